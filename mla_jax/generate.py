"""Batched generation over the paged latent cache: prefill, jitted decode steps, `generate`.

* Prefill runs the prompt batch (right-padded, true positions 0..len-1 per sequence) through the
  model in chunks of at most `prefill_chunk` tokens (default 2,048), one executable for every
  chunk: each chunk writes its tokens' normalised latents and rotated rope keys into their pages,
  then attends (expanded MLA, online softmax over key blocks) to the latents earlier chunks left in
  the pages and to its own, causally and padding-aware. Memory beyond the cache is set by the
  chunk, not the prompt. A prompt that fits one chunk is padded to a power-of-two bucket; a longer
  one to a multiple of the chunk. The last chunk samples the first new token.
* Each decode step feeds one token per sequence: it writes the token's latent, then attends with
  absorbed MLA over the pages through `pallas_kernels.mla_decode` (`decode_implementation` picks the
  Mosaic GPU kernel or the XLA reference, in one place) and samples the next token. One executable
  per (model, batch, cache shape, sampling settings), the cache buffers donated.

Executables are compiled ahead of time and kept in `_EXECUTABLES`, so compile time is measured apart
from run time and `compilations()` counts real compilations (a prompt of another length within
the same bucket reuses both executables).

Dimensions: B batch, T prompt chunk, N heads, C latent, R rotary dim, V vocabulary.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import sys
import time
import types
import weakref
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import PartitionSpec as P

import pallas_kernels
from pallas_kernels._interpret import has_sm90_gpu
from pallas_kernels.mla_decode import choose_implementation
from mla_jax import cache as kv
from mla_jax.attention import expand_keys, join_query, with_decode_layout
from mla_jax.errors import UsageError, UsageTypeError
from mla_jax.layers import with_cpu_layout
from mla_jax.model import Transformer
from mla_jax.moe import with_expert_layout
from mla_jax.ops import attention as ops_attention
from mla_jax.ops import platform
from mla_jax.parallel.mesh import auto_axes, leading_spec, mesh_of, on_mesh, put, to_host
from mla_jax.parallel.rules import batch_axes, batch_sharding, cache_sharding, replicated, shard_count
from mla_jax.rope import sin_cos
from mla_jax.sampling import Sampling, sample

IMPLEMENTATIONS = ("xla", "mosaic_gpu")
BY_TARGET = "by_target"  # both staged; the lowering keeps the compile target's (`platform.by_platform`)
MIN_BUCKET = 16
PREFILL_CHUNK = 2048  # prompt tokens per prefill step
ATTENTION_BLOCK = ops_attention.DEFAULT_BLOCK  # keys per online-softmax step in prefill
FINISHED = -1  # what a stream yields for a sequence that has already stopped


def query_dtype(pages_dtype) -> jnp.dtype:
    """Queries match the pages (the kernel's contract); FP8 pages are read with bfloat16 queries."""
    pages_dtype = jnp.dtype(pages_dtype)
    return jnp.dtype(jnp.bfloat16) if pages_dtype == kv.FP8 else pages_dtype


def decode_implementation(config, *, page_size: int, cache_dtype, override: str | None = None) -> str:
    """The one place that picks the decode attention: "mosaic_gpu", "xla" or `BY_TARGET`.

    Automatic (override None) follows the compile target (`mla_jax.ops.platform`): where the Mosaic
    GPU kernel takes these shapes and dtypes (16-bit or FP8 pages, page size a multiple of 16) it is
    "mosaic_gpu" under MLA_JAX_PLATFORM=gpu, "xla" under another forced platform, and otherwise
    `BY_TARGET`: both are staged and the lowering keeps the kernel for a CUDA target (an H100
    compiled for from a CPU-only process too), the reference for any other. A local pre-Hopper GPU
    gets "xla". An override that cannot run is an error, not a fallback.
    """
    check_implementation(override)
    pages_dtype = kv.resolve_dtype(cache_dtype)
    shapes = dict(q_dtype=query_dtype(pages_dtype), pages_dtype=pages_dtype, dim=config.latent_dim,
                  v_dim=config.kv_lora_rank, page_size=page_size, interpret=False)
    if override is not None:
        return choose_implementation(override, **shapes)
    target = platform.forced()
    if target not in (None, "gpu") or (jax.devices()[0].platform == "gpu" and not has_sm90_gpu()):
        return "xla"
    try:
        choose_implementation("mosaic_gpu", **shapes)
    except ValueError:  # shapes or dtypes the kernel does not take
        return "xla"
    return "mosaic_gpu" if target == "gpu" else BY_TARGET


def check_implementation(override: str | None) -> None:
    """An `implementation` override that names a known choice this machine can run, or a UsageError.

    Generation compiles for the devices of this process, so the Mosaic GPU kernel needs one of them
    to be an sm90+ GPU; checked before any work, so nothing is printed or compiled in vain.
    """
    if override not in (None, *IMPLEMENTATIONS):
        raise UsageError(f"implementation={override!r}; expected one of {IMPLEMENTATIONS} or None")
    if override == "mosaic_gpu" and not has_sm90_gpu():
        device = jax.devices()[0]
        where = "the CPU" if device.platform == "cpu" else f"{device.device_kind} ({device.platform})"
        raise UsageError(f"implementation='mosaic_gpu' needs an sm90+ (Hopper or newer) CUDA GPU; this process "
                         f"runs on {where}; use 'xla' or leave it unset")


def check_options(*, max_new_tokens, page_size, num_pages=None, seed=0, prefill_chunk=PREFILL_CHUNK) -> None:
    """The numeric arguments of `generate` / `generate_stream`, checked before any work."""
    if not _is_int(prefill_chunk) or prefill_chunk < 1:
        raise UsageError(f"prefill_chunk={prefill_chunk!r}; expected an integer >= 1 (prompt tokens per prefill step)")
    if not _is_int(max_new_tokens) or max_new_tokens < 0:
        raise UsageError(f"max_new_tokens={max_new_tokens!r}; expected an integer >= 0")
    if not _is_int(page_size) or page_size < 1:
        raise UsageError(f"page_size={page_size!r}; expected an integer >= 1 (tokens per cache page)")
    if num_pages is not None and (not _is_int(num_pages) or num_pages < 1):
        raise UsageError(f"num_pages={num_pages!r}; expected an integer >= 1 or None")
    if not _is_int(seed):
        raise UsageError(f"seed={seed!r}; expected an integer")


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def bucket_length(n: int, limit: int) -> int:
    """Prompt bucket: the next power of two >= n (at least MIN_BUCKET), at most `limit`."""
    return min(max(MIN_BUCKET, 1 << (max(n, 1) - 1).bit_length()), max(limit, n))


def prefill_plan(n: int, limit: int, chunk: int = PREFILL_CHUNK) -> tuple[int, int]:
    """(padded prompt width, chunk length) for a longest prompt of n tokens.

    Up to `chunk` tokens: one chunk, the power-of-two bucket (capped at the chunk). Longer: chunks
    of `chunk` tokens, the width rounded up to a multiple of it (one executable serves them all).
    """
    if n <= chunk:
        width = min(bucket_length(n, limit), chunk)
        return width, width
    return -(-n // chunk) * chunk, chunk


# ------------------------------------------------------------------------ forward passes
def _run_layers(model: Transformer, tokens, positions, attend, cache: kv.PagedCache):
    """Embedding and the scanned decoder layers with `attend` as self-attention, threading the
    cache from layer to layer: (hidden states [B,T,D], cache)."""
    sin, cos = sin_cos(model.config, positions)
    h, cache, _ = model.run_layers(model.embed(tokens), sin, cos, attend, cache)
    return h, cache


def _attend_pages(state, q, cache: kv.PagedCache, layer, past, w_uk, w_uv, scale, block: int):
    """Folds into `state` the keys already in `layer`'s pages: positions < past [B] of each sequence.

    Reads a block of pages at a time (a loop as long as the longest past), expanding its latents to
    per-head keys and values there: nothing the size of the past is materialised.
    """
    pages_per_block = max(1, block // cache.page_size)
    tokens_per_block = pages_per_block * cache.page_size
    c = w_uk.shape[0]
    b, t = q.shape[:2]

    def body(j, state):
        rows = kv.read_block(cache, layer, j * pages_per_block, pages_per_block, q.dtype)  # [B,blk,C+R]
        k, v = expand_keys(rows[..., :c], rows[..., c:], w_uk, w_uv)
        seen = j * tokens_per_block + jnp.arange(tokens_per_block) < past[:, None]  # [B,blk]
        mask = jnp.broadcast_to(seen[:, None, :], (b, t, tokens_per_block))
        return ops_attention.attend_block(state, q, k, v, mask, scale)

    n_blocks = (jnp.max(past) + tokens_per_block - 1) // tokens_per_block
    return jax.lax.fori_loop(0, n_blocks, body, state)


def _attend_chunk(state, q, c_kv, k_rope, positions, valid, w_uk, w_uv, scale, block: int):
    """Folds into `state` the chunk's own keys [B,T], causally by position, padding hidden."""
    b, t = positions.shape
    block = min(block, t)
    n_blocks = -(-t // block)
    pad = n_blocks * block - t

    def cut(x):  # [B,T,...] -> [nb,B,block,...]
        x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
        return jnp.moveaxis(x.reshape(b, n_blocks, block, *x.shape[2:]), 1, 0)

    def body(state, keys):
        c_j, r_j, pos_j, valid_j = keys
        k, v = expand_keys(c_j, r_j, w_uk, w_uv)
        mask = (pos_j[:, None, :] <= positions[:, :, None]) & valid_j[:, None, :]  # [B,T,block]
        return ops_attention.attend_block(state, q, k, v, mask, scale), None

    return jax.lax.scan(body, state, (cut(c_kv), cut(k_rope), cut(positions), cut(valid)))[0]


def _prefill_attention(positions, valid, past, block: int):
    """Self-attention of one prompt chunk (positions [B,T], valid [B,T]) over the pages' first
    past [B] tokens and its own; each valid token's latent row is stored in the pages."""

    def attend(layer, mla, x, sin, cos, cache):
        q_nope, q_rope = mla.queries(x, sin, cos)
        c_kv, k_rope = mla.latents(x, sin, cos)
        cache = kv.write(cache, layer, jnp.concatenate([c_kv, k_rope], axis=-1), positions, valid)
        q = join_query(q_nope, q_rope)
        w_uk, w_uv, scale = mla.w_uk, mla.w_uv, mla.config.softmax_scale
        state = ops_attention.init_state(*q.shape[:3], w_uv.shape[-1])
        # Earlier chunks from the pages (cache dtype); this chunk from its own unrounded latents.
        state = _attend_pages(state, q, cache, layer, past, w_uk, w_uv, scale, block)
        state = _attend_chunk(state, q, c_kv, k_rope, positions, valid, w_uk, w_uv, scale, block)
        out, _ = ops_attention.finish(state)
        return mla.o_proj(out.astype(q_nope.dtype)), cache

    return attend


def _decode_attention(positions, implementation: str):
    """Absorbed MLA of one new token per sequence over its pages (the token is written first)."""

    def attend(layer, mla, x, sin, cos, cache):
        c = mla.config
        q_nope, q_rope = mla.queries(x, sin, cos)  # [B,1,N,H], [B,1,N,R]
        c_kv, k_rope = mla.latents(x, sin, cos)
        cache = kv.write(cache, layer, jnp.concatenate([c_kv, k_rope], axis=-1), positions,
                         jnp.ones(positions.shape, bool))
        q = jnp.concatenate([mla.absorb(q_nope), q_rope.astype(q_nope.dtype)], axis=-1)
        pages = cache.pages[layer]  # [P,S,C+R]
        q = q.astype(query_dtype(pages.dtype))  # [B,1,N,C+R]
        scales = None if cache.scales is None else cache.scales[layer]

        def decode(impl, q, pages, table, lens):
            o_lat, _ = pallas_kernels.mla_decode(q, pages, table, lens, softmax_scale=c.softmax_scale,
                                                 v_dim=c.kv_lora_rank, implementation=impl, page_scales=scales)
            return o_lat  # [B,1,N,C]

        args = (q, pages, cache.block_table, cache.seq_lens)
        if implementation == BY_TARGET:
            o_lat = platform.by_platform(*args, gpu=functools.partial(decode, "mosaic_gpu"),
                                         default=functools.partial(decode, "xla"))
        else:
            o_lat = decode(implementation, *args)
        out = mla.unabsorb(o_lat.astype(x.dtype))  # [B,1,N,Hv]
        return mla.o_proj(out), cache

    return attend


def _first_token(logits, done_so_far, key, sampling: Sampling, stop):
    key, sub = jax.random.split(key)
    token = sample(logits, sub, sampling)
    token = jnp.where(done_so_far, FINISHED, token)
    done = done_so_far | jnp.isin(token, stop)
    return token, done, key


def _step_specs(cache, tokens):
    """Layouts of a step's outputs on a mesh: (cache, tokens [B], done [B], key, logits [B,V])."""
    rows = leading_spec(tokens, 1)[0]
    cache_specs = jax.tree.map(lambda x: jax.typeof(x).sharding.spec, cache)
    return cache_specs, P(rows), P(rows), P(), P(rows, None)


def _prefill(graphdef, state, cache, tokens, start, lengths, logits, key, stop, *, sampling: Sampling, block: int):
    """One chunk [B,T] of the right-padded prompts (lengths [B]), at positions start..start+T-1.

    Returns (cache, first new tokens [B], done, key, logits [B,V]): `logits` carries each
    sequence's last-token logits from the chunk that held it; after the last chunk, the token
    sampled from them is the first new one (every chunk gets the same key).
    """
    body = functools.partial(_prefill_body, graphdef, sampling=sampling, block=block)
    return auto_axes(body, (state, cache, tokens, start, lengths, logits, key, stop), _step_specs(cache, tokens))


def _prefill_body(graphdef, state, cache, tokens, start, lengths, logits, key, stop, *, sampling: Sampling,
                  block: int):
    model = nnx.merge(graphdef, state)
    b, t = tokens.shape
    positions = start + jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    lengths = lengths.astype(jnp.int32)
    valid = positions < lengths[:, None]
    cache = cache._replace(seq_lens=lengths)
    attend = _prefill_attention(positions, valid, jnp.minimum(start, lengths), block)
    h, cache = _run_layers(model, tokens, positions, attend, cache)
    last = lengths - 1 - start  # each sequence's last prompt token within this chunk, if there
    h_last = jnp.take_along_axis(h, jnp.clip(last, 0, t - 1)[:, None, None], axis=1)  # [B,1,D]
    logits = jnp.where(((last >= 0) & (last < t))[:, None], model.logits(h_last)[:, 0], logits)
    token, done, key = _first_token(logits, jnp.zeros((b,), bool), key, sampling, stop)
    return cache, token, done, key, logits


def _decode(graphdef, state, cache, tokens, done, key, stop, *, sampling: Sampling, implementation: str):
    """One token per sequence [B] -> (cache, next tokens [B], done, key, logits [B,V])."""
    body = functools.partial(_decode_body, graphdef, sampling=sampling, implementation=implementation)
    return auto_axes(body, (state, cache, tokens, done, key, stop), _step_specs(cache, tokens))


def _decode_body(graphdef, state, cache, tokens, done, key, stop, *, sampling: Sampling, implementation: str):
    model = nnx.merge(graphdef, state)
    positions = cache.seq_lens[:, None]  # the new token's position, [B,1]
    cache = cache._replace(seq_lens=cache.seq_lens + 1)
    # A finished sequence keeps running on a dummy token (its pages cover every step); outputs masked.
    h, cache = _run_layers(model, jnp.maximum(tokens, 0)[:, None], positions,
                           _decode_attention(positions, implementation), cache)
    logits = model.logits(h)[:, 0]
    token, done, key = _first_token(logits, done, key, sampling, stop)
    return cache, token, done, key, logits


# ------------------------------------------------------------------------ executables
_EXECUTABLES: collections.OrderedDict = collections.OrderedDict()
_MAX_EXECUTABLES = 32
_COMPILE_COUNT = [0]


def compilations() -> int:
    """How many prefill/decode executables this process has compiled (for recompilation checks)."""
    return _COMPILE_COUNT[0]


def _executable(fn, graphdef, args, statics: dict, out_shardings=None):
    """The compiled `fn` for these argument types and layouts, compiling (and timing) on first sight.

    Returns (executable, seconds spent compiling now). args[1] (the cache) is donated. On a mesh,
    `out_shardings` keeps the outputs where the next step's inputs are (one executable per layout).
    """
    leaves = jax.tree.leaves(args)
    key = (fn.__name__, graphdef, tuple(sorted(statics.items())), jax.tree.structure(args),
           tuple(jax.typeof(x) for x in leaves), tuple(getattr(x, "sharding", None) for x in leaves))
    if key in _EXECUTABLES:
        _EXECUTABLES.move_to_end(key)
        return _EXECUTABLES[key], 0.0
    start = time.perf_counter()
    jitted = jax.jit(functools.partial(fn, graphdef, **statics), donate_argnums=(1,), out_shardings=out_shardings)
    compiled = jitted.lower(*args).compile()
    _COMPILE_COUNT[0] += 1
    _EXECUTABLES[key] = compiled
    if len(_EXECUTABLES) > _MAX_EXECUTABLES:
        _EXECUTABLES.popitem(last=False)
    return compiled, time.perf_counter() - start


_CPU_VIEWS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # model -> (its arrays, view)


def _cpu_view(model: Transformer):
    """The model in the CPU layouts (see _runs_on_cpu), built once per model and its arrays: the
    transposed copies take seconds at real sizes, so a second `generate` call reuses them (rebuilt
    when any of the model's arrays was replaced; dropped with the model)."""
    arrays = jax.tree.leaves(nnx.state(model))
    cached = _CPU_VIEWS.get(model)
    if cached is None or len(cached[0]) != len(arrays) or any(a is not b for a, b in zip(cached[0], arrays)):
        cached = (arrays, nnx.split(with_cpu_layout(with_expert_layout(with_decode_layout(model)))))
        _CPU_VIEWS[model] = cached
    return cached[1]


def _runs_on_cpu(model: Transformer) -> bool:
    """Whether the decode step will run on the CPU: $MLA_JAX_PLATFORM if set, else where the weights are.

    There `generate` decodes with `with_decode_layout(model)`: XLA:CPU transposes W_UK and W_UV for the
    head-batched products on every step, as slowly as it reads the rest of the layer's attention
    weights. GPUs transpose them at memory speed and keep the memory (kv_b_proj's size) instead.
    Likewise `with_expert_layout`: XLA:CPU copies each chosen expert out of the stacked experts
    before multiplying by it; held one array per expert, it is read in place. And `with_cpu_layout`:
    projections multiply by kernels held [out, in], which XLA:CPU reads at memory speed for a few rows.
    """
    chosen = platform.forced()
    if chosen is not None:
        return chosen == "cpu"
    return all(d.platform == "cpu" for leaf in jax.tree.leaves(nnx.state(model)) for d in leaf.devices())


def lower_decode_step(model: Transformer, batch: int, context: int, *, page_size: int = kv.DEFAULT_PAGE_SIZE,
                      cache_dtype=jnp.bfloat16, implementation: str | None = None, sampling: Sampling = Sampling(),
                      device: jax.Device | None = None, place=None) -> jax.stages.Lowered:
    """The decode step for `batch` sequences of up to `context` cached tokens, lowered for `device`
    (default: the first local one) without allocating anything: `model` may be abstract
    (`mla_jax.weights.abstract_model`) and `device` a GPU topology device on a machine without a
    GPU (../shared/GPU_AOT.md). `.compile()` it to see memory, HLO and compile time. The decode
    attention is `implementation`, or by default the compile target's (`decode_implementation`).

    `place`, if given, lays the step out on several devices instead: called with the abstract
    arguments (state, cache, tokens, done, key, stop), it returns a matching tree of shardings
    (e.g. NamedShardings over a mesh of topology devices; see `mla_jax.parallel.plan`)."""
    if implementation not in (None, *IMPLEMENTATIONS):
        raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None")
    if implementation is None:
        implementation = decode_implementation(model.config, page_size=page_size, cache_dtype=cache_dtype)
    graphdef, state = nnx.split(model)
    pages_per_seq = kv.pages_needed(context, page_size)
    cache = jax.eval_shape(lambda: kv.init_cache(model.config, batch * pages_per_seq, batch, pages_per_seq,
                                                 page_size=page_size, dtype=cache_dtype))
    tokens = jax.ShapeDtypeStruct((batch,), jnp.int32)
    done = jax.ShapeDtypeStruct((batch,), jnp.bool_)
    key = jax.eval_shape(lambda: jax.random.key(0))
    stop = jax.ShapeDtypeStruct((1,), jnp.int32)
    args = (state, cache, tokens, done, key, stop)
    if place is None:
        single = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])
        shardings = jax.tree.map(lambda _: single, args)
    else:
        shardings = place(args)
    args = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), args, shardings)
    step = functools.partial(_decode, graphdef, sampling=sampling, implementation=implementation)
    return jax.jit(step, donate_argnums=(1,)).trace(*args).lower()


