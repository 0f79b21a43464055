"""Memory of chunked prefill: what it needs beyond the cache, and that it does not grow with the prompt.

    python bench/prefill_memory.py            # CPU part, then the H100 part if the CUDA plugin is here
    python bench/prefill_memory.py --cpu      # only the CPU part (tiny model, 4K and 16K prompts)
    python bench/prefill_memory.py --gpu      # only the H100 compile (no GPU needed)

CPU part: the shipped tiny model's config (checkpoints/tiny_v3) with max_position_embeddings
raised to 32,768 and random float32 weights; one prompt of 4,096 and one of 16,384 tokens, each in
a fresh process, prefilled through `mla_jax.generate` (bfloat16 cache, page 64, chunk 2,048) with
one new token. Reported per length: the compiled chunk step's `memory_analysis()` (temporaries,
arguments, aliased = the donated cache), the cache's bytes, and the process's peak resident memory
during the prefill above what it held before (Linux VmHWM, reset through /proc/self/clear_refs
after a first, compiling run). Each length runs REPEATS times, each in a fresh process. Peak growth minus the cache's bytes,
the least over a length's runs, must stay under one bound at both lengths: the chunk step's
temporaries (the same for every length) plus BOUND_SLACK.

The children run with glibc's mmap threshold fixed at 1 MiB (MALLOC_MMAP_THRESHOLD_). glibc's
default threshold moves: after a large block is freed, later blocks of up to 32 MiB come from the
heap, and whether they then raise the resident size depends on the heap's earlier history. With it,
the same 16K prefill measured 39.5 and 41.4 MiB beyond the cache in two runs; fixed, every buffer of
1 MiB or more is its own mapping, returned when freed, and runs agree to within a few hundred KiB.

H100 part: DeepSeek-V2-Lite (27 layers, bf16 weights, abstract: nothing allocated), one sequence
with a 32,768-token cache (bf16, page 64), the chunk step (2,048 tokens) compiled for an H100 from
this CPU-only process (../shared/GPU_AOT.md): its temporaries must be <= 8 GiB.

Writes bench/results/prefill_memory-<date>.json (machine, versions, date).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LENGTHS = (4096, 16384)
REPEATS = 3
MMAP_THRESHOLD = 2 ** 20
CHUNK = 2048
PAGE = 64
MIB, GIB = 2 ** 20, 2 ** 30
BOUND_SLACK = 4 * MIB  # the step's outputs, the prompt's host arrays, Python's own allocations
GPU_TARGETS = pathlib.Path(os.environ.get("MLA_JAX_GPU_TARGETS", "/work/shared/gpu_targets"))


def tiny_long_config():
    """The shipped tiny model's config, allowed 32K positions."""
    from mla_jax import Config

    raw = json.loads((ROOT / "checkpoints" / "tiny_v3" / "config.json").read_text())
    raw["max_position_embeddings"] = 32768
    return Config.from_hf(raw)


def abstract_cache(config, tokens: int, dtype="bfloat16"):
    """Shapes of a one-sequence cache holding `tokens` tokens in pages of PAGE."""
    import jax

    from mla_jax import cache as kv

    pages = kv.pages_needed(tokens, PAGE)
    return jax.eval_shape(lambda: kv.init_cache(config, pages, 1, pages, page_size=PAGE, dtype=dtype))


def nbytes(tree) -> int:
    import jax

    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))


def analysis(compiled) -> dict:
    m = compiled.memory_analysis()
    return {"temp_bytes": int(m.temp_size_in_bytes), "argument_bytes": int(m.argument_size_in_bytes),
            "output_bytes": int(m.output_size_in_bytes), "alias_bytes": int(m.alias_size_in_bytes)}


def _status(field: str) -> int:
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _settled_rss(timeout: float = 10.0) -> int:
    """VmRSS once it has stopped falling: the last step's buffers are released by the runtime's own
    threads just after its outputs are handed over (measured: up to ~45 MiB still resident at the
    first read, which the next run then reuses instead of counting)."""
    import gc

    gc.collect()
    last, deadline = _status("VmRSS"), time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        now = _status("VmRSS")
        if now == last:
            return now
        last = now
    return last


def cpu_child(length: int) -> dict:
    """One prompt length in this process: the step's analysis, cache bytes, peak RSS growth."""
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from mla_jax.generate import generate, lower_prefill_chunk
    from mla_jax.model import Transformer

    config = tiny_long_config()
    model = Transformer(config, rngs=nnx.Rngs(0))
    prompt = np.random.default_rng(0).integers(2, config.vocab_size, length).tolist()
    cache = abstract_cache(config, length + 1)
    step = analysis(lower_prefill_chunk(model, cache, CHUNK).compile())
    cache_bytes = nbytes(cache.pages)

    def run():
        return generate(model, [prompt], 1, page_size=PAGE, cache_dtype=jnp.bfloat16, prefill_chunk=CHUNK)

    first = run()  # compiles
    before = _settled_rss()
    pathlib.Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    start = time.perf_counter()
    second = run()
    seconds = time.perf_counter() - start
    peak = _status("VmHWM")
    if first != second:
        raise RuntimeError(f"two greedy runs of one prompt differ: {first} != {second}")
    return {"prompt_tokens": length, "chunk_step": step, "cache_bytes": int(cache_bytes),
            "rss_before_bytes": before, "peak_rss_growth_bytes": peak - before,
            "peak_growth_minus_cache_bytes": peak - before - int(cache_bytes),
            "prefill_and_one_token_seconds_loaded_machine": round(seconds, 1)}


