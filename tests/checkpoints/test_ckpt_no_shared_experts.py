"""n_shared_experts=0: transformers still writes a shared-experts MLP, of width 0 (zero-element
weights) and, with mlp_bias, a down_proj bias it adds to every MoE layer's output. Both loaders
take the placeholders; a non-zero bias, which this model has nowhere to put, is refused by name."""

import glob

import jax.numpy as jnp
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

import mla_jax  # noqa: E402
from checkpoints.convert import convert  # noqa: E402
from checkpoints.state_dict import load_state_dict  # noqa: E402
from mla_jax.store import CheckpointError  # noqa: E402
from hf_models import hf_logits  # noqa: E402
from mla_jax import Config  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

BIAS = "model.layers.1.mlp.shared_experts.down_proj.bias"


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(DeepseekV2Config(
        vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=12, n_routed_experts=4, n_shared_experts=0, num_experts_per_tok=2,
        first_k_dense_replace=1, mlp_bias=True, initializer_range=0.15)).eval()
    directory = tmp_path_factory.mktemp("hub")
    model.save_pretrained(directory)
    tensors = {}
    for f in glob.glob(str(directory / "*.safetensors")):
        tensors.update(load_file(f))
    assert BIAS in tensors and not tensors[BIAS].any()  # what transformers writes
    assert any(k.endswith("shared_experts.gate_proj.weight") and v.size == 0 for k, v in tensors.items())
    tokens = np.random.default_rng(0).integers(0, 97, (2, 12))
    return directory, tensors, hf_logits(model, tokens), tokens


def test_both_loaders_take_the_placeholders_and_match_transformers(hub, tmp_path):
    directory, tensors, reference, tokens = hub
    config = Config.from_hf(directory)
    convert(directory, tmp_path / "ckpt", dtype="float32", progress=False)
    for model in (load_state_dict(config, tensors), mla_jax.load(tmp_path / "ckpt", dtype=jnp.float32)):
        logits = np.asarray(model(jnp.asarray(tokens)))
        assert np.max(np.abs(logits - reference)) / np.max(np.abs(reference)) <= 1e-4


def test_a_non_zero_bias_is_refused_by_name(hub, tmp_path):
    directory, tensors, *_ = hub
    config = Config.from_hf(directory)
    poked = {**tensors, BIAS: np.full_like(tensors[BIAS], 0.5)}
    with pytest.raises(ValueError, match=f"tensor '{BIAS}' is not zero, but n_shared_experts=0"):
        load_state_dict(config, poked)
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text((directory / "config.json").read_text())
    save_file(poked, str(src / "model.safetensors"))
    with pytest.raises(CheckpointError, match=f"model.safetensors: tensor '{BIAS}' is not zero, but n_shared_experts=0"):
        convert(src, tmp_path / "ckpt", dtype="float32", progress=False)
    assert not (tmp_path / "ckpt").exists()
