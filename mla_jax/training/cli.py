"""`mla-jax finetune`: argument parsing for `mla_jax.training.finetune` (and `--demo`).

With `--resume`, every option not given again is taken from the run's `run.json`; an option given
with another value than the run used is refused (it would change the run).
"""

from __future__ import annotations

import dataclasses
import json
import os

# option -> TrainConfig field; their defaults are None so that "not given" is visible.
_TRAIN_OPTIONS = {
    "steps": int, "seq_len": int, "batch_size": int, "grad_accum": int, "lr": float, "warmup_steps": int,
    "min_lr_ratio": float, "weight_decay": float, "clip_norm": float, "bias_update_speed": float,
    "seq_aux_alpha": float, "expert_aux_alpha": float, "lora_rank": int, "lora_alpha": float, "seed": int,
    "save_every": int, "keep": int, "log_every": int,
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
    p.add_argument("--stop-after", type=int, default=None, metavar="K",
                   help="stop after step K with a checkpoint, as an interruption would")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default=None,
                   help="weight dtype of the forward pass (default bfloat16); masters stay float32")
    for name, kind in _TRAIN_OPTIONS.items():
        p.add_argument("--" + name.replace("_", "-"), type=kind, default=None, help=_HELP[name])
    p.add_argument("--no-shuffle", action="store_true", default=None, help="keep the rows in file order")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
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


def _train_config(args, stored: dict | None):
    from mla_jax.training.config import TrainConfig

    given = _given(args)
    if stored is None:
        return TrainConfig(**given)
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{**{k: v for k, v in stored.items() if k in fields}, **given})


def _resume(value: str | None) -> bool | int:
    if value is None:
        return False
    if value == "latest":
        return True
    if not value.isdigit():
        raise SystemExit(f"mla-jax finetune: --resume {value!r}; expected a step number or nothing (latest)")
    return int(value)


def run(args) -> int:
    from mla_jax.config import ConfigError
    from mla_jax.store import CheckpointError
    from mla_jax.training.data import DataError
    from mla_jax.training.loop import RunError

    # What a user can fix (bad data, a mismatched run directory, a missing checkpoint, a bad option)
    # ends with its message, not a traceback.
    try:
        return _run(args)
    except (ConfigError, CheckpointError, DataError, RunError, FileNotFoundError) as e:
        raise SystemExit(f"mla-jax finetune: {e}") from None


def _run(args) -> int:
    resume = _resume(args.resume)
    if resume is not False and not args.out:
        raise SystemExit("mla-jax finetune: --resume needs --out (the run directory)")
    if args.demo:
        if args.ckpt or args.data:
            raise SystemExit("mla-jax finetune --demo: trains the shipped tiny checkpoint on the bundled text; "
                             "drop --ckpt and --data")
        # The shipped checkpoint is in the hub layout: only `checkpoints` reads it (no torch needed).
        from checkpoints.demo import load_tiny
        from mla_jax.training.demo import run_demo, tiny_checkpoint_dir

        tiny = tiny_checkpoint_dir()
        _, model = load_tiny(tiny)
        summary = run_demo(model, tiny, args.out, overrides=_given(args), resume=resume, progress=not args.no_progress)
        return 130 if summary["stopped"] else 0
    stored = None
    if resume is not False:
        run_file = os.path.join(args.out, "run.json")
        if not os.path.exists(run_file):
            raise SystemExit(f"mla-jax finetune: {run_file} not found; {args.out} is not a fine-tuning run")
        with open(run_file) as f:
            stored = json.load(f)
        args.ckpt = args.ckpt or stored.get("base")
        args.data = args.data or stored.get("data")
    missing = [f"--{k}" for k in ("ckpt", "data", "out", "steps")
               if getattr(args, k) is None and not (k == "steps" and stored is not None)]
    if missing:
        raise SystemExit(f"mla-jax finetune: {', '.join(missing)} required (or --demo, or --resume with --out)")
    try:
        tc = _train_config(args, None if stored is None else stored.get("train_config"))
    except ValueError as e:  # TrainConfig names the option and what it expects
        raise SystemExit(f"mla-jax finetune: {e}") from None

    from mla_jax.training import model_io
    from mla_jax.training.data import load_tokenizer
    from mla_jax.training.loop import finetune

    ckpt = os.path.abspath(args.ckpt)
    model = model_io.load_base(ckpt, tc.param_dtype)
    summary = finetune(model, args.data, args.out, tc, tokenizer=load_tokenizer(ckpt), tokenizer_from=ckpt,
                       base=ckpt, resume=resume, stop_after=args.stop_after, progress=not args.no_progress)
    return 130 if summary["stopped"] else 0
