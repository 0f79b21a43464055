"""`mla-jax finetune`: argument parsing for `mla_jax.training.finetune` (and `--demo`).

With `--resume`, every option not given again is taken from the run's `run.json`; an option given
with another value than the run used is refused (it would change the run).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

from mla_jax.errors import UsageError
from mla_jax.parallel import launch

# option -> TrainConfig field; their defaults are None so that "not given" is visible.
_TRAIN_OPTIONS = {
    "steps": int, "seq_len": int, "batch_size": int, "grad_accum": int, "lr": float, "warmup_steps": int,
    "min_lr_ratio": float, "weight_decay": float, "clip_norm": float, "bias_update_speed": float,
    "seq_aux_alpha": float, "expert_aux_alpha": float, "lora_rank": int, "lora_alpha": float, "seed": int,
    "save_every": int, "keep": int, "log_every": int, "remat": str,
}
_HELP = {
    "steps": "optimizer updates in the run (the schedule's length)",
    "seq_len": "tokens per packed row (default 256)",
    "batch_size": "rows per micro batch (default 8)",
    "grad_accum": "micro batches summed per update (default 1)",
    "lr": "peak learning rate (default 1e-4)",
    "warmup_steps": "linear warm-up steps (default 10)",
    "min_lr_ratio": "cosine decay ends at lr * this (default 0.1)",
    "weight_decay": "AdamW decay, skipping norms and biases (default 0.1)",
    "clip_norm": "global gradient-norm clip (default 1.0)",
    "bias_update_speed": "V3 bias update gamma (default 0.001 for noaux_tc routers, else 0)",
    "seq_aux_alpha": "V3 sequence-wise balance loss alpha (default 1e-4 for noaux_tc, else 0)",
    "expert_aux_alpha": "V2 expert-level balance loss alpha (default 0.003 for other MoE routers, else 0)",
    "lora_rank": "LoRA rank on the attention projections, everything else frozen (default 0: full)",
    "lora_alpha": "LoRA scale numerator: delta = alpha/rank * A B (default 16)",
    "seed": "data order and LoRA init (default 0)",
    "save_every": "checkpoint every N steps (default 100)",
    "keep": "checkpoints kept (default 3)",
    "log_every": "print a log line every N steps (default 10)",
    "remat": "recompute activations in the backward pass, per layer: none | dots (keep the weight matmuls' "
             "outputs) | full (keep each layer's input); less memory, same gradients (default none)",
}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "finetune", help="fine-tune a checkpoint with optax (DeepSeek load balancing, resumable)",
        description="Fine-tune an mla-jax checkpoint on JSONL or text data. Writes OUT/metrics.jsonl, "
                    "OUT/checkpoints/ (resumable), OUT/model/ (the result, loadable with mla_jax.load) "
                    "and OUT/loss.png.",
    )
    p.add_argument("--ckpt", help="mla-jax checkpoint directory (from `mla-jax convert`) to start from")
    p.add_argument("--data", help="JSONL ({text} | {prompt, completion} | {input_ids}) or plain-text file")
    p.add_argument("--out", help="run directory (required unless --demo)")
    p.add_argument("--resume", nargs="?", const="latest", default=None, metavar="STEP",
                   help="continue the run in --out from its latest checkpoint (or from STEP)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run already in --out (only a run: anything else there is refused)")
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop after step K with a checkpoint, as an interruption would")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weight dtype of the forward pass (default bfloat16); masters stay float32")
    for name, kind in _TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_HELP[name])
    p.add_argument("--no-shuffle", action="store_true", default=None, help="keep the rows in file order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    launch.add_arguments(p)
    p.add_argument("--demo", action="store_true",
                   help="fine-tune the shipped tiny checkpoint on the bundled public-domain text (CPU, under "
                        "a minute); other options override the demo's settings")
    p.set_defaults(func=run)


def _given(args) -> dict:
    given = {k: getattr(args, k) for k in _TRAIN_OPTIONS if getattr(args, k) is not None}
    if args.dtype is not None:
        given["param_dtype"] = args.dtype
    if args.no_shuffle:
        given["shuffle"] = False
    return given


def _fields() -> set[str]:
    from mla_jax.training.config import TrainConfig

    return {f.name for f in dataclasses.fields(TrainConfig)}


def _train_config(args, stored: dict | None):
    from mla_jax.training.config import TrainConfig

    given = _given(args)
    if stored is None:
        return TrainConfig(**given)
    return TrainConfig(**{**{k: v for k, v in stored.items() if k in _fields()}, **given})


def _resume(value: str | None) -> bool | int:
    if value is None:
        return False
    if value == "latest":
        return True
    if not value.isdigit():
        raise UsageError(f"--resume {value}: expected a step number, or nothing for the latest checkpoint")
    return int(value)


def run(args) -> int:
    """The command; its errors end at the CLI's one boundary (`mla_jax.cli`)."""
    resume = _resume(args.resume)
    if resume is not False and not args.out:
        raise UsageError("--resume needs --out (the run directory)")
    if resume is not False and args.overwrite:
        raise UsageError("--resume continues the run in --out, --overwrite replaces it: give one of them")
    if args.demo:
        if args.ckpt or args.data:
            raise UsageError("--demo trains the shipped tiny checkpoint on the bundled text; drop --ckpt and --data")
        tc_check = _checked_options(args)  # before the model is loaded
        # The shipped checkpoint is in the hub layout: only `checkpoints` reads it (no torch needed).
        from checkpoints.demo import load_tiny
        from mla_jax.training.demo import run_demo, tiny_checkpoint_dir
        from mla_jax.training.loop import check_out

        tiny = tiny_checkpoint_dir()
        if args.out:
            check_out(os.path.abspath(args.out), resume=resume, overwrite=args.overwrite,
                      sources={"base checkpoint": tiny})
        if resume is not False:  # the run's own settings, as for any run (the demo's defaults may differ)
            with open(os.path.join(args.out, "run.json")) as f:
                stored = json.load(f).get("train_config", {})
            tc_check = {**{k: v for k, v in stored.items() if k in _fields()}, **tc_check}
        _, model = load_tiny(tiny)
        mesh = launch.start(args)
        if mesh is not None:
            from mla_jax.parallel.mesh import shard_model

            model = shard_model(model, mesh)
        summary = run_demo(model, tiny, args.out, overrides=tc_check, resume=resume, overwrite=args.overwrite,
                           stop_after=args.stop_after,
                           progress=not args.no_progress)
        return 130 if summary["stopped"] else 0
    stored = None
    if resume is not False:
        run_file = os.path.join(args.out, "run.json")
        if not os.path.isfile(run_file):
            raise UsageError(f"--out {args.out}: not a fine-tuning run ({run_file} not found); nothing to resume")
        with open(run_file) as f:
            stored = json.load(f)
        args.ckpt = args.ckpt or stored.get("base")
        args.data = args.data or stored.get("data")
    missing = [f"--{k}" for k in ("ckpt", "data", "out", "steps")
               if getattr(args, k) is None and not (k == "steps" and stored is not None)]
    if missing:
        raise UsageError(f"{', '.join(missing)} required (or --demo, or --resume with --out)")
    _checked_options(args)
    tc = _options_as_errors(lambda: _train_config(args, None if stored is None else stored.get("train_config")))

    from mla_jax.training.loop import finetune

    # finetune checks --out before it loads the checkpoint, and reads the tokenizer from there.
    summary = finetune(args.ckpt, args.data, args.out, tc, resume=resume, overwrite=args.overwrite,
                       stop_after=args.stop_after, progress=not args.no_progress, mesh=launch.start(args))
    return 130 if summary["stopped"] else 0


def _checked_options(args) -> dict:
    """The options given, each checked alone (as TrainConfig would) before anything is loaded."""
    from mla_jax.training.config import TrainConfig

    given = _given(args)
    _options_as_errors(lambda: TrainConfig(**given))
    if args.stop_after is not None and args.stop_after < 1:
        raise UsageError(f"--stop-after {args.stop_after}: expected a step >= 1")
    return given


def _options_as_errors(build):
    """`build()`, with TrainConfig's "lr=nan; expected ..." said as "--lr nan: expected ..."."""
    try:
        return build()
    except UsageError as e:
        m = re.match(r"(\w+)=(\S+?); (.*)$", str(e))
        if m and m.group(1) in _TRAIN_OPTIONS or m and m.group(1) == "param_dtype":
            name = "dtype" if m.group(1) == "param_dtype" else m.group(1)
            raise UsageError(f"--{name.replace('_', '-')} {m.group(2).strip(chr(39))}: {m.group(3)}") from None
        raise
