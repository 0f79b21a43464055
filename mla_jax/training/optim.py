"""The optimizer: gradient clipping, then AdamW under linear warm-up + cosine decay.

Weight decay skips norms and biases (decided by name: a "bias" leaf or a module whose name ends in
"norm"). Gradient accumulation happens in the train step, which sums the gradients of the micro
batches before this optimizer sees them, so one update is exactly one step of the schedule.
All optimizer state is float32 because the parameters it updates are the float32 master weights.
"""

from __future__ import annotations

import optax

from mla_jax.training.config import TrainConfig


def schedule(tc: TrainConfig) -> optax.Schedule:
    """Learning rate of update n (0-based): 0 -> lr over warmup_steps, cosine to lr·min_lr_ratio at `steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=tc.lr, warmup_steps=tc.warmup_steps,
        decay_steps=max(tc.steps, tc.warmup_steps + 1), end_value=tc.lr * tc.min_lr_ratio,
    )


def decays(name: str) -> bool:
    """Whether weight decay applies to the parameter called `name` ("stacks.0.input_layernorm.weight")."""
    parts = name.split(".")
    return parts[-1] != "bias" and not any(p.endswith("norm") for p in parts[:-1])


def optimizer(tc: TrainConfig, names) -> optax.GradientTransformation:
    mask = {n: decays(n) for n in names}
    return optax.chain(
        optax.clip_by_global_norm(tc.clip_norm),
        optax.adamw(schedule(tc), b1=tc.b1, b2=tc.b2, eps=tc.eps, weight_decay=tc.weight_decay, mask=mask),
    )
