"""Converter throughput and peak memory on a synthetic checkpoint with DeepSeek-V2-Lite layer shapes.

Writes random bf16 safetensors shards (hidden 2048, 16 heads, kv_lora 512, no q_lora, 64 experts
of 1408 + 2 shared, first layer dense 10944, vocab 102400; fewer layers than the real 27) to a temp
directory, then runs `checkpoints.convert.convert` in a child process and reports the source size,
GB/s, and the child's peak resident memory (VmHWM), also as a fraction of the checkpoint size; then
times what verifying the written checksums costs (every weight file read and CRC-32'd, from a cold
and from a warm page cache), `mla_jax.load` of the result (peak RSS too) and, for scale, plain
sequential disk write / read. `--baseline-root` also times the converter of another checkout (e.g.
`git archive <commit> | tar -x -C DIR`) on the same source, runs interleaved, so a change can be
compared under the same machine load. The result goes to bench/results/convert-cpu-<date>.json.

    python bench/convert.py [--layers 6] [--repeat 3] [--workdir /tmp] [--keep] [--skip-load]
                            [--baseline-root DIR]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import ml_dtypes
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from checkpoints import names, safetensors_io as st  # noqa: E402
from mla_jax.config import Config  # noqa: E402
from mla_jax.weights import abstract_model  # noqa: E402
from checkpoints.state_dict import variable_at  # noqa: E402
from mla_jax.store import DEFAULT_PART_BYTES  # noqa: E402

V2_LITE = dict(
    model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
    moe_intermediate_size=1408, num_attention_heads=16, num_key_value_heads=16, kv_lora_rank=512,
    q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
    n_shared_experts=2, num_experts_per_tok=6, first_k_dense_replace=1, moe_layer_freq=1,
    topk_method="greedy", n_group=1, topk_group=1, scoring_func="softmax", norm_topk_prob=False,
    routed_scaling_factor=1.0, max_position_embeddings=163840, rms_norm_eps=1e-6, rope_theta=10000,
    rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                  "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
    tie_word_embeddings=False, torch_dtype="bfloat16", bos_token_id=100000, eos_token_id=100001,
)
SHARD_BYTES = 2 << 30

_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})


def hwm_kb():
    # VmHWM: this process's own peak RSS (ru_maxrss would carry the parent's peak across exec)
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


from checkpoints.convert import convert
base = hwm_kb()
t = time.perf_counter()
report = convert({src!r}, {dst!r}, dtype="bfloat16", progress=False)
seconds = time.perf_counter() - t
print(json.dumps(dict(seconds=seconds, bytes=report.bytes_read, tensors=report.tensors,
                      rss_after_imports_kb=base, peak_rss_kb=hwm_kb())))
"""


_VERIFY_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
from mla_jax import checksums, store
layout = store.read_layout({dst!r})
t = time.perf_counter()
checksums.verify({dst!r}, layout["files"], layout["files"])
print(json.dumps(dict(seconds=time.perf_counter() - t, files=len(layout["files"]),
                      bytes=sum(f["size"] for f in layout["files"].values()))))
"""


def crc32_in_memory_gb_per_s(nbytes: int = 1 << 30) -> float:
    """zlib.crc32 over a buffer already in memory: the checksum's own speed, without the disk."""
    import zlib

    data = np.random.default_rng(0).integers(0, 255, nbytes, dtype=np.uint8).tobytes()
    t = time.perf_counter()
    zlib.crc32(data)
    return round(nbytes / 1e9 / (time.perf_counter() - t), 3)


_LOAD_CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})


def hwm_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


