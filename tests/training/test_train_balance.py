"""DeepSeek's balancing rules against values computed by hand, and the bias update inside a step.

The hand example: E=4 experts, K=2 per token. Row A has three real tokens and one padding token,
row B one real token and three padding tokens. Scores s and choices:
  A t0  s=[.5 .3 .1 .1] (sum 1)  chose {0,1}
  A t1  s=[.2 .2 .4 .2] (sum 1)  chose {2,1}
  A t2  s=[.4 .4 .8 .4] (sum 2, so s'=[.2 .2 .4 .2])  chose {2,3}
  A pad s=[.9 0 .05 .05]         chose {0,1}   (must count nowhere)
  B t0  s=[.1 .1 .1 .7]          chose {1,2}
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax.training import balance
from mla_jax.training.config import TrainConfig
from mla_jax.training.step import Trainer
from train_helpers import batch, tiny_model

PAD = [0.9, 0.0, 0.05, 0.05]
SCORES = np.array([
    [[.5, .3, .1, .1], [.2, .2, .4, .2], [.4, .4, .8, .4], PAD],
    [[.1, .1, .1, .7], PAD, PAD, PAD],
], np.float32)
EXPERTS = np.array([[[0, 1], [2, 1], [2, 3], [0, 1]], [[1, 2], [0, 1], [0, 1], [0, 1]]], np.int32)
REAL = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)


def test_sequence_balance_loss_per_row_matches_hand_values():
    # Row A: counts [1,2,2,1], f = 4/(2·3)·counts = [2/3,4/3,4/3,2/3]; P = ([.5,.3,.1,.1]+[.2,.2,.4,.2]
    #   +[.2,.2,.4,.2])/3 = [.3,.7/3,.3,.5/3]; Σ f·P = .2 + 2.8/9 + .4 + 1/9 = 46/45.
    # Row B: counts [0,1,1,0], f = 4/(2·1)·counts = [0,2,2,0]; P = [.1,.1,.1,.7]; Σ f·P = .4.
    alpha = 0.1
    got = balance.sequence_balance_loss(jnp.asarray(SCORES), jnp.asarray(EXPERTS), jnp.asarray(REAL), alpha)
    np.testing.assert_allclose(np.asarray(got), [alpha * 46 / 45, alpha * 0.4], rtol=1e-6)


def test_expert_balance_loss_matches_hand_value():
    # All 4 real tokens: counts [1,3,3,1], f = 4/(2·4)·counts = [.5,1.5,1.5,.5];
    # P = ([.9,.7,.9,.5] + [.1,.1,.1,.7])/4 = [.25,.2,.25,.3]; Σ f·P = .125+.3+.375+.15 = .95.
    got = balance.expert_balance_loss(jnp.asarray(SCORES), jnp.asarray(EXPERTS), jnp.asarray(REAL), 0.003)
    np.testing.assert_allclose(float(got), 0.003 * 0.95, rtol=1e-6)


def test_expert_load_counts_real_tokens_only():
    got = balance.expert_load(jnp.asarray(EXPERTS), 4, jnp.asarray(REAL))
    np.testing.assert_array_equal(np.asarray(got), [1, 3, 3, 1])


@pytest.mark.parametrize("loss", ["sequence", "expert"])
def test_padding_tokens_change_nothing(loss):
    fn = {"sequence": balance.sequence_balance_loss, "expert": balance.expert_balance_loss}[loss]
    other_scores = np.where(REAL[..., None], SCORES, 0.25).astype(np.float32)
    other_experts = np.where(REAL[..., None], EXPERTS, 3).astype(np.int32)
    a = fn(jnp.asarray(SCORES), jnp.asarray(EXPERTS), jnp.asarray(REAL), 1.0)
    b = fn(jnp.asarray(other_scores), jnp.asarray(other_experts), jnp.asarray(REAL), 1.0)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_balance_loss_gradient_flows_through_scores_only():
    # d(α Σ_i f_i P_i)/d s'_{i,t} = α f_i / T, with f held constant: for row B alone (T=1), α·[0,2,2,0]
    # on the normalised scores; with s summing to 1, d/ds_j = α (f_j - Σ_i f_i s'_i) / Σ s.
    s = jnp.asarray(SCORES[1:2])
    grad = jax.grad(lambda x: balance.sequence_balance_loss(x, jnp.asarray(EXPERTS[1:2]), jnp.asarray(REAL[1:2]), 1.0).sum())(s)
    f = np.array([0, 2, 2, 0], np.float32)
    expected = f - np.dot(f, SCORES[1, 0])
    np.testing.assert_allclose(np.asarray(grad[0, 0]), expected, rtol=1e-5)


@pytest.mark.parametrize("name,load,expected", [
    ("over- and under-loaded", [1, 3, 3, 1], [0.01, 0.09, -0.11, 0.01]),
    ("balanced", [2, 2, 2, 2], [0.0, 0.1, -0.1, 0.0]),
    ("one expert takes all", [8, 0, 0, 0], [-0.01, 0.11, -0.09, 0.01]),
])
def test_bias_update_sign_rule(name, load, expected):
    bias = jnp.asarray([0.0, 0.1, -0.1, 0.0], jnp.float32)
    got = balance.update_bias(bias, jnp.asarray(load, jnp.float32), 0.01)
    np.testing.assert_allclose(np.asarray(got), expected, atol=1e-7)


def test_train_step_moves_each_bias_by_gamma_towards_balance():
    gamma = 0.01
    trainer = Trainer(tiny_model(), TrainConfig(param_dtype="float32", bias_update_speed=gamma, steps=5))
    state = trainer.init_state()
    b = batch(0)
    bias_before = jax.device_get(state["bias"])

    @jax.jit
    def layer1_load(state, tokens, segment_ids):
        _, aux = trainer.model(state)(tokens, segment_ids=segment_ids, return_aux=True)
        return balance.expert_load(aux["experts"][0].reshape(*tokens.shape, -1), 8, segment_ids != 0)

    load = np.asarray(layer1_load(state, b["tokens"][0], b["segment_ids"][0]))
    state, _ = trainer.train_step(state, b)
    name = "stacks.1.mlp.e_score_correction_bias"  # [1,E]: the MoE stack holds one layer
    expected = bias_before[name] + gamma * np.sign(load.mean() - load)
    np.testing.assert_allclose(np.asarray(state["bias"][name]), expected, atol=1e-7)


def test_router_bias_is_not_a_trained_parameter():
    trainer = Trainer(tiny_model(), TrainConfig(param_dtype="float32"))
    state = trainer.init_state()
    assert [n for n in state["params"] if "e_score_correction_bias" in n] == [] and list(state["bias"]) == [
        "stacks.1.mlp.e_score_correction_bias"]
