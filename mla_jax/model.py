"""The DeepSeek-V2/V3 decoder: embeddings, MLA + (dense MLP | DeepSeekMoE) layers, norm, lm_head.

`Transformer(config, rngs=...)(tokens)` returns float32 logits [B,T,V].

Layers are scanned, not unrolled: consecutive layers of one kind (DeepSeek: `first_k_dense_replace`
dense-MLP layers, then MoE layers) form a run, and each run is one stacked module whose every
weight has a leading layer axis L, applied by `jax.lax.scan`. The compiled program holds one loop
body per run however deep the model is, so compile time does not grow with depth.

Attention is replaceable per call (`AttentionFn`) so that generation can run the same layers over
a paged latent cache: the callback gets the layer's global index (a traced int32 scalar) and a
`carry` that the scan threads from layer to layer (generation's cache).

Checkpoints keep one entry per layer (("layers", i, ...), the hub's own order): `checkpoint_paths`
and `model_path` translate between those and the stacked tree (("stacks", k, ...), index j).

Dimensions: B batch, T length, D model dim, V vocabulary, L layers of a run.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Protocol

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from mla_jax.attention import MLA
from mla_jax.config import Config
from mla_jax.layers import INIT_STD, MLP, Linear, RMSNorm, use_out_in
from mla_jax.moe import MoE
from mla_jax.parallel.mesh import auto_axes, leading_spec
from mla_jax.rope import sin_cos

Path = tuple


class AttentionFn(Protocol):
    """(layer index, the layer's MLA, normed x [B,T,D], sin, cos [B,T,R/2], carry) -> ([B,T,D], carry).

    The layer index is a traced int32 scalar (the layers are scanned); `carry` is passed on to the
    next layer's call unchanged in structure (shapes and dtypes fixed).
    """

    def __call__(self, layer: jax.Array, mla: MLA, x: jax.Array, sin: jax.Array, cos: jax.Array,
                 carry: Any) -> tuple[jax.Array, Any]: ...


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


# ------------------------------------------------------------------------ which layers stack together
class LayerRun(NamedTuple):
    """`count` consecutive layers of one kind, from layer `first` on: one scanned stack."""

    first: int
    count: int
    moe: bool


def layer_runs(config: Config) -> tuple[LayerRun, ...]:
    """The model's layers grouped into maximal runs of one kind, in order.

    DeepSeek-V2/V3 (moe_layer_freq 1) give at most two: the dense layers, then the MoE layers. An
    interleaving freq > 1 gives one run per layer, still correct, only no longer flat in depth.
    """
    runs: list[LayerRun] = []
    for i in range(config.num_hidden_layers):
        moe = config.is_moe_layer(i)
        if runs and runs[-1].moe == moe:
            runs[-1] = runs[-1]._replace(count=runs[-1].count + 1)
        else:
            runs.append(LayerRun(i, 1, moe))
    return tuple(runs)


def model_path(config: Config, path: Path) -> tuple[Path, int | None]:
    """Checkpoint path -> (model path, index along its layer axis); None for unstacked variables.

    ("layers", 4, "mlp", "gate") -> (("stacks", 1, "mlp", "gate"), 1) when run 1 starts at layer 3.
    """
    if not path or path[0] != "layers":
        return path, None
    i = path[1]
    for k, run in enumerate(layer_runs(config)):
        if run.first <= i < run.first + run.count:
            return ("stacks", k, *path[2:]), i - run.first
    raise KeyError(f"{'.'.join(map(str, path))}: the model has layers 0..{config.num_hidden_layers - 1}")


def checkpoint_paths(config: Config, path: Path) -> list[tuple[Path, int | None]]:
    """Model path -> [(checkpoint path, index along the layer axis)]: one per layer for a stacked
    variable, [(path, None)] for the others."""
    if not path or path[0] != "stacks":
        return [(path, None)]
    run = layer_runs(config)[path[1]]
    return [(("layers", run.first + j, *path[2:]), j) for j in range(run.count)]


# ------------------------------------------------------------------------ modules
class DecoderLayer(nnx.Module):
    """Pre-norm MLA, then pre-norm dense MLP or MoE, each with a residual connection."""

    def __init__(self, config: Config, moe: bool, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.input_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = MLA(c, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(c.hidden_size, c.rms_norm_eps, param_dtype=param_dtype)
        if moe:
            self.mlp = MoE(c, param_dtype=param_dtype, rngs=rngs)
        else:
            self.mlp = MLP(c.hidden_size, c.intermediate_size, bias=c.mlp_bias, act=c.hidden_act,
                           param_dtype=param_dtype, rngs=rngs)

    @property
    def is_moe(self) -> bool:
        return isinstance(self.mlp, MoE)

    def __call__(self, layer, x, sin, cos, attend: AttentionFn, carry, *, moe_reference: bool = False):
        """x [B,T,D] -> (x [B,T,D], carry, router stats of an MoE layer or None)."""
        out, carry = attend(layer, self.self_attn, self.input_layernorm(x), sin, cos, carry)
        h = x + out.astype(x.dtype)
        y = self.post_attention_layernorm(h)
        if self.is_moe:
            y, aux = self.mlp(y, reference=moe_reference)
        else:
            y, aux = self.mlp(y), None
        return h + y.astype(h.dtype), carry, aux


# What the backward pass keeps of a layer's forward (`remat`), the rest being recomputed per layer:
# "none" everything, "dots" the weight matmuls' outputs (not attention's batched ones), "full"
# only the layer's input. The gradients are the same; only memory and recomputation differ.
REMAT_POLICIES = {
    "none": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "full": jax.checkpoint_policies.nothing_saveable,
}


def _layer_stack(config: Config, run: LayerRun, param_dtype, rngs: nnx.Rngs) -> DecoderLayer:
    """`run.count` independently initialised layers as one DecoderLayer with weights [L, ...]."""

    @nnx.split_rngs(splits=run.count)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def make(rngs):
        return DecoderLayer(config, run.moe, param_dtype=param_dtype, rngs=rngs)

    return make(rngs)


def scan_layers(stack: DecoderLayer, run: LayerRun, h, sin, cos, attend: AttentionFn, carry, *,
                moe_reference: bool = False, remat: str = "none"):
    """The run's layers one after another over h [B,T,D]: (h, carry, router stats stacked [L, ...] or None).

    `remat` (a key of REMAT_POLICIES) rematerialises each layer in the backward pass.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"remat={remat!r}; expected one of {tuple(REMAT_POLICIES)}")
    graphdef, weights = nnx.split(stack)

    def body(state, xs):
        layer_weights, index = xs
        h, carry = state
        h, carry, aux = nnx.merge(graphdef, layer_weights)(index, h, sin, cos, attend, carry,
                                                           moe_reference=moe_reference)
        return (h, carry), aux

    if remat != "none":
        body = jax.checkpoint(body, policy=REMAT_POLICIES[remat])
    index = run.first + jnp.arange(run.count, dtype=jnp.int32)
    (h, carry), aux = jax.lax.scan(body, (h, carry), (weights, index))
    return h, carry, aux


