"""A sequence's MLA decode output depends only on its first seq_len cache rows.

Everything else a paged cache may hold is poisoned with NaN, +inf and -inf:
the rest of each sequence's last page, every page no table references, and the
block-table entries past a sequence's pages (pointing at poisoned pages, or out
of range: past the last page, negative, 2**31 - 1).  For FP8 caches the e4m3
bytes there are NaN (e4m3fn has no inf) and their per-token scales NaN or inf.
The result must equal, bit for bit, the result on a clean cache (same valid
rows, zeros elsewhere, in-range table), on the XLA path and on the kernel in
GPU interpret mode (whose outputs and shared memory start as NaN).
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _interpret
from pallas_kernels.mla_decode import mla_decode_reference

POISONS = np.array([np.nan, np.inf, -np.inf], np.float32)
OUT_OF_RANGE = "out_of_range"  # marker: table ids past the cache / negative


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  lens: tuple[int, ...]
  s_q: int
  dtype: str = "bfloat16"  # query dtype; the cache's too unless fp8
  fp8: bool = False
  heads: int = 3
  page_size: int = 16
  dim: int = 80
  v_dim: int = 64
  num_splits: int | None = None

  @property
  def batch(self):
    return len(self.lens)


P = 16
REFERENCE_CASES = [
    Case(f"{dtype}{'_fp8' if fp8 else ''}_sq{s_q}", lens=(0, 1, P - 1, 2 * P + 3, 0, s_q),
         s_q=s_q, dtype=dtype, fp8=fp8, page_size=32 if fp8 else P, dim=128 if fp8 else 80)
    for dtype, fp8 in (("bfloat16", False), ("float16", False), ("float32", False),
                       ("bfloat16", True))
    for s_q in (1, 2, 3, 4)
]
# Interpret mode compiles every case's warpgroup programs (minutes on a loaded 2-core
# machine): one case in the default run, the rest under -m slow.  The kernel's splits, row
# blocks, fp16 and FP8 paths are checked in the default run by test_mla_decode.py's grid.
KERNEL_CASES = [
    Case("bf16_sq1_zero_lens", lens=(0, P - 1, 2 * P + 3, 0), s_q=1),
]
SLOW_KERNEL_CASES = [
    Case("bf16_sq2_split3", lens=(3 * P + 5, 0, 2), s_q=2, heads=16, num_splits=3),
    Case("fp16_sq3", lens=(P + 1, 0, 4), s_q=3, dtype="float16"),
    Case("bf16_sq4_two_row_blocks", lens=(0, 2 * P - 2, 3), s_q=4, heads=20),
    Case("fp8_sq2_split2_two_pages_a_block", lens=(4 * P + 7, 0, 31), s_q=2, fp8=True,
         dim=128, num_splits=2),
]


def make_pair(case: Case, seed: int = 0):
  """(poisoned, clean) argument dicts for mla_decode that share every valid row."""
  rng = np.random.default_rng(seed)
  ps = case.page_size
  pages_per_seq = [math.ceil(n / ps) for n in case.lens]
  max_pages = max(pages_per_seq) + 3  # entries past every sequence's pages
  num_pages = sum(pages_per_seq) + 4  # pages no table references
  perm = rng.permutation(num_pages)
  valid = np.zeros((num_pages, ps), bool)
  clean_table = np.zeros((case.batch, max_pages), np.int32)
  poison_table = np.zeros((case.batch, max_pages), np.int32)
  nxt = 0
  referenced = np.zeros(num_pages, bool)
  for b, n in enumerate(case.lens):
    k = pages_per_seq[b]
    ids = perm[nxt:nxt + k]
    nxt += k
    clean_table[b, :k] = poison_table[b, :k] = ids
    referenced[ids] = True
    for j, page in enumerate(ids):
      valid[page, :min(ps, n - j * ps)] = True
  unreferenced = np.flatnonzero(~referenced)
  for b in range(case.batch):  # past the sequence's pages: out of range or poisoned
    for e in range(pages_per_seq[b], max_pages):
      choice = rng.integers(3)
      poison_table[b, e] = ((num_pages, num_pages + 100, -1, 2**31 - 1)[rng.integers(4)]
                            if choice == 0 else rng.choice(unreferenced))

  values = rng.standard_normal((num_pages, ps, case.dim)).astype(np.float32)
  q = jnp.asarray(rng.standard_normal((case.batch, case.s_q, case.heads, case.dim)),
                  case.dtype)
  if case.fp8:
    scales = rng.uniform(0.02, 0.2, (num_pages, ps)).astype(np.float32)
    fp8 = np.asarray(jnp.asarray(values / scales[..., None], jnp.float8_e4m3fn))
    clean_pages = np.where(valid[..., None], fp8, np.zeros((), fp8.dtype))
    poison_pages = np.where(valid[..., None], fp8, np.full((), np.nan, fp8.dtype))
    clean_scales = np.where(valid, scales, 0.0).astype(np.float32)
    poison_scales = np.where(valid, scales, rng.choice(POISONS, valid.shape))
    clean = dict(pages=jnp.asarray(clean_pages), page_scales=jnp.asarray(clean_scales))
    poison = dict(pages=jnp.asarray(poison_pages), page_scales=jnp.asarray(poison_scales))
  else:
    garbage = rng.choice(POISONS, values.shape)
    clean = dict(pages=jnp.asarray(np.where(valid[..., None], values, 0.0), case.dtype))
    poison = dict(pages=jnp.asarray(np.where(valid[..., None], values, garbage), case.dtype))
  common = dict(q=q, seq_lens=jnp.asarray(case.lens, jnp.int32))
  clean.update(common, block_table=jnp.asarray(clean_table))
  poison.update(common, block_table=jnp.asarray(poison_table))
  return poison, clean


def run(case: Case, args, implementation):
  kw = dict(softmax_scale=1.0 / math.sqrt(case.dim), v_dim=case.v_dim,
            implementation=implementation)
  if implementation == "mosaic_gpu":
    kw.update(interpret=True, num_splits=case.num_splits)
  out, lse = pallas_kernels.mla_decode(**args, **kw)
  return np.asarray(out.astype(jnp.float32)), np.asarray(lse)


def assert_only_valid_rows_matter(case: Case, implementation):
  """Runs poisoned and clean; returns the clean run's (out, lse) and arguments."""
  poison, clean = make_pair(case)
  out, lse = run(case, poison, implementation)
  clean_out, clean_lse = run(case, clean, implementation)
  assert np.isfinite(out).all(), "poison reached the output"
  assert not np.isnan(lse).any(), "poison reached the LSE"
  np.testing.assert_array_equal(out, clean_out)
  np.testing.assert_array_equal(lse, clean_lse)
  # Rows that see no key: exactly 0 and -inf.
  lens = np.asarray(case.lens)
  visible = lens[:, None] - case.s_q + 1 + np.arange(case.s_q)[None, :]
  np.testing.assert_array_equal(np.isneginf(lse), np.broadcast_to(
      (visible <= 0)[:, :, None], lse.shape))
  np.testing.assert_array_equal(out[visible <= 0], 0.0)
  return clean_out, clean_lse, clean


