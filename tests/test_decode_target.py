"""The decode step's attention follows the compile target, not the host.

A CPU-only process that compiles the decode step for an H100 gets the Mosaic GPU kernel (bf16 and
FP8 caches alike); compiled for the CPU it gets the XLA reference; $MLA_JAX_PLATFORM overrides both.
Lowering only (no ptxas): the kernel shows in the lowered program as a Mosaic GPU custom call.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from mla_jax.config import Config
from mla_jax.generate import BY_TARGET, decode_implementation, lower_decode_step
from mla_jax.ops import platform
from mla_jax.weights import abstract_model
from pallas_kernels.mla_decode import sm90_report

# Latent 64 + rope 64 = 128 columns: a width the kernel takes for bf16 and FP8 pages alike.
CONFIG = Config.preset("deepseek-v2-lite").replace(
    num_hidden_layers=2, vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=64, v_head_dim=12,
    n_routed_experts=4, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
    max_position_embeddings=128)
PAGE = 16
MISSING = sm90_report.missing_reason()


def has_mosaic_kernel(device, cache_dtype) -> bool:
    lowered = lower_decode_step(abstract_model(CONFIG, jnp.bfloat16), 2, 64, page_size=PAGE,
                                cache_dtype=cache_dtype, device=device)
    return "kernel_hash" in lowered.as_text()  # every Mosaic GPU custom call carries one


@pytest.fixture
def unforced(monkeypatch):
    monkeypatch.delenv(platform.ENV, raising=False)


def test_unforced_choice_is_staged_for_the_target_where_the_kernel_fits(unforced):
    assert decode_implementation(CONFIG, page_size=PAGE, cache_dtype="bfloat16") == BY_TARGET
    assert decode_implementation(CONFIG, page_size=PAGE, cache_dtype="fp8") == BY_TARGET
    # float32 pages: no kernel, whatever the target
    assert decode_implementation(CONFIG, page_size=PAGE, cache_dtype="float32") == "xla"


@pytest.mark.parametrize("forced, expected", [("gpu", "mosaic_gpu"), ("cpu", "xla")])
def test_a_forced_platform_decides(monkeypatch, forced, expected):
    monkeypatch.setenv(platform.ENV, forced)
    assert decode_implementation(CONFIG, page_size=PAGE, cache_dtype="bfloat16") == expected


def test_compiled_for_the_cpu_the_step_has_no_kernel(unforced):
    assert not has_mosaic_kernel(jax.devices("cpu")[0], "bfloat16")


@pytest.mark.skipif(MISSING is not None, reason=f"no sm_90a compile target: {MISSING}")
@pytest.mark.parametrize("cache_dtype", ["bfloat16", "fp8"])
def test_compiled_for_an_h100_from_this_cpu_process_the_step_uses_the_kernel(unforced, cache_dtype):
    assert jax.default_backend() == "cpu"
    assert has_mosaic_kernel(sm90_report.h100_device(), cache_dtype)


def test_by_default_both_steps_are_lowered_for_this_process_s_first_device(monkeypatch, unforced):
    """In a job of several processes jax.devices()[0] belongs to process 0; each process lowers for its own."""
    from mla_jax import cache as kv
    from mla_jax.generate import lower_prefill_chunk

    own = jax.devices()[2]
    monkeypatch.setattr(jax, "local_devices", lambda *a, **k: [own])
    model = abstract_model(CONFIG, jnp.float32)
    cache = jax.eval_shape(lambda: kv.init_cache(CONFIG, 4, 1, 4, page_size=PAGE))
    for lowered in (lower_decode_step(model, 1, 64, page_size=PAGE), lower_prefill_chunk(model, cache, 32)):
        shardings = jax.tree.leaves(lowered.compile().input_shardings)
        assert shardings and {d for s in shardings for d in s.device_set} == {own}
