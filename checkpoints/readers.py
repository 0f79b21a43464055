"""Hub tensors of a downloaded model directory, by name, each read only when asked for.

`open_source(directory)` finds the weights: `model.safetensors.index.json` and its shards, loose
`*.safetensors` (single or `-NNNNN-of-NNNNN` shards), `pytorch_model*.bin` (with or without its
index) or a `*.pt` / `*.pth` state dict. Every file is checked before any tensor is read: missing
shards, an index naming a missing file or a tensor its shard lacks, truncated or corrupt files,
the same tensor in two files. Fused expert tensors that transformers keeps in memory
(`mlp.experts.gate_up_proj` [E,2F,D], `mlp.experts.down_proj` [E,D,F]) are offered under the
per-expert names the hub uses, as views that read only that expert's rows. `Prefetcher` reads
ahead on a background thread in the order the converter will ask.
"""

from __future__ import annotations

import dataclasses
import glob
import json
import os
import queue
import re
import threading
from typing import Callable

import ml_dtypes
import numpy as np

from checkpoints import names
from checkpoints import safetensors_io as st
from mla_jax.store import CheckpointError

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<i>\d+)-of-(?P<n>\d+)\.(?P<ext>safetensors|bin)$")


@dataclasses.dataclass(frozen=True)
class Ref:
    """One readable hub tensor: where it is, what it is, and how to read it."""

    name: str
    file: str
    dtype: np.dtype
    shape: tuple[int, ...]
    read: Callable[[], np.ndarray]
    # For a 3-D tensor: (i, lo, hi) -> tensor[i, lo:hi], reading only those bytes
    rows: Callable[[int, int, int], np.ndarray] | None = None
    # Reads into the front of a caller's uint8 buffer and returns a view of it
    read_into: Callable[[np.ndarray], np.ndarray] | None = None

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class Source:
    """The hub tensors of one directory: `refs[name]` describes each; `read(name)` loads it."""

    def __init__(self, directory: str, refs: dict[str, Ref], kind: str):
        self.directory, self.refs, self.kind = directory, refs, kind

    def read(self, name: str, scratch: "Scratch | None" = None) -> np.ndarray:
        """The tensor; with `scratch`, possibly a view of its buffer, valid until its next use."""
        ref = self.refs[name]
        if scratch is not None and ref.read_into is not None and ref.nbytes <= scratch.limit:
            array = ref.read_into(scratch.buffer(ref.nbytes))
        else:
            array = ref.read()
        if array.dtype != ref.dtype or tuple(array.shape) != ref.shape:
            raise CheckpointError(
                f"{ref.file}: tensor {name!r} read as {array.dtype}{list(array.shape)}, header says {ref.dtype}{list(ref.shape)}"
            )
        return array


class Scratch:
    """One reusable read buffer for tensors up to `limit` bytes.

    Fresh memory costs a page fault per page on first touch, which on some machines is slower than
    the disk; reading each expert's weight into the same warm buffer avoids that for most bytes.
    """

    def __init__(self, limit: int = 64 << 20):
        self.limit = limit
        self._buffer = np.empty(0, np.uint8)

    def buffer(self, nbytes: int) -> np.ndarray:
        if self._buffer.size < nbytes:
            self._buffer = np.empty(nbytes, np.uint8)
        return self._buffer[:nbytes]


