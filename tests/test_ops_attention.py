"""Blockwise (flash-style) attention computes the dense reference's function, values and gradients.

Shapes are MLA's expanded form in miniature (q/k head dim ≠ v head dim); segment layouts cover
packing (several documents a row, one-token documents), right padding (segment 0) and a row that
is one document; block sizes that do and do not divide the length.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.ops import attention as ops
from mla_jax.model import attention_mask

B, T, N, H, HV = 2, 37, 3, 24, 16
SEGMENTS = {
    "one_document": [[1] * T, [1] * T],
    "packed_and_padded": [[1] * 10 + [2] * 20 + [0] * 7, [1] * 5 + [2] + [3] * 31],
    "mostly_padding": [[1] * 2 + [0] * 35, [5] * 36 + [6]],
}


def _inputs(seed):
    keys = jax.random.split(jax.random.key(seed), 4)
    return (jax.random.normal(keys[0], (B, T, N, H)), jax.random.normal(keys[1], (B, T, N, H)),
            jax.random.normal(keys[2], (B, T, N, HV)), jax.random.normal(keys[3], (B, T, N, HV)))


def rel(got, want):
    return float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))


@pytest.mark.parametrize("block", [8, 16, 64])
@pytest.mark.parametrize("layout", SEGMENTS)
def test_blockwise_equals_reference_values_and_gradients(layout, block):
    q, k, v, weight = _inputs(seed=block)
    seg = jnp.asarray(SEGMENTS[layout], jnp.int32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v, seg) * weight)

    reference = lambda q, k, v, s: ops.reference(q, k, v, s, scale=0.3)  # noqa: E731
    blockwise = lambda q, k, v, s: ops.blockwise(q, k, v, s, scale=0.3, block=block)  # noqa: E731
    with jax.default_matmul_precision("highest"):
        assert rel(jax.jit(blockwise)(q, k, v, seg), reference(q, k, v, seg)) < 1e-5
        want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
        got = jax.jit(jax.grad(loss(blockwise), argnums=(0, 1, 2)))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        assert rel(g, w) < 1e-5, name


def test_reference_mask_is_the_models_attention_mask():
    seg = jnp.asarray(SEGMENTS["packed_and_padded"], jnp.int32)
    index = jnp.arange(T)
    np.testing.assert_array_equal(ops.visible(index, index, seg, seg), attention_mask(seg.shape, seg))


def test_padding_queries_give_zeros_not_nan():
    q, k, v, _ = _inputs(seed=0)
    seg = jnp.asarray(SEGMENTS["mostly_padding"], jnp.int32)
    out = ops.blockwise(q, k, v, seg, scale=0.3, block=8)
    assert bool(jnp.all(jnp.isfinite(out)))
    np.testing.assert_array_equal(out[0, 2:], 0.0)


def test_segment_starts_are_each_runs_first_index():
    seg = jnp.asarray([[1, 1, 2, 2, 2, 0, 0], [3, 4, 4, 5, 5, 5, 5]], jnp.int32)
    np.testing.assert_array_equal(ops.segment_starts(seg), [[0, 0, 2, 2, 2, 5, 5], [0, 1, 1, 3, 3, 3, 3]])


def test_backward_holds_one_block_of_scores():
    """Compiled forward+backward temporaries grow with T·block, not T²: at T=2048 the dense
    reference's [B,N,T,T] float32 scores alone are 48 MiB; blockwise needs a few [B,N,T,block]."""
    b, t, n = 1, 2048, 3
    spec = [jax.ShapeDtypeStruct((b, t, n, h), jnp.float32) for h in (H, H, HV)]
    seg = jax.ShapeDtypeStruct((b, t), jnp.int32)

    def temp_bytes(fn):
        grad = jax.grad(lambda q, k, v, s: jnp.sum(fn(q, k, v, s)), argnums=(0, 1, 2))
        return jax.jit(grad).trace(*spec, seg).lower().compile().memory_analysis().temp_size_in_bytes

    dense_scores, block_scores = b * n * t * t * 4, b * n * t * 128 * 4
    blockwise = temp_bytes(lambda q, k, v, s: ops.blockwise(q, k, v, s, scale=0.3, block=128))
    reference = temp_bytes(lambda q, k, v, s: ops.reference(q, k, v, s, scale=0.3))
    assert reference >= dense_scores
    # a few block-sized score arrays (scores, probabilities, their gradients) and the K/V gradients
    assert blockwise < min(dense_scores / 2, 8 * block_scores), (blockwise, reference)


def test_unknown_implementation_is_an_error():
    q, k, v, _ = _inputs(seed=0)
    with pytest.raises(ValueError, match="implementation='flash'"):
        ops.attention(q, k, v, scale=0.3, implementation="flash")
