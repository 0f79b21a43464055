"""`convert --weights fp8` keeps a DeepSeek FP8 release as released, and the model computes with it.

The model: a small V3-layout model built by transformers whose dimensions straddle the 128×128
blocks of the release (hidden 200, expert hidden 136, latent 144, ...: several blocks per matrix,
partial edge blocks), its projections block-quantized the way DeepSeek's release stores them.
The reference is the same release converted without --weights, dequantized in float32.
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints.convert import convert  # noqa: E402
from checkpoints.export import export  # noqa: E402
from ckpt_helpers import block_quantize, edit_config, quantizable, read_all, write_single  # noqa: E402
from mla_jax.errors import UsageError  # noqa: E402
from mla_jax.generate import generate  # noqa: E402
from mla_jax.quant.apply import quantized_bytes, scheme_of  # noqa: E402
from mla_jax.weights import load  # noqa: E402

BLOCK = (128, 128)
# Dimensions not multiples of 128, several of them larger: q_b_proj [112,136], kv_a [160,200],
# kv_b [152,144], o_proj [200,72], dense MLP [264,200], experts [136,200] / [200,136].
V3_FP8_LIKE = dict(
    vocab_size=97, hidden_size=200, intermediate_size=264, moe_intermediate_size=136, num_hidden_layers=2,
    num_attention_heads=2, num_key_value_heads=2, kv_lora_rank=144, q_lora_rank=136, qk_nope_head_dim=40,
    qk_rope_head_dim=16, v_head_dim=36, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
    first_k_dense_replace=1, n_group=2, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
    max_position_embeddings=256, initializer_range=0.05, rms_norm_eps=1e-6,
)
TOKENS = np.array([[3, 17, 42, 8, 91, 5, 60, 22, 13, 77]])
PROMPTS = [[3, 17, 42, 8, 91, 5], [60, 22, 13, 77, 1, 9]]  # one length: one prefill compile


def save_fp8_release(directory) -> None:
    """A V3-layout model saved by transformers, then block-quantized like DeepSeek's FP8 release."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    model = DeepseekV3ForCausalLM(DeepseekV3Config(**V3_FP8_LIKE)).eval()
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn_like(buf))
    model.save_pretrained(str(directory))
    stored = {}
    for name, w in read_all(str(directory)).items():
        if quantizable(name, w):
            q, scale = block_quantize(w, BLOCK, ue8m0=False)
            stored[name], stored[name + "_scale_inv"] = q, scale
        elif name.endswith("e_score_correction_bias"):
            stored[name] = w.astype(np.float32)  # the release keeps the router bias in float32
        else:
            stored[name] = w.astype(ml_dtypes.bfloat16)
    write_single(str(directory), stored)
    edit_config(str(directory), dtype="bfloat16", quantization_config={
        "quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)})


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    save_fp8_release(root / "hf")
    convert(root / "hf", root / "kept", dtype="bfloat16", weights="fp8", progress=False)  # the release's dtype
    convert(root / "hf", root / "dequantized", dtype="float32", progress=False)
    return root


@pytest.fixture(scope="module")
def models(release):
    return load(release / "kept", dtype=jnp.float32), load(release / "dequantized", dtype=jnp.float32)


def compiled_forward(model):
    graphdef, state = nnx.split(model)
    compiled = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t)).lower(state, jnp.asarray(TOKENS)).compile()
    return compiled, state


@pytest.fixture(scope="module")
def forward(models):
    """The FP8 model's compiled forward and its logits, the reference's logits."""
    fp8, dequantized = models
    compiled, state = compiled_forward(fp8)
    return compiled, np.asarray(compiled(state, jnp.asarray(TOKENS))), np.asarray(dequantized(jnp.asarray(TOKENS)))


def test_release_has_partial_edge_blocks(release):
    tensors = read_all(str(release / "hf"))
    shapes = [v.shape for v in tensors.values() if v.dtype == ml_dtypes.float8_e4m3fn]
    assert any(max(s) > 128 for s in shapes) and all(m % 128 or n % 128 for m, n in shapes)


def test_kept_checkpoint_holds_the_release_values_and_scales(models):
    fp8, _ = models
    assert scheme_of(fp8).method == "fp8" and scheme_of(fp8).block == BLOCK
    experts = fp8.stacks[1].mlp.experts
    assert experts.gate_proj.dtype == jnp.float8_e4m3fn and experts.gate_proj_scale_inv.shape == (1, 8, 2, 2)


def test_logits_equal_the_float32_dequantized_model(forward):
    _, ours, reference = forward
    assert np.linalg.norm(ours - reference) <= 1e-3 * np.linalg.norm(reference)


def test_greedy_generation_is_identical(models):
    fp8, dequantized = models
    kw = dict(max_new_tokens=5, cache_dtype=jnp.float32, page_size=8)
    assert generate(fp8, PROMPTS, **kw) == generate(dequantized, PROMPTS, **kw)


def test_weight_bytes_per_quantized_parameter(models):
    """Measured from the loaded device arrays: e4m3 values (1 byte) plus float32 block scales."""
    fp8, _ = models
    nbytes, params = quantized_bytes(fp8)
    assert params > 0.9 * sum(x.size for x in jax.tree.leaves(nnx.state(models[1].stacks)))  # nearly all weights
    assert nbytes / params <= 1.05


def test_no_dequantized_copy_of_a_layers_experts_in_the_step(forward):
    """The compiled forward never holds one MoE layer's experts [E,D,F] dequantized."""
    hlo = forward[0].as_text()
    d, f = V3_FP8_LIKE["hidden_size"], V3_FP8_LIKE["moe_intermediate_size"]
    for dtype in ("f32", "bf16"):
        for shape in (f"[8,{d},{f}]", f"[8,{f},{d}]", f"[1,8,{d},{f}]"):
            assert f"{dtype}{shape}" not in hlo


def test_export_of_an_unmodified_fp8_checkpoint_is_bit_identical(release, tmp_path):
    export(release / "kept", tmp_path / "out", progress=False)
    before, after = read_all(str(release / "hf")), read_all(str(tmp_path / "out"))

    def bits(tensors):
        return {k: (v.dtype.name, v.shape, v.tobytes()) for k, v in tensors.items()}

    assert bits(after) == bits(before)


def test_export_refuses_to_cast_an_fp8_checkpoint(release, tmp_path):
    with pytest.raises(UsageError, match="exports as FP8"):
        export(release / "kept", tmp_path / "out", dtype="bfloat16", progress=False)
