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
from mla_jax.quant.blocks import dequantize_numpy, expand_scales
from mla_jax.training.config import TrainConfig
from mla_jax.training.step import Trainer
from mla_jax.weights import abstract_model, load, save

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


def test_quantized_model_holds_one_byte_per_parameter_plus_scales(fp8_model):
    nbytes, params = quantized_bytes(fp8_model)
    assert scheme_of(fp8_model) == FP8_BLOCK_128 and nbytes / params <= 1.05


def test_bytes_per_parameter_knows_the_quantized_sizes():
    """What `mla-jax plan` counts: V3 in FP8 as released is near 1 byte per parameter, bf16 is 2."""
    v3 = Config.preset("deepseek-v3")
    assert abs(bytes_per_parameter(v3, "bfloat16") - 2.0) < 1e-6  # (+ the float32 router biases)
    assert 1.0 < bytes_per_parameter(v3, "bfloat16", FP8_BLOCK_128) < 1.05


def test_full_fine_tuning_of_a_quantized_base_is_refused_clearly(fp8_model):
    with pytest.raises(ValueError, match=r"quantized \(fp8.*full fine-tuning.*fine-tune with LoRA"):
        Trainer(fp8_model, TrainConfig(param_dtype="float32"))


def batch(seed: int, rows: int = 2, t: int = 8) -> dict:
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, TINY.vocab_size, size=(1, rows, t)).astype(np.int32)
    ones = np.ones((1, rows, t), np.int32)
    return {"tokens": tokens, "targets": np.roll(tokens, -1, axis=-1), "loss_mask": ones.astype(bool),
            "segment_ids": ones, "positions": np.broadcast_to(np.arange(t, dtype=np.int32), (1, rows, t))}


@pytest.fixture(scope="module")
def lora_on_fp8():
    """LoRA on an FP8 base: the model, the base's values before, the trainer, the attention weights
    at step 0 (copied out: the step donates the state they come from), the state after one step."""
    model = Transformer(TINY, rngs=nnx.Rngs(0))
    attn = model.stacks[0].self_attn
    floats = {name: np.asarray(getattr(attn, name).kernel[...]) for name in ("q_b_proj", "kv_b_proj", "o_proj")}
    quantize_model(model, Scheme("fp8", (16, 16)))
    before = np.asarray(model.stacks[0].self_attn.q_b_proj.kernel[...]).copy()
    trainer = Trainer(model, TrainConfig(param_dtype="float32", lora_rank=4, lr=1e-2, warmup_steps=0, steps=1))
    state = trainer.init_state()
    attn = trainer.model(state).stacks[0].self_attn
    start = {name: np.asarray(getattr(attn, name).weight()) for name in ("q_b_proj", "kv_b_proj", "o_proj")}
    state, metrics = trainer.train_step(state, batch(0))
    return model, before, trainer, start, state, metrics, floats


def test_quantize_model_keeps_each_kernel_in_its_layout(lora_on_fp8):
    """Every kernel's weight() is its float original within e4m3's precision on its own block scale
    (a transposed or misplaced scale would be far off). Kernels [L, in, N, H] and o_proj [L, N, Hv, D]."""
    model, floats = lora_on_fp8[0], lora_on_fp8[-1]
    for name, w in floats.items():
        module = getattr(model.stacks[0].self_attn, name)
        assert module.kernel.dtype == jnp.float8_e4m3fn
        scales = np.asarray(expand_scales(module.kernel_scale_inv[...], module.quant, w.shape)).reshape(w.shape)
        assert np.all(np.abs(np.asarray(module.weight()) - w) <= 2**-4 * np.abs(w) + 2**-9 * scales), name


def test_lora_on_a_quantized_base_starts_from_it(lora_on_fp8):
    model, _, _, start, _, _, _ = lora_on_fp8
    for name, adapted in start.items():
        base = np.asarray(getattr(model.stacks[0].self_attn, name).weight())
        np.testing.assert_allclose(adapted, base, rtol=1e-6, atol=1e-9)


def test_lora_on_a_quantized_base_trains_the_adapters_only(lora_on_fp8):
    model, before, trainer, start, state, metrics, _ = lora_on_fp8
    frozen = trainer.frozen["stacks.0.self_attn.q_b_proj.kernel"]
    assert np.isfinite(metrics["loss"]) and frozen.dtype == jnp.float8_e4m3fn
    assert np.array_equal(np.asarray(frozen).view(np.uint8), before.view(np.uint8))  # the base is untouched
    moved = trainer.model(state).stacks[0].self_attn.q_b_proj.weight()
    assert not np.allclose(np.asarray(moved), start["q_b_proj"], rtol=1e-4)


def test_lora_merged_quantized_model_saves_quantized(lora_on_fp8, tmp_path):
    """Saved, the adapted kernels are e4m3 again (block scales recomputed: W + ΔW may outgrow the
    base's); loaded, within e4m3's precision of what was trained."""
    _, _, trainer, _, state, _, _ = lora_on_fp8
    trained = trainer.model(state)
    save(trained, tmp_path / "tuned")
    loaded = load(tmp_path / "tuned", dtype=jnp.float32)
    q_b = loaded.stacks[0].self_attn.q_b_proj
    assert scheme_of(loaded).method == "fp8" and q_b.kernel.dtype == jnp.float8_e4m3fn
    w, back = np.asarray(trained.stacks[0].self_attn.q_b_proj.weight()), np.asarray(q_b.weight())
    scales = np.asarray(expand_scales(q_b.kernel_scale_inv[...], q_b.quant, w.shape)).reshape(w.shape)
    assert np.all(np.abs(back - w) <= 2**-4 * np.abs(w) + 2**-9 * scales)
