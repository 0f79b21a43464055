"""The paged latent KV cache: what MLA decoding stores, where, and who owns which page.

One array of pages `[layers, num_pages, page_size, C+R]` holds, for every layer and cached token,
the normalised latent c_kv (C = kv_lora_rank) followed by the rotated shared rope key (R) - one row
per token for all heads, which is MLA's whole point. Token j of sequence b lives at
`pages[layer, block_table[b, j // page_size], j % page_size]`; `seq_lens[b]` counts the cached
tokens. The layer axis comes first so that the scanned layers carry the whole cache and each writes
its own rows in place (`write` takes the layer index as a traced scalar).

The arrays form a pytree (`PagedCache`) that jitted steps take and return with the buffers donated.
Page ownership is host-side bookkeeping (`PageAllocator`): pages are handed out for a whole request
up front, so the jitted loop never allocates, and running out is a clear error before any write.

FP8 caches store float8_e4m3fn rows with one float32 scale per token (`scales`), value = fp8 * scale.

Dimensions: L layers, P pages, S page size (slots), C latent, R rotary dim, B batch, T tokens.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax.config import Config
from mla_jax.ops.platform import by_platform

DEFAULT_PAGE_SIZE = 64
FP8 = jnp.float8_e4m3fn
FP8_MAX = float(jnp.finfo(FP8).max)  # 448
# Names accepted wherever a cache dtype is given as text (CLI, configs).
DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16, "fp8": FP8,
          "float8_e4m3fn": FP8}


class CacheError(ValueError):
    """A request the cache cannot hold: out of pages, or longer than the model's maximum length."""


class PagedCache(NamedTuple):
    pages: jax.Array  # [L,P,S,C+R], the cache dtype
    scales: jax.Array | None  # [L,P,S] float32 per-token scales; FP8 caches only
    block_table: jax.Array  # [B, pages per sequence] int32 page ids
    seq_lens: jax.Array  # [B] int32 tokens cached per sequence

    @property
    def page_size(self) -> int:
        return self.pages.shape[2]

    @property
    def num_pages(self) -> int:
        return self.pages.shape[1]

    @property
    def capacity(self) -> int:
        """Tokens one sequence can hold: its block-table width times the page size."""
        return self.block_table.shape[1] * self.page_size


def resolve_dtype(dtype) -> jnp.dtype:
    """A cache dtype from a jnp dtype or one of the names in `DTYPES`."""
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise CacheError(f"cache dtype {dtype!r} is not supported; expected one of {sorted(DTYPES)}")
        return jnp.dtype(DTYPES[dtype])
    dt = jnp.dtype(dtype)
    if dt not in {jnp.dtype(d) for d in DTYPES.values()}:
        raise CacheError(f"cache dtype {dt} is not supported; expected one of {sorted(DTYPES)}")
    return dt


def is_fp8(cache: PagedCache) -> bool:
    return cache.scales is not None


def init_cache(config: Config, num_pages: int, batch: int, pages_per_seq: int, *,
               page_size: int = DEFAULT_PAGE_SIZE, dtype=jnp.bfloat16) -> PagedCache:
    """An empty cache: `num_pages` pages per layer, a zero block table [batch, pages_per_seq]."""
    for name, v in (("num_pages", num_pages), ("batch", batch), ("pages_per_seq", pages_per_seq),
                    ("page_size", page_size)):
        if not isinstance(v, (int, np.integer)) or v <= 0:
            raise CacheError(f"init_cache: {name}={v!r}; expected a positive integer")
    dt = resolve_dtype(dtype)
    shape = (num_pages, page_size, config.latent_dim)
    layers = config.num_hidden_layers
    pages = jnp.zeros((layers, *shape), dt)
    scales = jnp.zeros((layers, *shape[:2]), jnp.float32) if dt == FP8 else None
    return PagedCache(pages, scales, jnp.zeros((batch, pages_per_seq), jnp.int32), jnp.zeros((batch,), jnp.int32))


def bytes_per_token(cache: PagedCache) -> int:
    """Bytes the cache spends per cached token over all layers, measured from its arrays.

    Equals layers x (kv_lora_rank + rope dim) x dtype bytes (+ 4 per layer for an FP8 scale); print
    it next to `Config.kv_cache_bytes_per_token` to compare with standard multi-head attention.
    """
    arrays = [cache.pages] + ([] if cache.scales is None else [cache.scales])
    slots = cache.num_pages * cache.page_size
    return sum(a.size * a.dtype.itemsize for a in arrays) // slots


def pages_needed(length: int, page_size: int) -> int:
    return max(1, math.ceil(length / page_size))


