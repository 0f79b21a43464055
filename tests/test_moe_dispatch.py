"""MoE dispatch implementations against the dense reference, on ragged expert loads.

Loads: random, some experts empty, one expert taking every pair, a decode-sized batch (fewer pair
rows than a tile), and batches large enough to cross tile boundaries and to run in token chunks.
Values and gradients (inputs, routing weights, all three expert weights) must match
`dispatch_reference` to float32 rounding.
"""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops import moe_dispatch as md

D, F = 12, 20


def relative(a, b) -> float:
    return float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))


def load(name: str, m: int, e: int, k: int, key) -> jax.Array:
    """experts [M,K] (distinct per token) for a named load pattern."""
    rows = jax.vmap(lambda kk: jax.random.permutation(kk, e)[:k])(jax.random.split(key, m))
    if name == "random":
        return rows.astype(jnp.int32)
    if name == "half_the_experts_empty":  # only experts 0 .. e/2-1 ever chosen
        rows = jax.vmap(lambda kk: jax.random.permutation(kk, e // 2)[:k])(jax.random.split(key, m))
        return rows.astype(jnp.int32)
    if name == "one_expert_takes_all":  # k == 1: expert e-1 gets every token, all others empty
        return jnp.full((m, k), e - 1, jnp.int32)
    if name == "one_expert_in_every_choice":  # expert 3 in every token's choice, the rest random
        others = jax.vmap(lambda kk: jax.random.permutation(kk, jnp.arange(e - 1) + (jnp.arange(e - 1) >= 3))[: k - 1])(
            jax.random.split(key, m))
        return jnp.concatenate([jnp.full((m, 1), 3), others], axis=1).astype(jnp.int32)
    raise ValueError(name)


def problem(m, e, k, pattern, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (m, D))
    w_gate, w_up = (jax.random.normal(kk, (e, D, F)) / D ** 0.5 for kk in keys[1:3])
    w_down = jax.random.normal(keys[3], (e, F, D)) / F ** 0.5
    experts = load(pattern, m, e, k, keys[4])
    weights = jax.random.uniform(keys[5], (m, k))
    return x, weights, experts, w_gate, w_up, w_down


CASES = [  # (M tokens, E experts, K, load): decode-sized, tile crossing, ragged
    (1, 8, 2, "random"),
    (3, 16, 6, "random"),
    (150, 8, 2, "half_the_experts_empty"),
    (70, 6, 1, "one_expert_takes_all"),
    (90, 8, 2, "one_expert_in_every_choice"),
]


@pytest.mark.parametrize("m, e, k, pattern", CASES)
def test_dispatch_values_equal_reference(m, e, k, pattern):
    args = problem(m, e, k, pattern)
    out = jax.jit(md.dispatch)(*args)  # what this platform gets
    assert relative(out, md.dispatch_reference(*args)) < 1e-5


@pytest.mark.parametrize("m, e, k, pattern", CASES)
def test_dispatch_gradients_equal_reference(m, e, k, pattern):
    x, weights, experts, *ws = problem(m, e, k, pattern, seed=1)

    def loss(fn):
        # a non-linear loss so that every output row's cotangent differs
        return lambda x, weights, *ws: jnp.sum(jnp.sin(fn(x, weights, experts, *ws)))

    argnums = (0, 1, 2, 3, 4)
    got = jax.jit(jax.grad(loss(lambda *a: md.dispatch(*a, implementation="loops")), argnums))(x, weights, *ws)
    want = jax.grad(loss(md.dispatch_reference), argnums)(x, weights, *ws)
    for name, a, b in zip(["x", "weights", "w_gate", "w_up", "w_down"], got, want):
        assert relative(a, b) < 1e-5, name


def test_empty_experts_get_zero_weight_gradient():
    x, weights, experts, *ws = problem(150, 8, 2, "half_the_experts_empty")
    grads = jax.grad(lambda ws: jnp.sum(md.dispatch(x, weights, experts, *ws, implementation="loops") ** 2))(ws)
    for g in grads:
        assert float(jnp.abs(g[4:]).max()) == 0.0 and float(jnp.abs(g[:4]).max()) > 0.0


def test_token_chunks_give_the_same_values_and_gradients():
    """A batch over `max_rows` pair rows runs forward in token chunks (the last one padded)."""
    x, weights, experts, *ws = problem(37, 8, 3, "random", seed=2)

    def f(max_rows):
        return lambda x, weights, *ws: md.dispatch(x, weights, experts, *ws, implementation="loops", max_rows=max_rows)

    whole, chunked = f(md.MAX_ROWS), f(24)  # 24 rows: chunks of 8 tokens, 5 chunks, 3 padded tokens
    assert relative(chunked(x, weights, *ws), whole(x, weights, *ws)) < 1e-6
    g_whole = jax.grad(lambda *a: jnp.sum(jnp.sin(whole(*a))), (0, 1, 2, 3, 4))(x, weights, *ws)
    g_chunked = jax.grad(lambda *a: jnp.sum(jnp.sin(chunked(*a))), (0, 1, 2, 3, 4))(x, weights, *ws)
    for a, b in zip(g_chunked, g_whole):
        assert relative(a, b) < 1e-6


# Row tiles: 64-row, 8-row, and single rows for an expert's last one or two: [65, 2, 1] ends in
# single rows after a 64-row tile, 2 and 1 are single rows only; [0, 5, 0, 60, 3] pads 8-row tiles.
@pytest.mark.parametrize("group_sizes", [[0, 5, 0, 60, 3], [68, 0, 0, 0, 0], [0, 0, 0, 0, 68], [1, 1, 1, 1, 1],
                                         [65, 0, 2, 0, 1]])
def test_grouped_matmul_loops_is_ragged_dot(group_sizes):
    """Same contract as jax.lax.ragged_dot, rows past sum(group_sizes) included (they are zero)."""
    keys = jax.random.split(jax.random.key(3), 3)
    lhs = jax.random.normal(keys[0], (68, D))
    rhs = jax.random.normal(keys[1], (5, D, F))
    gs = jnp.asarray(group_sizes, jnp.int32)
    got = jax.jit(md.grouped_matmul_loops)(lhs, rhs, gs)
    np.testing.assert_allclose(got, jax.lax.ragged_dot(lhs, rhs, gs), rtol=1e-5, atol=1e-5)
    dout = jax.random.normal(keys[2], (68, F))
    vjp_got = jax.vjp(lambda a, b: md.grouped_matmul_loops(a, b, gs), lhs, rhs)[1](dout)
    vjp_want = jax.vjp(lambda a, b: jax.lax.ragged_dot(a, b, gs), lhs, rhs)[1](dout)
    for a, b in zip(vjp_got, vjp_want):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_bfloat16_weights_are_multiplied_in_float32():
    """bf16 in, bf16 out, float32 products and sums: within bf16 rounding of the float32 result."""
    args = problem(37, 8, 3, "random", seed=4)
    x, weights, experts, *ws = args
    bf16 = [w.astype(jnp.bfloat16) for w in ws]
    out = md.dispatch(x.astype(jnp.bfloat16), weights, experts, *bf16, implementation="loops")
    ref = md.dispatch_reference(x.astype(jnp.bfloat16).astype(jnp.float32), weights, experts,
                                *[w.astype(jnp.float32) for w in bf16])
    assert out.dtype == jnp.bfloat16
    assert relative(out.astype(jnp.float32), ref) < 2e-2


def test_bad_shapes_and_names_are_clear_errors():
    lhs, rhs = jnp.zeros((4, D)), jnp.zeros((3, D + 1, F))
    with pytest.raises(ValueError, match="rhs.shape"):
        md.grouped_matmul(lhs, rhs, jnp.zeros((3,), jnp.int32))
    with pytest.raises(ValueError, match="implementation='pallas'"):
        md.dispatch(*problem(3, 8, 2, "random"), implementation="pallas")


def test_platform_override_picks_the_loops_for_cpu(monkeypatch):
    """MLA_JAX_PLATFORM=cpu traces only the loop form (while loops, no ragged_dot, no kernel call)."""
    monkeypatch.setenv("MLA_JAX_PLATFORM", "cpu")
    jaxpr = str(jax.make_jaxpr(md.dispatch)(*problem(5, 8, 2, "random")))
    assert "while" in jaxpr and "ragged_dot" not in jaxpr and "pallas_call" not in jaxpr


def test_tokamax_is_not_chosen_without_a_hopper_default_device():
    assert not md.tokamax_serves()  # this process's default device is a CPU


# ------------------------------------------------------------------------ experts held one array each
def by_expert(*stacks):
    """[E,...] stacks -> tuples of E separate arrays (the CPU decode layout)."""
    return tuple(tuple(jnp.array(w[e]) for e in range(w.shape[0])) for w in stacks)


@pytest.mark.parametrize("m, e, k, pattern", CASES)
def test_experts_held_one_array_each_give_the_reference(m, e, k, pattern):
    x, weights, experts, *ws = problem(m, e, k, pattern, seed=5)
    out = jax.jit(md.dispatch)(x, weights, experts, *by_expert(*ws))
    assert relative(out, md.dispatch_reference(x, weights, experts, *ws)) < 1e-5


def test_no_expert_weight_is_copied_before_its_product():
    """The point of the layout: in the optimized CPU program every value of an expert's shape ([D,F]
    or [F,D]) is an input passed along (parameter, tuple element, bitcast), never a fresh copy."""
    d, f = 24, 40  # no other value of the program has either shape (P = 12 pair rows)
    keys = jax.random.split(jax.random.key(6), 4)
    ws = (jax.random.normal(keys[0], (8, d, f)), jax.random.normal(keys[1], (8, d, f)),
          jax.random.normal(keys[2], (8, f, d)))
    x, experts = jax.random.normal(keys[3], (6, d)), load("random", 6, 8, 2, keys[3])
    hlo = jax.jit(md.dispatch).lower(x, jnp.ones((6, 2)), experts, *by_expert(*ws)).compile().as_text()
    made = [line.strip()[:160] for line in hlo.splitlines()
            if re.search(rf"= f32\[({d},{f}|{f},{d})\]\S* (?!parameter|get-tuple-element|bitcast)", line)]
    assert "conditional(" in hlo  # the per-expert branches are there
    assert made == []


def test_experts_held_one_array_each_refuse_other_implementations():
    x, weights, experts, *ws = problem(3, 8, 2, "random")
    with pytest.raises(ValueError, match="one array per expert"):
        md.dispatch(x, weights, experts, *by_expert(*ws), implementation="ragged_dot")
    with pytest.raises(ValueError, match="rhs shapes"):
        md.grouped_matmul(jnp.zeros((4, D)), (jnp.zeros((D, F)), jnp.zeros((D + 1, F))), jnp.zeros((2,), jnp.int32))
