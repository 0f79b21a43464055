"""Compile time of the decode step for an H100, on a machine without a GPU, at two depths.

    JAX_PLATFORMS=cpu python bench/compile_time.py                      # deepseek-v3 at 4 and 61 layers
    JAX_PLATFORMS=cpu python bench/compile_time.py --layers 4 61 --batch 32 --context 4096

Everything is abstract (`jax.ShapeDtypeStruct`): no weight, cache or activation is allocated, so
the full V3 step (~1.3 TB of bf16 weights) compiles in a few GB of host memory. The target device
comes from ../shared/gpu_targets/h100_sxm.txtpb (see ../shared/GPU_AOT.md); the CUDA plugin and
ptxas must be installed. Nothing runs, so the figures are compile times on *this* host, not GPU
times. Wall time depends on what else the host runs; `total_cpu_s` (this process and its ptxas
children, all threads) does not much, and on an otherwise idle host the wall time is at most
that (less where compilation keeps both cores busy; waits on disk aside). Layers are scanned, so the two depths should compile in about the same time; the script
also counts the while loops and dot instructions of the optimized HLO, which must not grow with
depth. Writes bench/results/compile_time-<host>-<date>.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import re
import resource
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers only this way without a driver

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from mla_jax.config import Config  # noqa: E402
from mla_jax.generate import lower_decode_step  # noqa: E402
from mla_jax.model import layer_runs  # noqa: E402
from mla_jax.weights import abstract_model  # noqa: E402



def target_file(name: str) -> pathlib.Path:
    """gpu_targets/<name>.txtpb from the nearest `shared/` above the checkout (../shared in the project)."""
    for parent in ROOT.parents:
        path = parent / "shared" / "gpu_targets" / f"{name}.txtpb"
        if path.is_file():
            return path
    raise SystemExit(f"no shared/gpu_targets/{name}.txtpb above {ROOT}; pass --target-file")


def _ptxas_on_path() -> None:
    try:
        import nvidia.cuda_nvcc as nvcc
    except ImportError:
        return
    os.environ["PATH"] = f"{list(nvcc.__path__)[0]}/bin:{os.environ['PATH']}"


def gpu_device(path: pathlib.Path):
    """One device of a single-GPU topology described by the target file `path`."""
    from jax.experimental import topologies

    _ptxas_on_path()
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=path.read_text())
    return topo.devices[0]


def hlo_structure(text: str) -> dict:
    """What the optimized HLO holds: while loops (with their trip counts) and dot instructions."""
    trips = [int(n) for n in re.findall(r'"known_trip_count":\{"n":"(\d+)"', text)]
    return {
        "while_loops": len(re.findall(r"\bwhile\(", text)),
        "known_trip_counts": sorted(trips),
        "dots": len(re.findall(r"\bdot\(", text)) + len(re.findall(r'custom_call_target="__cublas', text)),
        "hlo_chars": len(text),
    }


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as one), all threads."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure(config: Config, *, batch: int, context: int, implementation: str, device) -> dict:
    model = abstract_model(config, jnp.bfloat16)
    t0, c0 = time.perf_counter(), cpu_seconds()
    lowered = lower_decode_step(model, batch, context, implementation=implementation, device=device)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2, c2 = time.perf_counter(), cpu_seconds()
    memory = compiled.memory_analysis()
    gib = 1 << 30
    return {
        "layers": config.num_hidden_layers,
        "runs": [run._asdict() for run in layer_runs(config)],
        "trace_lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "total_cpu_s": round(c2 - c0, 2),
        "weights_gib": round(memory.argument_size_in_bytes / gib, 2) if memory else None,
        "temp_gib": round(memory.temp_size_in_bytes / gib, 3) if memory else None,
        **hlo_structure(compiled.as_text()),
    }


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="deepseek-v3")
    p.add_argument("--layers", type=int, nargs="+", default=[4, 61])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--context", type=int, default=4096)
    p.add_argument("--implementation", default="mosaic_gpu", choices=["mosaic_gpu", "xla"])
    p.add_argument("--target", default="h100_sxm", help="a file name in shared/gpu_targets/")
    p.add_argument("--target-file", default=None, help="a GPU target description (.txtpb) to use instead")
    p.add_argument("--out", default=None, help="results file (default: bench/results/compile_time-<host>-<date>.json)")
    args = p.parse_args(argv)

    device = gpu_device(pathlib.Path(args.target_file) if args.target_file else target_file(args.target))
    base = Config.preset(args.preset)
    rows = []
    for n in args.layers:
        row = measure(base.replace(num_hidden_layers=n), batch=args.batch, context=args.context,
                      implementation=args.implementation, device=device)
        rows.append(row)
        print(f"{args.preset} × {n:3d} layers: trace+lower {row['trace_lower_s']:6.1f} s, compile "
              f"{row['compile_s']:6.1f} s (process CPU {row['total_cpu_s']:.1f} s); {row['while_loops']} while "
              f"loops, trip counts {row['known_trip_counts']}, {row['dots']} dots; weights "
              f"{row['weights_gib']} GiB, temporaries {row['temp_gib']} GiB", flush=True)

    import flax

    result = {
        "what": f"{args.preset} decode step (bf16 weights and cache, batch {args.batch}, {args.context}-token "
                f"cache, {args.implementation} decode attention, greedy) compiled for {args.target} without a GPU",
        "compile_host": f"{platform.node()}: {os.cpu_count()} CPUs, {platform.processor() or platform.machine()}; "
                        f"load average {os.getloadavg()[0]:.1f} at the end",
        "device": str(device.device_kind),
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax.lib, "__version__") else None,
                     "flax": flax.__version__, "python": platform.python_version()},
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20), 2),
        "rows": rows,
    }
    out = pathlib.Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"compile_time-cpu-host-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
