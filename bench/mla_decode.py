"""Benchmark MLA decode on FlashMLA's grid.

    python bench/mla_decode.py                # GPU: full grid; CPU: tiny grid
    python bench/mla_decode.py --quick        # tiny grid (smoke test)
    python bench/mla_decode.py --grid check --time-budget 200   # bench/gpu_check.sh

Reports microseconds, TFLOPS and GB/s per shape for: the Mosaic GPU kernel
(`implementation="mosaic_gpu"`, GPU only), the XLA reference path, and JAX's
own Pallas `paged_attention` adapted to the MLA shapes (one KV head of dim 576
whose first 512 columns are also V is not expressible there, so it runs K=V
with head dim 576 as the closest stand-in; GPU only, skipped where it fails).
Next to them, in the same run: device-to-device copy bandwidth and the dense
bf16 matmul rate.  Writes bench/results/mla_decode-<device>-<date>.json.
On a CPU the run is labelled as such; its numbers say nothing about GPUs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
import pallas_kernels  # noqa: E402

DIM, V_DIM, PAGE = 576, 512, 64


def timeit(fn, *args, warmup=3, iters=10):
  """Median wall time in microseconds (after warm-up, blocking on results)."""
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return statistics.median(times) * 1e6


def copy_bandwidth_gbs(nbytes):
  x = jnp.ones((nbytes // 2,), jnp.bfloat16)
  f = jax.jit(lambda a: a + jnp.bfloat16(1))  # read + write
  us = timeit(f, x)
  return 2 * x.nbytes / (us * 1e-6) / 1e9


def matmul_tflops(n):
  a = jnp.ones((n, n), jnp.bfloat16)
  f = jax.jit(lambda x, y: x @ y)
  us = timeit(f, a, a)
  return 2 * n**3 / (us * 1e-6) / 1e12


def make_problem(batch, s_q, heads, mean_len, ragged, seed=0):
  rng = np.random.default_rng(seed)
  if ragged:  # FlashMLA's ragged setting: lengths spread around the mean
    lens = rng.normal(mean_len, mean_len / 2, batch).clip(s_q, 2 * mean_len)
  else:
    lens = np.full(batch, mean_len)
  lens = lens.astype(np.int32)
  pages_per = -(-lens // PAGE)
  max_pages = int(pages_per.max())
  num_pages = int(pages_per.sum())
  table = np.zeros((batch, max_pages), np.int32)
  perm = rng.permutation(num_pages).astype(np.int32)
  nxt = 0
  for b in range(batch):
    table[b, :pages_per[b]] = perm[nxt:nxt + pages_per[b]]
    nxt += pages_per[b]
  key = jax.random.key(seed)
  q = jax.random.normal(key, (batch, s_q, heads, DIM), jnp.bfloat16)
  pages = jax.random.normal(key, (num_pages, PAGE, DIM), jnp.bfloat16)
  return q, pages, jnp.asarray(table), jnp.asarray(lens), lens


def flops_and_bytes(lens, s_q, heads):
  keys = float(lens.sum())
  flops = 2 * keys * s_q * heads * (DIM + V_DIM)
  nbytes = keys * DIM * 2 + len(lens) * s_q * heads * (DIM + V_DIM) * 2
  return flops, nbytes


def jax_paged_attention(q, pages, table, seq_lens):
  """JAX's Pallas paged_attention (Triton) on the closest GQA stand-in."""
  from jax.experimental.pallas.ops.gpu import paged_attention as pa
  k = pages[None]  # [1 kv head, pages, page, dim]
  return pa.paged_attention(q[:, 0], k, k, table, seq_lens,
                            pages_per_compute_block=1)


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--quick", action="store_true")
  parser.add_argument("--grid", choices=("full", "check", "quick"), default=None,
                      help="full: FlashMLA's grid (GPU default); check: a 16-shape slice "
                      "of it for bench/gpu_check.sh; quick: tiny (CPU default)")
  parser.add_argument("--time-budget", type=float, default=None,
                      help="seconds; shapes not started by then are listed as skipped")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()
  dev = jax.devices()[0]
  on_gpu = dev.platform == "gpu"
  grid_name = args.grid or ("full" if on_gpu and not args.quick else "quick")
  if args.quick or not on_gpu:
    grid_name = "quick"
  quick = grid_name == "quick"
  if quick:
    grid = [(2, 1, 16, 256, False), (2, 2, 16, 256, True)]
  elif grid_name == "check":  # both s_q, smallest and largest h_q, short to long, ragged
    grid = [(128, s_q, h, L, ragged) for s_q in (1, 2) for h in (16, 128)
            for L, ragged in ((1024, False), (4096, False), (4096, True), (16384, False))]
  else:
    grid = [(128, s_q, h, L, ragged) for s_q in (1, 2) for h in (16, 32, 64, 128)
            for L in (1024, 2048, 4096, 8192, 16384, 32768)
            for ragged in (False, True)]
  started = time.perf_counter()
  device_name = dev.device_kind if on_gpu else f"cpu-{dev.device_kind}"
  result = {
      "device": device_name,
      "platform": dev.platform,
      "jax_version": jax.__version__,
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(),
      "note": ("CPU smoke run: XLA reference only; not GPU figures"
               if not on_gpu else "GPU run"),
      "copy_bandwidth_GBs": copy_bandwidth_gbs(256 << 20 if on_gpu else 32 << 20),
      "bf16_matmul_TFLOPS": matmul_tflops(8192 if on_gpu else 512),
      "grid": grid_name,
      "rows": [],
  }
  impls = ["xla"] + (["mosaic_gpu", "jax_paged_attention"] if on_gpu else [])
  for batch, s_q, heads, mean_len, ragged in grid:
    if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
      result["rows"].append(dict(batch=batch, s_q=s_q, heads=heads, mean_len=mean_len,
                                 ragged=ragged, skipped="time budget"))
      continue
    q, pages, table, seq_lens, lens = make_problem(batch, s_q, heads, mean_len, ragged)
    flops, nbytes = flops_and_bytes(lens, s_q, heads)
    for impl in impls:
      row = dict(batch=batch, s_q=s_q, heads=heads, mean_len=mean_len,
                 ragged=ragged, impl=impl)
      try:
        if impl == "jax_paged_attention":
          if s_q != 1:
            raise NotImplementedError("paged_attention has no s_q > 1")
          fn = jax.jit(jax_paged_attention)
          us = timeit(fn, q, pages, table, seq_lens)
        else:
          fn = jax.jit(lambda *a, impl=impl: pallas_kernels.mla_decode(
              *a, softmax_scale=1 / math.sqrt(DIM), v_dim=V_DIM,
              implementation=impl))
          us = timeit(fn, q, pages, table, seq_lens, iters=3 if quick else 10)
        row.update(us=us, TFLOPS=flops / (us * 1e-6) / 1e12,
                   GBs=nbytes / (us * 1e-6) / 1e9)
      except Exception as e:  # noqa: BLE001 - report and go on (OOM, unsupported)
        row.update(error=f"{type(e).__name__}: {str(e)[:200]}")
      result["rows"].append(row)
      print(json.dumps(row), flush=True)
  date = datetime.date.today().isoformat()
  out = args.out or (pathlib.Path(__file__).parent / "results" /
                     f"mla_decode-{device_name.replace(' ', '_')}-{date}.json")
  tmp = pathlib.Path(f"{out}.tmp")  # nothing half-written
  tmp.write_text(json.dumps(result, indent=1))
  tmp.replace(out)
  print(f"copy {result['copy_bandwidth_GBs']:.1f} GB/s, bf16 matmul "
        f"{result['bf16_matmul_TFLOPS']:.2f} TFLOPS -> {out}")


if __name__ == "__main__":
  main()
