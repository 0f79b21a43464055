"""`mla-jax plan`: argument parsing only (the work is `mla_jax.parallel.plan.plan`)."""

from __future__ import annotations

import argparse
import os

from mla_jax.cache import DEFAULT_PAGE_SIZE, DTYPES as CACHE_DTYPES


def register(subparsers) -> None:
    from mla_jax.parallel.plan import MESH_AXES, PENDING_FORMATS, WEIGHT_FORMATS

    p = subparsers.add_parser(
        "plan", help="will a model fit a GPU cluster? compiled for it without GPUs",
        description="Compile the decode step (and with --train the fine-tuning step) of a model for a cluster "
                    "of H100/H200 GPUs on this machine, without GPUs, and print per-device bytes (weights, "
                    "cache, optimizer state, XLA's temporaries), whether it fits, and the collectives per step.",
    )
    p.add_argument("model", help="a preset (deepseek-v2-lite, deepseek-v2, deepseek-v3), a config.json, or a "
                                 "directory holding one")
    p.add_argument("--gpus", required=True, help="[HOSTSx]GPUxCOUNT: h100x1, h200x8, 2xh200x8 (two hosts of 8)")
    p.add_argument("--weights", default="bf16", help=f"weights format: {', '.join(WEIGHT_FORMATS)}"
                                                     + (f" ({', '.join(PENDING_FORMATS)}: not yet)" if PENDING_FORMATS else ""))
    p.add_argument("--batch", type=int, default=32, help="sequences decoded together (rows per train step)")
    p.add_argument("--context", type=int, default=4096, help="cached tokens per sequence")
    p.add_argument("--mesh", default=None, help=f"AXIS=SIZE,...: presets {', '.join(MESH_AXES)} (e.g. expert=8 or "
                                                f"expert=4,tensor=2; see mla_jax/parallel/rules.py); default: proposed")
    p.add_argument("--train", action="store_true", help="also plan one full fine-tuning step (AdamW)")
    p.add_argument("--seq-len", type=int, default=None, help="tokens per training row (with --train)")
    p.add_argument("--remat", default="none", help="with --train: recompute in the backward pass (none, dots, "
                                                   "full; as finetune --remat)")
    p.add_argument("--no-compile", action="store_true", help="count bytes from the shapes only (instant; "
                                                             "no temporaries, no collectives)")
    p.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="bfloat16")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE)
    p.add_argument("--implementation", choices=("xla", "mosaic_gpu"), default=None,
                   help="decode attention to compile (default: what generate picks for the GPU, the Mosaic "
                        "GPU kernel where it takes the shapes)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not os.environ.get("JAX_PLATFORMS"):
        # Nothing runs on a device; without a GPU driver the CUDA plugin registers only this way.
        import jax

        jax.config.update("jax_platforms", "cpu")
    from mla_jax.errors import UsageError
    from mla_jax.generate_cli import _as_option
    from mla_jax.parallel.plan import format_plan, plan

    if args.train and args.seq_len is None:
        raise UsageError("--train needs --seq-len N (tokens per training row)")
    if args.seq_len is not None and not args.train:
        raise UsageError("--seq-len is for --train")
    try:
        result = plan(args.model, args.gpus, weights=args.weights, batch=args.batch, context=args.context,
                      mesh=args.mesh, train_seq_len=args.seq_len if args.train else None,
                      compile=not args.no_compile, page_size=args.page_size, cache_dtype=args.cache_dtype,
                      implementation=args.implementation, remat=args.remat)
    except UsageError as e:  # "batch=0; expected ..." -> "--batch 0: expected ..."
        raise UsageError(_as_option(str(e))) from None
    print(format_plan(result))
    return 0
