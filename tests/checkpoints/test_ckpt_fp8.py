"""DeepSeek FP8 checkpoints convert to exactly the weights DeepSeek's own dequantization gives, in
the output dtype's precision.

A tiny random V3 model's linear weights are block-quantized to float8_e4m3fn with `weight_scale_inv`
per block (blocks of 16×32 so that the tiny shapes have several blocks and partial edge blocks), the
way the V3 / R1 / V3.1 releases store them. The bfloat16 reference is DeepSeek's `weight_dequant`
written in torch: float32(W) * per-block scale, rounded once to bfloat16. The float32 reference is
that same product with no rounding step after it.
"""

import ml_dtypes
import numpy as np
import pytest

torch = pytest.importorskip("torch")

import jax.numpy as jnp  # noqa: E402

from checkpoints.convert import convert  # noqa: E402
from checkpoints.state_dict import state_dict  # noqa: E402
from ckpt_helpers import block_quantize, edit_config, quantizable, read_all, save_hub, write_single  # noqa: E402
from mla_jax.weights import load  # noqa: E402

BLOCK = (16, 32)

SCALE_FORMATS = {
    "float32_scales": dict(ue8m0=False, scale_dtype=np.float32),
    "ue8m0_float32_scales": dict(ue8m0=True, scale_dtype=np.float32),
    "ue8m0_e8m0fnu_scales": dict(ue8m0=True, scale_dtype=ml_dtypes.float8_e8m0fnu),
}


def deepseek_weight_dequant(weight: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """DeepSeek-V3 inference/kernel.py weight_dequant (via fp8_cast_bf16.py), in torch."""
    w = torch.from_numpy(weight.view(np.uint8).copy()).view(torch.float8_e4m3fn)
    s = torch.from_numpy(scale_inv.astype(np.float32))
    m, n = w.shape
    s_full = s.repeat_interleave(block[0], 0)[:m].repeat_interleave(block[1], 1)[:, :n]
    y = (w.float() * s_full).to(torch.bfloat16)
    return y.view(torch.int16).numpy().view(ml_dtypes.bfloat16)


def float32_dequant(weight: np.ndarray, scale_inv: np.ndarray, block) -> np.ndarray:
    """float32(W) * per-block scale, computed in float32 and kept there."""
    m, n = weight.shape
    s_full = np.repeat(np.repeat(scale_inv.astype(np.float32), block[0], 0), block[1], 1)[:m, :n]
    return weight.astype(np.float32) * s_full


def make_fp8_checkpoint(directory, ue8m0: bool, scale_dtype, dtype: str = "bfloat16") -> dict[str, np.ndarray]:
    """Quantizes a saved tiny V3 model in place; returns the expected hub tensors in `dtype`."""
    save_hub("v3_like_noaux_tc_yarn", str(directory), "safetensors")
    original = read_all(str(directory))
    stored, expected = {}, {}
    for name, w in original.items():
        if quantizable(name, w):
            q, scale = block_quantize(w, BLOCK, ue8m0)
            stored[name], stored[name + "_scale_inv"] = q, scale.astype(scale_dtype)
            reference = deepseek_weight_dequant if dtype == "bfloat16" else float32_dequant
            expected[name] = reference(q, scale.astype(scale_dtype), BLOCK)
        else:  # the release keeps norms, embeddings, router and head in bf16
            stored[name] = expected[name] = w.astype(ml_dtypes.bfloat16)
    write_single(str(directory), stored)
    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": list(BLOCK)}
    if ue8m0:
        quant["scale_fmt"] = "ue8m0"
    edit_config(str(directory), quantization_config=quant, dtype="bfloat16")
    return expected


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("scales", sorted(SCALE_FORMATS))
def test_fp8_weights_convert_to_deepseeks_dequantization(tmp_path, scales, dtype):
    expected = make_fp8_checkpoint(tmp_path / "hf", **SCALE_FORMATS[scales], dtype=dtype)
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype=dtype, progress=False)
    ours = state_dict(load(tmp_path / "ckpt", dtype=jnp.dtype(dtype)))
    worst = max(
        float(np.max(np.abs(ours[k].astype(np.float32) - v.astype(np.float32)))) for k, v in expected.items()
    )
    assert worst == 0.0


def test_float32_output_keeps_the_bits_bfloat16_would_drop(tmp_path):
    """The float32 conversion really differs from the bf16 one: the check above can tell them apart."""
    expected = make_fp8_checkpoint(tmp_path / "hf", ue8m0=False, scale_dtype=np.float32, dtype="float32")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    ours = state_dict(load(tmp_path / "ckpt", dtype=jnp.float32))
    name = "model.layers.0.self_attn.q_b_proj.weight"
    assert ours[name].dtype == np.float32 and np.array_equal(ours[name], expected[name])
    assert not np.array_equal(ours[name], ours[name].astype(ml_dtypes.bfloat16).astype(np.float32))


def test_synthetic_fp8_checkpoint_has_partial_edge_blocks(tmp_path):
    """The tiny shapes are not multiples of the block, so partial blocks are exercised."""
    make_fp8_checkpoint(tmp_path, ue8m0=False, scale_dtype=np.float32)
    shapes = [v.shape for v in read_all(str(tmp_path)).values() if v.dtype == ml_dtypes.float8_e4m3fn]
    assert any(m % BLOCK[0] or n % BLOCK[1] for m, n in shapes)


def test_block_quantization_is_faithful(tmp_path):
    """The synthetic FP8 weights are a real quantization: within e4m3 precision of the originals."""
    save_hub("v3_like_noaux_tc_yarn", str(tmp_path), "safetensors")
    name, w = next((k, v) for k, v in read_all(str(tmp_path)).items() if k.endswith("q_b_proj.weight"))
    q, scale = block_quantize(w, BLOCK, ue8m0=False)
    back = deepseek_weight_dequant(q, scale, BLOCK).astype(np.float32)
    s_full = np.repeat(np.repeat(scale, BLOCK[0], 0), BLOCK[1], 1)[: w.shape[0], : w.shape[1]]
    # e4m3: 3 mantissa bits (relative 2^-4), subnormal step 2^-9 of the scale; bf16 adds 2^-8 relative
    assert np.all(np.abs(back - w) <= (2**-4 + 2**-8) * np.abs(w) + 2**-9 * s_full), name
