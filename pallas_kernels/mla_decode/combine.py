"""Merge split-KV partial results (flash-decoding's second step)."""

from __future__ import annotations

import jax.numpy as jnp


def combine_splits(out_parts, lse_parts):
  """Log-sum-exp weighted merge over the split axis.

  out_parts: [batch, splits, rows, v_dim] float32, each split normalised by its
             own softmax denominator (0 where the split saw no key).
  lse_parts: [batch, splits, rows] float32 natural-log LSE (-inf: no key).
  Returns (out [batch, rows, v_dim] float32, lse [batch, rows] float32); a row
  no split saw comes back as 0 with lse -inf.
  """
  lse_max = jnp.max(lse_parts, axis=1, keepdims=True)  # [batch, 1, rows]
  finite = jnp.isfinite(lse_max)
  safe_max = jnp.where(finite, lse_max, 0.0)
  weights = jnp.exp(lse_parts - safe_max)  # 0 for empty splits
  total = jnp.sum(weights, axis=1, keepdims=True)  # [batch, 1, rows]
  safe_total = jnp.where(total > 0, total, 1.0)
  out = jnp.einsum("bsr,bsrv->brv", weights / safe_total, out_parts)
  lse = jnp.where(total > 0, safe_max + jnp.log(safe_total), -jnp.inf)
  return out, lse[:, 0, :]
