"""Multi-head Latent Attention: the maths as two functions, and the module that holds the weights.

A token x is compressed to one latent row shared by all heads: `c_kv` (kv_lora_rank, RMS-normed) and
a rotary key `k_rope` (qk_rope_head_dim, rotated). `kv_b_proj` expands c_kv per head into the no-rope
key (W_UK) and the value (W_UV).

* expanded form (prefill, training): materialise K, V per head, then ordinary attention. Two
  computations of it: `expanded_attention` with dense [B,N,T,S] scores (the reference, any mask),
  and `flash_attention`, the memory-bounded causal one over packed segments that training and the
  model's default forward use (`mla_jax.ops.attention` picks its implementation by target).
* absorbed form (decode): fold W_UK into the query (q_lat = q_nope·W_UK), score directly against the
  latent rows, attend over c_kv, apply W_UV after. Scores equal the expanded ones by associativity.

Dimensions: B batch, T query length, S key length, D model dim, N heads, H head dim (no-rope key or
value), R rotary dim, C latent (kv_lora_rank), Q query latent (q_lora_rank).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.config import Config
from mla_jax.layers import Linear, OutProj, RMSNorm
from mla_jax.ops import attention as ops_attention
from mla_jax.ops.attention import masked_softmax, visible
from mla_jax.rope import apply_rope

FORMS = ("expanded", "dense", "absorbed")


def expanded_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale):
    """Attention with per-head keys and values materialised from the latent.

    q_nope [B,T,N,H], q_rope [B,T,N,R], c_kv [B,S,C], k_rope [B,S,R], w_uk [C,N,H], w_uv [C,N,Hv],
    mask [B,T,S] (True = visible). Returns [B,T,N,Hv].
    """
    k_nope = jnp.einsum("BSC,CNH->BSNH", c_kv, w_uk)
    v = jnp.einsum("BSC,CNH->BSNH", c_kv, w_uv)
    f32 = jnp.float32
    scores = jnp.einsum("BTNH,BSNH->BNTS", q_nope, k_nope, preferred_element_type=f32)
    scores += jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope, preferred_element_type=f32)
    probs = masked_softmax(scores * scale, mask[:, None])
    return jnp.einsum("BNTS,BSNH->BTNH", probs.astype(v.dtype), v)


def expand_keys(c_kv, k_rope, w_uk, w_uv):
    """Latents c_kv [B,S,C], k_rope [B,S,R] -> per-head keys [B,S,N,H+R] (rope key shared) and values [B,S,N,Hv]."""
    k_nope = jnp.einsum("BSC,CNH->BSNH", c_kv, w_uk)
    k_rope = jnp.broadcast_to(k_rope[:, :, None, :].astype(k_nope.dtype), (*k_nope.shape[:3], k_rope.shape[-1]))
    return jnp.concatenate([k_nope, k_rope], axis=-1), jnp.einsum("BSC,CNH->BSNH", c_kv, w_uv)


def join_query(q_nope, q_rope):
    """q_nope [B,T,N,H], q_rope [B,T,N,R] -> [B,T,N,H+R], matching `expand_keys`."""
    return jnp.concatenate([q_nope, q_rope.astype(q_nope.dtype)], axis=-1)


def flash_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, segment_ids, scale, *, implementation=None):
    """Causal expanded attention within segments [B,T] (None: one sequence), memory O(T·block).

    The same function as `expanded_attention` under `mla_jax.model.attention_mask(segment_ids)`.
    """
    k, v = expand_keys(c_kv, k_rope, w_uk, w_uv)
    return ops_attention.attention(join_query(q_nope, q_rope), k, v, segment_ids, scale=scale,
                                   implementation=implementation)


def absorb_query(q_nope, w_uk):
    """q_nope [B,T,N,H] · W_UK [C,N,H] -> q_lat [B,T,N,C]: the query seen from the latent space."""
    return jnp.einsum("BTNH,CNH->BTNC", q_nope, w_uk)


def absorbed_attention(q_nope, q_rope, c_kv, k_rope, w_uk, w_uv, mask, scale):
    """The same function as `expanded_attention`, computed over the latent rows directly.

    Scores are q_lat·c_kv + q_rope·k_rope; the output is (softmax · c_kv)·W_UV. Nothing per head of
    size S is materialised besides the scores.
    """
    f32 = jnp.float32
    q_lat = absorb_query(q_nope, w_uk)
    scores = jnp.einsum("BTNC,BSC->BNTS", q_lat, c_kv, preferred_element_type=f32)
    scores += jnp.einsum("BTNR,BSR->BNTS", q_rope, k_rope, preferred_element_type=f32)
    probs = masked_softmax(scores * scale, mask[:, None])
    o_lat = jnp.einsum("BNTS,BSC->BTNC", probs.astype(c_kv.dtype), c_kv)
    return jnp.einsum("BTNC,CNH->BTNH", o_lat, w_uv)


class DecodeLayout(nnx.Variable):
    """W_UK and W_UV transposed head-first ([N,H,C], [N,C,Hv]) for the absorbed decode step: derived
    from kv_b_proj once per generation (`with_decode_layout`), never trained or saved."""


def with_decode_layout(model: nnx.Module) -> nnx.Module:
    """A view of `model` (sharing its arrays) whose MLA blocks also hold W_UK and W_UV head-first
    (what `generate` decodes with on CPUs).

    The absorbed products batch over heads; from kv_b_proj's [C,N,H+Hv] XLA transposes both blocks
    on every decode step (on CPU as slow as reading all of the layer's other attention weights).
    Done once here, a step reads them in place. Extra memory: kv_b_proj's size.
    """
    view = nnx.merge(*nnx.split(model))
    for _, mla in nnx.iter_graph(view):
        if isinstance(mla, MLA) and mla.kv_b_proj.quant is None:  # a quantized kv_b stays quantized
            w_uk, w_uv = mla.w_uk, mla.w_uv  # [..., C, N, H], [..., C, N, Hv] (leading L when stacked)
            mla.uk_by_head = DecodeLayout(jnp.moveaxis(w_uk, -3, -1))  # [..., N, H, C]
            mla.uv_by_head = DecodeLayout(jnp.swapaxes(w_uv, -3, -2))  # [..., N, C, Hv]
    return view


class MLA(nnx.Module):
    """The weights of one MLA block and the projections around the attention maths."""

    def __init__(self, config: Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        n, d = c.num_attention_heads, c.hidden_size
        kw = dict(param_dtype=param_dtype, rngs=rngs)
        if c.q_lora_rank is None:
            self.q_proj = Linear(d, (n, c.qk_head_dim), **kw)
        else:
            self.q_a_proj = Linear(d, c.q_lora_rank, bias=c.attention_bias, **kw)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps, param_dtype=param_dtype)
            self.q_b_proj = Linear(c.q_lora_rank, (n, c.qk_head_dim), **kw)
        self.kv_a_proj_with_mqa = Linear(d, c.latent_dim, bias=c.attention_bias, **kw)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps, param_dtype=param_dtype)
        self.kv_b_proj = Linear(c.kv_lora_rank, (n, c.qk_nope_head_dim + c.v_head_dim), **kw)
        self.o_proj = OutProj(n, c.v_head_dim, d, bias=c.attention_bias, **kw)

    # W_UK [C,N,H] and W_UV [C,N,Hv] are two column blocks of kv_b_proj.
    @property
    def w_uk(self) -> jax.Array:
        return self.kv_b_proj.weight()[..., : self.config.qk_nope_head_dim]

    @property
    def w_uv(self) -> jax.Array:
        return self.kv_b_proj.weight()[..., self.config.qk_nope_head_dim :]

    def absorb(self, q_nope: jax.Array) -> jax.Array:
        """q_nope [B,T,N,H] -> q_lat [B,T,N,C] (`absorb_query`), head-first weights if present."""
        if getattr(self, "uk_by_head", None) is None:
            return absorb_query(q_nope, self.w_uk)
        return jnp.einsum("BTNH,NHC->BTNC", q_nope, self.uk_by_head[...])

    def unabsorb(self, o_lat: jax.Array) -> jax.Array:
        """o_lat [B,T,N,C] -> per-head values [B,T,N,Hv] through W_UV, head-first weights if present."""
        if getattr(self, "uv_by_head", None) is None:
            return jnp.einsum("BTNC,CNH->BTNH", o_lat, self.w_uv)
        return jnp.einsum("BTNC,NCH->BTNH", o_lat, self.uv_by_head[...])

    def queries(self, x, sin, cos):
        """x [B,T,D] -> q_nope [B,T,N,H], q_rope [B,T,N,R] (rotated)."""
        if self.config.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q[..., : self.config.qk_nope_head_dim], q[..., self.config.qk_nope_head_dim :]
        q_rope = apply_rope(q_rope, sin[:, :, None], cos[:, :, None], interleave=self.config.rope_interleave)
        return q_nope, q_rope

    def latents(self, x, sin, cos):
        """x [B,T,D] -> c_kv [B,T,C] (normed), k_rope [B,T,R] (rotated): what the cache stores."""
        kv = self.kv_a_proj_with_mqa(x)
        c_kv = self.kv_a_layernorm(kv[..., : self.config.kv_lora_rank])
        k_rope = apply_rope(kv[..., self.config.kv_lora_rank :], sin, cos, interleave=self.config.rope_interleave)
        return c_kv, k_rope

    def __call__(self, x, sin, cos, segment_ids=None, *, form: str = "expanded"):
        """Causal self-attention of x [B,T,D] within segments [B,T] (0 = padding); returns [B,T,D].

        form: "expanded" (memory-bounded, implementation by target), "dense" (expanded with dense
        scores: the reference) or "absorbed" (dense, over the latent).
        """
        if form not in FORMS:
            raise ValueError(f"form={form!r}; expected one of {FORMS}")
        q_nope, q_rope = self.queries(x, sin, cos)
        c_kv, k_rope = self.latents(x, sin, cos)
        args = (q_nope, q_rope, c_kv, k_rope, self.w_uk, self.w_uv)
        scale = self.config.softmax_scale
        if form == "expanded":
            return self.o_proj(flash_attention(*args, segment_ids, scale))
        b, t = x.shape[:2]
        segments = jnp.ones((b, t), jnp.int32) if segment_ids is None else segment_ids
        index = jnp.arange(t)
        mask = visible(index, index, segments, segments)
        attend = expanded_attention if form == "dense" else absorbed_attention
        return self.o_proj(attend(*args, mask, scale))