@pytest.mark.parametrize("case", REFERENCE_CASES, ids=lambda c: c.name)
def test_xla_path_ignores_poison(case):
  assert_only_valid_rows_matter(case, "xla")


@pytest.fixture
def _reset_interpreter():
  yield
  _interpret.reset_interpret_state()


@pytest.mark.usefixtures("_reset_interpreter")
@pytest.mark.parametrize("case", KERNEL_CASES + [
    pytest.param(c, marks=pytest.mark.slow) for c in SLOW_KERNEL_CASES], ids=lambda c: c.name)
def test_kernel_interpret_ignores_poison(case):
  out, lse, clean = assert_only_valid_rows_matter(case, "mosaic_gpu")
  # ... and agrees with the reference on the clean cache.
  ref_out, ref_lse = mla_decode_reference(
      clean["q"], clean["pages"], clean["block_table"], clean["seq_lens"],
      softmax_scale=1.0 / math.sqrt(case.dim), v_dim=case.v_dim,
      page_scales=clean.get("page_scales"))
  ref_out = np.asarray(ref_out.astype(jnp.float32))
  err = np.linalg.norm(out - ref_out) / max(np.linalg.norm(ref_out), 1e-30)
  assert err <= 2e-2, err
  seen = np.isfinite(np.asarray(ref_lse))
  np.testing.assert_allclose(lse[seen], np.asarray(ref_lse)[seen], rtol=2e-3, atol=2e-3)
