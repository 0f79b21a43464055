"""Next-token choice from logits: greedy, temperature, top-k and top-p (nucleus) sampling.

`Sampling` is frozen and hashable so jitted steps take it as a static argument: greedy decoding
compiles without any sort, and changing the settings recompiles once rather than branching per step.

Dimensions: B batch, V vocabulary.
"""

from __future__ import annotations

import dataclasses
import math
import numbers

import jax
import jax.numpy as jnp

from mla_jax.errors import UsageError


def _real(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def _integer(x) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


@dataclasses.dataclass(frozen=True)
class Sampling:
    """temperature 0 means greedy (argmax); top_k None/0 and top_p None/1.0 mean no cut."""

    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self):
        if not _real(self.temperature) or not 0 <= self.temperature < math.inf:
            raise UsageError(f"temperature={self.temperature!r}; expected a finite number >= 0 (0 = greedy)")
        if self.top_k is not None and (not _integer(self.top_k) or self.top_k < 0):
            raise UsageError(f"top_k={self.top_k!r}; expected an integer >= 0 (0 or None = no cut) or None")
        if self.top_p is not None and not (_real(self.top_p) and 0 < self.top_p <= 1):
            raise UsageError(f"top_p={self.top_p!r}; expected a number in (0, 1] or None")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B,V] float32 with everything outside top-k and the top-p nucleus set to -inf."""
    if sampling.top_k:
        k = min(sampling.top_k, logits.shape[-1])
        kth = jax.lax.top_k(logits, k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p is not None and sampling.top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        # Keep a token when the mass strictly before it is below top_p: the top token always stays.
        before = jnp.cumsum(probs, axis=-1) - probs
        keep_sorted = before < sampling.top_p
        keep = jnp.zeros_like(keep_sorted).at[jnp.arange(logits.shape[0])[:, None], order].set(keep_sorted)
        logits = jnp.where(keep, logits, -jnp.inf)
    return logits


def sample(logits: jax.Array, key: jax.Array, sampling: Sampling) -> jax.Array:
    """logits [B,V] -> int32 tokens [B]."""
    logits = logits.astype(jnp.float32)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = filter_logits(logits / sampling.temperature, sampling)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
