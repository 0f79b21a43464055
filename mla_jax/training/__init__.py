"""Fine-tuning DeepSeek models with optax: exact gradients, DeepSeek's load balancing, resumable runs.

    from mla_jax.training import TrainConfig, finetune
    finetune("ckpt/v2-lite", "data.jsonl", "runs/a", TrainConfig(steps=1000))  # or a loaded model

Modules: `data` (read, tokenize, pack, batch), `losses` (cross-entropy), `balance` (V3 bias update,
V3 sequence-wise and V2 expert-level balance losses), `optim` (AdamW, schedule, decay mask), `lora`,
`params` (model <-> flat dicts), `step` (the jitted step, float32 masters), `checkpointing` (orbax),
`loop` (`finetune`), `demo`, `cli` (`mla-jax finetune`).
"""

import importlib

_LAZY = {
    "finetune": "mla_jax.training.loop",
    "TrainConfig": "mla_jax.training.config",
    "Trainer": "mla_jax.training.step",
    "run_demo": "mla_jax.training.demo",
}

__all__ = list(_LAZY)


def __getattr__(name):
    # Lazy, so that `mla-jax --help` does not import orbax and optax through the CLI module.
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mla_jax.training' has no attribute {name!r}")
