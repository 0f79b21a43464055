"""mla-jax: DeepSeek-V2/V3 (Multi-head Latent Attention + DeepSeekMoE) in JAX / Flax NNX."""

import importlib

from mla_jax.config import Config, ConfigError, RopeScaling
from mla_jax.model import Transformer
from mla_jax import parallel

# Public functions whose modules import more (orbax, tokenizers): loaded on first use.
_LAZY = {
    "load": "mla_jax.weights",
    "save": "mla_jax.weights",
    "generate": "mla_jax.generate",
    "generate_stream": "mla_jax.generate",
}

__all__ = ["Config", "ConfigError", "RopeScaling", "Transformer", "parallel", *_LAZY]


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mla_jax' has no attribute {name!r}")
