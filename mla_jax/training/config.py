"""`TrainConfig`: every knob of a fine-tuning run, with DeepSeek's balancing defaults resolved per model.

The balancing switches default to None ("what DeepSeek used for this architecture"); `resolve`
turns them into numbers from the model config, so the stored run records what actually ran:
* bias_update_speed γ: 0.001 (DeepSeek-V3) when the router has `e_score_correction_bias`
  (topk_method "noaux_tc"), else 0. A model without the bias cannot take a non-zero γ.
* seq_aux_alpha α: 0.0001 (DeepSeek-V3's sequence-wise loss) for noaux_tc routers, else 0.
* expert_aux_alpha α1: 0.003 (DeepSeek-V2's expert-level loss) for the other MoE routers, else 0.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from mla_jax.config import Config

DTYPES = ("float32", "bfloat16")


class RunError(ValueError):
    """An output directory or a resume request that does not fit the run asked for."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = 100
    seq_len: int = 256
    batch_size: int = 8
    grad_accum: int = 1
    # optimizer: AdamW, linear warm-up from 0 to lr, cosine decay to lr·min_lr_ratio at `steps`
    lr: float = 1e-4
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0
    # weights the model computes with; the optimizer always keeps float32 master weights
    param_dtype: str = "bfloat16"
    # MoE balancing (None: DeepSeek's value for this architecture, see the module docstring)
    bias_update_speed: float | None = None
    seq_aux_alpha: float | None = None
    expert_aux_alpha: float | None = None
    # parameter-efficient mode: LoRA rank on the attention projections (0 = full fine-tuning)
    lora_rank: int = 0
    lora_alpha: float = 16.0
    # data and bookkeeping
    shuffle: bool = True
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    log_every: int = 10

    def __post_init__(self):
        positive = ("steps", "seq_len", "batch_size", "grad_accum", "save_every", "keep", "log_every")
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"TrainConfig.{name}={v!r}; expected a positive integer")
        if self.seq_len < 2:
            raise ValueError(f"TrainConfig.seq_len={self.seq_len}; expected at least 2 (input and target)")
        if self.warmup_steps < 0 or self.lora_rank < 0:
            raise ValueError(f"warmup_steps={self.warmup_steps}, lora_rank={self.lora_rank}; expected >= 0")
        if self.lr <= 0 or self.clip_norm <= 0 or not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"lr={self.lr}, clip_norm={self.clip_norm} must be > 0 and "
                             f"min_lr_ratio={self.min_lr_ratio} in [0, 1]")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"TrainConfig.param_dtype={self.param_dtype!r}; expected one of {DTYPES}")
        for name in ("bias_update_speed", "seq_aux_alpha", "expert_aux_alpha", "weight_decay"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ValueError(f"TrainConfig.{name}={v}; expected >= 0")

    def resolve(self, config: Config) -> "TrainConfig":
        """The balancing defaults filled in for `config` (see the module docstring)."""
        has_bias = config.n_routed_experts is not None and config.topk_method == "noaux_tc"
        moe = config.n_routed_experts is not None
        gamma = self.bias_update_speed if self.bias_update_speed is not None else (0.001 if has_bias else 0.0)
        if gamma > 0 and not has_bias:
            raise ValueError(f"bias_update_speed={gamma}: the model's router (topk_method="
                             f"{config.topk_method!r}) has no e_score_correction_bias to update")
        seq = self.seq_aux_alpha if self.seq_aux_alpha is not None else (1e-4 if has_bias else 0.0)
        expert = self.expert_aux_alpha if self.expert_aux_alpha is not None else (0.003 if moe and not has_bias else 0.0)
        if not moe and (seq > 0 or expert > 0):
            raise ValueError("balance losses were asked for, but the model has no MoE layer")
        return dataclasses.replace(self, bias_update_speed=gamma, seq_aux_alpha=seq, expert_aux_alpha=expert)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown TrainConfig field(s) {unknown}")
        return cls(**d)