def lower_prefill_chunk(model: Transformer, cache: kv.PagedCache, chunk: int, *, sampling: Sampling = Sampling(),
                        block: int | None = None, device: jax.Device | None = None) -> jax.stages.Lowered:
    """The prefill chunk step for a batch of the cache's width and `chunk` prompt tokens, lowered
    without allocating anything, for `device` (default: this process's first): `model` and `cache` may
    be abstract (`mla_jax.weights.abstract_model`, `jax.eval_shape`) and `device` a GPU topology
    device on a machine without a GPU (../shared/GPU_AOT.md). `.compile()` it to see what one step
    needs (`memory_analysis()`)."""
    graphdef, state = nnx.split(model)
    b = cache.block_table.shape[0]
    sharding = jax.sharding.SingleDeviceSharding(device or jax.local_devices()[0])

    def spec(shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)

    key = jax.eval_shape(lambda: jax.random.key(0))
    args = (jax.tree.map(lambda x: spec(x.shape, x.dtype), (state, cache)) +
            (spec((b, chunk), jnp.int32), spec((), jnp.int32), spec((b,), jnp.int32),
             spec((b, model.config.vocab_size), jnp.float32), spec(key.shape, key.dtype), spec((1,), jnp.int32)))
    statics = {"sampling": sampling, "block": ATTENTION_BLOCK if block is None else block}
    return jax.jit(functools.partial(_prefill, graphdef, **statics), donate_argnums=(1,)).trace(*args).lower()


