"""MLA decode: kernel (GPU interpret mode, and compiled when a GPU is lent) vs reference.

Small latent dims (64 + 16) keep interpret mode fast; one DeepSeek-sized case
(512 + 64) is marked slow.  Every case builds fresh random inputs, fills unused
pages with NaN, points unused block-table entries at NaN pages, fills the tail
of each sequence's last page with large finite garbage, and runs the kernel
with NaN-initialised (poisoned) outputs and shared memory.
"""

from __future__ import annotations

import dataclasses
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels import _interpret
from pallas_kernels.mla_decode import Config
from pallas_kernels.mla_decode import api
from pallas_kernels.mla_decode import mla_decode_reference
from pallas_kernels.mla_decode.combine import combine_splits

HAS_GPU = _interpret.has_sm90_gpu()
gpu = pytest.mark.gpu
needs_gpu = pytest.mark.skipif(not HAS_GPU, reason="needs an sm90+ CUDA GPU")

# Relative-norm error bounds of the output against the float32 reference.
OUT_TOL = {"bfloat16": 2e-2, "float16": 4e-3, "float8_e4m3fn": 2e-2}
LSE_TOL = 2e-3


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  lens: tuple[int, ...]  # one per sequence: batch = len(lens)
  s_q: int = 1
  heads: int = 3
  page_size: int = 16
  dim: int = 80  # kv_lora_rank + rope dim, 64 + 16
  v_dim: int = 64
  dtype: str = "bfloat16"  # q dtype; cache dtype too unless fp8
  fp8: bool = False
  causal: bool = True
  num_splits: int | None = None
  block_kv: int | None = None

  @property
  def batch(self):
    return len(self.lens)


P = 16  # page size of most cases
GRID = [
    Case("b1_sq1_h1_len0", lens=(0,), heads=1),
    Case("b3_sq1_h3_len1_pagem1_pagep1", lens=(1, P - 1, P + 1)),
    Case("b2_sq1_h16_several_pages", lens=(5 * P + 3, 2 * P), heads=16),
    Case("b2_sq2_h3_causal_edges", lens=(2, P + 1), s_q=2),
    Case("b3_sq2_h16_ragged_split3", lens=(4 * P + 7, P, 3), s_q=2, heads=16,
         num_splits=3),
    Case("b1_sq2_h1_split4_empty_splits", lens=(P + 2,), s_q=2, heads=1,
         num_splits=4),
    Case("b1_sq2_h40_two_row_blocks", lens=(3 * P - 1,), s_q=2, heads=40),
    Case("b2_sq1_h3_page64_block32", lens=(140, 33), page_size=64, block_kv=32),
    Case("b2_sq2_h3_page16_block64_four_pages", lens=(70, 33), s_q=2, block_kv=64),
    Case("b2_sq2_h3_noncausal", lens=(P + 5, 2), s_q=2, causal=False),
    Case("b2_sq1_h16_fp16", lens=(3 * P + 1, P - 1), heads=16, dtype="float16"),
    Case("b2_sq2_h3_fp8_split2_two_pages_a_block", lens=(6 * P + 5, 31), s_q=2,
         dim=128, fp8=True, num_splits=2),
]
SLOW = [
    Case("b2_sq2_h16_deepseek_dims", lens=(200, 64), s_q=2, heads=16,
         page_size=64, dim=576, v_dim=512),
    Case("b3_sq2_h64_zero_len", lens=(0, 2 * P + 5, 1), s_q=2, heads=64),
    Case("b2_sq4_h128_eight_row_blocks", lens=(3 * P + 2, 3), s_q=4, heads=128,
         num_splits=2),
    Case("b2_sq1_h128_deepseek_dims", lens=(130, 0), heads=128, page_size=64, dim=576,
         v_dim=512),
    Case("b2_sq2_h16_fp8_deepseek_dims", lens=(150, 37), s_q=2, heads=16, dim=576,
         v_dim=512, fp8=True),
]


