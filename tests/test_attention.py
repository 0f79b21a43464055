"""MLA's two forms compute one function: expanded (K/V per head) and absorbed (over the latent)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.attention import absorbed_attention, expanded_attention, masked_softmax
from mla_jax.model import attention_mask

# name -> (B, T, S, N, H, Hv, C, R)
SHAPES = {
    "one_query": (2, 1, 9, 4, 16, 12, 32, 8),
    "prefill": (2, 17, 17, 3, 8, 8, 24, 4),
    "v3_head_dims": (1, 5, 40, 2, 128, 128, 512, 64),
}


def _inputs(shape, seed):
    b, t, s, n, h, hv, c, r = shape
    keys = jax.random.split(jax.random.key(seed), 6)
    normal = lambda k, dims: jax.random.normal(k, dims, jnp.float32)  # noqa: E731
    return (normal(keys[0], (b, t, n, h)), normal(keys[1], (b, t, n, r)), normal(keys[2], (b, s, c)),
            normal(keys[3], (b, s, r)), normal(keys[4], (c, n, h)) / c ** 0.5, normal(keys[5], (c, n, hv)) / c ** 0.5)


@pytest.mark.parametrize("name", SHAPES)
def test_absorbed_equals_expanded(name):
    b, t, s, *_ = SHAPES[name]
    args = _inputs(SHAPES[name], seed=len(name))
    # ragged visibility: query i of batch row j sees the first (s - t + i + 1 - j) keys
    lengths = s - t + 1 + jnp.arange(t)[None, :] - jnp.arange(b)[:, None]
    mask = jnp.arange(s)[None, None, :] < lengths[:, :, None]
    expanded = jax.jit(expanded_attention)(*args, mask, 0.1)
    absorbed = jax.jit(absorbed_attention)(*args, mask, 0.1)
    err = jnp.linalg.norm(expanded - absorbed) / jnp.linalg.norm(expanded)
    assert err < 1e-5, float(err)  # float32 rounding of two association orders


def test_query_with_no_visible_key_gives_zeros_not_nan():
    scores = jnp.array([[1.0, 2.0], [3.0, 4.0]])
    mask = jnp.array([[True, False], [False, False]])
    p = masked_softmax(scores, mask)
    np.testing.assert_array_equal(np.asarray(p), [[1.0, 0.0], [0.0, 0.0]])


def test_segments_keep_packed_documents_apart_and_hide_padding():
    seg = jnp.array([[1, 1, 2, 2, 0]])
    m = np.asarray(attention_mask(seg.shape, seg))[0]
    expected = np.array([
        [1, 0, 0, 0, 0],
        [1, 1, 0, 0, 0],
        [0, 0, 1, 0, 0],
        [0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0],
    ], bool)
    np.testing.assert_array_equal(m, expected)
