"""Decoupled rotary embedding for MLA's rope dims: plain, linear and YaRN scaling.

DeepSeek lays the rotary dims out as interleaved pairs (x0, x1), (x2, x3), ...; each pair is rotated
by one frequency. V3 configs may set `rope_interleave=False` (pairs are (x_i, x_{i+R/2})). Queries
and keys are rotated the same way, so attention scores do not depend on the layout; only the stored
keys do, and they are produced here and nowhere else.

Dimensions: B batch, T positions, R rotary dim (qk_rope_head_dim).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from mla_jax.config import Config, yarn_mscale


def inv_frequencies(config: Config) -> tuple[np.ndarray, float]:
    """Per-pair inverse frequencies [R/2] (float32) and the cos/sin scale ("attention factor")."""
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    rs = config.rope_scaling
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim))
    inv_freq = (1.0 / pos_freqs).astype(np.float32)
    if rs.type == "default":
        return inv_freq, 1.0
    if rs.type == "linear":
        return (inv_freq / np.float32(rs.factor)).astype(np.float32), 1.0

    # YaRN: extrapolate the fast-rotating pairs, interpolate the slow ones, ramp in between.
    factor = rs.factor
    orig = rs.original_max_position_embeddings or config.max_position_embeddings

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation = (1.0 - ramp).astype(np.float32)
    interpolated = (1.0 / (np.float32(factor) * pos_freqs)).astype(np.float32)
    inv_freq = interpolated * (1 - extrapolation) + inv_freq * extrapolation

    if rs.attention_factor is not None:
        attention_factor = rs.attention_factor
    elif rs.mscale and rs.mscale_all_dim:
        attention_factor = yarn_mscale(factor, rs.mscale) / yarn_mscale(factor, rs.mscale_all_dim)
    else:
        attention_factor = yarn_mscale(factor)
    return inv_freq.astype(np.float32), float(attention_factor)


def sin_cos(config: Config, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """sin, cos of shape positions.shape + [R/2], float32, already multiplied by the attention factor."""
    inv_freq, attention_factor = inv_frequencies(config)
    angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles) * attention_factor, jnp.cos(angles) * attention_factor


def apply_rope(x: jnp.ndarray, sin: jnp.ndarray, cos: jnp.ndarray, *, interleave: bool) -> jnp.ndarray:
    """Rotates the last axis (R) of x [..., T, (N,) R] by sin/cos [..., T, R/2].

    `sin`/`cos` broadcast over any head axis between T and R: pass them with a head axis added.
    Computed in float32, returned in x's dtype; the output keeps x's layout.
    """
    dtype = x.dtype
    x = x.astype(jnp.float32)
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
    else:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half], x[..., half:]
    r1 = x1 * cos - x2 * sin
    r2 = x2 * cos + x1 * sin
    if interleave:
        out = jnp.stack([r1, r2], axis=-1).reshape(x.shape)
    else:
        out = jnp.concatenate([r1, r2], axis=-1)
    return out.astype(dtype)
