"""DeepSeekMoE: routing rules as functions, dropless dispatch, and the module.

Routing (gate maths in float32):
* scores: softmax or sigmoid of the router logits.
* greedy: top-k of the scores.
* group_limited_greedy (V2): experts split into n_group groups; a group's score is its best expert;
  only the top topk_group groups stay (the rest score 0), then top-k.
* noaux_tc (V3): choose with scores + e_score_correction_bias; a group's score is the sum of its two
  best biased scores; masked groups drop out; the weights are the unbiased scores of the chosen.
Weights: V3 normalises when norm_topk_prob, then multiplies by routed_scaling_factor; V2 (DeepSeek's
own code) normalises when top_k > 1 and norm_topk_prob, and otherwise scales.

Dispatch is dropless: the M·K (token, expert) pairs are sorted by expert and run through a grouped
matmul, one group per expert, chosen by compile target in mla_jax/ops/moe_dispatch.py. No capacity
factor, nothing dropped.

Dimensions: M tokens, D model dim, E routed experts, G groups, K experts per token, F expert hidden.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.config import Config
from mla_jax.layers import INIT_STD, MLP, RouterBias
from mla_jax.ops import moe_dispatch
from mla_jax.quant.blocks import Blocked, Quantized
from mla_jax.parallel.experts import sharded_dispatch


class Routing(NamedTuple):
    weights: jax.Array  # [M,K] float32, what multiplies each expert's output
    experts: jax.Array  # [M,K] int32
    scores: jax.Array  # [M,E] float32 softmax/sigmoid scores (no bias): the balance losses use them


def router_scores(logits: jax.Array, scoring_func: str) -> jax.Array:
    logits = logits.astype(jnp.float32)
    if scoring_func == "softmax":
        return jax.nn.softmax(logits, axis=-1)
    if scoring_func == "sigmoid":
        return jax.nn.sigmoid(logits)
    raise ValueError(f"scoring_func={scoring_func!r}; expected 'softmax' or 'sigmoid'")


def _keep_top_groups(group_scores: jax.Array, topk_group: int, experts_per_group: int) -> jax.Array:
    """group_scores [M,G] -> boolean expert mask [M,E] of the topk_group best groups."""
    _, top = jax.lax.top_k(group_scores, topk_group)
    keep = jnp.zeros(group_scores.shape, bool).at[jnp.arange(group_scores.shape[0])[:, None], top].set(True)
    return jnp.repeat(keep, experts_per_group, axis=-1)


def route(logits: jax.Array, config: Config, bias: jax.Array | None = None) -> Routing:
    """logits [M,E] (float32 router logits) -> Routing. `bias` is e_score_correction_bias [E]."""
    c = config
    k, g = c.num_experts_per_tok, c.n_group
    scores = router_scores(logits, c.scoring_func)
    m, e = scores.shape
    per_group = e // g
    if c.topk_method == "greedy":
        weights, experts = jax.lax.top_k(scores, k)
    elif c.topk_method == "group_limited_greedy":
        group_scores = scores.reshape(m, g, per_group).max(axis=-1)
        keep = _keep_top_groups(group_scores, c.topk_group, per_group)
        weights, experts = jax.lax.top_k(jnp.where(keep, scores, 0.0), k)
    elif c.topk_method == "noaux_tc":
        if bias is None:
            raise ValueError("noaux_tc routing needs e_score_correction_bias")
        choice = scores + bias.astype(jnp.float32)
        group_scores = jax.lax.top_k(choice.reshape(m, g, per_group), 2)[0].sum(axis=-1)
        keep = _keep_top_groups(group_scores, c.topk_group, per_group)
        _, experts = jax.lax.top_k(jnp.where(keep, choice, -jnp.inf), k)
        weights = jnp.take_along_axis(scores, experts, axis=-1)
    else:
        raise ValueError(f"topk_method={c.topk_method!r}")

    def normalise(w):
        return w / (jnp.sum(w, axis=-1, keepdims=True) + 1e-20)

    if c.model_type == "deepseek_v2":
        if k > 1 and c.norm_topk_prob:
            weights = normalise(weights)
        else:
            weights = weights * c.routed_scaling_factor
    else:
        if c.norm_topk_prob:
            weights = normalise(weights)
        weights = weights * c.routed_scaling_factor
    return Routing(weights, experts.astype(jnp.int32), scores)


def dispatch(x, routing: Routing, w_gate, w_up, w_down, *, implementation: str | None = None, act: str = "silu"):
    """Dropless expert computation. x [M,D]; w_gate, w_up [E,D,F]; w_down [E,F,D] -> [M,D].

    The weights may be quantized (`mla_jax.quant.Blocked`): they stay so until each expert's turn.

    The grouped-matmul implementation follows the compile target (mla_jax/ops/moe_dispatch.py).
    """
    return moe_dispatch.dispatch(x, routing.weights, routing.experts, w_gate, w_up, w_down,
                                 implementation=implementation, act=act)


def dispatch_reference(x, routing: Routing, w_gate, w_up, w_down, *, act: str = "silu"):
    """Every expert on every token, combined with a dense [M,E] weight matrix. For tests only."""
    return moe_dispatch.dispatch_reference(x, routing.weights, routing.experts, w_gate, w_up, w_down, act=act)


def expert_load(routing: Routing, n_experts: int) -> jax.Array:
    """Tokens routed to each expert [E] (float32)."""
    return jnp.bincount(routing.experts.reshape(-1), length=n_experts).astype(jnp.float32)


class Experts(nnx.Module):
    """Routed experts stacked along E: gate_proj, up_proj [E,D,F]; down_proj [E,F,D].

    Quantized (`mla_jax.quant.apply`), each holds quantized values beside `<name>_scale_inv`
    [E, nI, nO], and `weights()` hands them to the dispatch still quantized: each expert is
    dequantized there, one at a time, only when it has rows.
    """

    NAMES = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, n_experts: int, dim: int, hidden: int, *, param_dtype, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(INIT_STD)
        self.gate_proj = nnx.Param(init(rngs.params(), (n_experts, dim, hidden), param_dtype))
        self.up_proj = nnx.Param(init(rngs.params(), (n_experts, dim, hidden), param_dtype))
        self.down_proj = nnx.Param(init(rngs.params(), (n_experts, hidden, dim), param_dtype))
        self.quant: Quantized | None = None
        self.gate_proj_scale_inv = nnx.data(None)
        self.up_proj_scale_inv = nnx.data(None)
        self.down_proj_scale_inv = nnx.data(None)
        self.by_expert = nnx.data(None)  # the CPU decode layout (`with_expert_layout`), else None

    def weights(self) -> tuple:
        """(gate, up, down): arrays, `Blocked` quantized weights, or (in the CPU decode layout)
        tuples of E per-expert arrays."""
        if self.by_expert is not None:
            return tuple(tuple(v[...] for v in per_expert) for per_expert in self.by_expert)
        if self.quant is None:
            return tuple(getattr(self, n)[...] for n in self.NAMES)
        return tuple(Blocked(getattr(self, n)[...], getattr(self, f"{n}_scale_inv")[...], self.quant)
                     for n in self.NAMES)


class ExpertLayout(nnx.Variable):
    """One routed expert's gate, up or down weight split out of the stack (`with_expert_layout`):
    derived once per generation, never trained or saved."""


def with_expert_layout(model: nnx.Module) -> nnx.Module:
    """A view of `model` (sharing its arrays) whose routed experts are also held one array per expert
    (what `generate` decodes with on CPUs; `grouped_matmul_by_expert`).

    XLA:CPU copies an expert's [D,F] out of the stacked [E,D,F] before every dot that reads it, on
    every step (mla_jax/ops/moe_dispatch.py); held apart, each is read in place. Extra memory: the
    routed experts' size. Only float32 experts of runs of one MoE layer get it: bf16 or quantized
    experts are converted to float32 one at a time anyway (a copy as costly), and in a run of L > 1
    scanned layers the scan would copy every expert's layer slice ([L,D,F] -> [D,F]) every step.
    """
    view = nnx.merge(*nnx.split(model))
    for _, experts in nnx.iter_graph(view):
        if not isinstance(experts, Experts) or experts.quant is not None:
            continue
        stacked = [getattr(experts, n)[...] for n in Experts.NAMES]  # [E,D,F] or [L,E,D,F]
        if stacked[0].dtype != jnp.float32 or (stacked[0].ndim == 4 and stacked[0].shape[0] != 1):
            continue
        axis = stacked[0].ndim - 3  # E
        experts.by_expert = nnx.List([
            nnx.List([ExpertLayout(jnp.take(w, e, axis=axis)) for e in range(w.shape[axis])])
            for w in stacked])
    return view


class MoE(nnx.Module):
    """Shared experts (always on) + routed experts behind the gate."""

    def __init__(self, config: Config, *, param_dtype=jnp.float32, rngs: nnx.Rngs):
        c = config
        self.config = c
        e, d = c.n_routed_experts, c.hidden_size
        init = jax.nn.initializers.normal(INIT_STD)
        self.gate = nnx.Param(init(rngs.params(), (d, e), param_dtype))  # router kernel [D,E]
        self.e_score_correction_bias = (
            RouterBias(jnp.zeros((e,), jnp.float32)) if c.topk_method == "noaux_tc" else None
        )
        self.experts = Experts(e, d, c.moe_intermediate_size, param_dtype=param_dtype, rngs=rngs)
        self.shared_experts = (
            MLP(d, c.moe_intermediate_size * c.n_shared_experts, bias=c.mlp_bias, act=c.hidden_act,
                param_dtype=param_dtype, rngs=rngs)
            if c.n_shared_experts > 0 else None
        )

    def routing(self, x: jax.Array) -> Routing:
        """x [M,D] -> Routing (logits in float32 from float32 inputs and weights)."""
        logits = jnp.einsum("MD,DE->ME", x.astype(jnp.float32), self.gate[...].astype(jnp.float32))
        bias = None if self.e_score_correction_bias is None else self.e_score_correction_bias[...]
        return route(logits, self.config, bias)

    def __call__(self, x: jax.Array, *, reference: bool = False, implementation: str | None = None):
        """x [B,T,D] -> (y [B,T,D], aux) with aux = {scores [M,E], experts [M,K], load [E]}.

        `reference` runs the dense form; `implementation` overrides the grouped matmul's choice.
        """
        shape = x.shape
        flat = x.reshape(-1, shape[-1])
        r = self.routing(flat)
        weights = self.experts.weights()
        if reference:
            y = dispatch_reference(flat, r, *weights, act=self.config.hidden_act)
        else:  # on a mesh with an `expert` axis the routed experts run split over it (mla_jax.parallel.experts)
            y = sharded_dispatch(dispatch, flat, r, *weights, implementation=implementation,
                                 act=self.config.hidden_act)
        y = y.astype(x.dtype).reshape(shape)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        aux = {"scores": r.scores, "experts": r.experts, "load": expert_load(r, self.config.n_routed_experts)}
        return y, aux