class Transformer(nnx.Module):
    """DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (without the MTP module) in Flax NNX.

    `stacks[k]` holds the layers of `layer_runs(config)[k]`, every weight with a leading axis L.
    """

    def __init__(self, config: Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        self.param_dtype = param_dtype
        init = jax.nn.initializers.normal(INIT_STD)
        self.embed_tokens = nnx.Param(init(rngs.params(), (c.vocab_size, c.hidden_size), param_dtype))
        self.stacks = nnx.List([_layer_stack(c, run, param_dtype, rngs) for run in layer_runs(c)])
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
        if use_out_in(self.lm_head, h):  # the CPU layout (mla_jax.layers.with_cpu_layout)
            w = self.lm_head.kernel_out_in[...]
            return jnp.einsum("BTD,VD->BTV", h.astype(w.dtype), w, preferred_element_type=jnp.float32)
        w = self.lm_head.kernel[...]
        return jnp.einsum("BTD,DV->BTV", h.astype(w.dtype), w, preferred_element_type=jnp.float32)

    def run_layers(self, h, sin, cos, attend: AttentionFn, carry=None, *, moe_reference: bool = False,
                   remat: str = "none"):
        """Every decoder layer over h [B,T,D] with `attend` as self-attention (`remat`: see REMAT_POLICIES).

        Returns (h [B,T,D], carry, router stats): the stats of the MoE layers in order, each of
        scores [L,M,E], experts [L,M,K], load [L,E] stacked over the L MoE layers (None without any).
        """
        stats = []
        for stack, run in zip(self.stacks, layer_runs(self.config)):
            h, carry, aux = scan_layers(stack, run, h, sin, cos, attend, carry, moe_reference=moe_reference,
                                        remat=remat)
            if run.moe:
                stats.append(aux)
        aux = jax.tree.map(lambda *xs: jnp.concatenate(xs), *stats) if stats else None
        return h, carry, aux

    def __call__(
        self,
        tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        attention_form: str = "expanded",
        moe_reference: bool = False,
        return_aux: bool = False,
        remat: str = "none",
    ):
        """tokens [B,T] int -> float32 logits [B,T,V] (and, with return_aux, the router stats).

        positions [B,T] default to 0..T-1 (restart them per document when packing); segment_ids [B,T]
        keep packed documents apart (0 = padding); `attention_form` is "expanded" (memory-bounded),
        "dense" (its dense-scores reference) or "absorbed". `remat` ("none", "dots", "full") trades
        the backward pass's memory for recomputation per layer (REMAT_POLICIES); same gradients.
        With return_aux, also {scores [L,M,E], experts [L,M,K], load [L,E]} over the L MoE layers
        in order (M = B·T tokens), or None for a model without MoE layers.
        """
        b, t = tokens.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        graphdef, state = nnx.split(self)

        def forward(state, tokens, positions, segment_ids):
            model = nnx.merge(graphdef, state)
            sin, cos = sin_cos(model.config, positions)

            def attend(layer, mla, x, sin, cos, carry):
                return mla(x, sin, cos, segment_ids, form=attention_form), carry

            h, _, aux = model.run_layers(model.embed(tokens), sin, cos, attend, moe_reference=moe_reference,
                                           remat=remat)
            return model.logits(h), aux

        # On a mesh with Explicit axes the body runs with sharding propagation (mla_jax.parallel);
        # logits and router stats [L,M,E] come back split like the batch (M = B·T, batch-major).
        rows = leading_spec(tokens, 1)[0]
        specs = (P(rows, None, None), None if not any(run.moe for run in layer_runs(self.config)) else
                 {"scores": P(None, rows, None), "experts": P(None, rows, None), "load": P(None, None)})
        logits, aux = auto_axes(forward, (state, tokens, positions, segment_ids), specs)
        return (logits, aux) if return_aux else logits