class Prefetcher:
    """Reads tensors in a known order on a background thread, up to `depth` ahead of the consumer.

    Reading (disk, page faults, FP8 dequantization) then overlaps the consumer's transposes.
    Tensors up to `limit` bytes land in a small pool of reused buffers, so what `get` returns is valid
    only until the next `get`; bigger ones are fresh arrays. Use as a context manager.
    """

    def __init__(self, source: Source, order: list[str], *, depth: int = 2, limit: int = 32 << 20):
        self._source, self._order = source, list(order)
        self._ready: queue.Queue = queue.Queue(maxsize=depth)
        self._free: queue.Queue = queue.Queue()
        for _ in range(depth + 2):  # depth queued + one being filled + one lent to the consumer
            self._free.put(Scratch(limit))
        self._lent: Scratch | None = None
        self._next = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="mla-jax-prefetch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        for name in self._order:
            try:
                scratch = self._wait(self._free)
                if scratch is None:
                    return
                item = (name, self._source.read(name, scratch), scratch)
            except BaseException as e:  # handed to the consumer, raised there
                item = (name, e, None)
            while not self._stop.is_set():
                try:
                    self._ready.put(item, timeout=0.1)
                    break
                except queue.Full:
                    continue
            if isinstance(item[1], BaseException):
                return

    def _wait(self, q: queue.Queue):
        while not self._stop.is_set():
            try:
                return q.get(timeout=0.1)
            except queue.Empty:
                continue
        return None

    def get(self, name: str) -> np.ndarray:
        if self._lent is not None:  # the previous tensor's buffer may be refilled now
            self._free.put(self._lent)
            self._lent = None
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise AssertionError(f"prefetch order broken: asked for {name!r}, next planned is {expected!r}")
        self._next += 1
        got, array, scratch = self._ready.get()
        if isinstance(array, BaseException):
            raise array
        self._lent = scratch
        return array

    def close(self) -> None:
        self._stop.set()
        self._thread.join()

    def __enter__(self) -> "Prefetcher":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_source(directory: str | os.PathLike) -> Source:
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        raise CheckpointError(f"{directory}: no such directory (expected a Hugging Face model directory)")
    if os.path.exists(os.path.join(directory, SAFETENSORS_INDEX)):
        return _unfuse(Source(directory, _safetensors_refs(directory, _indexed_files(directory, SAFETENSORS_INDEX)), "safetensors"))
    files = sorted(glob.glob(os.path.join(directory, "*.safetensors")))
    if files:
        _check_shard_set(directory, files)
        return _unfuse(Source(directory, _safetensors_refs(directory, {f: None for f in files}), "safetensors"))
    if os.path.exists(os.path.join(directory, TORCH_INDEX)):
        return _unfuse(Source(directory, _torch_refs(_indexed_files(directory, TORCH_INDEX)), "torch"))
    files = sorted(
        f for pattern in ("pytorch_model*.bin", "*.pt", "*.pth") for f in glob.glob(os.path.join(directory, pattern))
    )
    if files:
        _check_shard_set(directory, files)
        return _unfuse(Source(directory, _torch_refs({f: None for f in files}), "torch"))
    raise CheckpointError(
        f"{directory}: no weights found (expected {SAFETENSORS_INDEX}, *.safetensors, pytorch_model*.bin or *.pt)"
    )


# ------------------------------------------------------------------------------- file discovery
def _indexed_files(directory: str, index_name: str) -> dict[str, set[str]]:
    """{shard path: names the index puts there}, every shard checked to exist."""
    index_path = os.path.join(directory, index_name)
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
        if not isinstance(weight_map, dict):
            raise TypeError
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index_path}: not a valid index (expected JSON with a 'weight_map' object): {e}") from None
    files: dict[str, set[str]] = {}
    for name, shard in weight_map.items():
        files.setdefault(os.path.join(directory, shard), set()).add(name)
    for path, names_there in files.items():
        if not os.path.isfile(path):
            raise CheckpointError(
                f"{index_path} maps {len(names_there)} tensor(s) (e.g. {sorted(names_there)[0]!r}) to "
                f"{os.path.basename(path)}, which is missing from {directory}"
            )
    return files


def _check_shard_set(directory: str, files: list[str]) -> None:
    """Shards named stem-0000i-of-0000n must all be there, 1..n."""
    groups: dict[tuple[str, str, str], set[int]] = {}
    for f in files:
        m = _SHARD.match(os.path.basename(f))
        if m:
            groups.setdefault((m["stem"], m["ext"], m["n"]), set()).add(int(m["i"]))
    for (stem, ext, n), have in groups.items():
        width = len(n)  # hub shards are zero-padded to the width of the count
        missing = [f"{stem}-{i:0{width}d}-of-{n}.{ext}" for i in range(1, int(n) + 1) if i not in have]
        if missing:
            raise CheckpointError(f"{directory}: missing shard(s) {missing} of {int(n)}")


# ------------------------------------------------------------------------------- safetensors
def _safetensors_refs(directory: str, files: dict[str, set[str] | None]) -> dict[str, Ref]:
    refs: dict[str, Ref] = {}
    for path, indexed in files.items():
        try:
            header = st.read_header(path)
        except st.SafetensorsError as e:
            raise CheckpointError(str(e)) from None
        if indexed is not None:
            absent = sorted(indexed - header.keys())
            if absent:
                raise CheckpointError(
                    f"{os.path.join(directory, SAFETENSORS_INDEX)} puts tensor(s) {absent[:4]} in "
                    f"{os.path.basename(path)}, which does not hold them"
                )
            unlisted = sorted(header.keys() - indexed)
            if unlisted:
                raise CheckpointError(
                    f"{path} holds tensor(s) {unlisted[:4]} that {SAFETENSORS_INDEX} does not list (index and shards disagree)"
                )
        for name, info in header.items():
            _add(refs, Ref(name, path, info.dtype, info.shape, lambda info=info: st.read_tensor(info),
                           lambda i, lo, hi, info=info: st.read_tensor(_sub_block(info, i, lo, hi)),
                           lambda buffer, info=info: st.read_tensor(info, buffer)))
    return refs