# ------------------------------------------------------------------------ the public API
@dataclasses.dataclass
class Stats:
    """Wall-clock accounting of one generation (seconds exclude compilation)."""

    batch: int = 0
    prompt_tokens: int = 0  # real prompt tokens over the batch (padding not counted)
    prefill_seconds: float = 0.0
    decode_tokens: int = 0  # tokens produced by decode steps over the batch (first token excluded)
    decode_seconds: float = 0.0
    compile_seconds: float = 0.0
    cache_bytes_per_token: int = 0

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / self.prefill_seconds if self.prefill_seconds else math.nan

    @property
    def decode_tokens_per_second(self) -> float:
        return self.decode_tokens / self.decode_seconds if self.decode_seconds else math.nan


def _check_prompts(prompts, vocab_size: int) -> list[list[int]]:
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) and not isinstance(prompts, np.ndarray):
        raise UsageTypeError(f"prompts: expected a list of token-id lists, found {type(prompts).__name__}")
    out = []
    for i, p in enumerate(prompts):
        if _is_int(p):
            raise UsageTypeError("prompts: expected a list of token-id lists (a batch), found a flat list of "
                                 "ints; wrap a single prompt as [prompt]")
        if isinstance(p, (str, bytes)):
            raise UsageTypeError(f"prompts[{i}]: expected token ids, found text {p[:20]!r}; encode it with "
                                 "mla_jax.tokenizer.Tokenizer first")
        ids = np.asarray(p)
        if ids.size == 0:
            raise UsageError(f"prompts[{i}] is empty; every prompt needs at least one token")
        if ids.ndim != 1 or ids.dtype.kind not in "iu" and not (
                ids.dtype == object and all(_is_int(t) for t in ids.reshape(-1))):
            what = f"shape {ids.shape}" if ids.ndim != 1 else f"{ids.dtype} values such as {ids.reshape(-1)[0].item()!r}"
            raise UsageTypeError(f"prompts[{i}]: expected a flat list of integer token ids, found {what}")
        ids = [int(t) for t in ids]
        bad = [t for t in ids if not 0 <= t < vocab_size]
        if bad:
            raise UsageError(f"prompts[{i}] has token ids {bad[:5]} outside [0, vocab_size={vocab_size})")
        out.append(ids)
    if not out:
        raise UsageError("prompts is empty; expected at least one prompt")
    return out