def make_inputs(case: Case, seed: int = 0):
  """Random q and a paged cache; unused pages NaN, last-page tails garbage."""
  rng = np.random.default_rng(seed)
  ps = case.page_size
  pages_per_seq = [max(1, math.ceil(n / ps)) for n in case.lens]
  max_pages = max(pages_per_seq) + 1  # always at least one unused entry
  num_pages = sum(pages_per_seq) + 3  # a few pages nobody references
  cache = rng.standard_normal((num_pages, ps, case.dim)).astype(np.float32)
  perm = rng.permutation(num_pages)
  table = np.empty((case.batch, max_pages), np.int32)
  used = np.zeros(num_pages, bool)
  nxt = 0
  for b, n in enumerate(case.lens):
    k = pages_per_seq[b]
    table[b, :k] = perm[nxt:nxt + k]
    nxt += k
    used[table[b, :k]] = True
    tail = n - (k - 1) * ps  # tokens used in the last page
    cache[table[b, k - 1], tail:] = 50.0 * rng.standard_normal(
        (ps - tail, case.dim))  # finite garbage beyond seq_len
  unused = np.flatnonzero(~used)
  cache[unused] = np.nan
  for b in range(case.batch):  # unused entries point at NaN pages
    table[b, pages_per_seq[b]:] = rng.choice(unused, max_pages - pages_per_seq[b])
  q = rng.standard_normal((case.batch, case.s_q, case.heads, case.dim))
  q = jnp.asarray(q, case.dtype)
  scales = None
  if case.fp8:
    scales_np = rng.uniform(0.02, 0.2, (num_pages, ps)).astype(np.float32)
    # Garbage must stay finite in e4m3 too (it has no inf: overflow is NaN).
    fp8 = np.clip(cache / scales_np[..., None], -440.0, 440.0)
    pages = jnp.asarray(fp8, jnp.float8_e4m3fn)
    scales = jnp.asarray(scales_np)
  else:
    pages = jnp.asarray(cache, case.dtype)
  seq_lens = jnp.asarray(case.lens, jnp.int32)
  return q, pages, jnp.asarray(table), seq_lens, scales


def scale_of(case: Case) -> float:
  return 1.0 / math.sqrt(case.dim)


