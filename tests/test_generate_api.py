"""`generate` / `generate_stream` as a user meets them: stopping, streaming, seeds, compilation, errors.

One small random model of our own (no torch): 3 layers, a dense and an MoE layer mixed.
"""

import jax.numpy as jnp
import pytest
from flax import nnx

from mla_jax import Config, Transformer
from mla_jax.cache import CacheError
from mla_jax.generate import compilations, decode_implementation, generate, generate_stream
from test_generate import max_relative_error, recomputed, run_stream

CONFIG = Config.preset("deepseek-v2-lite").replace(
    num_hidden_layers=3, vocab_size=97, hidden_size=48, intermediate_size=80, moe_intermediate_size=24,
    num_attention_heads=4, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=12,
    n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=2,
    max_position_embeddings=128)
PROMPTS = [[5, 17, 33, 2, 9], [71, 3, 44, 8, 90, 12, 6, 61, 23], [40, 41]]


@pytest.fixture(scope="module")
def model():
    return Transformer(CONFIG, rngs=nnx.Rngs(0))


@pytest.fixture(scope="module")
def dense_model():
    """No MoE: the discrete expert choice would turn tiny rounding into jumps and hide precision."""
    return Transformer(CONFIG.replace(n_routed_experts=None), rngs=nnx.Rngs(1))


def test_stream_yields_the_tokens_generate_returns(model):
    streamed = [[] for _ in PROMPTS]
    for step in generate_stream(model, PROMPTS, 12, cache_dtype=jnp.float32):
        for seq, t in zip(streamed, step.tolist()):
            seq.extend([t] if t >= 0 else [])
    assert streamed == generate(model, PROMPTS, 12, cache_dtype=jnp.float32)


def test_each_sequence_ends_right_after_its_first_stop_token(model):
    free = generate(model, PROMPTS, 12, cache_dtype=jnp.float32)
    stop = free[0][3]
    cut = [seq[: seq.index(stop) + 1] if stop in seq else seq for seq in free]
    assert generate(model, PROMPTS, 12, stop_tokens=(stop,), cache_dtype=jnp.float32) == cut


def test_prompt_of_another_length_in_the_same_bucket_reuses_the_compiled_steps(model):
    generate(model, [[1] * 5, [2] * 9], 6)
    before = compilations()
    generate(model, [[3] * 12, [4] * 7], 6)
    assert compilations() == before


def test_same_seed_samples_the_same_tokens(model):
    kwargs = dict(temperature=1.0, top_p=0.9, seed=7)
    assert generate(model, PROMPTS, 10, **kwargs) == generate(model, PROMPTS, 10, **kwargs)


def test_different_seeds_sample_different_tokens(model):
    assert generate(model, PROMPTS, 10, temperature=1.0, seed=1) != generate(model, PROMPTS, 10, temperature=1.0, seed=2)


def test_top_k_of_one_samples_the_greedy_tokens(model):
    assert generate(model, PROMPTS, 8, temperature=0.7, top_k=1, seed=3) == generate(model, PROMPTS, 8)


def test_package_level_generate_is_the_function_even_after_the_module_is_imported(model):
    import mla_jax

    assert mla_jax.generate(model, PROMPTS, 3) == generate(model, PROMPTS, 3)


def test_a_stream_runs_once(model):
    stream = generate_stream(model, PROMPTS, 2)
    list(stream)
    with pytest.raises(RuntimeError, match="already run"):
        list(stream)


def test_a_pool_just_large_enough_for_the_real_lengths_suffices(model):
    # Pages needed: ceil((5+4)/4) + ceil((9+4)/4) + ceil((2+4)/4) = 3 + 4 + 2, fewer than the bucket's 3 x 5.
    assert generate(model, PROMPTS, 4, page_size=4, num_pages=9) == generate(model, PROMPTS, 4, page_size=4)


def test_zero_new_tokens_gives_empty_lists(model):
    assert generate(model, PROMPTS, 0) == [[], [], []]


# Relative logit error (of the largest logit) vs a float32 recomputation over the same tokens: at most
# one unit of the cache format's relative precision (bf16: 8 mantissa bits, e4m3: 3, scaled per token).
LOW_PRECISION = {"bfloat16": 2.0 ** -8, "fp8": 2.0 ** -5}


@pytest.mark.parametrize("cache_dtype", list(LOW_PRECISION))
def test_low_precision_cache_logits_stay_within_the_format_precision(dense_model, cache_dtype):
    seqs, logits = run_stream(dense_model, PROMPTS, cache_dtype=cache_dtype, page_size=16)
    assert max_relative_error(logits, recomputed(dense_model, PROMPTS, seqs)) < LOW_PRECISION[cache_dtype]


BAD_CALLS = {
    "prompt past max length": (dict(prompts=[[1] * 120], max_new_tokens=9), CacheError, "129 > max_position_embeddings=128"),
    "empty prompt": (dict(prompts=[[1, 2], []]), ValueError, r"prompts\[1\] is empty"),
    "token outside vocab": (dict(prompts=[[1, 97]]), ValueError, r"prompts\[0\] has token ids \[97\] outside \[0, vocab_size=97\)"),
    "flat list": (dict(prompts=[1, 2, 3]), TypeError, "wrap a single prompt as"),
    "negative max_new_tokens": (dict(max_new_tokens=-1), ValueError, "max_new_tokens=-1"),
    "negative temperature": (dict(temperature=-0.5), ValueError, "temperature=-0.5"),
    "unknown implementation": (dict(implementation="cuda"), ValueError, "implementation='cuda'"),
    "unknown cache dtype": (dict(cache_dtype="int8"), CacheError, "cache dtype 'int8'"),
    "float token ids": (dict(prompts=[[1.0, 2.5]]), TypeError, r"prompts\[0\]: expected a flat list of integer token ids, found float64 values such as 1.0"),
    "text as a prompt": (dict(prompts=["hello"]), TypeError, r"prompts\[0\]: expected token ids, found text 'hello'"),
    "nan temperature": (dict(temperature=float("nan")), ValueError, "temperature=nan; expected a finite number >= 0"),
    "page size 0": (dict(page_size=0), ValueError, r"page_size=0; expected an integer >= 1"),
    "prefill chunk 0": (dict(prefill_chunk=0), ValueError, r"prefill_chunk=0; expected an integer >= 1 \(prompt tokens per prefill step\)"),
    "cache pool too small": (dict(num_pages=2, page_size=4), CacheError, r"out of cache pages: the batch needs 9 pages of 4 tokens \(\[9, 13, 6\] tokens\), 2 of 2 are free"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_bad_arguments_are_clear_errors(model, case):
    overrides, error, message = BAD_CALLS[case]
    kwargs = dict(prompts=PROMPTS, max_new_tokens=4) | overrides
    with pytest.raises(error, match=message):
        generate(model, kwargs.pop("prompts"), kwargs.pop("max_new_tokens"), **kwargs)


def test_decode_attention_is_the_xla_reference_on_cpu():
    assert decode_implementation(CONFIG, page_size=64, cache_dtype="bfloat16") == "xla"


def test_forcing_the_gpu_kernel_where_it_cannot_run_is_an_error():
    with pytest.raises(ValueError, match="mosaic_gpu"):
        decode_implementation(CONFIG, page_size=64, cache_dtype="float32", override="mosaic_gpu")
