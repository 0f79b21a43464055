"""The CPU layout of the projections (`with_cpu_layout`): kernels also held [out, in], same logits.

`generate` runs with it on CPUs; the greedy-generation tests (tests/test_generate.py against
transformers, tests/test_generate_api.py) decode through it.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.layers import Linear, OutProj, with_cpu_layout
from mla_jax.quant.apply import quantize_model
from mla_jax.quant.blocks import Scheme

# V3-like: a low-rank query, biases in attention, lm_head untied, three layers (one dense, two MoE
# scanned together, so stacked kernels carry a leading layer axis).
CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=3, vocab_size=61, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
    num_attention_heads=2, q_lora_rank=24, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
    v_head_dim=8, n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1, n_shared_experts=1,
    first_k_dense_replace=1, attention_bias=True, max_position_embeddings=64)


def projections(model):
    return [m for _, m in nnx.iter_graph(model) if type(m) in (Linear, OutProj)]


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


def test_every_float32_projection_gets_its_kernel_output_first_and_the_model_is_left_alone(model):
    view = with_cpu_layout(model)
    assert all(m.kernel_out_in is None for m in projections(model))
    for m in projections(view):
        kernel, out_in = m.kernel[...], m.kernel_out_in[...]
        if isinstance(m, OutProj):  # [..., N, H, D] -> [..., D, N*H]
            np.testing.assert_array_equal(out_in, np.swapaxes(kernel.reshape(*kernel.shape[:-3], -1, kernel.shape[-1]), -1, -2))
        else:  # [..., in, *out] -> [..., *out, in]
            np.testing.assert_array_equal(out_in, np.moveaxis(kernel, kernel.ndim - 1 - len(m.out_shape), -1))
    stacked = [m for m in projections(view) if m.kernel[...].ndim == 3 and isinstance(m, Linear)]
    assert stacked, "the scanned MoE layers' projections carry a leading layer axis"


def test_the_view_computes_the_same_logits_in_every_attention_form(model):
    view = with_cpu_layout(model)
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, CONFIG.vocab_size)
    for form in ("expanded", "absorbed"):
        run = nnx.jit(lambda m, t: m(t, attention_form=form))
        np.testing.assert_allclose(run(view, tokens), run(model, tokens), rtol=1e-5, atol=1e-5, err_msg=form)


def test_quantized_and_bfloat16_kernels_keep_their_one_layout():
    bf16 = Transformer(CONFIG, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0))
    assert all(m.kernel_out_in is None for m in projections(with_cpu_layout(bf16)))
    quantized = Transformer(CONFIG, rngs=nnx.Rngs(0))
    quantize_model(quantized, Scheme("fp8", (16, 16)))
    view = with_cpu_layout(quantized)
    assert all(m.kernel_out_in is None for m in projections(view) if m.quant is not None)
    assert any(m.quant is not None for m in projections(view))
