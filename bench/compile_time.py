"""Compile time of the decode step for an H100, on a machine without a GPU, at two depths.

    JAX_PLATFORMS=cpu python bench/compile_time.py                      # deepseek-v3 at 4 and 61 layers
    JAX_PLATFORMS=cpu python bench/compile_time.py --layers 4 61 --batch 32 --context 4096
    git worktree add /tmp/before <rev>; python bench/compile_time.py --before /tmp/before   # + that code

Everything is abstract (`jax.ShapeDtypeStruct`): no weight, cache or activation is allocated, so
the full V3 step (~1.3 TB of bf16 weights) compiles in a few GB of host memory. The target device
comes from ../shared/gpu_targets/h100_sxm.txtpb (see ../shared/GPU_AOT.md); the CUDA plugin and
ptxas must be installed. Nothing runs, so the figures are compile times on *this* host, not GPU
times. Wall time depends on what else the host runs; `total_cpu_s` (this process and its ptxas
children, all threads) does not much, and on an otherwise idle host the wall time is at most
that (less where compilation keeps both cores busy; waits on disk aside). Layers are scanned, so the two depths should compile in about the same time; the script
also counts the while loops and dot instructions of the optimized HLO, which must not grow with
depth. `--before DIR` measures the same in a subprocess against another checkout of the project
(e.g. the last unrolled commit) for a before/after table in one file. Writes
bench/results/compile_time-<host>-<date>.json.
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
import subprocess
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers only this way without a driver

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECKOUT_ENV = "COMPILE_TIME_CHECKOUT"  # the project checkout to import (--before sets it)
sys.path.insert(0, os.environ.get(CHECKOUT_ENV, str(ROOT)))
from mla_jax import generate  # noqa: E402
from mla_jax.config import Config  # noqa: E402
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
    return own_cpu_seconds() + children_cpu_seconds()


def own_cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    return own.ru_utime + own.ru_stime


def children_cpu_seconds() -> float:
    """CPU time of finished child processes: ptxas, which Mosaic GPU and XLA run per kernel."""
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return children.ru_utime + children.ru_stime


def _lower_unrolled_checkout(model, batch, context, *, implementation, device):
    """`generate.lower_decode_step` for checkouts that predate it (the same arguments, built here)."""
    import functools

    from flax import nnx

    from mla_jax import cache as kv
    from mla_jax.sampling import Sampling

    graphdef, state = nnx.split(model)
    pages = kv.pages_needed(context, kv.DEFAULT_PAGE_SIZE)
    cache = jax.eval_shape(lambda: kv.init_cache(model.config, batch * pages, batch, pages))
    key = jax.eval_shape(lambda: jax.random.key(0))
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), (
        state, cache, jax.ShapeDtypeStruct((batch,), jnp.int32), jax.ShapeDtypeStruct((batch,), jnp.bool_), key,
        jax.ShapeDtypeStruct((1,), jnp.int32)))
    step = functools.partial(generate._decode, graphdef, sampling=Sampling(), implementation=implementation)
    return jax.jit(step, donate_argnums=(1,)).trace(*args).lower()


def measure(config: Config, *, batch: int, context: int, implementation: str, device) -> dict:
    model = abstract_model(config, jnp.bfloat16)
    lower = getattr(generate, "lower_decode_step", _lower_unrolled_checkout)
    t0, c0, p0 = time.perf_counter(), cpu_seconds(), children_cpu_seconds()
    lowered = lower(model, batch, context, implementation=implementation, device=device)
    t1, c1 = time.perf_counter(), cpu_seconds()
    compiled = lowered.compile()
    t2, c2, p2 = time.perf_counter(), cpu_seconds(), children_cpu_seconds()
    memory = compiled.memory_analysis()
    gib = 1 << 30
    return {
        "layers": config.num_hidden_layers,
        "trace_lower_s": round(t1 - t0, 2),
        "compile_s": round(t2 - t1, 2),
        "total_s": round(t2 - t0, 2),
        "total_cpu_s": round(c2 - c0, 2),
        # where the CPU time goes: tracing + lowering (Python, JAX, Mosaic GPU's kernel lowering),
        # XLA's compile in this process, ptxas in child processes
        "trace_lower_cpu_s": round(c1 - c0, 2),
        "compile_cpu_s_without_ptxas": round(c2 - c1 - (p2 - p0), 2),
        "ptxas_cpu_s": round(p2 - p0, 2),
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
    p.add_argument("--note", default=None, help="a remark stored with the results (e.g. the host's load)")
    p.add_argument("--before", default=None, help="another checkout of the project to measure the same way")
    p.add_argument("--rows-only", action="store_true", help=argparse.SUPPRESS)  # --before's subprocess
    p.add_argument("--out", default=None, help="results file (default: bench/results/compile_time-<host>-<date>.json)")
    args = p.parse_args(argv)

    device = gpu_device(pathlib.Path(args.target_file) if args.target_file else target_file(args.target))
    base = Config.preset(args.preset)
    rows = []
    for n in args.layers:
        row = measure(base.replace(num_hidden_layers=n), batch=args.batch, context=args.context,
                      implementation=args.implementation, device=device)
        rows.append(row)
        print(f"{'before' if args.rows_only else 'this checkout'}: {args.preset} × {n:3d} layers: trace+lower {row['trace_lower_s']:6.1f} s, compile "
              f"{row['compile_s']:6.1f} s (process CPU {row['total_cpu_s']:.1f} s); {row['while_loops']} while "
              f"loops, trip counts {row['known_trip_counts']}, {row['dots']} dots; weights "
              f"{row['weights_gib']} GiB, temporaries {row['temp_gib']} GiB", flush=True)

    if args.rows_only:
        print("ROWS " + json.dumps(rows))
        return {"rows": rows}
    before = None
    if args.before:
        cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), *_forwarded(args), "--rows-only"]
        env = {**os.environ, CHECKOUT_ENV: os.path.abspath(args.before)}
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
        rev = subprocess.run(["git", "-C", args.before, "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        before = {"checkout": args.before, "commit": rev or None,
                  "rows": json.loads(out.split("ROWS ", 1)[1].splitlines()[0])}
        for row in before["rows"]:
            print(f"before ({rev}): {row['layers']:3d} layers, compile {row['compile_s']} s, CPU {row['total_cpu_s']} s, "
                  f"{row['while_loops']} while loops, {row['dots']} dots")

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
        "before": before,
        "note": args.note,
    }
    out = pathlib.Path(args.out) if args.out else (
        ROOT / "bench" / "results" / f"compile_time-cpu-host-{datetime.date.today().isoformat()}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    tmp.replace(out)
    print(f"wrote {out}")
    return result


def _forwarded(args) -> list[str]:
    out = ["--preset", args.preset, "--layers", *map(str, args.layers), "--batch", str(args.batch),
           "--context", str(args.context), "--implementation", args.implementation]
    return out + (["--target-file", args.target_file] if args.target_file else ["--target", args.target])


if __name__ == "__main__":
    main()
