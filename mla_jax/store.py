"""The on-disk layout of an mla-jax checkpoint, written in bounded memory and published atomically.

A checkpoint directory holds:
  config.json     the model's hub-style config (`Config.to_hf()`); written last, so a directory that
                  has it is complete
  mla_jax.json    the layout: format version, dtype, for every orbax item the variables it holds
                  (path, shape, dtype), and every weight file's size and CRC-32 ("files"; config
                  and tokenizer files are left out: users edit them, and parsing checks them)
  state/part_NNNNN/  orbax (StandardCheckpointer) items, each a nested dict of a few whole variables
  tokenizer files copied along, when given

Variables go to disk in parts of about `part_bytes` as soon as they are ready, so a converter or a
saver never holds more than a part or two in host memory; a reader restores part by part straight
into device arrays. Everything is written into a hidden sibling directory that is renamed into place
only when complete: an interrupted run leaves nothing that looks like a checkpoint (destination
rules, interrupts and disk-full errors: `mla_jax.staging`).

Reading verifies every weight file against its recorded checksum before orbax sees it (a part is checked
on a helper thread while the previous one is restored); a damaged, truncated or missing file is a
CheckpointError naming it. Version 1 checkpoints (written before checksums were recorded) are still
read, unverified, with a warning.

The converter (`checkpoints.convert`), `mla_jax.save` and `mla_jax.load` all go through
this file; nothing else knows the layout.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import json
import math
import os
import re
import shutil
import warnings
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

from mla_jax import checksums
from mla_jax.staging import (  # noqa: F401  (re-exported: the checkpoint code's one error type and rules)
    CheckpointError, DeferredSignals, Kind, Staging, check_destination, check_separate, json_field_is,
    quiet_orbax_errors, temporary_path, user_path, write_errors,
)

FORMAT = "mla-jax-orbax"
VERSION = 2  # 2: "files" records every file's size and CRC-32; 1 had none
READABLE_VERSIONS = (1, 2)
LAYOUT_FILE = "mla_jax.json"
CONFIG_FILE = "config.json"
STATE_DIR = "state"
# Written beside the weights when present at the source: what generation needs to tokenize.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json",
)
DEFAULT_PART_BYTES = 128 << 20
# Storage chunk bound: a reader gets whole chunks, so a device restoring its shard of a bigger array
# reads the chunks its shard overlaps, not the array (`chunk_shape`).
DEFAULT_CHUNK_BYTES = 16 << 20
ALIGNED_SPLITS = 8  # pieces per split dimension worth cutting for (`chunk_shape`)

Path = tuple  # ("layers", 0, "self_attn", "q_b_proj", "kernel"); ("mtp", "<hub name>") for extras


def path_name(path: Path) -> str:
    return ".".join(map(str, path))


def _nest(flat: Mapping[Path, Any]) -> dict:
    """{path: leaf} -> nested dict with string keys (orbax's tree), one level per path element."""
    tree: dict = {}
    for path, leaf in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(str(key), {})
        node[str(path[-1])] = leaf
    return tree


def _leaves(tree: Mapping, paths: Iterable[Path]) -> Iterator[tuple[Path, Any]]:
    for path in paths:
        node = tree
        for key in path:
            node = node[str(key)]
        yield path, node


# ---------------------------------------------------------------------------------------- chunks
def chunk_shape(path: Path, shape: tuple[int, ...], itemsize: int, max_bytes: int) -> tuple[int, ...]:
    """How a variable is cut into storage chunks of at most `max_bytes` (when its dimensions allow).

    tensorstore reads whole chunks, so a restore onto a mesh reads, per device, every chunk its
    shard overlaps. The chunks are therefore cut along the dimensions some preset of the
    logical-axis table splits (`mla_jax.parallel.rules`: experts, embed, heads, hidden, vocab),
    halving each in turn until within `max_bytes`, and then on, while chunks stay above
    max_bytes / 16, until each such dimension is in `ALIGNED_SPLITS` pieces: a split of up to 8
    ways (one host's GPUs) then reads whole chunks of its own only, whichever preset made it.
    Arrays within max_bytes / 16 stay one chunk (norms, biases, a tiny model's weights). Names
    the table does not know (MTP extras) are halved along their largest dimensions.
    """
    from mla_jax.parallel.rules import PRESETS, param_axes

    split_somewhere = {axis for axes in PRESETS.values() for axis in axes}
    shape = tuple(max(1, int(d)) for d in shape)
    chunk = list(shape)
    try:
        logical = param_axes(path_name(path), len(chunk)) if path and path[0] != "mtp" else (None,) * len(chunk)
    except ValueError:  # stored in another rank than the model holds it (quantized forms): no table entry
        logical = (None,) * len(chunk)
    preferred = [d for d, axis in enumerate(logical) if axis in split_somewhere]
    nbytes = lambda: math.prod(chunk) * itemsize
    turn = 0
    while nbytes() > max_bytes:
        even = [d for d in preferred if chunk[d] % 2 == 0]
        if even:
            d = even[turn % len(even)]
            turn += 1
        else:
            rest = [d for d in range(len(chunk)) if chunk[d] % 2 == 0]
            if not rest:
                break  # odd sizes everywhere: the array stays in bigger chunks
            d = max(rest, key=lambda i: chunk[i])
        chunk[d] //= 2
    while nbytes() // 2 >= max_bytes // 16:
        short = [d for d in preferred if chunk[d] % 2 == 0 and shape[d] // chunk[d] < ALIGNED_SPLITS]
        if not short:
            break
        d = short[turn % len(short)]
        turn += 1
        chunk[d] //= 2
    return tuple(chunk)


class _Chunked(np.ndarray):
    """A host array (a view, no copy) carrying the chunk shape it is to be stored with."""

    chunks: tuple[int, ...] | None = None


def _with_chunks(array: np.ndarray, chunks: tuple[int, ...]) -> np.ndarray:
    if tuple(chunks) == tuple(array.shape):
        return array
    view = array.view(_Chunked)
    view.chunks = tuple(chunks)
    return view


# ---------------------------------------------------------------------------------------- writing
def is_checkpoint(path: str) -> bool:
    """A directory whose mla_jax.json says it is our layout: what `overwrite` may replace."""
    return json_field_is(path, LAYOUT_FILE, "format", FORMAT)


CHECKPOINT = Kind(f"an mla-jax checkpoint (no {LAYOUT_FILE} of format {FORMAT!r})", is_checkpoint)


class Writer:
    """Streams variables into a new checkpoint at `dst`; `commit()` publishes it atomically.

    Use as a context manager: leaving the block by an exception (KeyboardInterrupt included) waits
    for the writes in flight and removes the partial directory. `sources` are directories the
    destination must keep clear of (see `mla_jax.staging`).

    In a job of several processes (`jax.distributed`) every process makes the same Writer and adds
    the same variables: each writes the shards of the arrays it holds, through orbax, into the
    directory process 0 staged. Only process 0 checks the destination, records checksums, writes
    mla_jax.json / config.json / the tokenizer and publishes; the others never touch the staging
    directory's name, and `commit` returns in every process once the checkpoint is in place. The
    directory must be the same one for every process (a shared file system, as orbax requires).
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False, part_bytes: int = DEFAULT_PART_BYTES,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, sources=()):
        self.part_bytes = part_bytes
        self.chunk_bytes = chunk_bytes
        self._lead = jax.process_index() == 0
        self._jobwide = jax.process_count() > 1
        self.stage: Staging | None = None
        failed: BaseException | None = None
        if self._lead:
            try:
                self.stage = Staging(dst, overwrite=overwrite, kind=CHECKPOINT, sources=sources)
                with write_errors(self.stage.dst):
                    os.makedirs(os.path.join(self.stage.tmp, STATE_DIR))
            except BaseException as e:
                failed = e
                if self.stage is not None:
                    self.stage.discard()
        # every process learns where process 0 stages (its pid names the directory), or that it failed
        pid = _from_lead(os.getpid() if failed is None else -1) if self._jobwide else os.getpid()
        if failed is not None:
            raise failed
        if pid < 0:
            raise CheckpointError(f"{user_path(dst)}: process 0 could not start writing the checkpoint (its error says why)")
        self.dst = user_path(dst) if self.stage is None else self.stage.dst
        self.tmp = temporary_path(self.dst, pid)
        self._quiet = contextlib.ExitStack()
        try:
            self._quiet.enter_context(quiet_orbax_errors())
            self._checkpointer = _saver()
        except BaseException:
            self._quiet.close()
            if self.stage is not None:
                self.stage.discard()
            raise
        # Each finished part is checksummed on this thread while the next one is read and written.
        self._hasher = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mla-jax-checksum")
        self._sums: list[concurrent.futures.Future] = []
        self._unhashed: str | None = None
        self._pending: dict[Path, Any] = {}
        self._pending_bytes = 0
        self._items: list[dict] = []
        self._seen: set[Path] = set()
        self._committed = False

    def _check(self) -> None:
        if self.stage is not None:
            self.stage.check()

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._committed:
            self.abort(interrupted=exc_type is not None and issubclass(exc_type, KeyboardInterrupt))
        return False

    def add(self, path: Path, array) -> None:
        """Queue one whole variable (numpy or jax array); a full part goes to disk first.

        The array is written in the background without a defensive copy: never modify it afterwards.
        A host array, or a device array this process holds whole, is stored in `chunk_shape`
        chunks; an array split over several processes is written by each process for its own
        shards (orbax), in chunks that cut its shards down to `chunk_bytes`.
        """
        self._check()
        path = tuple(path)
        if path in self._seen:
            raise CheckpointError(f"variable {path_name(path)} written twice")
        self._seen.add(path)
        itemsize = np.dtype(array.dtype).itemsize
        if not isinstance(array, jax.Array) or array.is_fully_addressable:
            array = np.asarray(array)  # a device array: copied to the host now, as orbax would
            array = _with_chunks(array, chunk_shape(path, array.shape, itemsize, self.chunk_bytes))
        nbytes = int(np.prod(array.shape)) * itemsize
        if self._pending and self._pending_bytes + nbytes > self.part_bytes:
            self.flush()  # so a part never exceeds max(part_bytes, one variable)
        self._pending[path] = array
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.part_bytes:
            self.flush()  # now, so the caller can drop its reference before building the next

    def flush(self) -> None:
        self._check()
        if not self._pending:
            return
        name = f"part_{len(self._items):05d}"
        variables = [
            {"path": list(p), "shape": list(a.shape), "dtype": np.dtype(a.dtype).name} for p, a in self._pending.items()
        ]
        # Async: this part is written while the caller reads the next one; orbax finishes the
        # previous save before starting a new one, so at most two parts are alive.
        import orbax.checkpoint as ocp

        save_args = _nest({p: ocp.SaveArgs(chunk_byte_size=self.chunk_bytes if isinstance(a, jax.Array) else None)
                           for p, a in self._pending.items()})
        with write_errors(self.dst):
            self._checkpointer.save(os.path.join(self.tmp, STATE_DIR, name),
                                    args=ocp.args.PyTreeSave(_nest(self._pending), save_args=save_args))
        self._checksum_finished_part()  # the previous one: save() returns only once it is complete
        self._unhashed = name
        self._items.append({"dir": name, "variables": variables})
        self._pending, self._pending_bytes = {}, 0

    def _checksum_finished_part(self) -> None:
        if self._unhashed is not None:
            part = f"{STATE_DIR}/{self._unhashed}"
            self._sums.append(self._hasher.submit(
                lambda tmp=self.tmp: checksums.record(tmp, self._own_files(checksums.files_under(tmp, part)))))
        self._unhashed = None

    def _own_files(self, files: list[str]) -> list[str]:
        """The files this process checksums: in a job, those it wrote (orbax's `ocdbt.process_N/`),
        and process 0 everything else; so no process reads back another's shards."""
        if not self._jobwide:
            return files
        me = jax.process_index()
        writer = lambda rel: int(m[1]) if (m := _PROCESS_FILES.search(rel)) else 0
        return [rel for rel in files if writer(rel) == me]

    def commit(self, config_json: Mapping[str, Any], *, dtype: str, tokenizer_from: str | os.PathLike | None = None,
               extra: Mapping[str, Any] | None = None) -> str:
        """Finish the writes, add the layout (with every weight file's checksum), tokenizer and
        config.json, and rename into place."""
        self.flush()
        with write_errors(self.dst):
            self._checkpointer.wait_until_finished()  # in a job: every process's shards are written
            self._checkpointer.close()
        failed: BaseException | None = None
        files: dict | None = {}
        try:
            with write_errors(self.dst):
                self._checksum_finished_part()
                for done in self._sums:
                    files.update(done.result())
        except BaseException as e:
            failed, files = e, None
        if self._jobwide:  # every process's checksums, to process 0
            gathered = _gather_json(files)
            if self._lead and failed is None:
                broken = [p for p, f in enumerate(gathered) if f is None]
                if broken:
                    failed = CheckpointError(f"{self.dst}: process {broken[0]} could not checksum the files it wrote "
                                             "(its error says why)")
                files = {rel: entry for f in gathered if f for rel, entry in f.items()}
        if self._lead and failed is None:
            try:
                self._publish(files, config_json, dtype=dtype, tokenizer_from=tokenizer_from, extra=extra)
            except BaseException as e:
                failed = e
        if self._jobwide and _from_lead(0 if failed is None else 1) and failed is None:
            raise CheckpointError(f"{self.dst}: process 0 could not finish writing the checkpoint (its error says why)")
        if failed is not None:
            raise failed
        self._committed = True
        self._finish()
        return self.dst

    def _publish(self, files: dict, config_json, *, dtype, tokenizer_from, extra) -> None:
        with write_errors(self.dst):
            self._check()
            layout = {"format": FORMAT, "version": VERSION, "dtype": dtype, "items": self._items, **(extra or {}),
                      "files": dict(sorted(files.items()))}
            write_json(os.path.join(self.tmp, LAYOUT_FILE), layout)
            if tokenizer_from is not None:
                copy_tokenizer(tokenizer_from, self.tmp)
            write_json(os.path.join(self.tmp, CONFIG_FILE), dict(config_json))  # the completeness marker
        self.stage.publish()

    def abort(self, interrupted: bool = False) -> None:
        """Waits for writes in flight, then removes the partial directory (process 0)."""
        try:
            self._checkpointer.close()
        except Exception:  # the original error matters more than a failure to close
            pass
        self._finish()
        if self.stage is not None:
            self.stage.discard(interrupted=interrupted)

    def _finish(self) -> None:
        self._hasher.shutdown(wait=True, cancel_futures=True)
        self._quiet.close()


# orbax's per-process databases in a multi-process save: what process N wrote
_PROCESS_FILES = re.compile(r"(?:^|/)ocdbt\.process_(\d+)/")


def _gather_json(obj) -> list:
    """Every process's JSON-able `obj`, in process order, in every process (a collective)."""
    from jax.experimental import multihost_utils

    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.int64(data.size))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded))
    return [json.loads(rows[p, :int(n)].tobytes()) for p, n in enumerate(sizes)]


