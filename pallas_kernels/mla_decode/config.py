"""Tuning knobs of the Mosaic GPU MLA decode kernel and the heuristic picking them."""

from __future__ import annotations

import dataclasses
import itertools
import math

# Hopper (sm90) limits the kernel plans against.
SMEM_BYTES = 227 * 1024  # dynamic shared memory per CTA on H100/H200
H100_SMS = 132
WGMMA_M = 64  # rows of one warpgroup matmul: query rows (heads x new tokens) per CTA
MAX_SPLITS = 64


@dataclasses.dataclass(frozen=True)
class Config:
  """Static tiling of one kernel launch.

  block_kv:   cache tokens per pipeline stage, multiple of 32 (each consumer scores
              half); divides page_size or is a multiple of it.
  num_stages: depth of the TMA ring buffer of cache tiles (>= 1).
  num_splits: split-KV factor (flash-decoding); each CTA handles 1/num_splits of
              one sequence's blocks and a combine step merges the partials.
  block_h:    query rows per CTA (the wgmma M dimension), heads x new tokens.
  out_chunk:  columns per TMA store of the float32 partial output.
  """

  block_kv: int
  num_stages: int
  num_splits: int = 1
  block_h: int = WGMMA_M
  out_chunk: int = 64

  def __post_init__(self):
    if self.block_kv % 32 or self.block_kv <= 0 or self.block_kv > 256:
      raise ValueError(f"{self.block_kv=} must be a multiple of 32 in [32, 256]")
    if self.num_stages < 1:
      raise ValueError(f"{self.num_stages=} must be >= 1")
    if not 1 <= self.num_splits <= 1024:
      raise ValueError(f"{self.num_splits=} must be in [1, 1024]")
    if self.block_h != WGMMA_M:
      raise ValueError(f"{self.block_h=} must be {WGMMA_M} (one wgmma M tile)")
    if self.out_chunk % 8 or self.out_chunk <= 0:
      raise ValueError(f"{self.out_chunk=} must be a positive multiple of 8")


# How Mosaic GPU lays out one CTA's dynamic shared memory (jax 0.10/0.11): every scratch
# buffer rounded up to SMEM_ALIGNMENT, a cross-warp reduction scratch when the kernel
# reduces in registers (the softmax row max / sum), then 8 bytes per mbarrier.
SMEM_ALIGNMENT = 1024
REDUCTION_SCRATCH = 128 * 4 * 4  # CompilerParams.reduction_scratch_bytes' default
MBARRIER_BYTES = 8
META_LEN = 32  # int32 of per-CTA metadata (TMA copies move multiples of 128 bytes)


def table_shape(max_pages: int) -> tuple[int, int]:
  """2-D layout of one block-table row in SMEM, so that each TMA box dim is <= 256."""
  cols = min(128, -(-max_pages // 32) * 32)  # 128-byte multiples
  return -(-max_pages // cols), cols


def _aligned(nbytes: int) -> int:
  return -(-nbytes // SMEM_ALIGNMENT) * SMEM_ALIGNMENT


def smem_bytes(config: Config, *, dim: int, v_dim: int, itemsize: int,
               table_entries: int, num_consumers: int = 2,
               interpret: bool = False, fp8: bool = False) -> int:
  """Dynamic shared memory one CTA of the kernel requests for `config`, in bytes.

  Exact for the compiled kernel (checked against the compiler's launch size by
  tests/pallas_kernels/test_mla_decode_sm90.py); `itemsize` is the cache's.
  """
  t_rows, t_cols = table_shape(table_entries)
  out_chunk = min(config.out_chunk, v_dim // num_consumers)
  buffers = [
      config.block_h * dim * 2,  # Q tile
      config.num_stages * config.block_kv * dim * itemsize,  # cache ring
      2 * config.block_h * config.block_kv * 2,  # P, both consumers' halves, 2 parities
      2 * num_consumers * config.block_h * 4,  # row maxima / sums exchanged
      num_consumers * config.block_h * out_chunk * 4,  # output staging (f32)
      config.block_h * 4,  # LSE staging
      t_rows * t_cols * 4,  # block-table row
      META_LEN * 4,
  ]
  if fp8:  # the bf16 copy of the tile (2 parities); per-token scales of the ring
    buffers += [2 * config.block_kv * dim * 2, config.num_stages * config.block_kv * 4]
  if interpret:  # each consumer's K^T staged for the interpreter
    buffers.append(config.block_kv * dim * 2)
  # setup, kv, [scales], consumed; row-max and P exchanges (2 parities each)
  barriers = 3 + config.num_stages * (3 if fp8 else 2) + 4
  return (sum(_aligned(n) for n in buffers) + REDUCTION_SCRATCH
          + barriers * MBARRIER_BYTES)


def num_splits_heuristic(batch: int, rows: int, capacity_blocks: int,
                         num_sms: int = H100_SMS, min_blocks_per_split: int = 4) -> int:
  """Split-KV factor so that batch x head-blocks x splits covers the SMs.

  `capacity_blocks` is the static upper bound of cache blocks per sequence
  (max_pages * page_size / block_kv); the kernel divides each sequence's own
  blocks evenly between its splits at run time, so ragged batches stay balanced
  within a sequence.
  """
  ctas = batch * math.ceil(rows / WGMMA_M)
  if ctas >= num_sms or capacity_blocks <= min_blocks_per_split:
    return 1
  want = math.ceil(num_sms / ctas)
  most = max(1, capacity_blocks // min_blocks_per_split)
  return max(1, min(want, most, MAX_SPLITS))


def default_config(*, batch: int, s_q: int, heads: int, dim: int, v_dim: int,
                   page_size: int, max_pages: int, itemsize: int,
                   num_sms: int = H100_SMS, interpret: bool = False,
                   fp8: bool = False, num_splits: int | None = None) -> Config:
  """Deepest ring, then largest block, then widest output staging that fits in
  shared memory (`smem_bytes` is exact); then the split."""
  table_entries = max_pages
  # a block may span several pages or be part of one
  candidates = [b for b in ((32,) if fp8 else (64, 32))  # FP8: mosaic_gpu.FP8_BLOCK_KV
                if page_size % b == 0 or b % page_size == 0]
  if not candidates:
    raise ValueError(f"{page_size=} must be a multiple of 16")
  chosen = None
  for stages, block_kv, out_chunk in itertools.product((3, 2), candidates, (64, 32, 16)):
    cfg = Config(block_kv=block_kv, num_stages=stages, out_chunk=out_chunk)
    need = smem_bytes(cfg, dim=dim, v_dim=v_dim, itemsize=itemsize,
                      table_entries=table_entries, interpret=interpret, fp8=fp8)
    if need <= SMEM_BYTES or interpret:
      chosen = cfg
      break
  if chosen is None:
    chosen = Config(block_kv=candidates[-1], num_stages=1)
  capacity_blocks = max_pages * page_size // chosen.block_kv
  if num_splits is None:
    num_splits = num_splits_heuristic(batch, heads * s_q, capacity_blocks, num_sms)
  return dataclasses.replace(chosen, num_splits=num_splits)
