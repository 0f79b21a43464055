"""Causal self-attention over packed segments with memory O(T·block): the one place that picks how.

MLA's expanded form is ordinary multi-head attention with q/k head dim H = nope + rope (192 for
V2/V3) and value head dim Hv (128). `attention(q, k, v, segment_ids)` computes it under the causal,
segment-aware mask of training (a key is visible when it is not after the query, in the query's
segment, and not padding: segment 0). Three implementations of one function:

* `reference`: dense float32 scores [B,N,T,S]. The definition; memory O(T·S).
* `blockwise`: online softmax over key blocks (flash style) in plain XLA, with a custom VJP that
  recomputes each block's scores from the saved log-sum-exp, so forward and backward hold scores
  for one block at a time: O(T·block). Runs on every backend.
* `mosaic_gpu`: tokamax's fused Mosaic GPU flash attention (sm90/sm100, forward and backward,
  q/k 192 ≠ v 128 supported), segments given as each query's first visible key. Segments must be
  contiguous runs (what packing produces).

`attention(..., implementation=None)` takes `mosaic_gpu` when compiled for a CUDA GPU and
`blockwise` elsewhere (`mla_jax.ops.platform.by_platform`). tokamax decides whether its kernel
applies from the *default device*, so compiling for a GPU from a CPU-only process needs
`with jax.default_device(gpu_topology_device):` around the trace; without it the GPU branch
falls back to `blockwise` (correct and memory-bounded, only slower).

The online-softmax pieces (`init_state`, `attend_block`, `finish`) are public: chunked prefill
(`mla_jax.generate`) runs them over cache pages and its own chunk.

Dimensions: B batch, T queries, S keys, N heads, H q/k head dim, Hv value head dim.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mla_jax.ops.platform import by_platform

DEFAULT_BLOCK = 512
IMPLEMENTATIONS = ("reference", "blockwise", "mosaic_gpu")
F32 = jnp.float32


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32; rows with no visible key give zeros, never NaN."""
    scores = jnp.where(mask, scores.astype(F32), -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


def visible(q_index, k_index, q_segments, k_segments) -> jax.Array:
    """[B,T,S] mask: key index <= query index, same segment, key not padding (segment 0)."""
    causal = k_index[None, None, :] <= q_index[None, :, None]
    same = q_segments[:, :, None] == k_segments[:, None, :]
    return causal & same & (k_segments[:, None, :] != 0)


def _check(q, k, v, segment_ids):
    b, t, n, h = q.shape
    if k.shape != (b, t, n, h) or v.shape[:3] != (b, t, n) or segment_ids.shape != (b, t):
        raise ValueError(f"attention: expected q, k [B,T,N,H], v [B,T,N,Hv], segment_ids [B,T]; found "
                         f"{q.shape=} {k.shape=} {v.shape=} {segment_ids.shape=}")


# ------------------------------------------------------------------------ reference
def reference(q, k, v, segment_ids, *, scale: float) -> jax.Array:
    """Dense attention: q, k [B,T,N,H], v [B,T,N,Hv], segment_ids [B,T] -> [B,T,N,Hv]."""
    _check(q, k, v, segment_ids)
    index = jnp.arange(q.shape[1])
    mask = visible(index, index, segment_ids, segment_ids)
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=F32) * scale
    probs = masked_softmax(scores, mask[:, None])
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)


# ------------------------------------------------------------------------ online softmax
class State(NamedTuple):
    """Running softmax over the key blocks seen so far."""

    row_max: jax.Array  # [B,N,T] float32, -inf while no key was visible
    denom: jax.Array  # [B,N,T] float32
    acc: jax.Array  # [B,T,N,Hv] float32, un-normalised output


def init_state(b: int, t: int, n: int, hv: int) -> State:
    return State(jnp.full((b, n, t), -jnp.inf, F32), jnp.zeros((b, n, t), F32), jnp.zeros((b, t, n, hv), F32))


def _finite(row_max):
    return jnp.where(jnp.isfinite(row_max), row_max, 0.0)


