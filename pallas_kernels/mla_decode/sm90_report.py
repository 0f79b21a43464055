"""Compile the MLA decode kernel for sm_90a on any machine and read what the compiler says.

No GPU is needed: jax's CUDA plugin lowers for a fake H100 topology and ptxas (from the
`nvidia-cuda-nvcc-cu12` wheel) assembles the PTX.  Per kernel we read back:

  * ptxas -v: registers per thread, spill stores / loads (bytes), static shared memory;
  * Mosaic GPU's pass log: the dynamic shared memory the launch will request.

Requires the `gpu-compile` extra (`pip install -e ".[gpu-compile]"`); `missing_reason()` says
what is absent.  Must run with `JAX_PLATFORMS=cpu` (the plugin cannot register without a driver
otherwise).  Usage:

    python -m pallas_kernels.mla_decode.sm90_report --heads 128 --s-q 2 --page 64
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import pathlib
import re
import shutil
import tempfile

import jax
import jax.numpy as jnp

DEVICE_SMEM_LIMIT = 232_448  # bytes of dynamic shared memory one CTA may use on H100/H200
TARGET = "h100_sxm"


@dataclasses.dataclass(frozen=True)
class KernelReport:
  name: str
  registers: int
  spill_stores: int  # bytes
  spill_loads: int  # bytes
  static_smem: int  # bytes
  dynamic_smem: int  # bytes, as requested at launch


@functools.cache
def _ptxas_dir() -> str | None:
  try:
    import nvidia.cuda_nvcc as nvcc  # the nvidia-cuda-nvcc-cu12 wheel
  except ImportError:
    return None
  for root in nvcc.__path__:
    if (pathlib.Path(root) / "bin" / "ptxas").exists():
      return str(pathlib.Path(root) / "bin")
  return None


def _target_config() -> str:
  """The H100 GPU target description (`gpu_targets/h100_sxm.txtpb` beside this file)."""
  return (pathlib.Path(__file__).parent / "gpu_targets" / f"{TARGET}.txtpb").read_text()


def missing_reason() -> str | None:
  """Why an sm_90a compile cannot run here, or None when it can."""
  try:
    import jax_plugins.xla_cuda12  # noqa: F401  (jax-cuda12-plugin)
  except ImportError:
    return ("jax-cuda12-plugin is not installed (pip install -e '.[gpu-compile]')")
  if _ptxas_dir() is None and shutil.which("ptxas") is None:
    return "ptxas not found (nvidia-cuda-nvcc-cu12 is not installed)"
  try:
    _devices()
  except Exception as e:  # noqa: BLE001 - any failure means "cannot compile here"
    return f"no CUDA compile target: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
  return None


@functools.cache
def _devices():
  from jax.experimental import topologies
  topo = topologies.get_topology_desc(
      platform="cuda", topology="1x1x1", target_config=_target_config())
  return topo.devices


def h100_device():
  """One H100 of a compile-only topology (needs the `gpu-compile` extra: `missing_reason()`)."""
  return _devices()[0]


def _ensure_ptxas_on_path():
  d = _ptxas_dir()
  if d and d not in os.environ.get("PATH", "").split(os.pathsep):
    os.environ["PATH"] = d + os.pathsep + os.environ.get("PATH", "")


_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
    "static_smem": re.compile(r"(\d+) bytes smem"),
}
# e.g. `gpu.launch ... dynamic_shared_memory_size %c230472_i32` in the pass log.
_DYN_SMEM_RE = re.compile(rb"dynamic_shared_memory_size %c(\d+)_i32")


def parse_dump(directory: str) -> list[KernelReport]:
  """KernelReports from a MOSAIC_GPU_DUMP_TO directory (one per kernel)."""
  reports = []
  for ptxas in sorted(pathlib.Path(directory).glob("*.ptxas")):
    text = ptxas.read_text()
    vals = {}
    for key, rx in _PTXAS_RE.items():
      found = [int(m) for m in rx.findall(text)]
      if not found:
        raise ValueError(f"{ptxas}: no '{rx.pattern}' in ptxas' report:\n{text}")
      vals[key] = max(found)
    log = ptxas.with_name(ptxas.name[:-len(".ptxas")] + ".mlir-passes.log")
    dyn = [int(m) for m in _DYN_SMEM_RE.findall(log.read_bytes())] if log.exists() else []
    if not dyn:
      raise ValueError(f"{log}: no dynamic_shared_memory_size in Mosaic GPU's pass log")
    reports.append(KernelReport(name=ptxas.name[:-len(".ptxas")], dynamic_smem=max(dyn),
                                **vals))
  if not reports:
    raise ValueError(f"{directory}: Mosaic GPU wrote no .ptxas report")
  return reports


def compile_sm90(*, batch: int = 2, s_q: int, heads: int, page_size: int, dtype: str,
                 dim: int = 576, v_dim: int = 512, max_pages: int = 8,
                 config=None, causal: bool = True) -> tuple[list[KernelReport], object]:
  """Compiles `mla_decode(implementation="mosaic_gpu")` for one H100; (reports, config).

  `dtype` is the cache dtype ("bfloat16", "float16" or "float8_e4m3fn"; FP8 takes bf16
  queries and per-token scales).  Nothing is allocated: every input is abstract.
  """
  from pallas_kernels.mla_decode import api

  reason = missing_reason()
  if reason is not None:
    raise RuntimeError(reason)
  _ensure_ptxas_on_path()
  fp8 = dtype == "float8_e4m3fn"
  q_dtype = jnp.bfloat16 if fp8 else jnp.dtype(dtype)
  sharding = jax.sharding.SingleDeviceSharding(_devices()[0])
  num_pages = batch * max_pages

  def sds(shape, dt):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

  q = sds((batch, s_q, heads, dim), q_dtype)
  pages = sds((num_pages, page_size, dim), jnp.dtype(dtype))
  table = sds((batch, max_pages), jnp.int32)
  lens = sds((batch,), jnp.int32)
  scales = sds((num_pages, page_size), jnp.float32) if fp8 else None
  if config is None:
    config = api.kernel_config(q, pages, table, v_dim=v_dim, interpret=False)

  def fn(q, pages, table, lens, scales):
    return api.mla_decode(q, pages, table, lens, softmax_scale=dim ** -0.5, causal=causal,
                          v_dim=v_dim, page_scales=scales, implementation="mosaic_gpu",
                          config=config)

  lowered = jax.jit(fn).trace(q, pages, table, lens, scales).lower()
  hashes = tuple(_KERNEL_HASH_RE.findall(lowered.as_text()))
  if not hashes:
    raise ValueError("no Mosaic GPU kernel in the lowered program")
  if hashes in _SEEN:
    # The CUDA plugin compiles a kernel once per process and dumps only then.
    return _SEEN[hashes], config
  with tempfile.TemporaryDirectory(prefix="mla_sm90_") as dump:
    old = os.environ.get("MOSAIC_GPU_DUMP_TO")
    os.environ["MOSAIC_GPU_DUMP_TO"] = dump
    try:
      lowered.compile()
    finally:
      if old is None:
        os.environ.pop("MOSAIC_GPU_DUMP_TO", None)
      else:
        os.environ["MOSAIC_GPU_DUMP_TO"] = old
    reports = parse_dump(dump)
  if len(reports) != len(hashes):
    raise ValueError(f"{len(hashes)} kernels lowered but {len(reports)} ptxas reports "
                     "(was this kernel compiled earlier in this process?)")
  _SEEN[hashes] = reports
  return reports, config


_KERNEL_HASH_RE = re.compile(r'kernel_hash = "((?:[^"\\]|\\.)*)"')
_SEEN: dict[tuple[str, ...], list[KernelReport]] = {}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--heads", type=int, nargs="+", default=[16])
  parser.add_argument("--s-q", type=int, nargs="+", default=[1])
  parser.add_argument("--page", type=int, nargs="+", default=[64])
  parser.add_argument("--dtype", nargs="+", default=["bfloat16"])
  parser.add_argument("--block-kv", type=int, default=None)
  parser.add_argument("--stages", type=int, default=None)
  args = parser.parse_args()
  from pallas_kernels.mla_decode import config as config_lib
  for dtype in args.dtype:
    for heads in args.heads:
      for s_q in args.s_q:
        for page in args.page:
          cfg = None
          if args.block_kv:
            cfg = config_lib.Config(block_kv=args.block_kv, num_stages=args.stages or 2)
          row = dict(dtype=dtype, heads=heads, s_q=s_q, page=page)
          try:
            reports, cfg = compile_sm90(s_q=s_q, heads=heads, page_size=page, dtype=dtype,
                                        config=cfg)
            row.update(block_kv=cfg.block_kv, stages=cfg.num_stages,
                       kernels=[dataclasses.asdict(r) for r in reports])
          except Exception as e:  # noqa: BLE001 - report and go on
            row.update(error=f"{type(e).__name__}: {str(e)[:300]}")
          print(json.dumps(row), flush=True)


if __name__ == "__main__":
  main()