def _sub_block(info: st.TensorInfo, i: int, lo: int, hi: int) -> st.TensorInfo:
    """tensor[i, lo:hi] of a 3-D tensor, which is one contiguous run of bytes."""
    _, rows, cols = info.shape
    offset = info.offset + ((i * rows + lo) * cols) * info.dtype.itemsize
    return st.TensorInfo(info.file, f"{info.name}[{i}, {lo}:{hi}]", info.dtype, (hi - lo, cols), offset)


def _add(refs: dict[str, Ref], ref: Ref) -> None:
    if ref.name in refs:
        raise CheckpointError(f"tensor {ref.name!r} appears in both {refs[ref.name].file} and {ref.file}")
    refs[ref.name] = ref


# ------------------------------------------------------------------------------- torch
def _torch_refs(files: dict[str, set[str] | None]) -> dict[str, Ref]:
    try:
        import torch
    except ImportError:
        first = sorted(files)[0]
        raise CheckpointError(
            f"{first}: a PyTorch checkpoint, and reading it needs torch, which is not installed: "
            "`pip install torch` (the CPU build is enough), or convert it to safetensors first"
        ) from None

    refs: dict[str, Ref] = {}
    for path, indexed in files.items():
        try:
            try:  # zip-format files (torch >= 1.6) are memory-mapped: tensors are read when touched
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as e:
                if "mmap" not in str(e):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # torch raises many types for a damaged file
            first_line = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"{path}: cannot be read as a PyTorch state dict ({type(e).__name__}: {first_line})") from None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{path}: expected a flat state dict of tensors, found {type(state).__name__}")
        if indexed is not None and indexed - state.keys():
            raise CheckpointError(f"{TORCH_INDEX} puts tensor(s) {sorted(indexed - state.keys())[:4]} in {path}, which does not hold them")
        for name, tensor in state.items():
            dtype = _numpy_dtype(tensor.dtype, path, name)
            _add(refs, Ref(name, path, dtype, tuple(tensor.shape), lambda t=tensor: _torch_to_numpy(t),
                           lambda i, lo, hi, t=tensor: _torch_to_numpy(t[i, lo:hi])))
    return refs


def _torch_views():
    import torch

    # torch dtypes numpy lacks, read bit for bit through a same-width integer view
    return {
        torch.bfloat16: (torch.int16, ml_dtypes.bfloat16),
        torch.float8_e4m3fn: (torch.uint8, ml_dtypes.float8_e4m3fn),
        torch.float8_e5m2: (torch.uint8, ml_dtypes.float8_e5m2),
        getattr(torch, "float8_e8m0fnu", None): (torch.uint8, ml_dtypes.float8_e8m0fnu),
    }


def _numpy_dtype(torch_dtype, path: str, name: str) -> np.dtype:
    views = _torch_views()
    if torch_dtype in views:
        return np.dtype(views[torch_dtype][1])
    try:
        import torch

        return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)
    except TypeError:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {torch_dtype}, which has no numpy equivalent") from None


def _torch_to_numpy(tensor) -> np.ndarray:
    views = _torch_views()
    t = tensor.detach().contiguous()
    if t.dtype in views:
        int_dtype, np_dtype = views[t.dtype]
        return t.view(int_dtype).numpy().view(np_dtype).copy()
    return t.numpy().copy()


# ------------------------------------------------------------------------------- fused experts
def _unfuse(source: Source) -> Source:
    """Adds per-expert names for fused [E, ...] expert tensors (`names.split_fused`), drops the fused."""
    refs = dict(source.refs)
    for name, ref in source.refs.items():
        try:
            parts = names.split_fused(name, ref.shape)
        except ValueError as e:
            raise CheckpointError(f"{ref.file}: {e}") from None
        if parts is None:
            continue
        del refs[name]
        for part_name, expert, lo, hi in parts:
            _add(refs, Ref(part_name, ref.file, ref.dtype, (hi - lo, ref.shape[2]),
                           lambda ref=ref, e=expert, lo=lo, hi=hi: ref.rows(e, lo, hi)))
    return Source(source.directory, refs, source.kind)