class Stream:
    """Iterator over the tokens of a batched generation, one int32 array [B] per step.

    A sequence that has stopped (its stop token was yielded earlier) shows FINISHED (-1). After a
    step is yielded, `logits` holds the float32 logits [B,V] its tokens were chosen from; `stats`
    fills in as the stream runs.
    """

    def __init__(self, model: Transformer, prompts, max_new_tokens: int, *, sampling: Sampling,
                 stop_tokens: Sequence[int], seed: int, page_size: int, cache_dtype, implementation,
                 num_pages: int | None = None, prefill_chunk: int = PREFILL_CHUNK):
        config = model.config
        check_options(max_new_tokens=max_new_tokens, page_size=page_size, num_pages=num_pages, seed=seed,
                      prefill_chunk=prefill_chunk)
        self.prompts = _check_prompts(prompts, config.vocab_size)
        lengths = [len(p) for p in self.prompts]
        kv.check_length(config, lengths, max_new_tokens)
        self.max_new_tokens = int(max_new_tokens)
        self.sampling = sampling
        self.implementation = decode_implementation(config, page_size=page_size, cache_dtype=cache_dtype,
                                                    override=implementation)
        self.stop = jnp.asarray(sorted({int(t) for t in stop_tokens}), jnp.int32).reshape(-1)
        self.key = jax.random.key(seed)
        self.page_size = page_size
        self.stats = Stats(batch=len(lengths), prompt_tokens=sum(lengths))
        self.logits = None

        b = len(lengths)
        bucket, self.chunk = prefill_plan(max(lengths), config.max_position_embeddings, int(prefill_chunk))
        pages_per_seq = kv.pages_needed(bucket + self.max_new_tokens, page_size)
        # By default the pool holds every sequence at the bucket's full length; a smaller pool is
        # shared out by what each request really needs (its prompt plus max_new_tokens).
        pool = b * pages_per_seq if num_pages is None else num_pages
        self.graphdef, self.state = nnx.split(model)
        self.mesh = mesh_of(self.state)  # where the weights live: the batch and cache follow them
        shards = 1 if self.mesh is None else shard_count(self.mesh, batch_axes(self.mesh, b))
        if pool % shards:
            raise UsageError(f"num_pages={num_pages}: the cache is split over {shards} batch shards on "
                             f"this mesh; use a multiple of {shards}")
        make_cache = functools.partial(kv.init_cache, config, pool, b, pages_per_seq, page_size=page_size,
                                       dtype=cache_dtype)
        cache_at = None if self.mesh is None else cache_sharding(self.mesh, jax.eval_shape(make_cache))
        # On a mesh each device makes its own part of the empty pages (in a job of several processes
        # no process could hold them all).
        self.cache = make_cache() if cache_at is None else jax.jit(make_cache, out_shardings=cache_at)()
        self.allocator = kv.PageAllocator(self.cache.num_pages, shards)
        self.reserved = [n + self.max_new_tokens for n in lengths]
        self.table = self.allocator.allocate(self.reserved, page_size, pages_per_seq)
        table = jnp.asarray(self.table) if cache_at is None else put(self.table, cache_at.block_table)
        self.cache = self.cache._replace(block_table=table)
        self.stats.cache_bytes_per_token = kv.bytes_per_token(self.cache)
        tokens = np.zeros((b, bucket), np.int32)
        for i, p in enumerate(self.prompts):
            tokens[i, : len(p)] = p
        self.tokens, self.lengths = tokens, jnp.asarray(lengths, jnp.int32)
        self.vocab_size = config.vocab_size
        if self.mesh is None and _runs_on_cpu(model):  # one device: the CPU decode layout (see _runs_on_cpu)
            self.graphdef, self.state = _cpu_view(model)
        self.out_shardings = None
        if self.mesh is not None:
            rows = batch_sharding(self.mesh, (b,))
            self.lengths = put(np.asarray(lengths, np.int32), rows)
            self.key, self.stop = put((self.key, self.stop), replicated(self.mesh))
            self.out_shardings = (cache_at, rows, rows, replicated(self.mesh),
                                  batch_sharding(self.mesh, (b, config.vocab_size)))

    def _put(self, x: jax.Array) -> jax.Array:
        """x [B,...] split like the batch on the model's mesh (unchanged without one)."""
        return x if self.mesh is None else put(x, batch_sharding(self.mesh, x.shape))

    def __iter__(self) -> Iterator[np.ndarray]:
        with on_mesh(self.mesh):
            yield from self._steps()

    def _steps(self) -> Iterator[np.ndarray]:
        if self.max_new_tokens == 0:
            return
        if self.cache is None:
            raise RuntimeError("this Stream has already run (its cache was donated); call generate_stream again")
        cache, self.cache = self.cache, None  # donated below
        logits = self._put(np.zeros((len(self.prompts), self.vocab_size), np.float32))
        prefill, begin = None, 0.0
        for first in range(0, self.tokens.shape[1], self.chunk):
            chunk = self.tokens[:, first: first + self.chunk]
            chunk = jnp.asarray(chunk) if self.mesh is None else self._put(chunk)
            start = np.int32(first)
            start = jnp.asarray(start) if self.mesh is None else put(start, replicated(self.mesh))
            args = (self.state, cache, chunk, start, self.lengths, logits, self.key, self.stop)
            if prefill is None:
                prefill, compile_s = _executable(_prefill, self.graphdef, args,
                                                 {"sampling": self.sampling, "block": ATTENTION_BLOCK},
                                                 self.out_shardings)
                self.stats.compile_seconds += compile_s
                begin = time.perf_counter()
            cache, token, done, key, logits = prefill(*args)
        token_host = to_host(token)  # every process of a job gets every sequence's tokens
        self.stats.prefill_seconds = time.perf_counter() - begin
        statics = {"sampling": self.sampling, "implementation": self.implementation}
        decode = None
        pending = (token_host, logits, to_host(done))
        try:
            for _ in range(self.max_new_tokens - 1):
                if pending[2].all():
                    break
                step_args = (self.state, cache, token, done, key, self.stop)
                if decode is None:
                    decode, compile_s = _executable(_decode, self.graphdef, step_args, statics, self.out_shardings)
                    self.stats.compile_seconds += compile_s
                    start = time.perf_counter()
                # Dispatch the next step before handing out this one, so the device never waits on us.
                cache, token, done, key, logits = decode(*step_args)
                yield self._hand_out(pending)
                pending = (to_host(token), logits, to_host(done))
                self.stats.decode_tokens += int((pending[0] != FINISHED).sum())
                self.stats.decode_seconds = time.perf_counter() - start
            yield self._hand_out(pending)
        finally:
            self.allocator.release(self.table, self.reserved, self.page_size)

    def _hand_out(self, pending) -> np.ndarray:
        self.logits = pending[1]
        return pending[0]


