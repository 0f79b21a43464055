"""A size and CRC-32 for every file of a checkpoint, recorded when written and verified when read.

CRC-32 (zlib's, the IEEE polynomial) is what this machine's Python has built in; it runs at about
2.8 GB/s on one core here (CRC-32C would need an extra package). It catches flipped bits and
truncation, which is what it is for: a damaged download or disk, not an adversary. Files are read
through one reused buffer, so verifying costs no memory beyond it.
"""

from __future__ import annotations

import os
import zlib
from typing import Iterable, Mapping

from mla_jax.staging import CheckpointError

ALGORITHM = "crc32"
_CHUNK = 16 << 20


def file_crc32(path: str, buffer: bytearray | None = None) -> tuple[int, int]:
    """(size in bytes, CRC-32) of one file."""
    buffer = buffer if buffer is not None else bytearray(_CHUNK)
    view = memoryview(buffer)
    crc, size = 0, 0
    with open(path, "rb", buffering=0) as f:
        while True:
            got = f.readinto(view)
            if not got:
                return size, crc
            crc = zlib.crc32(view[:got], crc)
            size += got


def files_under(root: str, subdir: str = "") -> list[str]:
    """Paths (relative to `root`, '/'-separated) of every file under `root/subdir`, sorted."""
    out = []
    for directory, _, files in os.walk(os.path.join(root, subdir)):
        for name in files:
            out.append(os.path.relpath(os.path.join(directory, name), root).replace(os.sep, "/"))
    return sorted(out)


def record(root: str, relpaths: Iterable[str]) -> dict[str, dict]:
    """{relpath: {"size", "crc32"}} for the given files under `root`."""
    buffer = bytearray(_CHUNK)
    out = {}
    for rel in relpaths:
        size, crc = file_crc32(os.path.join(root, rel), buffer)
        out[rel] = {"size": size, ALGORITHM: crc}
    return out


def check_present(root: str, files: Mapping[str, Mapping], relpaths: Iterable[str]) -> None:
    """Cheap check (no reading): every listed file exists with its recorded size."""
    for rel in relpaths:
        path = os.path.join(root, rel)
        try:
            size = os.path.getsize(path)
        except FileNotFoundError:
            raise CheckpointError(f"{path}: missing; the checkpoint is damaged (restore or re-create it)") from None
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        if size != files[rel]["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes but {files[rel]['size']} were written (truncated or damaged); "
                "restore or re-create the checkpoint"
            )


def verify(root: str, files: Mapping[str, Mapping], relpaths: Iterable[str]) -> None:
    """Every listed file exists with its recorded size and CRC-32, else CheckpointError naming it."""
    relpaths = list(relpaths)
    check_present(root, files, relpaths)
    buffer = bytearray(_CHUNK)
    for rel in relpaths:
        path = os.path.join(root, rel)
        try:
            size, crc = file_crc32(path, buffer)
        except OSError as e:
            raise CheckpointError(f"{path}: cannot be read ({e.strerror or e})") from None
        if size != files[rel]["size"] or crc != files[rel][ALGORITHM]:
            raise CheckpointError(
                f"{path}: checksum mismatch (CRC-32 {crc:08x}, recorded {files[rel][ALGORITHM]:08x}); the file "
                "is damaged: restore or re-create the checkpoint"
            )
