"""`mla-jax convert` and `mla-jax export`: argument parsing around checkpoints.convert / .export.

Errors (CheckpointError, ConfigError, ...), Ctrl-C and SIGTERM reach the one boundary in `mla_jax.cli`;
convert and export clean up after themselves before they get there. The progress bar is drawn only
on a terminal, so logs and pipes get the result line alone.
"""

from __future__ import annotations

import argparse
import math
import sys

DTYPES = ("bfloat16", "float32")


def positive_gb(text: str) -> float:
    """An argparse type: a finite size in GB above zero."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a size in GB, got {text!r}") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"expected a size in GB above 0, got {text}")
    return value


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "convert", help="Hugging Face / PyTorch DeepSeek directory -> mla-jax checkpoint (streaming)",
        description="Convert a Hugging Face DeepSeek model directory (safetensors, sharded or not, FP8 "
                    "or not; or pytorch_model*.bin / *.pt) into an mla-jax orbax checkpoint.",
    )
    p.add_argument("src", help="model directory with config.json and weights")
    p.add_argument("dst", help="checkpoint directory to create")
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="stored weight dtype (default bfloat16)")
    p.add_argument("--weights", choices=("fp8", "int8"), default=None,
                   help="keep the projections quantized: fp8 keeps a DeepSeek FP8 release's weights and block "
                        "scales as released; int8 quantizes a bfloat16/float32 model per output channel "
                        "(default: every weight in --dtype)")
    p.add_argument("--keep-mtp", action="store_true", help="also keep the multi-token-prediction layer")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is an mla-jax checkpoint")
    p.set_defaults(func=_convert)

    p = subparsers.add_parser(
        "export", help="mla-jax checkpoint -> Hugging Face directory (safetensors + config.json)",
        description="Write an mla-jax checkpoint back as a Hugging Face directory that transformers loads.",
    )
    p.add_argument("ckpt", help="mla-jax checkpoint directory")
    p.add_argument("dst", help="Hugging Face directory to create")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="cast every tensor (default: as stored)")
    p.add_argument("--max-shard-gb", type=positive_gb, default=5.0, help="largest safetensors shard (default 5)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it is an earlier mla-jax export")
    p.set_defaults(func=_export)


def _convert(args) -> int:
    from checkpoints.convert import convert

    r = convert(args.src, args.dst, dtype=args.dtype, keep_mtp=args.keep_mtp, overwrite=args.overwrite,
                progress=sys.stderr.isatty(), weights=args.weights)
    mtp = f", {r.mtp_tensors} MTP tensors kept" if r.mtp_tensors else ""
    print(f"wrote {r.dst}: {r.tensors} tensors, {_size(r.bytes_read)} read in {r.seconds:.1f} s "
          f"({_size(r.bytes_read / max(r.seconds, 1e-9))}/s){mtp}")
    return 0


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes:.0f} B"


def _export(args) -> int:
    from checkpoints.export import export

    dst = export(args.ckpt, args.dst, dtype=args.dtype, overwrite=args.overwrite,
                 max_shard_bytes=max(1, int(args.max_shard_gb * 2**30)), progress=sys.stderr.isatty())
    print(f"wrote {dst}")
    return 0
