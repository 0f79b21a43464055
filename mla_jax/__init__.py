"""mla-jax: DeepSeek-V2/V3 (Multi-head Latent Attention + DeepSeekMoE) in JAX / Flax NNX."""

from mla_jax.config import Config, ConfigError, RopeScaling
from mla_jax.model import Transformer

__all__ = ["Config", "ConfigError", "RopeScaling", "Transformer"]
