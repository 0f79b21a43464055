"""MLA decode for Hopper in Pallas Mosaic GPU (FlashMLA's job).

One CTA owns (64 query rows, one split of one sequence).  Query rows are the
heads of all new tokens folded together: row = token * heads + head, padded to
64 (the wgmma M dimension).  Three warpgroups:

  * warpgroup 2, the producer: copies the CTA's metadata, block-table row and
    query tile with TMA, then streams cache tiles (`block_kv` tokens x `dim`)
    of the split into a `num_stages`-deep shared-memory ring, waiting on
    "consumed" barriers before reusing a slot.
  * warpgroups 0 and 1, the consumers: for every tile, consumer w scores its
    own half of the keys, S_w = Q K_w^T with wgmma (M = 64 query rows,
    N = block_kv / 2, K = dim), masks it, exchanges row maxima with the other
    consumer through shared memory, writes P_w, and after both halves of P are
    written computes O += P V for its value columns [w*v_dim/2, (w+1)*v_dim/2)
    over all the block's keys (FlashMLA's split: no Q K^T is computed twice).

The kernel writes float32 partials normalised per split plus their LSE; the
wrapper merges the splits with `combine.combine_splits`.

Two primitives are not implemented by GPU interpret mode, so under
`interpret=True` the kernel swaps them for equivalents (`_qk` and `_pv`):
a transposed (K-major) wgmma operand is staged transposed through registers,
and the O accumulator is added in registers instead of being fed back with
`pl.run_state(ACC.init(...))`.  Everything else (TMA, barriers, warp
specialisation, wgmma, masking, softmax) is the same code.
"""

from __future__ import annotations

import functools
import math

import jax
from jax import lax
import jax.experimental.pallas as pl
import jax.experimental.pallas.mosaic_gpu as plgpu
import jax.numpy as jnp

from pallas_kernels import _interpret
from pallas_kernels.mla_decode.combine import combine_splits
from pallas_kernels.mla_decode import config as config_lib
from pallas_kernels.mla_decode.config import Config