def brute_force_f64(q, pages, table, seq_lens, scales, *, softmax_scale, causal,
                    v_dim):
  """Independent float64 numpy loop (checks the reference itself)."""
  q = np.asarray(q, np.float64)
  pages = np.asarray(pages.astype(jnp.float32), np.float64)
  if scales is not None:
    pages = pages * np.asarray(scales, np.float64)[..., None]
  table, seq_lens = np.asarray(table), np.asarray(seq_lens)
  batch, s_q, heads, _ = q.shape
  ps = pages.shape[1]
  out = np.zeros((batch, s_q, heads, v_dim))
  lse = np.full((batch, s_q, heads), -np.inf)
  for b in range(batch):
    for i in range(s_q):
      n = seq_lens[b] - s_q + 1 + i if causal else seq_lens[b]
      if n <= 0:
        continue
      keys = np.stack([pages[table[b, j // ps], j % ps] for j in range(n)])
      for h in range(heads):
        s = keys @ q[b, i, h] * softmax_scale
        mx = s.max()
        w = np.exp(s - mx)
        out[b, i, h] = w @ keys[:, :v_dim] / w.sum()
        lse[b, i, h] = mx + np.log(w.sum())
  return out, lse


def rel_err(x, y):
  x = np.asarray(x, np.float64)
  y = np.asarray(y, np.float64)
  return np.linalg.norm(x - y) / max(np.linalg.norm(y), 1e-30)


def check_against_reference(case: Case, out, lse, ref_out, ref_lse):
  out = np.asarray(out.astype(jnp.float32))
  lse = np.asarray(lse)
  ref_out = np.asarray(ref_out.astype(jnp.float32))
  ref_lse = np.asarray(ref_lse)
  assert out.shape == (case.batch, case.s_q, case.heads, case.v_dim)
  assert lse.shape == (case.batch, case.s_q, case.heads)
  assert lse.dtype == np.float32
  assert not np.isnan(out).any(), "NaN in output"
  assert not np.isnan(lse).any(), "NaN in lse"
  empty = np.isneginf(ref_lse)
  np.testing.assert_array_equal(np.isneginf(lse), empty)
  np.testing.assert_array_equal(out[empty], 0.0)
  assert rel_err(out, ref_out) <= OUT_TOL[case.dtype if not case.fp8 else
                                           "float8_e4m3fn"], rel_err(out, ref_out)
  np.testing.assert_allclose(lse[~empty], ref_lse[~empty], rtol=LSE_TOL,
                             atol=LSE_TOL)


def run_kernel(case: Case, *, interpret: bool):
  q, pages, table, seq_lens, scales = make_inputs(case)
  config = None
  if case.block_kv is not None:
    config = Config(block_kv=case.block_kv, num_stages=2,
                    num_splits=case.num_splits or 1)
  out, lse = pallas_kernels.mla_decode(
      q, pages, table, seq_lens, softmax_scale=scale_of(case),
      causal=case.causal, v_dim=case.v_dim, page_scales=scales,
      implementation="mosaic_gpu", interpret=interpret, config=config,
      num_splits=case.num_splits)
  ref_out, ref_lse = mla_decode_reference(
      q, pages, table, seq_lens, softmax_scale=scale_of(case),
      causal=case.causal, v_dim=case.v_dim, page_scales=scales)
  check_against_reference(case, out, lse, ref_out, ref_lse)


@pytest.fixture(autouse=True)
def _reset_interpreter():
  yield
  _interpret.reset_interpret_state()  # after a failure inside the simulator


# The slowest interpret cases (40-110 s each in CI) run under -m slow; the XLA path and the poison
# tests keep their shapes in the default run.
SLOW_IN_CI = {"b3_sq2_h16_ragged_split3", "b1_sq2_h1_split4_empty_splits", "b3_sq1_h3_len1_pagem1_pagep1",
              "b2_sq2_h3_causal_edges"}


@pytest.mark.parametrize("case", [pytest.param(c, id=c.name, marks=[pytest.mark.slow] if c.name in SLOW_IN_CI else [])
                                  for c in GRID])
def test_kernel_interpret(case):
  run_kernel(case, interpret=True)


@pytest.mark.slow
@pytest.mark.parametrize("case", SLOW, ids=lambda c: c.name)
def test_kernel_interpret_deepseek_dims(case):
  run_kernel(case, interpret=True)


@gpu
@needs_gpu
@pytest.mark.parametrize("case", GRID + SLOW, ids=lambda c: c.name)
def test_kernel_compiled_gpu(case):
  run_kernel(case, interpret=False)


@pytest.mark.parametrize("case", GRID + SLOW, ids=lambda c: c.name)
def test_reference_matches_float64_brute_force(case):
  q, pages, table, seq_lens, scales = make_inputs(case, seed=1)
  q32 = q.astype(jnp.float32)
  if not case.fp8:
    pages = pages.astype(jnp.float32)
  out, lse = mla_decode_reference(
      q32, pages, table, seq_lens, softmax_scale=scale_of(case),
      causal=case.causal, v_dim=case.v_dim, page_scales=scales)
  bf_out, bf_lse = brute_force_f64(
      q32, pages, table, seq_lens, scales, softmax_scale=scale_of(case),
      causal=case.causal, v_dim=case.v_dim)
  assert not np.isnan(np.asarray(out)).any()
  np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(bf_lse))
  np.testing.assert_allclose(np.asarray(out), bf_out, rtol=1e-4, atol=1e-5)
  fin = np.isfinite(bf_lse)
  np.testing.assert_allclose(np.asarray(lse)[fin], bf_lse[fin], rtol=1e-5, atol=1e-5)


def test_automatic_choice_on_cpu_is_reference_and_takes_float32():
  case = Case("f32", lens=(P + 3, 1), s_q=2, dtype="float32")
  q, pages, table, seq_lens, _ = make_inputs(case)
  impl = api.choose_implementation(
      None, q_dtype=q.dtype, pages_dtype=pages.dtype, dim=case.dim,
      v_dim=case.v_dim, page_size=case.page_size, interpret=False)
  assert impl == "xla"
  out, lse = pallas_kernels.mla_decode(q, pages, table, seq_lens,
                                       softmax_scale=scale_of(case),
                                       v_dim=case.v_dim)
  ref_out, ref_lse = mla_decode_reference(q, pages, table, seq_lens,
                                          softmax_scale=scale_of(case),
                                          v_dim=case.v_dim)
  assert out.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
  np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref_lse))


def test_automatic_choice():
  kw = dict(dim=576, v_dim=512, page_size=64)
  bf16 = jnp.bfloat16
  expect_kernel = "mosaic_gpu" if HAS_GPU else "xla"
  assert api.choose_implementation(None, q_dtype=bf16, pages_dtype=bf16,
                                   interpret=False, **kw) == expect_kernel
  assert api.choose_implementation(None, q_dtype=bf16, pages_dtype=bf16,
                                   interpret=True, **kw) == "mosaic_gpu"
  assert api.choose_implementation("xla", q_dtype=bf16, pages_dtype=bf16,
                                   interpret=True, **kw) == "xla"
  assert api.choose_implementation(None, q_dtype=jnp.float32,
                                   pages_dtype=jnp.float32, interpret=True,
                                   **kw) == "xla"
  fp8 = jnp.float8_e4m3fn  # the FP8 cache path compiles for sm90 (test_mla_decode_sm90.py)
  assert api.choose_implementation(None, q_dtype=bf16, pages_dtype=fp8,
                                   interpret=False, **kw) == expect_kernel
  assert api.choose_implementation("mosaic_gpu", q_dtype=bf16, pages_dtype=fp8,
                                   interpret=False, **kw) == "mosaic_gpu"
  with pytest.raises(ValueError, match="kernel takes bfloat16/float16"):
    api.choose_implementation("mosaic_gpu", q_dtype=jnp.float32,
                              pages_dtype=jnp.float32, interpret=True, **kw)
  with pytest.raises(ValueError, match="implementation="):
    api.choose_implementation("triton", q_dtype=bf16, pages_dtype=bf16,
                              interpret=True, **kw)


def test_xla_path_fp8_matches_reference():
  case = Case("fp8_xla", lens=(40, 7), page_size=32, dim=128, fp8=True)
  q, pages, table, seq_lens, scales = make_inputs(case)
  out, lse = pallas_kernels.mla_decode(q, pages, table, seq_lens,
                                       softmax_scale=0.1, v_dim=case.v_dim,
                                       page_scales=scales, implementation="xla")
  ref_out, ref_lse = mla_decode_reference(q, pages, table, seq_lens,
                                          softmax_scale=0.1, v_dim=case.v_dim,
                                          page_scales=scales)
  np.testing.assert_array_equal(np.asarray(out.astype(jnp.float32)),
                                np.asarray(ref_out.astype(jnp.float32)))


def test_combine_splits_matches_single_softmax():
  rng = np.random.default_rng(3)
  scores = rng.standard_normal((2, 12)).astype(np.float32)
  values = rng.standard_normal((12, 5)).astype(np.float32)
  parts_o, parts_l = [], []
  for lo, hi in ((0, 5), (5, 12), (12, 12)):
    s = scores[:, lo:hi]
    if hi == lo:
      parts_o.append(np.zeros((2, 5), np.float32))
      parts_l.append(np.full((2,), -np.inf, np.float32))
      continue
    w = np.exp(s - s.max(1, keepdims=True))
    parts_o.append(w @ values[lo:hi] / w.sum(1, keepdims=True))
    parts_l.append(s.max(1) + np.log(w.sum(1)))
  out, lse = combine_splits(jnp.asarray(np.stack(parts_o))[None],
                            jnp.asarray(np.stack(parts_l))[None])
  w = np.exp(scores - scores.max(1, keepdims=True))
  np.testing.assert_allclose(np.asarray(out[0]), w @ values / w.sum(1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(lse[0]),
                             scores.max(1) + np.log(w.sum(1)), rtol=1e-6)


def _valid():
  case = Case("v", lens=(5, 3))
  q, pages, table, seq_lens, _ = make_inputs(case)
  return dict(q=q, pages=pages, block_table=table, seq_lens=seq_lens)


@pytest.mark.parametrize("change, match", [
    (lambda a: {**a, "q": a["q"][0]}, r"q\.shape=.*4-D"),
    (lambda a: {**a, "q": jnp.concatenate([a["q"]] * 5, axis=1)}, r"s_q=5"),
    (lambda a: {**a, "pages": a["pages"][..., :-1]}, r"pages\.shape=.*num_pages, page_size, 80"),
    (lambda a: {**a, "block_table": a["block_table"][:1]}, r"block_table\.shape=.*\[2, max_pages\]"),
    (lambda a: {**a, "block_table": a["block_table"].astype(jnp.float32)}, r"block_table\.dtype="),
    (lambda a: {**a, "seq_lens": a["seq_lens"][:, None]}, r"seq_lens\.shape=.*\(2,\)"),
    (lambda a: {**a, "seq_lens": a["seq_lens"].astype(jnp.float32)}, r"seq_lens\.dtype="),
    (lambda a: {**a, "q": a["q"].astype(jnp.int32)}, r"q\.dtype=.*bfloat16, float16, float32"),
    (lambda a: {**a, "pages": a["pages"].astype(jnp.float16)}, r"pages\.dtype=.*must equal q\.dtype"),
    (lambda a: {**a, "pages": a["pages"].astype(jnp.float8_e4m3fn)}, r"page_scales .*required"),
])
def test_validation_errors(change, match):
  args = change(_valid())
  with pytest.raises(ValueError, match=match):
    pallas_kernels.mla_decode(**args, softmax_scale=0.1, v_dim=64)


def test_validation_page_scales_and_v_dim():
  args = _valid()
  with pytest.raises(ValueError, match=r"page_scales is only for float8"):
    pallas_kernels.mla_decode(**args, softmax_scale=0.1, v_dim=64,
                              page_scales=jnp.ones(args["pages"].shape[:2]))
  fp8 = {**args, "pages": args["pages"].astype(jnp.float8_e4m3fn)}
  with pytest.raises(ValueError, match=r"page_scales\.shape="):
    pallas_kernels.mla_decode(**fp8, softmax_scale=0.1, v_dim=64,
                              page_scales=jnp.ones((1, 1)))
  with pytest.raises(ValueError, match=r"v_dim=100 must be in \[1, 80\]"):
    pallas_kernels.mla_decode(**args, softmax_scale=0.1, v_dim=100)
  with pytest.raises(ValueError, match=r"block_kv=24 must be a multiple of 32"):
    Config(block_kv=24, num_stages=2)
  with pytest.raises(ValueError, match=r"page_size=12 must be a multiple of 16"):
    small = {**args, "pages": args["pages"][:, :12]}
    pallas_kernels.mla_decode(**small, softmax_scale=0.1, v_dim=64,
                              implementation="mosaic_gpu", interpret=True)
