"""Multi-head Latent Attention: the maths as two functions, and the module that holds the weights.

A token x is compressed to one latent row shared by all heads: `c_kv` (kv_lora_rank, RMS-normed) and
a rotary key `k_rope` (qk_rope_head_dim, rotated). `kv_b_proj` expands c_kv per head into the no-rope
key (W_UK) and the value (W_UV).

* expanded form (prefill, training): materialise K, V per head, then ordinary attention.
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
from mla_jax.rope import apply_rope


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax over the last axis in float32; rows with no visible key give zeros, never NaN."""
    scores = jnp.where(mask, scores.astype(jnp.float32), -jnp.inf)
    row_max = jnp.max(scores, axis=-1, keepdims=True)
    row_max = jnp.where(jnp.isfinite(row_max), row_max, 0.0)
    p = jnp.where(mask, jnp.exp(scores - row_max), 0.0)
    denom = jnp.sum(p, axis=-1, keepdims=True)
    return p / jnp.where(denom > 0, denom, 1.0)


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
        return self.kv_b_proj.kernel[...][..., : self.config.qk_nope_head_dim]

    @property
    def w_uv(self) -> jax.Array:
        return self.kv_b_proj.kernel[...][..., self.config.qk_nope_head_dim :]

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

    def __call__(self, x, sin, cos, mask, *, form: str = "expanded"):
        """Self-attention of x [B,T,D] over itself under mask [B,T,T]; returns [B,T,D]."""
        q_nope, q_rope = self.queries(x, sin, cos)
        c_kv, k_rope = self.latents(x, sin, cos)
        attend = {"expanded": expanded_attention, "absorbed": absorbed_attention}.get(form)
        if attend is None:
            raise ValueError(f"form={form!r}; expected 'expanded' or 'absorbed'")
        out = attend(q_nope, q_rope, c_kv, k_rope, self.w_uk, self.w_uv, mask, self.config.softmax_scale)
        return self.o_proj(out)