class PageAllocator:
    """Host-side free lists of page ids: hands out pages per sequence and takes them back.

    With `shards` = n (a cache split over n batch shards on a mesh, `mla_jax.parallel`), the pool
    is n equal ranges and the sequences of batch shard i (rows [i·B/n, (i+1)·B/n)) take pages only
    from range i, the pages that live on their devices.
    """

    def __init__(self, num_pages: int, shards: int = 1):
        if shards < 1 or num_pages % shards:
            raise CacheError(f"PageAllocator: {num_pages} pages do not split into {shards} equal shards")
        self.num_pages, self.shards = num_pages, shards
        per = num_pages // shards
        # pop() hands out the lowest id of a range first
        self._free = [list(range((i + 1) * per - 1, i * per - 1, -1)) for i in range(shards)]

    @property
    def free(self) -> int:
        return sum(len(f) for f in self._free)

    def _shard(self, b: int, batch: int) -> int:
        if batch % self.shards:
            raise CacheError(f"a batch of {batch} sequences does not split into {self.shards} cache shards")
        return b // (batch // self.shards)

    def allocate(self, lengths, page_size: int, pages_per_seq: int) -> np.ndarray:
        """Block table [B, pages_per_seq] giving sequence b enough pages for lengths[b] tokens.

        Raises CacheError, having taken nothing, when the pages do not suffice. Entries past a
        sequence's own pages repeat its last page: never read (seq_lens masks them), always valid.
        """
        need = [pages_needed(int(n), page_size) for n in lengths]
        too_long = [i for i, n in enumerate(need) if n > pages_per_seq]
        if too_long:
            i = too_long[0]
            raise CacheError(
                f"sequence {i} needs {int(lengths[i])} tokens = {need[i]} pages of {page_size}, but the "
                f"block table holds {pages_per_seq} pages per sequence")
        shard = [self._shard(b, len(need)) for b in range(len(need))]
        for i in range(self.shards):
            wanted = sum(n for n, s in zip(need, shard) if s == i)
            if wanted > len(self._free[i]):
                where = "" if self.shards == 1 else f" in cache shard {i} of {self.shards}"
                raise CacheError(
                    f"out of cache pages{where}: the batch needs {wanted} pages of {page_size} tokens "
                    f"({[int(n) for n in lengths]} tokens), {len(self._free[i])} of "
                    f"{self.num_pages // self.shards} are free")
        table = np.zeros((len(need), pages_per_seq), np.int32)
        for b, n in enumerate(need):
            ids = [self._free[shard[b]].pop() for _ in range(n)]
            table[b, :n] = ids
            table[b, n:] = ids[-1]
        return table

    def release(self, block_table: np.ndarray, lengths, page_size: int) -> None:
        """Returns the pages `allocate` gave for these lengths; a page freed twice is an error."""
        ids = [int(p) for b, n in enumerate(lengths)
               for p in np.asarray(block_table)[b, : pages_needed(int(n), page_size)]]
        held = set(range(self.num_pages)) - {p for f in self._free for p in f}
        stray = sorted(set(ids) - held)
        if stray or len(set(ids)) != len(ids):
            raise CacheError(f"release: pages {stray or ids} are not allocated (double release?)")
        per = self.num_pages // self.shards
        for p in ids:
            self._free[p // per].append(p)
        for f in self._free:
            f.sort(reverse=True)


def check_length(config: Config, lengths, max_new_tokens: int) -> None:
    """CacheError when a prompt plus its new tokens exceeds the model's max_position_embeddings."""
    limit = config.max_position_embeddings
    for i, n in enumerate(lengths):
        if int(n) + max_new_tokens > limit:
            raise CacheError(
                f"prompt {i} has {int(n)} tokens; with max_new_tokens={max_new_tokens} that is "
                f"{int(n) + max_new_tokens} > max_position_embeddings={limit}")


# ------------------------------------------------------------------------ writes (inside jit)
def quantize(rows: jax.Array) -> tuple[jax.Array, jax.Array]:
    """rows [..., C+R] -> float8_e4m3fn rows and float32 scales [...] (per-token absmax / 448)."""
    rows = rows.astype(jnp.float32)
    amax = jnp.max(jnp.abs(rows), axis=-1)
    scale = jnp.where(amax > 0, amax / FP8_MAX, 1.0)
    return (rows / scale[..., None]).astype(FP8), scale


def _set_rows(pages: jax.Array, layer, block_table, positions, valid, rows) -> jax.Array:
    """pages [L,P,S,...] with rows [B,T,...] stored in `layer` at positions [B,T] where valid [B,T].

    GPUs scatter (invalid rows aimed at a page past the end, which the scatter drops). XLA:CPU
    scatters a bfloat16/fp8 array by converting all of it - every layer's pages - to float32 and
    back, a temporary twice the cache's size. So there each page a sequence's rows fall in is
    rebuilt and written back in place: B·(T/S + 1) page writes. This needs each sequence's positions
    consecutive (positions[b] = positions[b, 0] + 0..T-1), as prefill chunks and decode steps are.
    """
    page_size = pages.shape[2]
    trail = pages.shape[3:]
    rows = rows.astype(pages.dtype)

    def scatter(pages, layer, block_table, positions, valid, rows):
        page = jnp.take_along_axis(block_table, positions // page_size, axis=1, mode="clip")
        page = jnp.where(valid, page, pages.shape[1])
        return pages.at[layer, page, positions % page_size].set(rows, mode="drop")

    def page_by_page(pages, layer, block_table, positions, valid, rows):
        b, t = positions.shape
        width = block_table.shape[1]
        columns = -(-t // page_size) + (1 if t > 1 else 0)  # pages a run of t positions can touch
        zeros = (0,) * len(trail)

        def body(i, pages):
            seq = i // columns
            column = positions[seq, 0] // page_size + i % columns
            page_id = block_table[seq, jnp.minimum(column, width - 1)]
            index = column * page_size + jnp.arange(page_size) - positions[seq, 0]  # row of each slot
            inside = jnp.clip(index, 0, t - 1)
            take = (index >= 0) & (index < t) & (column < width) & valid[seq, inside]  # [S]
            corner = (layer, page_id, 0, *zeros)
            old = jax.lax.dynamic_slice(pages, corner, (1, 1, page_size, *trail))[0, 0]
            new = jnp.where(take.reshape(page_size, *(1,) * len(trail)), rows[seq, inside], old)
            return jax.lax.dynamic_update_slice(pages, new[None, None], corner)

        return jax.lax.fori_loop(0, b * columns, body, pages)

    layer = jnp.asarray(layer, jnp.int32)
    return by_platform(pages, layer, block_table, positions, valid, rows, gpu=scatter, default=page_by_page)


def write(cache: PagedCache, layer, rows: jax.Array, positions: jax.Array, valid: jax.Array) -> PagedCache:
    """Stores rows [B,T,C+R] of `layer` (an int or a traced int32 scalar) at token positions [B,T]
    where valid [B,T] (padding is skipped); each sequence's positions are consecutive."""
    where = (layer, cache.block_table, positions, valid)
    if cache.scales is None:
        return cache._replace(pages=_set_rows(cache.pages, *where, rows))
    q, s = quantize(rows)
    return cache._replace(pages=_set_rows(cache.pages, *where, q), scales=_set_rows(cache.scales, *where, s))


# ------------------------------------------------------------------------ reads (inside jit)
def read_block(cache: PagedCache, layer, first_page: jax.Array, num_pages: int, dtype) -> jax.Array:
    """Rows [B, num_pages·S, C+R] in `dtype` of `layer`'s block-table columns first_page ..
    first_page+num_pages-1 of every sequence (columns past the table repeat its last one: mask
    them by position). FP8 rows come back dequantised (row · its scale)."""
    width = cache.block_table.shape[1]
    columns = jnp.minimum(first_page + jnp.arange(num_pages), width - 1)
    ids = cache.block_table[:, columns]  # [B,K]
    layer = jnp.asarray(layer, jnp.int32)
    rows = _get_pages(cache.pages, layer, ids)
    if cache.scales is not None:
        rows = rows.astype(jnp.float32) * _get_pages(cache.scales, layer, ids)[..., None]
    b = rows.shape[0]
    return rows.reshape(b, num_pages * cache.page_size, rows.shape[-1]).astype(dtype)


def _get_pages(pages: jax.Array, layer, ids: jax.Array) -> jax.Array:
    """pages[layer, ids] for pages [L,P,S,...], ids [B,K]: [B,K,S,...]. GPUs gather; XLA:CPU
    gathers a bfloat16/fp8 array from a float32 copy of all of it, so there pages are sliced one
    by one."""

    def gather(pages, layer, ids):
        return pages[layer, ids]

    def page_by_page(pages, layer, ids):
        flat = ids.reshape(-1)
        zeros = (0,) * (pages.ndim - 2)
        shape = pages.shape[2:]

        def body(i, out):
            # The barrier ties the pages to the loop index: otherwise XLA:CPU hoists a float32
            # conversion of all of them (twice the cache's size) out of the loop.
            whole, i = jax.lax.optimization_barrier((pages, i))
            page = jax.lax.dynamic_slice(whole, (layer, flat[i], *zeros), (1, 1, *shape))[0]
            return jax.lax.dynamic_update_slice(out, page, (i, *zeros))

        out = jax.lax.fori_loop(0, flat.shape[0], body, jnp.zeros((flat.shape[0], *shape), pages.dtype))
        return out.reshape(*ids.shape, *shape)

    return by_platform(pages, layer, ids, gpu=gather, default=page_by_page)
