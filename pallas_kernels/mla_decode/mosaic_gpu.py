"""MLA decode for Hopper in Pallas Mosaic GPU (FlashMLA's job).

One CTA owns (64 query rows, one split of one sequence).  Query rows are the
heads of all new tokens folded together: row = token * heads + head, padded to
64 (the wgmma M dimension).  Three warpgroups:

  * warpgroup 2, the producer: copies the CTA's metadata, block-table row and
    query tile with TMA, then streams cache tiles (`block_kv` tokens x `dim`)
    of the split into a `num_stages`-deep shared-memory ring, waiting on
    "consumed" barriers before reusing a slot.
  * warpgroups 0 and 1, the consumers: for every tile, S = Q K^T with wgmma
    (M = 64 query rows, N = block_kv tokens, K = dim), causal/length masking,
    online softmax in the exp2 domain, P to shared memory, and O += P V with
    wgmma where consumer w owns value columns [w*v_dim/2, (w+1)*v_dim/2).
    Both consumers compute the same S (QK^T is duplicated, see NOTES.md).

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
from pallas_kernels.mla_decode.config import Config

NUM_CONSUMERS = 2
META_LEN = 8  # int32 per CTA: start block, end block, seq_len, padding
LOG2E = math.log2(math.e)
LN2 = math.log(2.0)


def _table_shape(max_pages: int) -> tuple[int, int]:
  """2-D layout of one block-table row so that each TMA box dim is <= 256."""
  cols = min(128, -(-max_pages // 4) * 4)
  return -(-max_pages // cols), cols


def _mla_decode_kernel(
    q_ref,  # [batch, h_blocks, block_h, dim] bf16/f16 (GMEM)
    pages_ref,  # [num_pages, page_size, dim] bf16/f16 (GMEM)
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
  dim = q_ref.shape[-1]
  block_h, block_kv, stages = config.block_h, config.block_kv, config.num_stages
  half = v_dim // NUM_CONSUMERS
  out_chunk = min(config.out_chunk, half)
  _, t_rows, t_cols = table_ref.shape
  scale_log2 = softmax_scale * LOG2E

  swizzle = plgpu.find_swizzle(dim * jnp.dtype(dtype).itemsize * 8)
  tile_transforms = (
      plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(swizzle),
  )
  p_swizzle = plgpu.find_swizzle(block_kv * jnp.dtype(dtype).itemsize * 8)
  p_transforms = (
      plgpu.TilingTransform((8, p_swizzle // jnp.dtype(dtype).itemsize)),
      plgpu.SwizzleTransform(p_swizzle),
  )

  def body(q_smem,  # [block_h, dim]
           kv_smem,  # [stages, block_kv, dim]
           p_smem,  # [NUM_CONSUMERS, block_h, block_kv]
           o_smem,  # [NUM_CONSUMERS, block_h, out_chunk] f32
           lse_smem,  # [block_h] f32
           table_smem,  # [t_rows, t_cols] int32
           meta_smem,  # [META_LEN] int32
           kt_smem,  # [NUM_CONSUMERS, dim, block_kv] (interpret only) or None
           setup_barriers,  # 3 barriers: meta, table, q
           kv_barriers,  # [stages]: a cache tile landed
           consumed_barriers):  # [stages]: both consumers are done with a tile
    b = lax.axis_index("b")
    split = lax.axis_index("split")
    hb = lax.axis_index("hb")
    wg = lax.axis_index("wg")
    meta_bar, table_bar, q_bar = (setup_barriers.at[i] for i in range(3))

    def read_meta():
      plgpu.barrier_wait(meta_bar)
      return meta_smem[0], meta_smem[1], meta_smem[2]

    @pl.when(wg == NUM_CONSUMERS)
    def _producer():
      plgpu.set_max_registers(40, action="decrease")
      plgpu.copy_gmem_to_smem(meta_ref.at[b, split], meta_smem, meta_bar)
      plgpu.copy_gmem_to_smem(table_ref.at[b], table_smem, table_bar)
      plgpu.copy_gmem_to_smem(q_ref.at[b, hb], q_smem, q_bar)
      start, end, _ = read_meta()
      plgpu.barrier_wait(table_bar)
      num_blocks = end - start

      def issue(j, slot):
        token = (start + j) * block_kv
        entry = token // page_size
        page = table_smem[entry // t_cols, entry % t_cols]
        if block_kv == page_size:
          src = pages_ref.at[page]
        else:
          src = pages_ref.at[page, pl.ds(token % page_size, block_kv)]
        plgpu.copy_gmem_to_smem(src, kv_smem.at[slot], kv_barriers.at[slot])

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

    def _qk(slot, w):
      """S [block_h, block_kv] f32 = Q K^T for the tile in `slot`."""
      if interpret:  # transposed wgmma operands are not interpreted: stage K^T
        kt_smem.at[w][...] = kv_smem.at[slot][...].T
        k_operand = kt_smem.at[w]
      else:
        k_operand = _interpret.transposed(kv_smem.at[slot])

      def mma(acc_ref):
        plgpu.wgmma(acc_ref, q_smem, k_operand)
        return acc_ref[...]

      return pl.run_scoped(mma, plgpu.ACC((block_h, block_kv), jnp.float32))

    def _pv(acc, slot, w):
      """acc + P V for consumer w's value columns."""
      v_operand = kv_smem.at[slot, :, pl.ds(w * half, half)]
      p_operand = p_smem.at[w]
      if interpret:  # pl.run_state is not interpreted: add a fresh product
        def mma(acc_ref):
          plgpu.wgmma(acc_ref, p_operand, v_operand)
          return acc_ref[...]
        return acc + pl.run_scoped(mma, plgpu.ACC((block_h, half), jnp.float32))

      def mma_into(acc_ref):
        plgpu.wgmma(acc_ref, p_operand, v_operand)
      return pl.run_state(mma_into)(plgpu.ACC.init(acc))

    def consumer(w: int):
      plgpu.set_max_registers(232, action="increase")
      start, end, seq_len = read_meta()
      plgpu.barrier_wait(q_bar)
      num_blocks = end - start
      wgmma_layout = plgpu.Layout.WGMMA
      row_layout = plgpu.Layout.WGMMA.reduce(1)

      rows = _interpret.iota((block_h, block_kv), 0, wgmma_layout, interpret=interpret)
      cols = _interpret.iota((block_h, block_kv), 1, wgmma_layout, interpret=interpret)
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
        plgpu.barrier_wait(kv_barriers.at[slot])
        s = _qk(slot, w) * scale_log2  # log2 domain
        key_pos = cols + (start + j) * block_kv
        s = jnp.where(key_pos < limit, s, -jnp.inf)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)  # no key seen yet
        alpha = jnp.exp2(m_i - m_safe)
        p = jnp.exp2(s - lax.broadcast_in_dim(m_safe, s.shape, [0]))
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * lax.broadcast_in_dim(alpha, acc.shape, [0])
        p_smem.at[w][...] = p.astype(dtype)
        plgpu.commit_smem()
        acc = _pv(acc, slot, w)
        plgpu.barrier_arrive(consumed_barriers.at[slot])
        return acc, m_new, l_i

      acc, m_i, l_i = lax.fori_loop(0, num_blocks, step, (acc0, m0, l0))

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
      if w == 0:
        lse_smem[...] = jnp.where(seen, (m_i + jnp.log2(l_safe)) * LN2, -jnp.inf)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(lse_smem, lse_ref.at[b, split, hb])
      plgpu.wait_smem_to_gmem(0)

    for w in range(NUM_CONSUMERS):
      pl.when(wg == w)(functools.partial(consumer, w))

  scratch = [
      plgpu.SMEM((block_h, dim), dtype, transforms=tile_transforms),
      plgpu.SMEM((stages, block_kv, dim), dtype, transforms=tile_transforms),
      plgpu.SMEM((NUM_CONSUMERS, block_h, block_kv), dtype, transforms=p_transforms),
      plgpu.SMEM((NUM_CONSUMERS, block_h, out_chunk), jnp.float32),
      plgpu.SMEM((block_h,), jnp.float32),
      plgpu.SMEM((t_rows, t_cols), jnp.int32),
      plgpu.SMEM((META_LEN,), jnp.int32),
      plgpu.SMEM((NUM_CONSUMERS, dim, block_kv), dtype) if interpret else None,
  ]
  pl.run_scoped(
      lambda *refs: body(*refs),
      *scratch,
      plgpu.Barrier(num_barriers=3),
      plgpu.Barrier(num_barriers=stages),
      plgpu.Barrier(num_arrivals=NUM_CONSUMERS, num_barriers=stages),
      collective_axes="wg",
  )