NUM_CONSUMERS = 2
META_LEN = config_lib.META_LEN  # int32 per CTA: start block, end block, seq_len, last
# block, padding
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def tile_swizzle(dim: int, block_kv: int, itemsize: int) -> int:
  """Swizzle (bytes) shared by every wgmma operand tile.

  wgmma wants both operands of one product with the same swizzle; each
  consumer's P is only block_kv / 2 keys wide, so every tile uses the smaller.
  """
  return min(plgpu.find_swizzle(dim * itemsize * 8),
             plgpu.find_swizzle(block_kv // NUM_CONSUMERS * itemsize * 8))


# FP8 caches: the ring holds e4m3 tiles (32-byte swizzle, 8 x 32 SMEM tiles) and each
# consumer converts its own 16 keys into a bf16 tile (32-byte swizzle, 8 x 16 SMEM tiles:
# the swizzle every operand shares at block_kv 32), FP8_COLS columns at a time.
FP8_BLOCK_KV = 32
FP8_SWIZZLE = 32
FP8_COLS = 64


def fp8_convert_layout():
  """Register layout of a [16, FP8_COLS] slice converted from e4m3 to bf16.

  The WGMMA register layouts tile 64 rows; a consumer converts only its own 16 keys.
  Warps take 8 rows x 32 columns each; within a warp the 8 lanes of one 128-byte
  store cover 4 rows of one 8 x 16 bf16 SMEM tile, and the 16 lanes of one 128-byte
  load 4 rows of one 8 x 32 e4m3 tile, so neither side has bank conflicts.  Each lane
  holds 8 consecutive elements of a row (8 bytes read, 16 bytes written).
  """
  return plgpu.Layout.TILED(
      plgpu.Tiling(((16, FP8_COLS), (8, 32), (4, 16), (8,))),
      warp_dims=(-7, -6), lane_dims=(-5, -4, -3, -2), vector_dim=-1)


def copies_per_block(page_size: int, block_kv: int) -> int:
  """TMA copies that fill one ring slot: a block spans block_kv / page_size pages."""
  return max(1, block_kv // page_size)


def unsupported_reason(*, dim: int, v_dim: int, page_size: int, block_kv: int,
                       itemsize: int, fp8: bool = False) -> str | None:
  """Why the kernel cannot take these static shapes, or None if it can."""
  if page_size % 16:
    return f"{page_size=} must be a multiple of 16"
  if fp8 and (dim % FP8_COLS or block_kv != FP8_BLOCK_KV):
    return (f"an FP8 cache needs {dim=} a multiple of {FP8_COLS} and {block_kv=} "
            f"equal to {FP8_BLOCK_KV} (the e4m3 -> bf16 conversion's register layout)")
  if block_kv % 32:
    return (f"{block_kv=} must be a multiple of 32 (each of the {NUM_CONSUMERS} "
            "consumers scores 16 or more keys)")
  if page_size % block_kv and block_kv % page_size:
    return f"{block_kv=} must divide {page_size=} or be a multiple of it"
  if v_dim % NUM_CONSUMERS or v_dim > dim:
    return f"{v_dim=} must be even and <= {dim=}"
  half = v_dim // NUM_CONSUMERS
  if tile_swizzle(dim, block_kv, itemsize) < 32:
    return (f"{dim=} rows of {itemsize}-byte elements must be a multiple of 32 bytes "
            "(the smallest shared-memory swizzle Mosaic GPU takes)")
  tile = tile_swizzle(dim, block_kv, itemsize) // itemsize
  if half % tile or dim % tile:
    return (f"{v_dim=} split over {NUM_CONSUMERS} consumer warpgroups gives "
            f"{half} value columns each; it and {dim=} must be multiples of the "
            f"{tile}-element shared-memory tile")
  return None


def _mla_decode_kernel(
    q_ref,  # [batch, h_blocks, block_h, dim] bf16/f16 (GMEM)
    pages_ref,  # [num_pages, page_size, dim] bf16/f16/fp8 (GMEM)
    scales_ref,  # [batch, blocks, block_kv] f32 (GMEM), FP8 only: per block, 0 past seq_len
    tail_ref,  # [batch, block_kv, dim] cache dtype (GMEM): last block, zero past seq_len
    table_ref,  # [batch, t_rows, t_cols] int32 (GMEM)
    meta_ref,  # [batch, splits, META_LEN] int32 (GMEM)
    out_ref,  # [batch, splits, h_blocks, block_h, v_dim] f32 (GMEM)
    lse_ref,  # [batch, splits, h_blocks, block_h] f32 (GMEM)
    *,
    config: Config,
    s_q: int,
    heads: int,
    page_size: int,
    v_dim: int,
    softmax_scale: float,
    causal: bool,
    interpret: bool,
):
  dtype = q_ref.dtype
  fp8 = scales_ref is not None
  dim = q_ref.shape[-1]
  block_h, block_kv, stages = config.block_h, config.block_kv, config.num_stages
  half = v_dim // NUM_CONSUMERS  # value columns per consumer
  kh = block_kv // NUM_CONSUMERS  # keys per consumer: each scores only its own
  copies = copies_per_block(page_size, block_kv)
  chunk = block_kv // copies  # rows per TMA copy
  out_chunk = min(config.out_chunk, half)
  _, t_rows, t_cols = table_ref.shape
  scale_log2 = softmax_scale * LOG2E

  itemsize = jnp.dtype(dtype).itemsize
  swizzle = tile_swizzle(dim, block_kv, itemsize)
  tile_transforms = (
      plgpu.TilingTransform((8, swizzle // itemsize)),
      plgpu.SwizzleTransform(swizzle),
  )
  if fp8:  # the raw FP8 ring is only read into registers, never by wgmma
    ring_transforms = (plgpu.TilingTransform((8, FP8_SWIZZLE)),
                       plgpu.SwizzleTransform(FP8_SWIZZLE))
  else:
    ring_transforms = tile_transforms
  p_transforms = tile_transforms

  def body(q_smem,  # [block_h, dim]
           kv_smem,  # [stages, block_kv, dim] cache dtype
           deq_smem,  # [2, block_kv, dim] q dtype by parity (FP8 only) or None
           scale_smem,  # [stages, block_kv] f32 (FP8 only) or None
           p_smem,  # [2, NUM_CONSUMERS, block_h, kh]: P of each consumer's keys, by parity
           max_smem,  # [2, NUM_CONSUMERS, block_h] f32: row maxima exchanged, by parity
           o_smem,  # [NUM_CONSUMERS, block_h, out_chunk] f32
           lse_smem,  # [block_h] f32
           table_smem,  # [t_rows, t_cols] int32
           meta_smem,  # [META_LEN] int32
           kt_smem,  # [NUM_CONSUMERS, dim, kh] (interpret only) or None
           setup_barriers,  # 3 barriers: meta, table, q
           kv_barriers,  # [stages]: a cache tile landed (`copies` arrivals)
           scale_barriers,  # [stages]: its FP8 scales landed (FP8 only) or None
           consumed_barriers,  # [stages]: both consumers are done with a tile
           max_barriers,  # [2]: both consumers wrote their row maxima
           p_barriers):  # [2]: both consumers wrote their half of P
    b = lax.axis_index("b")
    split = lax.axis_index("split")
    hb = lax.axis_index("hb")
    wg = lax.axis_index("wg")
    meta_bar, table_bar, q_bar = (setup_barriers.at[i] for i in range(3))

    def read_meta():
      plgpu.barrier_wait(meta_bar)
      return meta_smem[0], meta_smem[1], meta_smem[2], meta_smem[3]

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      plgpu.copy_gmem_to_smem(meta_ref.at[b, split], meta_smem, meta_bar)
      plgpu.copy_gmem_to_smem(table_ref.at[b], table_smem, table_bar)
      plgpu.copy_gmem_to_smem(q_ref.at[b, hb], q_smem, q_bar)
      start, end, _, last = read_meta()
      plgpu.barrier_wait(table_bar)
      num_blocks = end - start

      def issue(j, slot):
        block = start + j

        # The sequence's last block comes from the wrapper's zero-filled copy:
        # rows past seq_len may hold anything (NaN, inf), and 0 * NaN in P V is
        # NaN, so they must never reach the ring.
        @pl.when(block == last)
        def _tail():
          for i in range(copies):  # as many arrivals as a block of pages
            rows = pl.ds(i * chunk, chunk)
            plgpu.copy_gmem_to_smem(tail_ref.at[b, rows], kv_smem.at[slot, rows],
                                    kv_barriers.at[slot])

        @pl.when(block != last)
        def _page():
          for i in range(copies):  # a block is part of one page or several pages
            token = block * block_kv + i * chunk
            entry = token // page_size
            page = table_smem[entry // t_cols, entry % t_cols]
            if chunk == page_size:
              src = pages_ref.at[page]
            else:
              src = pages_ref.at[page, pl.ds(token % page_size, chunk)]
            plgpu.copy_gmem_to_smem(src, kv_smem.at[slot, pl.ds(i * chunk, chunk)],
                                    kv_barriers.at[slot])

        if fp8:  # the wrapper lays the scales out by block, zeroed past seq_len
          plgpu.copy_gmem_to_smem(scales_ref.at[b, block], scale_smem.at[slot],
                                  scale_barriers.at[slot])

      for j in range(stages):
        pl.when(j < num_blocks)(functools.partial(issue, j, j))

      @pl.loop(stages, jnp.maximum(num_blocks, stages))
      def _steady(j):
        slot = lax.rem(j, stages)
        plgpu.barrier_wait(consumed_barriers.at[slot])
        issue(j, slot)

      # Drain: observe the release of the last tiles too, so that every barrier
      # phase is waited on before the CTA exits.
      @pl.loop(jnp.maximum(num_blocks - stages, 0), num_blocks)
      def _drain(j):
        plgpu.barrier_wait(consumed_barriers.at[lax.rem(j, stages)])

    def _qk(tile, w):
      """S_w [block_h, kh] f32 = Q K_w^T, K_w = consumer w's keys of the tile ref."""
      keys = tile.at[pl.ds(w * kh, kh)]
      if interpret:  # transposed wgmma operands are not interpreted: stage K^T
        kt_smem.at[w][...] = keys[...].T
        k_operand = kt_smem.at[w]
      else:
        k_operand = _interpret.transposed(keys)

      def mma(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_operand)
        return acc_ref[...]

      return pl.run_scoped(mma, plgpu.ACC((block_h, kh), jnp.float32))

    def _pv(acc, tile, w, parity):
      """acc + P V for consumer w's value columns: both consumers' P, all keys."""
      operands = [(p_smem.at[parity, c], tile.at[pl.ds(c * kh, kh), pl.ds(w * half, half)])
                  for c in range(NUM_CONSUMERS)]
      if interpret:  # pl.run_state is not interpreted: add a fresh product
        def mma(acc_ref):
          for p_operand, v_operand in operands:
            plgpu.wgmma(acc_ref, p_operand, v_operand)
          return acc_ref[...]
        return acc + pl.run_scoped(mma, plgpu.ACC((block_h, half), jnp.float32))

      def mma_into(acc_ref):
        for p_operand, v_operand in operands:
          plgpu.wgmma(acc_ref, p_operand, v_operand)
      return pl.run_state(mma_into)(plgpu.ACC.init(acc))

    def exchange(mine, parity):
      """Publishes this consumer's row vector, returns the other consumer's."""
      max_smem.at[parity, wg][...] = mine
      plgpu.commit_smem()
      plgpu.barrier_arrive(max_barriers.at[parity])
      plgpu.barrier_wait(max_barriers.at[parity])
      return _interpret.load_vector(max_smem.at[parity, 1 - wg],
                                    plgpu.Layout.WGMMA.reduce(1), interpret=interpret)

    def consumer(w):  # w: traced warpgroup index, 0 or 1
      plgpu.set_max_registers(232, action="increase")
      start, end, seq_len, _ = read_meta()
      plgpu.barrier_wait(q_bar)
      num_blocks = end - start
      wgmma_layout = plgpu.Layout.WGMMA
      row_layout = plgpu.Layout.WGMMA.reduce(1)
      col_layout = plgpu.Layout.WGMMA.reduce(0)

      rows = _interpret.iota((block_h, kh), 0, wgmma_layout, interpret=interpret)
      cols = _interpret.iota((block_h, kh), 1, wgmma_layout, interpret=interpret)
      cols = cols + w * kh  # this consumer's keys within a block
      # Which of the s_q new tokens a row belongs to: row = token * heads + head.
      global_row = rows + hb * block_h
      token = jnp.zeros_like(rows)
      for i in range(1, s_q):
        token = token + (global_row >= i * heads).astype(jnp.int32)
      limit = seq_len - s_q + 1 + token if causal else seq_len + jnp.zeros_like(rows)

      m0 = _interpret.layout_cast(
          jnp.full((block_h,), -jnp.inf, jnp.float32), row_layout, interpret=interpret)
      l0 = _interpret.layout_cast(
          jnp.full((block_h,), 0.0, jnp.float32), row_layout, interpret=interpret)
      acc0 = _interpret.layout_cast(
          jnp.full((block_h, half), 0.0, jnp.float32), wgmma_layout, interpret=interpret)

      def step(j, carry):
        acc, m_i, l_i = carry
        slot = lax.rem(j, stages)
        parity = lax.rem(j, 2)
        plgpu.barrier_wait(kv_barriers.at[slot])
        if fp8:
          # One bf16 copy of the tile shared by both consumers (by parity: the
          # other consumer may still be multiplying by the previous one); each
          # converts its own keys, the ones it scores.  e4m3 -> f16 -> bf16 is
          # exact; the per-token scale multiplies S's and P's columns instead.
          plgpu.barrier_wait(scale_barriers.at[slot])
          tile = deq_smem.at[parity]
          own = pl.ds(w * kh, kh)
          for c in range(dim // FP8_COLS):
            cols_c = pl.ds(c * FP8_COLS, FP8_COLS)
            raw = _interpret.load_vector(kv_smem.at[slot, own, cols_c],
                                         fp8_convert_layout(), interpret=interpret)
            tile.at[own, cols_c][...] = raw.astype(jnp.float16).astype(dtype)
          token_scale = lax.broadcast_in_dim(
              _interpret.load_vector(scale_smem.at[slot, pl.ds(w * kh, kh)], col_layout,
                                     interpret=interpret),
              (block_h, kh), [1])
          plgpu.commit_smem()
          plgpu.barrier_arrive(consumed_barriers.at[slot])  # ring slot is free
        else:
          tile = kv_smem.at[slot]
        s = _qk(tile, w) * scale_log2  # log2 domain
        if fp8:
          s = s * token_scale
        key_pos = cols + (start + j) * block_kv
        s = jnp.where(key_pos < limit, s, -jnp.inf)
        # The block's row maximum needs the other consumer's keys too.
        own_max = s.max(axis=1)
        m_new = jnp.maximum(m_i, jnp.maximum(own_max, exchange(own_max, parity)))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet
        alpha = jnp.exp2(m_i - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)  # over this consumer's keys only
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        if fp8:
          p = p * token_scale
        p_smem.at[parity, w][...] = p.astype(dtype)
        plgpu.commit_smem()
        plgpu.barrier_arrive(p_barriers.at[parity])
        plgpu.barrier_wait(p_barriers.at[parity])  # both halves of P written
        acc = _pv(acc, tile, w, parity)
        if not fp8:
          plgpu.barrier_arrive(consumed_barriers.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, num_blocks, step, (acc0, m0, l0))
      # m_i is the same in both consumers; the softmax denominator is the sum of
      # their partial sums (parity num_blocks % 2: the slot after the last step's).
      l_i = l_i + exchange(l_i, lax.rem(num_blocks, 2))

      seen = l_i > 0.0
      l_safe = jnp.where(seen, l_i, 1.0)
      out = acc * lax.broadcast_in_dim(1.0 / l_safe, acc.shape, [0])
      for c in range(half // out_chunk):
        lo = c * out_chunk
        plgpu.wait_smem_to_gmem(0, wait_read_only=True)
        o_smem.at[w][...] = out[:, lo:lo + out_chunk]
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(
            o_smem.at[w],
            out_ref.at[b, split, hb, :, pl.ds(w * half + lo, out_chunk)],
        )
      @pl.when(w == 0)
      def _():
        lse_smem[...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, split, hb])
      plgpu.wait_smem_to_gmem(0)

    # One consumer body for both warpgroups (w is the traced warpgroup index): with
    # one copy per warpgroup, ptxas spilled 20-52 bytes in the second copy's loop.
    pl.when(wg < NUM_CONSUMERS)(lambda: consumer(wg))

  scratch = [
      plgpu.SMEM((block_h, dim), dtype, transforms=tile_transforms),
      plgpu.SMEM((stages, block_kv, dim), pages_ref.dtype, transforms=ring_transforms),
      plgpu.SMEM((2, block_kv, dim), dtype, transforms=tile_transforms) if fp8 else None,
      plgpu.SMEM((stages, block_kv), jnp.float32) if fp8 else None,
      plgpu.SMEM((2, NUM_CONSUMERS, block_h, kh), dtype, transforms=p_transforms),
      plgpu.SMEM((2, NUM_CONSUMERS, block_h), jnp.float32),
      plgpu.SMEM((NUM_CONSUMERS, block_h, out_chunk), jnp.float32),
      plgpu.SMEM((block_h,), jnp.float32),
      plgpu.SMEM((t_rows, t_cols), jnp.int32),
      plgpu.SMEM((META_LEN,), jnp.int32),
      plgpu.SMEM((NUM_CONSUMERS, dim, kh), dtype) if interpret else None,
  ]
  pl.run_scoped(
      lambda *refs: body(*refs),
      *scratch,
      plgpu.Barrier(num_barriers=3),
      plgpu.Barrier(num_arrivals=copies, num_barriers=stages),
      plgpu.Barrier(num_barriers=stages) if fp8 else None,
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=2),
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=2),
      collective_axes="wg",
  )


def _launch(q_blocks, pages, scales, tail, table, meta, *, config: Config,
            s_q: int,
            heads: int, v_dim: int, softmax_scale: float, causal: bool,
            interpret: bool):
  """pallas call: returns float32 partial outputs and LSEs of every split."""
  batch, h_blocks, block_h, _ = q_blocks.shape
  _, page_size, _ = pages.shape
  kernel = functools.partial(
      _mla_decode_kernel, config=config, s_q=s_q, heads=heads,
      page_size=page_size, v_dim=v_dim, softmax_scale=softmax_scale,
      causal=causal, interpret=interpret)
  splits = config.num_splits
  out_type = (
      jax.ShapeDtypeStruct((batch, splits, h_blocks, block_h, v_dim), jnp.float32),
      jax.ShapeDtypeStruct((batch, splits, h_blocks, block_h), jnp.float32),
  )
  call = plgpu.kernel(
      kernel,
      out_type=out_type,
      grid=(h_blocks, splits, batch),
      grid_names=("hb", "split", "b"),
      num_threads=NUM_CONSUMERS + 1,
      thread_name="wg",
      compiler_params=plgpu.CompilerParams(approx_math=True),
      interpret=_interpret.gpu_interpret_params() if interpret else None,
  )
  return call(q_blocks, pages, scales, tail, table, meta)


def cached_lengths(seq_lens, *, capacity: int):
  """[batch] int32: cache rows that exist and count, seq_len clipped to [0, capacity]."""
  return jnp.clip(seq_lens.astype(jnp.int32), 0, capacity)


def split_metadata(seq_lens, *, block_kv: int, num_splits: int, capacity: int):
  """[batch, num_splits, META_LEN] int32: (start block, end block, seq_len, last block, 0...).

  Blocks cover the rows that exist (`cached_lengths`); seq_len itself stays as given
  for the causal limits.  `capacity` is max_pages * page_size.
  """
  seq_lens = seq_lens.astype(jnp.int32)
  num_blocks = (cached_lengths(seq_lens, capacity=capacity) + block_kv - 1) // block_kv
  per_split = (num_blocks + num_splits - 1) // num_splits
  split_ids = jnp.arange(num_splits, dtype=jnp.int32)
  start = jnp.minimum(split_ids[None, :] * per_split[:, None], num_blocks[:, None])
  end = jnp.minimum(start + per_split[:, None], num_blocks[:, None])
  meta = jnp.zeros((seq_lens.shape[0], num_splits, META_LEN), jnp.int32)
  meta = meta.at[:, :, 0].set(start).at[:, :, 1].set(end)
  meta = meta.at[:, :, 2].set(jnp.broadcast_to(seq_lens[:, None], start.shape))
  return meta.at[:, :, 3].set(jnp.broadcast_to(num_blocks[:, None] - 1, start.shape))


def tail_blocks(pages, table, seq_lens, *, block_kv: int):
  """Each sequence's last cache block with the rows past its length zeroed.

  pages [num_pages, page_size, dim], table [batch, max_pages] (ids in range),
  seq_lens [batch] -> [batch, block_kv, dim] in pages.dtype.  A select, not a
  multiply: NaN and inf become exact zeros.  Sequences with no rows get an
  all-zero block (never read).
  """
  page_size = pages.shape[1]
  capacity = table.shape[1] * page_size
  lens = cached_lengths(seq_lens, capacity=capacity)  # [batch]
  first = jnp.maximum((lens + block_kv - 1) // block_kv - 1, 0) * block_kv  # [batch]
  token = first[:, None] + jnp.arange(block_kv, dtype=jnp.int32)[None, :]  # [batch, bkv]
  valid = token < lens[:, None]
  # Rows past the table (a block may overhang it) are clamped here, zeroed below.
  page = jnp.take_along_axis(table, token // page_size, axis=1, mode="clip")
  offset = token % page_size
  tail = pages[page, offset]  # [batch, block_kv, dim]
  return jnp.where(valid[:, :, None], tail, jnp.zeros((), pages.dtype))


def block_scales(page_scales, table, seq_lens, *, block_kv: int):
  """FP8 per-token scales laid out by cache block: [batch, blocks, block_kv] f32.

  page_scales [num_pages, page_size], table [batch, max_pages] (ids in range).
  Scales of rows past a sequence's length are exact zeros (a select: NaN and
  inf never reach the kernel), so one TMA copy of block_kv * 4 bytes brings a
  block's scales whatever the page size.  Costs a gather of batch x capacity
  floats, 1/144 of the FP8 cache bytes it scales at dim 576.
  """
  page_size = page_scales.shape[1]
  capacity = table.shape[1] * page_size
  blocks = -(-capacity // block_kv)
  lens = cached_lengths(seq_lens, capacity=capacity)  # [batch]
  token = jnp.arange(blocks * block_kv, dtype=jnp.int32)  # [blocks * block_kv]
  page = jnp.take(table, token // page_size, axis=1, mode="clip")  # [batch, tokens]
  scales = page_scales[page, token % page_size]
  scales = jnp.where(token[None, :] < lens[:, None], scales, 0.0)
  return scales.reshape(table.shape[0], blocks, block_kv).astype(jnp.float32)


def mla_decode_mosaic_gpu(q, pages, block_table, seq_lens, *, softmax_scale: float,
                          causal: bool, v_dim: int, config: Config,
                          interpret: bool = False, page_scales=None):
  """MLA decode with the Mosaic GPU kernel; same contract as the reference."""
  batch, s_q, heads, dim = q.shape
  num_pages, page_size, _ = pages.shape
  rows = s_q * heads
  block_h = config.block_h
  h_blocks = -(-rows // block_h)
  q_rows = q.reshape(batch, rows, dim)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, h_blocks * block_h - rows), (0, 0)))
  q_blocks = q_rows.reshape(batch, h_blocks, block_h, dim)

  max_pages = block_table.shape[1]
  t_rows, t_cols = config_lib.table_shape(max_pages)
  # Out-of-range ids are clamped so that no copy can leave the cache; entries past a
  # sequence's length are never read anyway.
  in_range = jnp.clip(block_table.astype(jnp.int32), 0, num_pages - 1)
  table = jnp.pad(in_range, ((0, 0), (0, t_rows * t_cols - max_pages)))
  table = table.reshape(batch, t_rows, t_cols)
  meta = split_metadata(seq_lens, block_kv=config.block_kv,
                        num_splits=config.num_splits, capacity=max_pages * page_size)
  tail = tail_blocks(pages, in_range, seq_lens, block_kv=config.block_kv)
  scales = None
  if page_scales is not None:
    scales = block_scales(page_scales, in_range, seq_lens, block_kv=config.block_kv)

  out_parts, lse_parts = _launch(
      q_blocks, pages, scales, tail, table, meta, config=config, s_q=s_q,
      heads=heads,
      v_dim=v_dim, softmax_scale=softmax_scale, causal=causal,
      interpret=interpret)
  splits = config.num_splits
  out_parts = out_parts.reshape(batch, splits, h_blocks * block_h, v_dim)
  lse_parts = lse_parts.reshape(batch, splits, h_blocks * block_h)
  if splits == 1:
    out, lse = out_parts[:, 0], lse_parts[:, 0]
  else:
    out, lse = combine_splits(out_parts, lse_parts)
  out = out[:, :rows].reshape(batch, s_q, heads, v_dim).astype(q.dtype)
  lse = lse[:, :rows].reshape(batch, s_q, heads)
  return out, lse
