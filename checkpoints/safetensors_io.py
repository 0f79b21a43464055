"""The safetensors format read and written by hand, one tensor at a time, with errors that name the file.

Reading parses the header and then reads each tensor into a fresh (or a caller's) buffer when asked:
nothing is memory-mapped, so pages of tensors already converted never count towards the converter's resident
memory (file-backed mmap pages would, until the kernel needed them back). Every header is checked
against the file's real size, so a truncated or corrupt download is caught before conversion starts.
Writing streams tensors into a file whose header is planned up front from their shapes.

Format: u64 little-endian header length N, N bytes of JSON {name: {dtype, shape, data_offsets}},
then the data; offsets are relative to the end of the header.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "I64": np.dtype(np.int64), "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
CODES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 << 20  # the format's own limit


class SafetensorsError(ValueError):
    """A safetensors file that is truncated, corrupt, or not safetensors at all."""


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: str
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]
    offset: int  # absolute, in the file

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def read_header(path: str) -> dict[str, TensorInfo]:
    """{name: TensorInfo} of a safetensors file, validated against its size."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsError(f"{path}: truncated ({size} bytes), too short for a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > _MAX_HEADER or 8 + n > size:
            raise SafetensorsError(
                f"{path}: corrupt or truncated: header claims {n} bytes but the file has {size - 8} after the length"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (ValueError, UnicodeDecodeError) as e:
        raise SafetensorsError(f"{path}: corrupt safetensors header ({e})") from None
    header.pop("__metadata__", None)
    data_start, data_size = 8 + n, size - 8 - n
    out = {}
    for name, spec in header.items():
        try:
            dtype = DTYPES[spec["dtype"]]
            shape = tuple(int(d) for d in spec["shape"])
            begin, end = (int(x) for x in spec["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise SafetensorsError(f"{path}: corrupt header entry for tensor {name!r}: {spec!r}") from None
        if end - begin != math.prod(shape) * dtype.itemsize or begin < 0:
            raise SafetensorsError(
                f"{path}: tensor {name!r} has offsets {begin}..{end} ({end - begin} bytes) but "
                f"{spec['dtype']}{list(shape)} needs {math.prod(shape) * dtype.itemsize} bytes (corrupt header)"
            )
        if end > data_size:
            raise SafetensorsError(
                f"{path}: truncated: tensor {name!r} ends at byte {data_start + end} but the file has {size} bytes"
            )
        out[name] = TensorInfo(path, name, dtype, shape, data_start + begin)
    return out


def read_tensor(info: TensorInfo, buffer: np.ndarray | None = None) -> np.ndarray:
    """The tensor's bytes, read into a fresh array (no mapping kept), or into the front of `buffer`
    (uint8, at least info.nbytes long), which the result then views."""
    if buffer is None:
        out = np.empty(info.shape, info.dtype)
    else:
        out = buffer[: info.nbytes].view(info.dtype).reshape(info.shape)
    view = memoryview(out.reshape(-1).view(np.uint8))
    with open(info.file, "rb", buffering=0) as f:
        f.seek(info.offset)
        done = 0
        while done < info.nbytes:
            got = f.readinto(view[done:])
            if not got:
                raise SafetensorsError(f"{info.file}: truncated while reading tensor {info.name!r}")
            done += got
    return out


def write_file(path: str, specs: Iterable[tuple[str, np.dtype, tuple[int, ...]]], arrays: Iterable[np.ndarray],
               metadata: Mapping[str, str] | None = None) -> None:
    """Writes tensors in `specs` order; `arrays` yields each one as it is ready (checked against its spec)."""
    specs = [(name, np.dtype(dtype), tuple(shape)) for name, dtype, shape in specs]
    header: dict = {"__metadata__": dict(metadata or {"format": "pt"})}
    offset = 0
    for name, dtype, shape in specs:
        nbytes = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": CODES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the reference writer does
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        count = 0
        for (name, dtype, shape), array in zip(specs, arrays):
            if array.dtype != dtype or tuple(array.shape) != shape:
                raise ValueError(f"{path}: tensor {name!r} is {array.dtype}{list(array.shape)}, planned {dtype}{list(shape)}")
            f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
            count += 1
        if count != len(specs):
            raise ValueError(f"{path}: {len(specs)} tensors planned, {count} written")


def save_file(path: str, tensors: Mapping[str, np.ndarray], metadata: Mapping[str, str] | None = None) -> None:
    """All of `tensors` (numpy, any dtype above) into one file."""
    write_file(path, [(k, v.dtype, v.shape) for k, v in tensors.items()], tensors.values(), metadata)