def attend_block(state: State, q, k, v, mask, scale: float) -> State:
    """Folds one key block into the state: q [B,T,N,H], k [B,S,N,H], v [B,S,N,Hv], mask [B,T,S]."""
    scores = jnp.einsum("BTNH,BSNH->BNTS", q, k, preferred_element_type=F32) * scale
    scores = jnp.where(mask[:, None], scores, -jnp.inf)
    row_max = jnp.maximum(state.row_max, jnp.max(scores, axis=-1))
    shift = _finite(row_max)
    p = jnp.exp(scores - shift[..., None])  # masked keys: exp(-inf) = 0
    rescale = jnp.exp(state.row_max - shift)  # 0 while nothing was visible
    denom = state.denom * rescale + jnp.sum(p, axis=-1)
    pv = jnp.einsum("BNTS,BSNH->BTNH", p.astype(v.dtype), v, preferred_element_type=F32)
    acc = state.acc * jnp.swapaxes(rescale, 1, 2)[..., None] + pv
    return State(row_max, denom, acc)


def finish(state: State) -> tuple[jax.Array, jax.Array]:
    """(output [B,T,N,Hv] float32, log-sum-exp [B,N,T]); rows that saw no key give zeros."""
    denom = jnp.where(state.denom > 0, state.denom, 1.0)
    out = state.acc / jnp.swapaxes(denom, 1, 2)[..., None]
    return out, _finite(state.row_max) + jnp.log(denom)


# ------------------------------------------------------------------------ blockwise (XLA)
def _key_blocks(k, v, segment_ids, block):
    """Keys cut into blocks along S (padded with segment 0): [nb, B, block, ...] each, and indices [nb, block]."""
    s = k.shape[1]
    nb = -(-s // block)
    pad = nb * block - s

    def cut(x):
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(x.shape[0], nb, block, *x.shape[2:]), 1, 0)

    return cut(k), cut(v), cut(segment_ids), jnp.arange(nb * block).reshape(nb, block)


def _uncut(x, s):
    """[nb, B, block, ...] -> [B, S, ...]."""
    x = jnp.moveaxis(x, 0, 1)
    return x.reshape(x.shape[0], -1, *x.shape[3:])[:, :s]


def _forward(q, k, v, segment_ids, scale, block):
    b, t, n, _ = q.shape
    q_index = jnp.arange(t)

    def body(state, blk):
        k_j, v_j, seg_j, index_j = blk
        return attend_block(state, q, k_j, v_j, visible(q_index, index_j, segment_ids, seg_j), scale), None

    state, _ = jax.lax.scan(body, init_state(b, t, n, v.shape[-1]), _key_blocks(k, v, segment_ids, block))
    out, lse = finish(state)
    return out.astype(v.dtype), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _blockwise(q, k, v, segment_ids, scale, block):
    return _forward(q, k, v, segment_ids, scale, block)[0]


def _blockwise_fwd(q, k, v, segment_ids, scale, block):
    out, lse = _forward(q, k, v, segment_ids, scale, block)
    return out, (q, k, v, segment_ids, out, lse)


