"""The MLA decode kernel compiles for H100 (sm_90a) on this CPU machine, as ptxas sees it.

For every shape: ptxas spills nothing to local memory, and the dynamic shared memory the
launch requests is within the device limit and equal to `config.smem_bytes()` (so the
heuristic that picks block_kv and stages can trust its own arithmetic).

The default run compiles a covering subset (every h_q, s_q, page size and dtype appears at
least once); the full product of the grid is marked slow.  Needs the `gpu-compile` extra
(jax's CUDA plugin and ptxas); skipped, with the reason, where it is not installed.
"""

from __future__ import annotations

import itertools

import pytest

from pallas_kernels.mla_decode import config as config_lib
from pallas_kernels.mla_decode import sm90_report

MISSING = sm90_report.missing_reason()
pytestmark = pytest.mark.skipif(MISSING is not None, reason=f"no sm_90a compile: {MISSING}")

HEADS = (1, 16, 64, 128)
S_Q = (1, 2, 4)
PAGES = (16, 64, 256)
DTYPES = ("bfloat16", "float16", "float8_e4m3fn")
MAX_PAGES = 8

# (dtype, h_q, s_q, page): every value of every axis at least once in 4 compiles (CI time),
# including a row-heavy shape (128 heads x 2 tokens = 4 row blocks) and FP8 with 16-token
# pages (two tile copies a block).  The other 104 shapes are under -m slow.
COVERING = [
    ("bfloat16", 16, 1, 16),
    ("bfloat16", 128, 2, 64),
    ("float16", 64, 4, 256),
    ("float8_e4m3fn", 1, 4, 16),
]
FULL = [s for s in itertools.product(DTYPES, HEADS, S_Q, PAGES) if s not in COVERING]


def test_covering_subset_covers_every_axis_value():
  for axis, values in enumerate((DTYPES, HEADS, S_Q, PAGES)):
    assert {shape[axis] for shape in COVERING} == set(values)


def check_compiles_clean(dtype, heads, s_q, page):
  reports, config = sm90_report.compile_sm90(
      s_q=s_q, heads=heads, page_size=page, dtype=dtype, max_pages=MAX_PAGES)
  (kernel,) = reports
  expected_smem = config_lib.smem_bytes(
      config, dim=576, v_dim=512, itemsize=1 if dtype == "float8_e4m3fn" else 2,
      table_entries=MAX_PAGES, fp8=dtype == "float8_e4m3fn")
  assert kernel.spill_stores == 0 and kernel.spill_loads == 0, kernel
  assert kernel.dynamic_smem <= sm90_report.DEVICE_SMEM_LIMIT, kernel
  assert kernel.dynamic_smem == expected_smem, (kernel, config)


@pytest.mark.parametrize("dtype, heads, s_q, page", COVERING)
def test_compiles_for_sm90a_without_spills(dtype, heads, s_q, page):
  check_compiles_clean(dtype, heads, s_q, page)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, heads, s_q, page", FULL)
def test_compiles_for_sm90a_without_spills_full_grid(dtype, heads, s_q, page):
  check_compiles_clean(dtype, heads, s_q, page)