def run_child(length: int) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", str(length)], capture_output=True, text=True,
                          env={**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT),
                               "MALLOC_MMAP_THRESHOLD_": str(MMAP_THRESHOLD)})
    if proc.returncode != 0:
        raise RuntimeError(f"prefill of {length} tokens failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def cpu_part() -> dict:
    runs = []
    for length in LENGTHS:
        for _ in range(REPEATS):
            r = run_child(length)
            runs.append(r)
            print(f"cpu {length:6d} tokens: step temp {r['chunk_step']['temp_bytes'] / MIB:.2f} MiB, cache "
                  f"{r['cache_bytes'] / MIB:.2f} MiB, peak RSS growth {r['peak_rss_growth_bytes'] / MIB:.2f} MiB "
                  f"({r['peak_growth_minus_cache_bytes'] / MIB:.2f} MiB beyond the cache)", flush=True)
    bound = bound_beyond_cache(runs)
    least = least_beyond_cache(runs)
    print(f"bound beyond the cache: {bound / MIB:.2f} MiB (step temporaries + {BOUND_SLACK / MIB:.0f} MiB); least of "
          f"{REPEATS} runs: " + ", ".join(f"{n}: {b / MIB:.2f} MiB" for n, b in least.items()), flush=True)
    return {"runs": runs, "mmap_threshold_bytes": MMAP_THRESHOLD, "bound_beyond_cache_bytes": bound,
            "least_beyond_cache_bytes": {str(n): b for n, b in least.items()},
            "within_bound": all(b <= bound for b in least.values())}


def least_beyond_cache(runs: list[dict]) -> dict[int, int]:
    """Per length, the least peak growth beyond the cache over its runs. What a run adds on top of
    its need is positive noise (a thread's first stack pages, the heap's own growth: up to ~3 MiB
    between runs of one length), so the least of a few runs is the estimate of the need."""
    least: dict[int, int] = {}
    for r in runs:
        n = r["prompt_tokens"]
        least[n] = min(least.get(n, r["peak_growth_minus_cache_bytes"]), r["peak_growth_minus_cache_bytes"])
    return least


def bound_beyond_cache(runs: list[dict]) -> int:
    """The constant every run's peak growth beyond its cache must stay under: the chunk step's
    temporaries (which must be the same at every length) plus BOUND_SLACK."""
    temps = {r["chunk_step"]["temp_bytes"] for r in runs}
    if len(temps) != 1:
        raise RuntimeError(f"the chunk step's temporaries depend on the length: {sorted(temps)}")
    return temps.pop() + BOUND_SLACK


def h100_device(target: str = "h100_sxm"):
    """A topology device of the target GPU (raises where the CUDA compile-only plugin is missing),
    with ptxas put on PATH."""
    from jax.experimental import topologies

    import nvidia.cuda_nvcc as nvcc

    bin_dir = os.path.join(list(nvcc.__path__)[0], "bin")
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    text = (GPU_TARGETS / f"{target}.txtpb").read_text()
    return topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=text).devices[0]


def h100_chunk_step(config, capacity: int, chunk: int = CHUNK, device=None):
    """The chunk step of `config` (bf16 weights) over a `capacity`-token bf16 cache, compiled for
    one H100 from this CPU process. Returns the compiled executable."""
    import jax
    import jax.numpy as jnp

    from mla_jax.generate import lower_prefill_chunk
    from mla_jax.weights import abstract_model

    device = device or h100_device()
    with jax.default_device(device):
        return lower_prefill_chunk(abstract_model(config, jnp.bfloat16), abstract_cache(config, capacity), chunk,
                                   device=device).compile()


def gpu_part() -> dict:
    from mla_jax import Config

    start, cpu = time.perf_counter(), time.process_time()
    compiled = h100_chunk_step(Config.preset("deepseek-v2-lite"), 32768)
    result = {"model": "deepseek-v2-lite (27 layers, bf16 weights)", "target": "h100_sxm, compiled on CPU, nothing run",
              "cache_tokens": 32768, "chunk": CHUNK, "page_size": PAGE, "chunk_step": analysis(compiled),
              "compile_wall_s": round(time.perf_counter() - start, 1), "compile_cpu_s": round(time.process_time() - cpu, 1)}
    print(f"h100 V2-Lite chunk step over a 32K cache: temp {result['chunk_step']['temp_bytes'] / GIB:.2f} GiB, "
          f"arguments {result['chunk_step']['argument_bytes'] / GIB:.2f} GiB", flush=True)
    return result


def versions() -> dict:
    import flax
    import jax
    import jaxlib

    return {"jax": jax.__version__, "jaxlib": jaxlib.__version__, "flax": flax.__version__,
            "python": platform.python_version()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cpu", action="store_true", help="only the CPU part")
    parser.add_argument("--gpu", action="store_true", help="only the H100 compile")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(cpu_child(args.child)))
        return 0
    both = not (args.cpu or args.gpu)
    now = datetime.datetime.now(datetime.timezone.utc)
    results = {"date": now.isoformat(timespec="seconds"), "machine": platform.platform(),
               "cpu_count": os.cpu_count(), "load_average": os.getloadavg(), "versions": versions()}
    if args.cpu or both:
        results["cpu_tiny"] = cpu_part()
    if args.gpu or both:
        results["h100_v2_lite"] = gpu_part()
    parts = "-".join(k for k in ("cpu", "gpu") if getattr(args, k) or both)
    out = ROOT / "bench" / "results" / f"prefill_memory-{parts}-{now.date().isoformat()}.json"
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.rename(out)
    print(f"wrote {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
