"""Chunked prefill's memory beyond the cache does not grow with the prompt (tiny model, CPU), and a
DeepSeek-V2-Lite 32K-token chunked prefill compiled for an H100 fits 8 GiB of temporaries.

The tiny model's config with max_position_embeddings raised to 32K; caches for 4K- and 16K-token
prompts. The compiled chunk step (2,048 tokens) needs the same temporaries for both, and its
arguments differ by exactly the cache's bytes, donated and updated in place. The slow test prefills
both prompts for real, a few times each: the process's peak memory growth beyond the cache stays
under the step's temporaries plus a fixed slack at both lengths (bench/prefill_memory.py says how
it is measured and why the least of a length's runs).
"""

import dataclasses
import pathlib
import sys

import jax.numpy as jnp
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

from prefill_memory import (CHUNK, MIB, REPEATS, abstract_cache, analysis, bound_beyond_cache,  # noqa: E402
                            h100_chunk_step, h100_device, least_beyond_cache, nbytes, run_child, tiny_long_config)

from mla_jax import Config  # noqa: E402
from mla_jax.generate import lower_prefill_chunk  # noqa: E402
from mla_jax.weights import abstract_model  # noqa: E402


def test_chunk_step_temporaries_do_not_grow_with_the_cache():
    config = tiny_long_config()
    model = abstract_model(config, jnp.float32)
    small, large = abstract_cache(config, 4096), abstract_cache(config, 16384)
    a = analysis(lower_prefill_chunk(model, small, CHUNK).compile())
    b = analysis(lower_prefill_chunk(model, large, CHUNK).compile())
    assert b["temp_bytes"] == a["temp_bytes"], (a, b)
    assert b["argument_bytes"] - a["argument_bytes"] == nbytes(large) - nbytes(small), (a, b)
    assert b["alias_bytes"] - a["alias_bytes"] >= nbytes(large.pages) - nbytes(small.pages), (a, b)  # donated
    # for scale: one [N,T,T] float32 score array of the 16K prompt would take 4 GiB
    assert b["temp_bytes"] < 64 * 2 ** 20, b


@pytest.mark.slow
def test_prefilling_16k_tokens_grows_peak_memory_by_the_cache_plus_a_constant():
    runs = [run_child(n) for n in (4096, 16384) for _ in range(REPEATS)]
    bound = bound_beyond_cache(runs)  # the step's temporaries (equal at both lengths) + slack
    least = least_beyond_cache(runs)
    cache = {r["prompt_tokens"]: r["cache_bytes"] for r in runs}
    assert cache[16384] > 3 * cache[4096]
    assert all(r["peak_rss_growth_bytes"] >= r["cache_bytes"] for r in runs), runs  # the cache is seen
    assert max(least.values()) <= bound, (least, bound)
    # a second copy of the 16K cache would add 3.4 MiB more than one of the 4K cache
    assert least[16384] - least[4096] < 2 * MIB, least


@pytest.fixture(scope="module")
def h100():
    try:
        return h100_device()
    except Exception as e:  # no CUDA compile-only plugin (or no target file): nothing to compile for
        pytest.skip(f"compiling for an H100 needs jax-cuda12-plugin and ../shared/gpu_targets: {e!r}")


def test_v2_lite_32k_chunked_prefill_fits_8_gib_of_temporaries_on_an_h100(h100):
    """Two V2-Lite layers (one dense, one MoE): the scanned layers reuse their temporaries, so two
    show a step's need (bench/prefill_memory.py --gpu compiles all 27; results in bench/results/)."""
    config = dataclasses.replace(Config.preset("deepseek-v2-lite"), num_hidden_layers=2)
    temp = h100_chunk_step(config, 32768, device=h100).memory_analysis().temp_size_in_bytes
    assert temp <= 8 * 2 ** 30, f"{temp / 2 ** 30:.2f} GiB of temporaries"