def generate_stream(model: Transformer, prompts, max_new_tokens: int, *, temperature: float = 0.0,
                    top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
                    seed: int = 0, page_size: int = kv.DEFAULT_PAGE_SIZE, cache_dtype=jnp.bfloat16,
                    implementation: str | None = None, num_pages: int | None = None,
                    prefill_chunk: int = PREFILL_CHUNK) -> Stream:
    """Like `generate`, but an iterable `Stream` of int32 arrays [B], one per step, as they come."""
    return Stream(model, prompts, max_new_tokens, sampling=Sampling(temperature, top_k, top_p),
                  stop_tokens=stop_tokens, seed=seed, page_size=page_size, cache_dtype=cache_dtype,
                  implementation=implementation, num_pages=num_pages, prefill_chunk=prefill_chunk)


def generate(model: Transformer, prompts, max_new_tokens: int, *, temperature: float = 0.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: Sequence[int] = (),
             seed: int = 0, page_size: int = kv.DEFAULT_PAGE_SIZE, cache_dtype=jnp.bfloat16,
             implementation: str | None = None, num_pages: int | None = None,
             prefill_chunk: int = PREFILL_CHUNK) -> list[list[int]]:
    """New tokens for each prompt (a batch of token-id lists of any lengths).

    Greedy when temperature is 0; otherwise samples at `temperature` within top_k / top_p. A
    sequence ends after max_new_tokens or right after emitting one of `stop_tokens` (kept, as
    transformers does). The cache holds bfloat16 latents unless `cache_dtype` says otherwise
    (float32, or "fp8" for float8_e4m3fn rows with per-token scales). `implementation` overrides
    the decode attention choice ("xla" or "mosaic_gpu"). `num_pages` caps the cache pool (pages
    of `page_size` tokens per layer); a batch that does not fit is a CacheError before any work.
    Prompts are prefilled `prefill_chunk` tokens at a time (memory set by the chunk, not the prompt).
    """
    stream = generate_stream(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k,
                             top_p=top_p, stop_tokens=stop_tokens, seed=seed, page_size=page_size,
                             cache_dtype=cache_dtype, implementation=implementation, num_pages=num_pages,
                             prefill_chunk=prefill_chunk)
    out: list[list[int]] = [[] for _ in stream.prompts]
    for step in stream:
        for seq, t in zip(out, step.tolist()):
            if t != FINISHED:
                seq.append(t)
    return out


class _CallableModule(types.ModuleType):
    """Importing anything from `mla_jax.generate` binds the package attribute `mla_jax.generate` to
    this module, shadowing the lazily exported function; calling the module calls `generate`, so
    `mla_jax.generate(model, prompts, n)` works whichever of the two the attribute holds."""

    def __call__(self, *args, **kwargs) -> list[list[int]]:
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
