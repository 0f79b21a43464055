"""DeepSeekMoE: routing rules against hand-computed cases, dropless dispatch against the dense reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.config import Config, RopeScaling
from mla_jax.moe import Routing, dispatch, dispatch_reference, route


def cfg(**kw) -> Config:
    fields = dict(
        model_type="deepseek_v3", vocab_size=8, hidden_size=8, intermediate_size=8, num_hidden_layers=1,
        num_attention_heads=1, q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=2, qk_rope_head_dim=2,
        v_head_dim=2, moe_intermediate_size=4, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=2,
        first_k_dense_replace=0, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, rope_theta=1e4,
        rope_scaling=RopeScaling(), rope_interleave=True,
        max_position_embeddings=64, rms_norm_eps=1e-6,
    )
    fields.update(kw)
    return Config(**fields)


def chosen(r: Routing):
    """{expert: weight} for the single token routed."""
    return {int(e): float(w) for e, w in zip(r.experts[0], r.weights[0])}


PROBS = np.array([[0.05, 0.40, 0.10, 0.30, 0.02, 0.03, 0.06, 0.04]], np.float32)  # already sums to 1
LOGITS = jnp.log(jnp.asarray(PROBS))  # softmax(LOGITS) == PROBS


def test_greedy_takes_top_k_scores_times_scaling():
    r = route(LOGITS, cfg(n_routed_experts=8, routed_scaling_factor=2.0), None)
    assert chosen(r) == pytest.approx({1: 0.80, 3: 0.60})


def test_group_limited_greedy_only_looks_inside_the_best_groups():
    # groups {0,1} {2,3} {4,5} {6,7}: best members 0.40, 0.30, 0.03, 0.06 -> only group 0 stays,
    # so expert 0 (0.05) is chosen over expert 3 (0.30), which greedy would take
    c = cfg(n_routed_experts=8, topk_method="group_limited_greedy", n_group=4, topk_group=1, model_type="deepseek_v2")
    assert chosen(route(LOGITS, c, None)) == pytest.approx({1: 0.40, 0: 0.05})


def test_noaux_tc_chooses_with_bias_but_weighs_without_it():
    logits = jnp.asarray([[0.0, 1.0, -1.0, 0.5]])
    scores = 1 / (1 + np.exp(-np.array([0.0, 1.0, -1.0, 0.5])))
    bias = jnp.asarray([0.0, 0.0, 2.0, 0.0])  # pushes expert 2 into the choice
    c = cfg(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=2, norm_topk_prob=False)
    assert chosen(route(logits, c, bias)) == pytest.approx({2: scores[2], 1: scores[1]})


def test_noaux_tc_group_score_is_sum_of_two_best_biased_scores():
    # groups {0,1} and {2,3}; group 1's top-2 sum wins although expert 0 alone is the best score
    logits = jnp.asarray([[3.0, -3.0, 1.0, 1.0]])
    s = 1 / (1 + np.exp(-np.array([3.0, -3.0, 1.0, 1.0])))
    c = cfg(topk_method="noaux_tc", scoring_func="sigmoid", n_group=2, topk_group=1, norm_topk_prob=True,
            routed_scaling_factor=2.5)
    w = 2.5 * s[2:] / s[2:].sum()
    assert chosen(route(logits, c, jnp.zeros(4))) == pytest.approx({2: w[0], 3: w[1]})


@pytest.mark.parametrize("model_type, expected", [
    # DeepSeek-V2's rule: normalise (top_k > 1) *instead of* scaling
    ("deepseek_v2", {1: 0.40 / 0.70, 3: 0.30 / 0.70}),
    # DeepSeek-V3's rule: normalise, *then* scale
    ("deepseek_v3", {1: 3.0 * 0.40 / 0.70, 3: 3.0 * 0.30 / 0.70}),
])
def test_norm_topk_prob_rule_per_model_type(model_type, expected):
    c = cfg(model_type=model_type, n_routed_experts=8, norm_topk_prob=True, routed_scaling_factor=3.0)
    assert chosen(route(LOGITS, c, None)) == pytest.approx(expected)


def test_v2_top1_scales_even_when_normalising():
    c = cfg(model_type="deepseek_v2", n_routed_experts=8, num_experts_per_tok=1, norm_topk_prob=True,
            routed_scaling_factor=3.0)
    assert chosen(route(LOGITS, c, None)) == pytest.approx({1: 1.2})


def test_moe_layer_freq_follows_deepseek():
    c = cfg(num_hidden_layers=7, first_k_dense_replace=2, moe_layer_freq=2)
    assert [c.is_moe_layer(i) for i in range(7)] == [False, False, True, False, True, False, True]


@pytest.mark.parametrize("m, e, k", [(1, 4, 1), (13, 8, 2), (64, 16, 6), (5, 32, 8)])
def test_dropless_dispatch_equals_dense_reference(m, e, k):
    d, f = 12, 20
    keys = jax.random.split(jax.random.key(m * e + k), 5)
    x = jax.random.normal(keys[0], (m, d))
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) / d ** 0.5 for kk in keys[1:3])
    w_down = jax.random.normal(keys[3], (e, f, d)) / f ** 0.5
    experts = jax.vmap(lambda kk: jax.random.choice(kk, e, (k,), replace=False))(jax.random.split(keys[4], m))
    r = Routing(jax.random.uniform(keys[4], (m, k)), experts.astype(jnp.int32), jnp.zeros((m, e)))
    out, ref = dispatch(x, r, w_gate, w_up, w_down), dispatch_reference(x, r, w_gate, w_up, w_down)
    assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 1e-5


def test_dispatch_gradients_equal_reference_gradients():
    m, e, k, d, f = 9, 4, 2, 6, 5
    keys = jax.random.split(jax.random.key(7), 5)
    x = jax.random.normal(keys[0], (m, d))
    ws = [jax.random.normal(kk, s) for kk, s in zip(keys[1:4], [(e, d, f), (e, d, f), (e, f, d)])]
    experts = jnp.stack([jnp.arange(m) % e, (jnp.arange(m) + 1) % e], 1).astype(jnp.int32)

    def loss(fn, weights, x, ws):
        return jnp.sum(fn(x, Routing(weights, experts, jnp.zeros((m, e))), *ws) ** 2)

    weights = jax.random.uniform(keys[4], (m, k))
    g = jax.grad(lambda *a: loss(dispatch, *a), argnums=(0, 1, 2))(weights, x, ws)
    g_ref = jax.grad(lambda *a: loss(dispatch_reference, *a), argnums=(0, 1, 2))(weights, x, ws)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g_ref)):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-5


def test_moe_module_dispatch_equals_reference_on_tiny_checkpoint():
    from flax import nnx

    from mla_jax import Transformer

    c = Config.from_hf("checkpoints/tiny_v3")
    model = Transformer(c, rngs=nnx.Rngs(3))
    tokens = jax.random.randint(jax.random.key(0), (2, 33), 0, c.vocab_size)
    out, aux = nnx.jit(lambda m, t: m(t, return_aux=True))(model, tokens)
    ref = nnx.jit(lambda m, t: m(t, moe_reference=True))(model, tokens)
    assert float(jnp.max(jnp.abs(out - ref)) / jnp.max(jnp.abs(ref))) < 1e-5
    moe_layers = sum(c.is_moe_layer(i) for i in range(c.num_hidden_layers))
    assert aux["load"].sum(axis=-1).tolist() == [2 * 33 * c.num_experts_per_tok] * moe_layers  # [L,E]

