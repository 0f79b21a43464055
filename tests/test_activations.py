"""Every `hidden_act` Config accepts computes what transformers' ACT2FN computes for that name."""

import numpy as np
import pytest

from mla_jax import Config
from mla_jax.ops.activations import ACTIVATIONS

torch = pytest.importorskip("torch")
activations = pytest.importorskip("transformers.activations")

X = np.concatenate([np.linspace(-12.0, 12.0, 2001), [0.0, -0.5, 0.5, 5.9, 6.0, 6.1]]).astype(np.float32)


@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_each_activation_equals_transformers(name):
    ours = np.asarray(ACTIVATIONS[name](X))
    theirs = activations.ACT2FN[name](torch.from_numpy(X)).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=2e-6, atol=2e-6)


def test_the_activation_is_read_and_written_with_the_config():
    raw = {**Config.preset("deepseek-v2-lite").to_hf(), "hidden_act": "gelu"}
    config = Config.from_hf(raw)
    assert config.hidden_act == "gelu" and config.to_hf()["hidden_act"] == "gelu"
    assert Config.from_hf({k: v for k, v in raw.items() if k != "hidden_act"}).hidden_act == "silu"
