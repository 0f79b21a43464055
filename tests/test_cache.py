"""The paged latent cache: page bookkeeping, writes landing where the block table says, sizes, FP8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mla_jax import Config
from mla_jax import cache as kv

CONFIG = Config.preset("deepseek-v2-lite").replace(num_hidden_layers=3, vocab_size=64, max_position_embeddings=100)


# ------------------------------------------------------------------------ allocator
def test_allocated_pages_are_distinct_and_cover_each_sequence():
    alloc = kv.PageAllocator(10)
    table = alloc.allocate([5, 1, 9], page_size=4, pages_per_seq=3)
    owned = [set(table[0, :2]), set(table[1, :1]), set(table[2, :3])]
    assert sum(map(len, owned)) == len(set().union(*owned)) == 6


def test_running_out_of_pages_is_an_error_that_takes_nothing():
    alloc = kv.PageAllocator(4)
    with pytest.raises(kv.CacheError, match=r"out of cache pages: the batch needs 5 pages .* 4 of 4 are free"):
        alloc.allocate([8, 9], page_size=4, pages_per_seq=3)
    assert alloc.free == 4


def test_sequence_longer_than_the_block_table_is_an_error():
    with pytest.raises(kv.CacheError, match=r"sequence 1 needs 13 tokens = 4 pages of 4.*holds 3 pages"):
        kv.PageAllocator(10).allocate([2, 13], page_size=4, pages_per_seq=3)


def test_released_pages_can_be_allocated_again():
    alloc = kv.PageAllocator(4)
    table = alloc.allocate([8, 8], page_size=4, pages_per_seq=2)
    alloc.release(table, [8, 8], page_size=4)
    assert alloc.allocate([16], page_size=4, pages_per_seq=4).shape == (1, 4)


def test_double_release_is_an_error():
    alloc = kv.PageAllocator(4)
    table = alloc.allocate([4], page_size=4, pages_per_seq=1)
    alloc.release(table, [4], page_size=4)
    with pytest.raises(kv.CacheError, match="not allocated"):
        alloc.release(table, [4], page_size=4)


def test_request_past_the_model_maximum_length_is_an_error():
    with pytest.raises(kv.CacheError, match=r"prompt 1 has 90 tokens; with max_new_tokens=20 .* 110 > max_position_embeddings=100"):
        kv.check_length(CONFIG, [10, 90], 20)


@pytest.mark.parametrize("argument, value", [("num_pages", 0), ("page_size", -1), ("batch", 1.5)])
def test_init_cache_refuses_non_positive_sizes(argument, value):
    sizes = dict(num_pages=4, batch=1, pages_per_seq=4, page_size=8) | {argument: value}
    with pytest.raises(kv.CacheError, match=f"{argument}="):
        kv.init_cache(CONFIG, sizes["num_pages"], sizes["batch"], sizes["pages_per_seq"], page_size=sizes["page_size"])


def test_unknown_cache_dtype_is_an_error():
    with pytest.raises(kv.CacheError, match="cache dtype 'int4' is not supported"):
        kv.resolve_dtype("int4")


# ------------------------------------------------------------------------ writes
def _gathered(cache: kv.PagedCache, layer: int) -> np.ndarray:
    """Per-sequence dense rows [B, capacity, C+R] read through the block table (float32)."""
    pages = cache.pages[layer].astype(jnp.float32)
    if cache.scales is not None:
        pages = pages * cache.scales[layer][..., None]
    rows = jnp.take(pages, cache.block_table, axis=0)
    return np.asarray(rows.reshape(cache.block_table.shape[0], -1, pages.shape[-1]))


@pytest.mark.parametrize("page_size", [1, 3, 64], ids=lambda s: f"page_size={s}")
def test_written_rows_read_back_through_the_block_table(page_size):
    lengths = [7, 2]
    pages_per_seq = kv.pages_needed(max(lengths), page_size)
    cache = kv.init_cache(CONFIG, 2 * pages_per_seq, 2, pages_per_seq, page_size=page_size, dtype=jnp.float32)
    table = kv.PageAllocator(cache.num_pages).allocate(lengths, page_size, pages_per_seq)
    cache = cache._replace(block_table=jnp.asarray(table))
    rows = jax.random.normal(jax.random.key(0), (2, 7, CONFIG.latent_dim))
    positions = jnp.broadcast_to(jnp.arange(7), (2, 7))
    cache = kv.write(cache, 1, rows, positions, positions < jnp.asarray(lengths)[:, None])
    got = _gathered(cache, 1)
    assert np.array_equal(got[0, :7], rows[0]) and np.array_equal(got[1, :2], rows[1, :2])


def test_padding_rows_are_dropped_not_written():
    cache = kv.init_cache(CONFIG, 4, 1, 4, page_size=2, dtype=jnp.float32)
    cache = cache._replace(block_table=jnp.asarray(kv.PageAllocator(4).allocate([2], 2, 4)))
    positions = jnp.arange(8)[None]
    cache = kv.write(cache, 0, jnp.ones((1, 8, CONFIG.latent_dim)), positions, positions < 2)
    assert float(jnp.sum(cache.pages[0])) == 2 * CONFIG.latent_dim


def test_fp8_rows_round_trip_within_e4m3_precision():
    rows = jax.random.normal(jax.random.key(1), (3, 5, CONFIG.latent_dim)) * 3.0
    q, scale = kv.quantize(rows)
    back = q.astype(jnp.float32) * scale[..., None]
    # e4m3 keeps 3 mantissa bits: relative rounding error at most 2^-4 of each row's magnitude range.
    assert float(jnp.max(jnp.abs(back - rows) / jnp.max(jnp.abs(rows), -1, keepdims=True))) <= 2.0 ** -4


# ------------------------------------------------------------------------ size
@pytest.mark.parametrize("dtype, itemsize, scale_bytes", [("bfloat16", 2, 0), ("float32", 4, 0), ("fp8", 1, 4)])
def test_bytes_per_token_is_layers_times_latent_width_times_dtype_bytes(dtype, itemsize, scale_bytes):
    cache = kv.init_cache(CONFIG, 3, 1, 3, page_size=16, dtype=dtype)
    expected = CONFIG.num_hidden_layers * (CONFIG.latent_dim * itemsize + scale_bytes)
    assert kv.bytes_per_token(cache) == expected


def test_bf16_bytes_per_token_equals_the_config_formula_for_mla():
    cache = kv.init_cache(CONFIG, 2, 1, 2, page_size=64)
    assert kv.bytes_per_token(cache) == CONFIG.kv_cache_bytes_per_token(2)["mla"]
