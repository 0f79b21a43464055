"""Logit parity with transformers' DeepseekV2ForCausalLM / DeepseekV3ForCausalLM (float32).

Each named tiny config is built by transformers, saved with save_pretrained (the hub layout),
loaded through the name map, and run in each attention form (memory-bounded expanded, its dense reference, absorbed) on a batch of 2 × 70 tokens.
"""

import glob

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file

pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints.state_dict import load_state_dict  # noqa: E402
from hf_models import TINY_CONFIGS, hf_logits, save_tiny  # noqa: E402
from mla_jax import Config  # noqa: E402

# max |ours - theirs| / max |theirs|: the bound, far above float32 rounding (~3e-6 seen).
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    hf_model = save_tiny(request.param, directory)
    config = Config.from_hf(directory)
    tensors = {}
    for shard in glob.glob(str(directory / "*.safetensors")):
        tensors.update(load_file(shard))
    tokens = np.random.default_rng(1).integers(0, config.vocab_size, (2, 70))
    return request.param, load_state_dict(config, tensors), hf_logits(hf_model, tokens), tokens


def rel_err(ours, theirs):
    return float(np.max(np.abs(np.asarray(ours) - theirs)) / np.max(np.abs(theirs)))


@pytest.mark.parametrize("form", ["expanded", "dense", "absorbed"])
def test_logits_match_transformers(pair, form):
    name, model, reference, tokens = pair
    logits = jax.jit(lambda t: model(t, attention_form=form))(jnp.asarray(tokens))
    assert logits.dtype == jnp.float32 and logits.shape == reference.shape
    assert rel_err(logits, reference) <= TOL, name


def test_in_memory_torch_state_dict_loads_the_same_model(pair, tmp_path):
    """transformers' live state_dict (fused experts, torch tensors) gives the same logits as its files."""
    name, model, reference, tokens = pair
    from hf_models import build

    live = load_state_dict(model.config, build(name).state_dict())
    np.testing.assert_array_equal(np.asarray(live(jnp.asarray(tokens))), np.asarray(model(jnp.asarray(tokens))))


def test_bf16_params_track_float32(pair):
    """bf16 weights compute the same function up to bf16 rounding.

    bf16 rounding flips a few near-tie expert choices, which moves those tokens a lot; so the
    bound is on the median token's relative error, which rounding alone keeps near 2-4%.
    """
    name, model, reference, tokens = pair
    from flax import nnx

    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda x: x.astype(jnp.bfloat16) if x.dtype == jnp.float32 else x, state)
    logits = np.asarray(nnx.merge(graphdef, state)(jnp.asarray(tokens)))
    assert logits.dtype == np.float32
    per_token = np.abs(logits - reference).max(-1) / np.abs(reference).max(-1)
    assert np.median(per_token) < 0.06, name