def _launch(q_blocks, pages, table, meta, *, config: Config, s_q: int,
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
  return call(q_blocks, pages, table, meta)


def split_metadata(seq_lens, *, block_kv: int, num_splits: int):
  """[batch, num_splits, META_LEN] int32: (start block, end block, seq_len, 0...)."""
  seq_lens = seq_lens.astype(jnp.int32)
  num_blocks = (seq_lens + block_kv - 1) // block_kv  # [batch]
  per_split = (num_blocks + num_splits - 1) // num_splits
  split_ids = jnp.arange(num_splits, dtype=jnp.int32)
  start = jnp.minimum(split_ids[None, :] * per_split[:, None], num_blocks[:, None])
  end = jnp.minimum(start + per_split[:, None], num_blocks[:, None])
  meta = jnp.zeros((seq_lens.shape[0], num_splits, META_LEN), jnp.int32)
  meta = meta.at[:, :, 0].set(start).at[:, :, 1].set(end)
  return meta.at[:, :, 2].set(jnp.broadcast_to(seq_lens[:, None], start.shape))


def mla_decode_mosaic_gpu(q, pages, block_table, seq_lens, *, softmax_scale: float,
                          causal: bool, v_dim: int, config: Config,
                          interpret: bool = False):
  """MLA decode with the Mosaic GPU kernel; same contract as the reference."""
  batch, s_q, heads, dim = q.shape
  num_pages, page_size, _ = pages.shape
  rows = s_q * heads
  block_h = config.block_h
  h_blocks = -(-rows // block_h)
  q_rows = q.reshape(batch, rows, dim)
  q_rows = jnp.pad(q_rows, ((0, 0), (0, h_blocks * block_h - rows), (0, 0)))
  q_blocks = q_rows.reshape(batch, h_blocks, block_h, dim).astype(pages.dtype)

  max_pages = block_table.shape[1]
  t_rows, t_cols = _table_shape(max_pages)
  table = jnp.clip(block_table.astype(jnp.int32), 0, num_pages - 1)
  table = jnp.pad(table, ((0, 0), (0, t_rows * t_cols - max_pages)))
  table = table.reshape(batch, t_rows, t_cols)
  meta = split_metadata(seq_lens, block_kv=config.block_kv,
                        num_splits=config.num_splits)

  out_parts, lse_parts = _launch(
      q_blocks, pages, table, meta, config=config, s_q=s_q, heads=heads,
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
