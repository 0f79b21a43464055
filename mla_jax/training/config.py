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
import math
from typing import Any

from mla_jax.config import Config
from mla_jax.errors import UsageError
from mla_jax.model import REMAT_POLICIES

DTYPES = ("float32", "bfloat16")


class RunError(ValueError):
    """An output directory or a resume request that does not fit the run asked for."""


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


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
    # backward-pass memory, per layer: "none" keeps every activation, "dots" the weight matmuls'
    # outputs, "full" only each layer's input; the rest is recomputed (mla_jax.model.REMAT_POLICIES)
    remat: str = "none"
    # data and bookkeeping
    shuffle: bool = True
    seed: int = 0
    save_every: int = 100
    keep: int = 3
    log_every: int = 10

    def __post_init__(self):
        def bad(name: str, expected: str):
            raise UsageError(f"{name}={getattr(self, name)!r}; expected {expected}")

        for name in ("steps", "seq_len", "batch_size", "grad_accum", "save_every", "keep", "log_every"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 1:
                bad(name, "a positive integer")
        if self.seq_len < 2:
            bad("seq_len", "at least 2 (input and target)")
        for name in ("warmup_steps", "lora_rank", "seed"):
            if not _is_int(getattr(self, name)) or getattr(self, name) < 0:
                bad(name, "an integer >= 0")
        for name in ("lr", "clip_norm", "eps", "lora_alpha"):
            if not _finite(getattr(self, name)) or getattr(self, name) <= 0:
                bad(name, "a finite number > 0")
        for name in ("min_lr_ratio", "b1", "b2"):
            if not _finite(getattr(self, name)) or not 0 <= getattr(self, name) <= 1:
                bad(name, "a number in [0, 1]")
        for name in ("bias_update_speed", "seq_aux_alpha", "expert_aux_alpha", "weight_decay"):
            v = getattr(self, name)
            if v is not None and (not _finite(v) or v < 0):
                bad(name, "a finite number >= 0")
        if self.param_dtype not in DTYPES:
            bad("param_dtype", f"one of {DTYPES}")
        if self.remat not in REMAT_POLICIES:
            bad("remat", f"one of {tuple(REMAT_POLICIES)}")
        if not isinstance(self.shuffle, bool):
            bad("shuffle", "true or false")

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
