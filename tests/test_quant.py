"""mla_jax.quant: block scales with partial edge blocks, dequantization in the step, quantized experts
through the grouped matmul, and what a quantized base refuses.

Small arrays and one tiny model of our own (no torch); the checkpoint-level claims (FP8 release
kept and exported bit for bit, int8 perplexity) live in tests/checkpoints/test_ckpt_{fp8_kept,int8}.py.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.ops import moe_dispatch
from mla_jax.quant import FP8_BLOCK_128, INT8_PER_CHANNEL, Blocked, Quantized, Scheme, dequantize, quantize
from mla_jax.quant.apply import bytes_per_parameter, quantize_model, quantized_bytes, scheme_of
from mla_jax.quant.blocks import dequantize_numpy
from mla_jax.training.config import TrainConfig
from mla_jax.training.step import Trainer
from mla_jax.weights import abstract_model

SCHEMES = {"fp8_128": FP8_BLOCK_128, "fp8_16x32": Scheme("fp8", (16, 32)), "int8_channel": INT8_PER_CHANNEL}
TINY = Config.preset("deepseek-v3").replace(
    num_hidden_layers=2, vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=2, kv_lora_rank=32, q_lora_rank=40, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=12, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    n_group=2, topk_group=1, max_position_embeddings=64)


def weight(shape, seed=0):
    return np.random.default_rng(seed).normal(0, 0.05, shape).astype(np.float32)


@pytest.mark.parametrize("name", sorted(SCHEMES))
def test_quantize_is_within_a_half_step_per_block(name):
    scheme = SCHEMES[name]
    w = weight((200, 136))  # [O,I], partial edge blocks along both axes
    values, scales = quantize(w, scheme)
    assert scales.shape == scheme.scale_shape(136, 200)[::-1]
    back = dequantize_numpy(values, scales, scheme)
    bi, bo = scheme.ours(136, 200)
    step = np.repeat(np.repeat(scales, bo, 0)[:200], bi, 1)[:, :136]
    # int8 rounds to nearest (half a step); e4m3 keeps 3 mantissa bits (2^-4 relative, 2^-9 subnormal)
    bound = 0.5 * step if scheme.method == "int8" else 2**-4 * np.abs(w) + 2**-9 * step
    assert np.all(np.abs(back - w) <= bound + 1e-9)


def test_in_step_dequantization_equals_the_numpy_one_for_every_layout():
    """Kernels [in, *out] with leading layer/expert axes: the same numbers as the hub-layout formula."""
    scheme = Scheme("fp8", (16, 32))
    hub = weight((3, 2 * 28, 40), seed=1)  # three layers of a [N·H, in] projection, N=2, H=28
    pairs = [quantize(m, scheme) for m in hub]
    values = np.stack([q.T for q, _ in pairs]).reshape(3, 40, 2, 28)  # ours: [L, in, N, H]
    scales = np.stack([s.T for _, s in pairs])
    q = Quantized(scheme, in_dims=1, out_dims=2, dtype="float32")
    ours = np.asarray(dequantize(jnp.asarray(values), jnp.asarray(scales), q)).reshape(3, 40, 56)
    expected = np.stack([dequantize_numpy(v, s, scheme).T for v, s in pairs])
    np.testing.assert_array_equal(ours, expected)


def test_quantized_experts_through_the_grouped_matmul():
    """The loop form dequantizes one expert at a time and gives the dequantized weights' product."""
    scheme = Scheme("fp8", (16, 16))
    hub = weight((4, 24, 40), seed=2)  # four experts [F,D]
    pairs = [quantize(m, scheme) for m in hub]
    w = Blocked(jnp.asarray(np.stack([v.T for v, _ in pairs])), jnp.asarray(np.stack([s.T for _, s in pairs])),
                Quantized(scheme, 1, 1, "float32"))
    lhs = jnp.asarray(weight((10, 40), seed=3))
    group_sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    ours = moe_dispatch.grouped_matmul(lhs, w, group_sizes, implementation="loops")
    reference = jax.lax.ragged_dot(lhs, w.dequantize(), group_sizes)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(reference), rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def fp8_model():
    """Shapes and dtypes only (what load() fills): the sizes and refusals need nothing more."""
    return abstract_model(TINY, jnp.float32, FP8_BLOCK_128)


def test_quantize_model_keeps_each_kernel_in_its_layout():
    """In memory, int8 per output channel: every kernel's weight() is the original within half a step
    of its output channel (a transposed or misplaced scale would be far off)."""
    model = Transformer(TINY.replace(num_hidden_layers=1, first_k_dense_replace=1), rngs=nnx.Rngs(0))
    attn = model.stacks[0].self_attn
    before = {name: np.asarray(getattr(attn, name).kernel[...]) for name in ("q_b_proj", "kv_b_proj", "o_proj")}
    quantize_model(model, INT8_PER_CHANNEL)
    for name, w in before.items():
        module = getattr(attn, name)
        assert module.kernel.dtype == jnp.int8
        in_axes = (1, 2) if name == "o_proj" else (1,)  # [L, in..., out...]: o_proj [L,N,Hv,D], others [L,in,N,H]
        half_step = np.max(np.abs(w), axis=in_axes, keepdims=True) / 127 / 2
        assert np.all(np.abs(np.asarray(module.weight()) - w) <= half_step * (1 + 1e-6)), name


def test_quantized_model_holds_one_byte_per_parameter_plus_scales(fp8_model):
    nbytes, params = quantized_bytes(fp8_model)
    assert scheme_of(fp8_model) == FP8_BLOCK_128 and nbytes / params <= 1.05


def test_bytes_per_parameter_knows_the_quantized_sizes():
    """What `mla-jax plan` counts: V3 in FP8 as released is near 1 byte per parameter, bf16 is 2."""
    v3 = Config.preset("deepseek-v3")
    assert abs(bytes_per_parameter(v3, "bfloat16") - 2.0) < 1e-6  # (+ the float32 router biases)
    assert 1.0 < bytes_per_parameter(v3, "bfloat16", FP8_BLOCK_128) < 1.05


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_fine_tuning_a_quantized_base_is_refused_clearly(fp8_model, lora_rank):
    with pytest.raises(ValueError, match="fine-tuning of a quantized base is not supported"):
        Trainer(fp8_model, TrainConfig(param_dtype="float32", lora_rank=lora_rank))
