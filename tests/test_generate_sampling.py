"""Token choice from logits: greedy, top-k, top-p, and the settings' validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.sampling import Sampling, filter_logits, sample

# Probabilities 0.5, 0.25, 0.125, 0.0625, 0.0625 in a shuffled order.
PROBS = np.array([0.0625, 0.25, 0.5, 0.0625, 0.125], np.float32)
LOGITS = jnp.log(jnp.asarray(PROBS))[None]


def kept(sampling: Sampling) -> set[int]:
    return set(np.flatnonzero(np.isfinite(np.asarray(filter_logits(LOGITS, sampling)[0]))).tolist())


@pytest.mark.parametrize("top_k, expected", [(1, {2}), (2, {1, 2}), (3, {1, 2, 4})])
def test_top_k_keeps_the_k_most_likely_tokens(top_k, expected):
    assert kept(Sampling(1.0, top_k=top_k)) == expected


@pytest.mark.parametrize("top_p, expected", [(0.4, {2}), (0.5, {2}), (0.6, {1, 2}), (0.8, {1, 2, 4}), (1.0, {0, 1, 2, 3, 4})])
def test_top_p_keeps_the_smallest_prefix_reaching_the_mass(top_p, expected):
    assert kept(Sampling(1.0, top_p=top_p)) == expected


def test_greedy_picks_the_argmax():
    assert int(sample(LOGITS, jax.random.key(0), Sampling())[0]) == 2


def test_samples_never_leave_the_top_k():
    keys = jax.random.split(jax.random.key(0), 400)
    draws = jax.vmap(lambda k: sample(LOGITS, k, Sampling(1.0, top_k=2))[0])(keys)
    assert set(np.asarray(draws).tolist()) == {1, 2}


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-1.0), "temperature=-1.0"),
    (dict(top_k=-2), "top_k=-2"),
    (dict(top_p=0.0), "top_p=0.0"),
    (dict(top_p=1.5), "top_p=1.5"),
])
def test_invalid_settings_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Sampling(**kwargs)