def _blockwise_bwd(scale, block, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    t = q.shape[1]
    q_index = jnp.arange(t)
    # sum_s p·dp per row, = rowsum(d_out * out): the softmax Jacobian's correction term.
    delta = jnp.einsum("BTNH,BTNH->BNT", d_out.astype(F32), out.astype(F32))

    def body(d_q, blk):
        k_j, v_j, seg_j, index_j = blk
        mask = visible(q_index, index_j, segment_ids, seg_j)[:, None]
        scores = jnp.einsum("BTNH,BSNH->BNTS", q, k_j, preferred_element_type=F32) * scale
        p = jnp.where(mask, jnp.exp(scores - lse[..., None]), 0.0)  # [B,N,T,S] the forward's probabilities
        d_v = jnp.einsum("BNTS,BTNH->BSNH", p.astype(d_out.dtype), d_out, preferred_element_type=F32)
        d_p = jnp.einsum("BTNH,BSNH->BNTS", d_out, v_j, preferred_element_type=F32)
        d_s = p * (d_p - delta[..., None]) * scale
        d_q = d_q + jnp.einsum("BNTS,BSNH->BTNH", d_s.astype(k_j.dtype), k_j, preferred_element_type=F32)
        d_k = jnp.einsum("BNTS,BTNH->BSNH", d_s.astype(q.dtype), q, preferred_element_type=F32)
        return d_q, (d_k, d_v)

    d_q, (d_k, d_v) = jax.lax.scan(body, jnp.zeros(q.shape, F32), _key_blocks(k, v, segment_ids, block))
    return (d_q.astype(q.dtype), _uncut(d_k, t).astype(k.dtype), _uncut(d_v, t).astype(v.dtype), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def blockwise(q, k, v, segment_ids, *, scale: float, block: int = DEFAULT_BLOCK) -> jax.Array:
    """Flash-style attention in XLA: same function as `reference`, scores held one key block at a time."""
    _check(q, k, v, segment_ids)
    return _blockwise(q, k, v, segment_ids, float(scale), int(min(block, q.shape[1])))


# ------------------------------------------------------------------------ Mosaic GPU (tokamax)
def segment_starts(segment_ids) -> jax.Array:
    """[B,T] index of the first token of each token's run of equal segment ids."""
    t = segment_ids.shape[1]
    index = jnp.broadcast_to(jnp.arange(t), segment_ids.shape)
    new = jnp.concatenate([jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)
    return jax.lax.cummax(jnp.where(new, index, 0), axis=1)


def mosaic_gpu(q, k, v, segment_ids, *, scale: float) -> jax.Array:
    """tokamax's Mosaic GPU flash attention; raises NotImplementedError where it does not apply.

    Padding (segment 0) queries see their own padding run here, not nothing: their outputs differ
    from `reference` but are finite, and no real token sees them.
    """
    _check(q, k, v, segment_ids)
    from tokamax._src.ops.attention import base, pallas_mosaic_gpu

    from mla_jax.ops import _tokamax

    _tokamax.prepare()

    mask = base.Mask(k_start=segment_starts(segment_ids)[:, None, :], is_causal=True)
    impl = pallas_mosaic_gpu.PallasMosaicGpuFlashAttention()
    return impl(q, k, v, mask=mask, logits_scale=scale)


def _mosaic_applies() -> bool:
    """Whether tokamax's kernel accepts the default device (what it checks): a Hopper or Blackwell GPU."""
    from jax.extend import backend

    device = backend.get_default_device()
    capability = getattr(device, "compute_capability", None)
    return device.platform == "gpu" and capability is not None and 9.0 <= float(capability) < 11.0


def _tokamax_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("tokamax") is not None


def _gpu(q, k, v, segment_ids, scale, block):
    # tokamax is an optional extra (`pip install -e ".[gpu]"`): without it a GPU runs `blockwise`.
    if _mosaic_applies() and _tokamax_installed():
        return mosaic_gpu(q, k, v, segment_ids, scale=scale)
    # Not a Hopper/Blackwell default device at trace time (see the module docstring).
    return blockwise(q, k, v, segment_ids, scale=scale, block=block)


def attention(q, k, v, segment_ids=None, *, scale: float, implementation: str | None = None,
              block: int = DEFAULT_BLOCK) -> jax.Array:
    """Causal attention of q, k [B,T,N,H], v [B,T,N,Hv] within segments [B,T] (None: one segment).

    implementation: None (by compile target), "reference", "blockwise" or "mosaic_gpu".
    """
    if segment_ids is None:
        segment_ids = jnp.ones(q.shape[:2], jnp.int32)
    if implementation == "reference":
        return reference(q, k, v, segment_ids, scale=scale)
    if implementation == "blockwise":
        return blockwise(q, k, v, segment_ids, scale=scale, block=block)
    if implementation == "mosaic_gpu":
        return mosaic_gpu(q, k, v, segment_ids, scale=scale)
    if implementation is not None:
        raise ValueError(f"attention: implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None")
    return by_platform(q, k, v, segment_ids,
                       gpu=lambda *a: _gpu(*a, scale, block),
                       default=lambda *a: blockwise(*a, scale=scale, block=block))