import jax, jax.numpy as jnp
from flax import nnx
from mla_jax.weights import load
base = hwm_kb()
t = time.perf_counter()
model = load({dst!r}, dtype=jnp.bfloat16, verify={verify!r})
jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
print(json.dumps(dict(seconds=time.perf_counter() - t, rss_after_imports_kb=base, peak_rss_kb=hwm_kb())))
"""


def disk_baseline(directory: str, nbytes: int = 2 << 30) -> dict:
    """Plain sequential write (+fsync) and cold read of one file: the ceiling for any converter."""
    path = os.path.join(directory, "disk-baseline.bin")
    block = np.random.default_rng(0).integers(0, 255, 64 << 20, dtype=np.uint8)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        for _ in range(nbytes // block.nbytes):
            f.write(block.data)
        os.fsync(f.fileno())
    write = time.perf_counter() - t
    cold = drop_page_cache()
    t = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while f.readinto(block.data):
            pass
    read = time.perf_counter() - t
    os.remove(path)
    return dict(write_gb_per_s=round(nbytes / 1e9 / write, 3), read_gb_per_s=round(nbytes / 1e9 / read, 3),
                read_cold=cold)


def write_synthetic(directory: str, layers: int, seed: int = 0) -> tuple[int, int, int]:
    """Random bf16 shards + index + config.json; returns (bytes, tensors, shards)."""
    raw = {**V2_LITE, "num_hidden_layers": layers}
    config = Config.from_hf(raw)
    model = abstract_model(config)
    specs = []
    for e in names.entries(config):
        shape = tuple(variable_at(model, e.path).shape)
        specs.append((e.hf, np.dtype(ml_dtypes.bfloat16), names.hub_shape(e, shape[1:] if e.expert is not None else shape)))
    shards, size = [[]], 0
    for spec in specs:
        nbytes = int(np.prod(spec[2])) * 2
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes
    rng = np.random.default_rng(seed)
    weight_map = {}
    for i, shard in enumerate(shards):
        file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        arrays = ((0.02 * rng.standard_normal(shape, np.float32)).astype(ml_dtypes.bfloat16) for _, _, shape in shard)
        st.write_file(os.path.join(directory, file), shard, arrays)
        weight_map.update({name: file for name, _, _ in shard})
    total = sum(int(np.prod(s)) * 2 for _, _, s in specs)
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(raw, f)
    return total, len(specs), len(shards)


def drop_page_cache() -> bool:
    """Best effort, so the converter reads from disk rather than from the cache the writer filled."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def machine() -> dict:
    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    import jax
    import orbax.checkpoint as ocp

    return dict(cpu=cpu, cores=os.cpu_count(), ram_gb=round(mem / 2**30, 1), python=platform.python_version(),
                jax=jax.__version__, orbax=ocp.__version__, numpy=np.__version__, platform=platform.platform())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=6, help="decoder layers (first dense, rest MoE)")
    parser.add_argument("--workdir", default="/tmp", help="where the synthetic checkpoint and output go")
    parser.add_argument("--repeat", type=int, default=3, help="conversions to time (median reported)")
    parser.add_argument("--keep", action="store_true", help="keep the synthetic checkpoint and the output")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results"))
    parser.add_argument("--skip-load", action="store_true", help="skip timing mla_jax.load (its peak RSS is "
                                                                  "about 1.2x the checkpoint)")
    parser.add_argument("--baseline-root", help="another checkout whose converter is timed too, interleaved")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]  # other work on the machine slows every figure here
    work = tempfile.mkdtemp(prefix="mla-jax-bench-convert-", dir=args.workdir)
    src, dst = os.path.join(work, "hf"), os.path.join(work, "ckpt")
    os.makedirs(src)
    try:
        t = time.perf_counter()
        total, tensors, shards = write_synthetic(src, args.layers)
        print(f"synthetic checkpoint: {total / 1e9:.2f} GB, {tensors} tensors, {shards} shards "
              f"(written in {time.perf_counter() - t:.0f} s)", flush=True)
        runs, baseline_runs = [], []
        # baseline first in each round, so the checkpoint left for the checks below is ours
        roots = ([(os.path.abspath(args.baseline_root), baseline_runs)] if args.baseline_root else []) + [(ROOT, runs)]
        for _ in range(args.repeat):  # this VM's disk writeback varies a lot from run to run
            for root, into in roots:
                shutil.rmtree(dst, ignore_errors=True)
                cold = drop_page_cache()
                child = subprocess.run([sys.executable, "-c", _CHILD.format(root=root, src=src, dst=dst)],
                                       capture_output=True, text=True)
                if child.returncode:
                    print(child.stderr, file=sys.stderr)
                    return child.returncode
                into.append(json.loads(child.stdout.strip().splitlines()[-1]))
                print(f"  run {len(into)}{' (baseline)' if into is baseline_runs else ''}: {into[-1]['seconds']:.1f} s, "
                      f"peak RSS {into[-1]['peak_rss_kb'] / 1e6:.2f} GB", flush=True)
        out_bytes = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(dst) for f in fs)
        verify = {}
        for cache in ("cold", "warm"):
            dropped = drop_page_cache() if cache == "cold" else False
            child = subprocess.run([sys.executable, "-c", _VERIFY_CHILD.format(root=ROOT, dst=dst)],
                                   capture_output=True, text=True)
            if child.returncode:
                print(child.stderr, file=sys.stderr)
                return child.returncode
            got = json.loads(child.stdout.strip().splitlines()[-1])
            verify[cache] = dict(seconds=round(got["seconds"], 2), gb_per_s=round(got["bytes"] / 1e9 / got["seconds"], 3),
                                 page_cache_dropped=dropped)
            print(f"  verify ({cache} cache): {got['seconds']:.1f} s for {got['bytes'] / 1e9:.2f} GB in "
                  f"{got['files']} files", flush=True)
        verify.update(bytes=got["bytes"], files=got["files"], crc32_in_memory_gb_per_s=crc32_in_memory_gb_per_s())
        loaded = {}
        for check in ([] if args.skip_load else [True, False]):  # with and without verifying checksums
            drop_page_cache()
            child = subprocess.run([sys.executable, "-c", _LOAD_CHILD.format(root=ROOT, dst=dst, verify=check)],
                                   capture_output=True, text=True)
            if child.returncode:
                print(child.stderr, file=sys.stderr)
                return child.returncode
            loaded[check] = json.loads(child.stdout.strip().splitlines()[-1])
        disk = disk_baseline(work)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)

    seconds = sorted(r["seconds"] for r in runs)
    median = seconds[len(seconds) // 2]
    peak = max(r["peak_rss_kb"] for r in runs) * 1024
    result = dict(
        benchmark="convert", date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        machine=dict(machine(), load_average_1min=[round(load_before, 1), round(os.getloadavg()[0], 1)]),
        model="synthetic, DeepSeek-V2-Lite layer shapes", layers=args.layers,
        source=dict(format="safetensors bf16, sharded with index", bytes=total, tensors=tensors, shards=shards,
                    page_cache_dropped_before_convert=cold),
        output=dict(dtype="bfloat16", bytes_on_disk=out_bytes),
        runs=len(runs), seconds_each=[round(x, 2) for x in seconds], seconds_median=round(median, 2),
        gb_per_s_median=round(total / 1e9 / median, 3), gb_per_s_best=round(total / 1e9 / seconds[0], 3),
        peak_rss_bytes=peak, peak_rss_fraction_of_checkpoint=round(peak / total, 4),
        rss_after_imports_bytes=max(r["rss_after_imports_kb"] for r in runs) * 1024,
        part_bytes=DEFAULT_PART_BYTES,
        disk_baseline=disk,
        verify=dict(verify, note="checksums.verify over every weight file, as mla_jax.load(verify=True) does "
                                 "(load overlaps it with restoring; this is the cost alone)"),
        load=None if not loaded else dict(
            seconds=round(loaded[True]["seconds"], 2), peak_rss_bytes=loaded[True]["peak_rss_kb"] * 1024,
            peak_rss_fraction_of_checkpoint=round(loaded[True]["peak_rss_kb"] * 1024 / total, 4),
            seconds_without_verify=round(loaded[False]["seconds"], 2),
            note="mla_jax.load(dtype=bfloat16) onto the CPU device, page cache dropped before each: the weights "
                 "themselves live in host memory; verify=True (the default) and verify=False"),
    )
    if baseline_runs:
        base = sorted(r["seconds"] for r in baseline_runs)
        result["baseline"] = dict(root=os.path.abspath(args.baseline_root), seconds_each=[round(x, 2) for x in base],
                                  seconds_median=round(base[len(base) // 2], 2),
                                  gb_per_s_median=round(total / 1e9 / base[len(base) // 2], 3),
                                  peak_rss_bytes=max(r["peak_rss_kb"] for r in baseline_runs) * 1024)
    os.makedirs(args.out, exist_ok=True)
    suffix = "" if args.layers == 6 else f"-{args.layers}layers"
    path = os.path.join(args.out, f"convert-cpu-{datetime.date.today().isoformat()}{suffix}.json")
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    os.replace(path + ".tmp", path)
    print(f"converted {total / 1e9:.2f} GB: median {median:.1f} s = {result['gb_per_s_median']:.2f} GB/s "
          f"(best {result['gb_per_s_best']:.2f} GB/s over {len(runs)} runs); peak RSS {peak / 1e9:.2f} GB = "
          f"{100 * peak / total:.1f}% of the checkpoint (after imports {result['rss_after_imports_bytes'] / 1e9:.2f} GB); "
          f"page cache dropped: {cold}")
    print(f"disk alone: write {disk['write_gb_per_s']:.2f} GB/s, read {disk['read_gb_per_s']:.2f} GB/s; verify: "
          f"{verify['cold']['seconds']:.1f} s cold ({verify['cold']['gb_per_s']:.2f} GB/s), {verify['warm']['seconds']:.1f} s "
          f"warm ({verify['warm']['gb_per_s']:.2f} GB/s)")
    if loaded:
        print(f"mla_jax.load: {loaded[True]['seconds']:.1f} s verified, {loaded[False]['seconds']:.1f} s not; "
              f"peak RSS {loaded[True]['peak_rss_kb'] / 1e6:.2f} GB")
    if baseline_runs:
        print(f"baseline {args.baseline_root}: median {result['baseline']['seconds_median']:.1f} s = "
              f"{result['baseline']['gb_per_s_median']:.2f} GB/s")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
