"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | DeepSeekMoE) layers, norm, lm_head.

`Transformer(config, rngs=...)(tokens)` returns float32 logits [B,T,V]. Attention is replaceable per
call (`attention_fn`) so that generation can run the same layers over a paged latent cache.

Dimensions: B batch, T length, D model dim, V vocabulary.
"""

from __future__ import annotations

from typing import Callable, Protocol

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.attention import MLA
from mla_jax.config import Config
from mla_jax.layers import INIT_STD, MLP, Linear, RMSNorm
from mla_jax.moe import MoE
from mla_jax.rope import sin_cos


class AttentionFn(Protocol):
    """(layer index, the layer's MLA, normed x [B,T,D], sin, cos [B,T,R/2]) -> [B,T,D]."""

    def __call__(self, layer: int, mla: MLA, x: jax.Array, sin: jax.Array, cos: jax.Array) -> jax.Array: ...


def attention_mask(tokens_shape, segment_ids: jax.Array | None) -> jax.Array:
    """Causal mask [B,T,T]; with segment_ids [B,T], keys also must share the query's segment.

    Segment 0 marks padding: a padding query sees nothing, and no query sees a padding key.
    """
    b, t = tokens_shape
    causal = jnp.tril(jnp.ones((t, t), bool))[None]
    if segment_ids is None:
        return jnp.broadcast_to(causal, (b, t, t))
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return causal & same & (segment_ids[:, None, :] != 0)


class DecoderLayer(nnx.Module):
    def __init__(self, config: Config, layer: int, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.layer = layer
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MLA(c, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        if c.is_moe_layer(layer):
            self.mlp = MoE(c, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, param_dtype=param_dtype, rngs=rngs)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def __call__(self, x, sin, cos, attend: Callable, *, moe_reference: bool = False):
        h = x + attend(self.layer, self.self_attn, self.input_layernorm(x), sin, cos).astype(x.dtype)
        y = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(y, reference=moe_reference)
        else:
            y, aux = self.mlp(y), None
        return h + y.astype(h.dtype), aux


class Transformer(nnx.Module):
    """DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (without the MTP module) in Flax NNX."""

    def __init__(self, config: Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.param_dtype = param_dtype
        init = jax.nn.initializers.normal(INIT_STD)
        self.embed_tokens = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype))
        self.layers = nnx.List(
            [DecoderLayer(c, i, param_dtype=param_dtype, rngs=rngs) for i in range(c.num_hidden_layers)]
        )
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.lm_head = None if c.tie_word_embeddings else Linear(c.hidden_size, c.vocab_size, param_dtype=param_dtype, rngs=rngs)

    def embed(self, tokens: jax.Array) -> jax.Array:
        return jnp.take(self.embed_tokens[...], tokens, axis=0)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final norm and lm_head: h [B,T,D] -> float32 logits [B,T,V]."""
        h = self.norm(h)
        if self.lm_head is None:
            w = self.embed_tokens[...]
            return jnp.einsum("BTD,VD->BTV", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...]
        return jnp.einsum("BTD,DV->BTV", h.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_form: str = "expanded",
        attention_fn: AttentionFn | None = None,
        moe_reference: bool = False,
        return_aux: bool = False,
    ):
        """tokens [B,T] int -> float32 logits [B,T,V] (and, with return_aux, per-MoE-layer router stats).

        positions [B,T] default to 0..T-1 (restart them per document when packing); segment_ids [B,T]
        keep packed documents apart (0 = padding). `attention_fn` replaces self-attention, e.g. to
        attend over a cache; `attention_form` picks "expanded" or "absorbed" for the default.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        sin, cos = sin_cos(self.config, positions)
        if attention_fn is None:
            mask = attention_mask((b, t), segment_ids)

            def attention_fn(layer, mla, x, sin, cos):
                return mla(x, sin, cos, mask, form=attention_form)

        h = self.embed(tokens)
        aux = []
        for layer in self.layers:
            h, layer_aux = layer(h, sin, cos, attention_fn, moe_reference=moe_reference)
            if layer_aux is not None:
                aux.append(layer_aux)
        logits = self.logits(h)
        return (logits, aux) if return_aux else logits