def _from_lead(value: int) -> int:
    """Process 0's `value`, in every process of the job (a collective: all must call it)."""
    from jax.experimental import multihost_utils

    return int(multihost_utils.broadcast_one_to_all(np.int32(value)))


def _saver():
    """An async orbax PyTree checkpointer that writes numpy arrays without copying them first.

    orbax's default numpy handler deep-copies every array before its background write, to guard
    against the caller mutating it; the writer hands over arrays it never touches again, so that
    copy would only double the peak memory of a conversion. Compression is off: zstd over float
    weights saves little space and costs CPU time and another buffer per array.
    """
    import orbax.checkpoint as ocp
    from orbax.checkpoint import type_handlers

    registry = type_handlers.create_type_handler_registry(
        (np.ndarray, _chunked_handler_class()(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    return ocp.AsyncCheckpointer(handler)


@functools.cache
def _chunked_handler_class():
    from orbax.checkpoint import type_handlers

    class ChunkedNumpyHandler(type_handlers.NumpyHandler):
        """orbax's numpy handler, storing a `_Chunked` array in its own chunk shape.

        orbax (0.12) offers only a byte bound whose greedy split ignores how the array will be
        sharded, so the zarr chunk grid of the write spec is set here, just before tensorstore
        creates the array; reading needs nothing special (the grid is in the array's metadata).
        """

        async def _open_and_write(self, value, tspec, ts_context):
            chunks = getattr(value, "chunks", None)
            if chunks is not None:
                spec = tspec
                while "metadata" not in spec and isinstance(spec.get("base"), dict):
                    spec = spec["base"]  # a dtype cast wraps the array's spec
                metadata = spec.get("metadata", {})
                if "chunks" not in metadata:
                    raise CheckpointError(f"orbax wrote a storage layout mla-jax does not know ({sorted(metadata)}); "
                                          "cannot set the chunk shape")
                metadata["chunks"] = list(chunks)
            await super()._open_and_write(value, tspec, ts_context)

    return ChunkedNumpyHandler


def copy_tokenizer(src: str | os.PathLike, dst_dir: str) -> list[str]:
    src = user_path(src)
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(src, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(dst_dir, name))
            copied.append(name)
    return copied


def write_json(path: str, obj) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------- reading
def read_layout(path: str | os.PathLike) -> dict:
    """The layout of a complete checkpoint directory, validated; every weight file must exist with
    its recorded size (a stat, no reading: `restore` verifies the checksums)."""
    path = user_path(path)
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint directory")
    layout_file = os.path.join(path, LAYOUT_FILE)
    if not os.path.isfile(os.path.join(path, CONFIG_FILE)) or not os.path.isfile(layout_file):
        raise CheckpointError(
            f"{path}: not a complete mla-jax checkpoint (expected {CONFIG_FILE} and {LAYOUT_FILE}); "
            "convert a Hugging Face directory with `mla-jax convert SRC DST`"
        )
    try:
        with open(layout_file) as f:
            layout = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{layout_file}: not valid JSON ({e})") from None
    if not isinstance(layout, dict) or layout.get("format") != FORMAT or layout.get("version") not in READABLE_VERSIONS:
        found = (layout.get("format"), layout.get("version")) if isinstance(layout, dict) else (None, None)
        raise CheckpointError(
            f"{layout_file}: format {found[0]!r} version {found[1]!r}; "
            f"expected {FORMAT!r} version {' or '.join(map(str, READABLE_VERSIONS))}"
        )
    for item in layout["items"]:
        if not os.path.isdir(os.path.join(path, STATE_DIR, item["dir"])):
            raise CheckpointError(f"{path}: item {STATE_DIR}/{item['dir']} listed in {LAYOUT_FILE} is missing")
    if layout["version"] == 1:
        warnings.warn(f"{path} was written before mla-jax recorded checksums (format version 1): it is read "
                      "without an integrity check; save or convert it again to add them", stacklevel=2)
        return layout
    files = layout.get("files")
    if not isinstance(files, dict) or (layout["items"] and not files):
        raise CheckpointError(f"{layout_file}: version {layout['version']} without its \"files\" checksums (damaged)")
    checksums.check_present(path, files, files)
    return layout


def _part_files(layout: Mapping, item: Mapping) -> list[str]:
    prefix = f"{STATE_DIR}/{item['dir']}/"
    return [rel for rel in layout.get("files", {}) if rel.startswith(prefix)]


def dtype_named(name: str) -> np.dtype:
    """A dtype from its numpy name, bfloat16 included (numpy knows it only as an ml_dtypes type)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def stored_variables(layout: Mapping) -> dict[Path, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype name)} of every stored variable."""
    return {
        tuple(v["path"]): (tuple(v["shape"]), v["dtype"]) for item in layout["items"] for v in item["variables"]
    }


# tensorstore's status codes for data it could not read (its errors arrive as ValueError)
_UNREADABLE = re.compile(r"^(NOT_FOUND|DATA_LOSS|OUT_OF_RANGE|FAILED_PRECONDITION|INVALID_ARGUMENT|UNKNOWN)\b")


def restore(path: str | os.PathLike, layout: Mapping, targets: Mapping[Path, jax.ShapeDtypeStruct], *,
            verify: bool = True) -> Iterator[tuple[Path, Any]]:
    """Yields (path, array) for the variables in `targets`, part by part, nothing else held.

    A target with a sharding comes back as a jax.Array laid out on its devices (each device reads
    the chunks its shard overlaps: `chunk_shape`); one without comes back as a numpy array. Dtypes
    are cast by orbax on reading. With `verify` (and checksums recorded), each part's files are
    checked before orbax reads them; the check of the next part runs while this one is restored,
    and leaves it in the page cache. In a job of several processes the files are verified once
    for the job, shared out among the processes (`_verify_shared`), before any is restored.
    """
    import orbax.checkpoint as ocp

    # orbax refuses relative paths ("Checkpoint path should be absolute")
    path = user_path(path)
    items = [item for item in layout["items"] if any(tuple(v["path"]) in targets for v in item["variables"])]
    files = layout.get("files", {})
    if verify and jax.process_count() > 1:
        _verify_shared(path, files, [rel for item in items for rel in _part_files(layout, item)])
        verify = False
    check = checksums.verify if verify else checksums.check_present
    checkpointer = ocp.StandardCheckpointer()
    checker = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="mla-jax-verify")
    checks = [checker.submit(check, path, files, _part_files(layout, item)) for item in items[:1]]
    try:
        for i, item in enumerate(items):
            if i + 1 < len(items):
                checks.append(checker.submit(check, path, files, _part_files(layout, items[i + 1])))
            checks[i].result()
            wanted = [tuple(v["path"]) for v in item["variables"] if tuple(v["path"]) in targets]
            # orbax restores whole trees: a variable not asked for (an MTP tensor, were it to share a
            # part) is read too, as a host array of its stored shape, and dropped.
            tree = _nest({
                tuple(v["path"]): targets[tuple(v["path"])] if tuple(v["path"]) in targets
                else jax.ShapeDtypeStruct(tuple(v["shape"]), dtype_named(v["dtype"]))
                for v in item["variables"]
            })
            directory = os.path.join(path, STATE_DIR, item["dir"])
            yield from _leaves(_restore_part(checkpointer, directory, tree), wanted)
    finally:
        checker.shutdown(wait=True, cancel_futures=True)
        checkpointer.close()


def _verify_shared(path: str, files: Mapping[str, Mapping], relpaths: list[str]) -> None:
    """Verifies `relpaths` once for the whole job: each process checks its share (by bytes), so no
    process reads the whole checkpoint to verify it; then every process raises if any found damage.

    A collective: every process of the job must call it with the same files.
    """
    from jax.experimental import multihost_utils

    n, me = jax.process_count(), jax.process_index()
    order = sorted(relpaths, key=lambda rel: (-files[rel]["size"], rel))  # the same in every process
    load, mine = [0] * n, []
    for index, rel in enumerate(order):  # biggest first, each to the least-loaded process
        owner = min(range(n), key=lambda p: (load[p], p))
        load[owner] += files[rel]["size"]
        if owner == me:
            mine.append(index)
    failed, bad = None, -1
    for index in mine:
        try:
            checksums.verify(path, files, [order[index]])
        except CheckpointError as e:
            failed, bad = e, index
            break
    found = np.asarray(multihost_utils.process_allgather(np.int32(bad))).ravel()
    if failed is not None:
        raise failed
    for process, index in enumerate(found):
        if index >= 0:
            raise CheckpointError(f"{os.path.join(path, order[index])}: damaged (process {process} found it "
                                  "verifying its checksum; its error says how): restore or re-create the checkpoint")


def _restore_part(checkpointer, directory: str, tree: dict) -> dict:
    """One orbax item; an interrupt waits until it is read, an unreadable file is one line."""
    signals = DeferredSignals()
    try:
        with quiet_orbax_errors():
            return checkpointer.restore(directory, tree)
    except Exception as e:
        cause = _unreadable_cause(e)
        if cause is None:
            raise
        raise CheckpointError(
            f"{directory}: cannot be read ({cause[:300]}); the checkpoint is damaged: restore or re-create it"
        ) from None
    finally:
        signals.restore()


def _unreadable_cause(exc: BaseException) -> str | None:
    """The first line of the OS or tensorstore read error behind `exc` (orbax wraps them), if any."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        first = (str(exc).strip().splitlines() or [""])[0]
        if isinstance(exc, OSError) or (isinstance(exc, ValueError) and _UNREADABLE.match(first)):
            return first
        exc = exc.__cause__ or exc.__context__
    return None
