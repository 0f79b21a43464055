"""Plain-jnp MLA decode: the semantic ground truth for every kernel test.

Semantics (shared with every implementation):
  * q `[batch, s_q, heads, dim]`; pages `[num_pages, page_size, dim]` hold one
    latent "head" shared by all query heads; the first `v_dim` columns of a
    cached token are also its value.
  * Token `j` of sequence `b` lives at `pages[block_table[b, j // page_size],
    j % page_size]`.
  * `seq_lens[b]` counts the new tokens too.  Query `i` of the `s_q` new tokens
    sees keys `0 .. seq_lens[b] - s_q + i` when `causal`, else `0 ..
    seq_lens[b] - 1`.
  * A row that sees no key returns exactly 0 and `lse = -inf` (never NaN).
  * FP8 caches: `pages` in float8_e4m3fn and `page_scales[num_pages,
    page_size]` float32, value = fp8 * scale per token.
Softmax and matmuls run in float32 (HIGHEST precision); the output is cast to
q's dtype, the log-sum-exp (natural log) stays float32.
"""

from __future__ import annotations

import jax
from jax import lax
import jax.numpy as jnp


def visible_lengths(seq_lens, s_q: int, causal: bool):
  """[batch, s_q] int32: number of keys query i of each sequence may see."""
  seq_lens = seq_lens.astype(jnp.int32)
  if not causal:
    return jnp.broadcast_to(seq_lens[:, None], (seq_lens.shape[0], s_q))
  offsets = jnp.arange(s_q, dtype=jnp.int32) - (s_q - 1)
  return jnp.maximum(seq_lens[:, None] + offsets[None, :], 0)


def gather_cache(pages, block_table, page_scales=None):
  """Dense float32 per-sequence cache `[batch, max_pages * page_size, dim]`."""
  batch, max_pages = block_table.shape
  _, page_size, dim = pages.shape
  gathered = jnp.take(pages, block_table, axis=0, mode="clip")
  gathered = gathered.astype(jnp.float32)
  if page_scales is not None:
    scales = jnp.take(page_scales, block_table, axis=0, mode="clip")
    gathered = gathered * scales.astype(jnp.float32)[..., None]
  return gathered.reshape(batch, max_pages * page_size, dim)


def mla_decode_reference(
    q,
    pages,
    block_table,
    seq_lens,
    *,
    softmax_scale: float,
    causal: bool = True,
    v_dim: int = 512,
    page_scales=None,
):
  """Returns (out `[batch, s_q, heads, v_dim]` in q.dtype, lse `[batch, s_q, heads]` f32)."""
  batch, s_q, _, _ = q.shape
  kv = gather_cache(pages, block_table, page_scales)  # [batch, keys, dim]
  num_keys = kv.shape[1]
  visible = visible_lengths(seq_lens, s_q, causal)  # [batch, s_q]
  key_pos = jnp.arange(num_keys, dtype=jnp.int32)
  mask = key_pos[None, None, :] < visible[:, :, None]  # [batch, s_q, keys]
  # Positions nobody may see are zeroed so garbage (even NaN) there cannot leak.
  seen = key_pos[None, :] < jnp.max(visible, axis=1)[:, None]  # [batch, keys]
  kv = jnp.where(seen[:, :, None], kv, 0.0)

  qf = q.astype(jnp.float32)
  scores = jnp.einsum(
      "bqhd,bkd->bqhk", qf, kv, precision=lax.Precision.HIGHEST
  ) * jnp.float32(softmax_scale)
  scores = jnp.where(mask[:, :, None, :], scores, -jnp.inf)
  row_max = jnp.max(scores, axis=-1, keepdims=True)  # -inf when nothing seen
  safe_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
  probs = jnp.exp(scores - safe_max)  # exactly 0 where masked
  denom = jnp.sum(probs, axis=-1, keepdims=True)
  safe_denom = jnp.where(denom > 0, denom, 1.0)
  out = jnp.einsum(
      "bqhk,bkv->bqhv", probs / safe_denom, kv[:, :, :v_dim],
      precision=lax.Precision.HIGHEST,
  )
  lse = jnp.where(
      denom[..., 0] > 0, safe_max[..., 0] + jnp.log(safe_denom[..., 0]), -jnp.inf
  )
  return out.astype(q.dtype), lse.astype(jnp.float32)


mla_decode_reference_jit = jax.jit(
    mla_decode_reference, static_argnames=("softmax_scale", "causal", "v_dim")
)
