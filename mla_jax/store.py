"""The on-disk layout of an mla-jax checkpoint, written in bounded memory and published atomically.

A checkpoint directory holds:
  config.json     the model's hub-style config (`Config.to_hf()`); written last, so a directory that
                  has it is complete
  mla_jax.json    the layout: format version, dtype, and for every orbax item the variables it holds
                  (path, shape, dtype)
  state/part_NNNNN/  orbax (StandardCheckpointer) items, each a nested dict of a few whole variables
  tokenizer files copied along, when given

Variables go to disk in parts of about `part_bytes` as soon as they are ready, so a converter or a
saver never holds more than a part or two in host memory; a reader restores part by part straight
into device arrays. Everything is written into a hidden sibling directory that is renamed into place
only when complete: an interrupted run leaves nothing that looks like a checkpoint.

The converter (`checkpoints.convert`), `mla_jax.save` and `mla_jax.load` all go through
this file; nothing else knows the layout.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable, Iterator, Mapping

import jax
import numpy as np

FORMAT = "mla-jax-orbax"
VERSION = 1
LAYOUT_FILE = "mla_jax.json"
CONFIG_FILE = "config.json"
STATE_DIR = "state"
# Written beside the weights when present at the source: what generation needs to tokenize.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
    "generation_config.json",
)
DEFAULT_PART_BYTES = 128 << 20

Path = tuple  # ("layers", 0, "self_attn", "q_b_proj", "kernel"); ("mtp", "<hub name>") for extras


class CheckpointError(ValueError):
    """A checkpoint (or its destination) that cannot be read or written as asked."""


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


# ---------------------------------------------------------------------------------------- writing
class Writer:
    """Streams variables into a new checkpoint at `dst`; `commit()` publishes it atomically.

    Use as a context manager: leaving the block by an exception removes the partial directory.
    """

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False, part_bytes: int = DEFAULT_PART_BYTES):
        self.stage = Staging(dst, overwrite=overwrite)
        self.part_bytes = part_bytes
        os.makedirs(os.path.join(self.stage.tmp, STATE_DIR))
        self._checkpointer = _saver()
        self._pending: dict[Path, Any] = {}
        self._pending_bytes = 0
        self._items: list[dict] = []
        self._seen: set[Path] = set()
        self._committed = False

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None or not self._committed:
            self.abort()
        return False

    def add(self, path: Path, array) -> None:
        """Queue one whole variable (numpy or jax array); a full part goes to disk first.

        The array is written in the background without a defensive copy: never modify it afterwards.
        """
        path = tuple(path)
        if path in self._seen:
            raise CheckpointError(f"variable {path_name(path)} written twice")
        self._seen.add(path)
        nbytes = int(np.prod(array.shape)) * np.dtype(array.dtype).itemsize
        if self._pending and self._pending_bytes + nbytes > self.part_bytes:
            self.flush()  # so a part never exceeds max(part_bytes, one variable)
        self._pending[path] = array
        self._pending_bytes += nbytes
        if self._pending_bytes >= self.part_bytes:
            self.flush()  # now, so the caller can drop its reference before building the next

    def flush(self) -> None:
        if not self._pending:
            return
        name = f"part_{len(self._items):05d}"
        variables = [
            {"path": list(p), "shape": list(a.shape), "dtype": np.dtype(a.dtype).name} for p, a in self._pending.items()
        ]
        # Async: this part is written while the caller reads the next one; orbax finishes the
        # previous save before starting a new one, so at most two parts are alive.
        import orbax.checkpoint as ocp

        self._checkpointer.save(os.path.join(self.stage.tmp, STATE_DIR, name), args=ocp.args.PyTreeSave(_nest(self._pending)))
        self._items.append({"dir": name, "variables": variables})
        self._pending, self._pending_bytes = {}, 0

    def commit(self, config_json: Mapping[str, Any], *, dtype: str, tokenizer_from: str | os.PathLike | None = None,
               extra: Mapping[str, Any] | None = None) -> str:
        """Finish the writes, add the layout, tokenizer and config.json, and rename into place."""
        self.flush()
        self._checkpointer.wait_until_finished()
        self._checkpointer.close()
        layout = {"format": FORMAT, "version": VERSION, "dtype": dtype, "items": self._items, **(extra or {})}
        write_json(os.path.join(self.stage.tmp, LAYOUT_FILE), layout)
        if tokenizer_from is not None:
            copy_tokenizer(tokenizer_from, self.stage.tmp)
        write_json(os.path.join(self.stage.tmp, CONFIG_FILE), dict(config_json))  # the completeness marker
        dst = self.stage.publish()
        self._committed = True
        return dst

    def abort(self) -> None:
        try:
            self._checkpointer.close()
        except Exception:  # the original error matters more than a failure to close
            pass
        self.stage.discard()


class Staging:
    """A hidden sibling `.NAME.tmp-PID` of `dst` to fill, then rename onto `dst` in one step."""

    def __init__(self, dst: str | os.PathLike, *, overwrite: bool = False):
        self.dst = os.path.abspath(os.fspath(dst))
        self.overwrite = overwrite
        check_destination(self.dst, overwrite)
        parent, name = os.path.split(self.dst)
        self.tmp = os.path.join(parent, f".{name}.tmp-{os.getpid()}")
        try:
            os.makedirs(parent, exist_ok=True)
            if os.path.exists(self.tmp):  # left by a killed run that had our pid: never a checkpoint
                shutil.rmtree(self.tmp)
            os.makedirs(self.tmp)
        except OSError as e:
            raise CheckpointError(f"destination {self.dst}: cannot write in {parent} ({e.strerror or e})") from None

    def publish(self) -> str:
        publish(self.tmp, self.dst, self.overwrite)
        return self.dst

    def discard(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


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
        (np.ndarray, type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, type_handlers.get_type_handler(jax.Array)),
    )
    handler = ocp.PyTreeCheckpointHandler(type_handler_registry=registry, use_compression=False)
    return ocp.AsyncCheckpointer(handler)


def check_destination(dst: str, overwrite: bool) -> None:
    """Refuses an existing destination (unless overwrite) and one whose parent cannot be written."""
    if os.path.lexists(dst) and not overwrite:
        raise CheckpointError(f"destination {dst} already exists; pass --overwrite (overwrite=True) to replace it")
    parent = os.path.dirname(dst)
    existing = parent
    while existing and not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if existing and not os.path.isdir(existing):
        raise CheckpointError(f"destination {dst} is not writable: {existing} is a file, not a directory")
    if existing and not os.access(existing, os.W_OK | os.X_OK):
        raise CheckpointError(f"destination {dst} is not writable: no write permission on {existing}")


def publish(tmp: str, dst: str, overwrite: bool) -> None:
    """Renames the finished `tmp` onto `dst`; an old `dst` is moved aside first, then deleted."""
    old = None
    if os.path.lexists(dst):
        if not overwrite:
            raise CheckpointError(f"destination {dst} appeared while writing; the new checkpoint is left at {tmp}")
        old = f"{tmp}.old"
        os.rename(dst, old)
    os.rename(tmp, dst)
    if old is not None:
        if os.path.isdir(old) and not os.path.islink(old):
            shutil.rmtree(old)
        else:
            os.remove(old)


def copy_tokenizer(src: str | os.PathLike, dst_dir: str) -> list[str]:
    src = os.fspath(src)
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
    """The layout of a complete checkpoint directory, validated."""
    path = os.fspath(path)
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
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{layout_file}: not valid JSON ({e})") from None
    if layout.get("format") != FORMAT or layout.get("version") != VERSION:
        raise CheckpointError(
            f"{layout_file}: format {layout.get('format')!r} version {layout.get('version')!r}; "
            f"expected {FORMAT!r} version {VERSION}"
        )
    for item in layout["items"]:
        if not os.path.isdir(os.path.join(path, STATE_DIR, item["dir"])):
            raise CheckpointError(f"{path}: item {STATE_DIR}/{item['dir']} listed in {LAYOUT_FILE} is missing")
    return layout


def dtype_named(name: str) -> np.dtype:
    """A dtype from its numpy name, bfloat16 included (numpy knows it only as an ml_dtypes type)."""
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


def stored_variables(layout: Mapping) -> dict[Path, tuple[tuple[int, ...], str]]:
    """{path: (shape, dtype name)} of every stored variable."""
    return {
        tuple(v["path"]): (tuple(v["shape"]), v["dtype"]) for item in layout["items"] for v in item["variables"]
    }


def restore(path: str | os.PathLike, layout: Mapping, targets: Mapping[Path, jax.ShapeDtypeStruct]
            ) -> Iterator[tuple[Path, Any]]:
    """Yields (path, array) for the variables in `targets`, part by part, nothing else held.

    A target with a sharding comes back as a jax.Array laid out on its devices (each device reads
    only its shard); one without comes back as a numpy array. Dtypes are cast by orbax on reading.
    """
    import orbax.checkpoint as ocp

    checkpointer = ocp.StandardCheckpointer()
    try:
        for item in layout["items"]:
            wanted = [tuple(v["path"]) for v in item["variables"] if tuple(v["path"]) in targets]
            if not wanted:
                continue
            # orbax restores whole trees: a variable not asked for (an MTP tensor, were it to share a
            # part) is read too, as a host array of its stored shape, and dropped.
            tree = _nest({
                tuple(v["path"]): targets[tuple(v["path"])] if tuple(v["path"]) in targets
                else jax.ShapeDtypeStruct(tuple(v["shape"]), dtype_named(v["dtype"]))
                for v in item["variables"]
            })
            # orbax refuses relative paths ("Checkpoint path should be absolute")
            directory = os.path.join(os.path.abspath(os.fspath(path)), STATE_DIR, item["dir"])
            restored = checkpointer.restore(directory, tree)
            yield from _leaves(restored, wanted)
    finally:
        checkpointer.close()
