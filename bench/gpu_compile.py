"""GPU compile checks, run on any machine: programs compiled for an H100 without a GPU.

Uses the recipe of ../shared/GPU_AOT.md (a GPU topology from the CUDA plugin, every input abstract),
so nothing is allocated and nothing runs: what comes back is what the compiler knows, per device:
memory (`compiled.memory_analysis()`) and the optimized HLO.

Check: one DeepSeek-V3 MoE layer (hidden 7168, 256 routed experts of 2048, top-8, one shared expert,
noaux_tc routing; bfloat16 weights) on 32,768 tokens, forward and forward+backward:
* temporaries <= 4 GiB forward and <= 16 GiB forward+backward;
* no dot in the optimized HLO whose contraction spans all experts (the dense decomposition of
  `jax.lax.ragged_dot` contracts over experts x model dim).

Tracing happens under `jax.default_device(<the H100>)`, because tokamax picks its kernel from the
default device (mla_jax/ops/moe_dispatch.py). Writes bench/results/gpu-compile-<date>.json.

    PYTHONPATH=$PWD python bench/gpu_compile.py [--tokens 32768] [--target h100_sxm] [--implementation ...]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin registers only this way without a driver

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

from mla_jax.config import Config  # noqa: E402
from mla_jax.moe import MoE  # noqa: E402

GiB = 2**30

# GPU target descriptions (../shared/GPU_AOT.md): $MLA_JAX_GPU_TARGETS, or shared/gpu_targets beside
# the checkout or one level above it (git worktrees).
TARGETS = os.environ.get("MLA_JAX_GPU_TARGETS") or next(
    (p for p in (os.path.join(os.path.dirname(ROOT), "shared", "gpu_targets"),
                 os.path.join(os.path.dirname(os.path.dirname(ROOT)), "shared", "gpu_targets")) if os.path.isdir(p)),
    os.path.join(os.path.dirname(ROOT), "shared", "gpu_targets"))


def gpu_device(target: str = "h100_sxm", targets_dir: str = TARGETS):
    """One device of a single-GPU CUDA topology described by `targets_dir/target.txtpb`."""
    from jax.experimental import topologies

    path = os.path.join(targets_dir, target + ".txtpb")
    if not os.path.exists(path):
        raise FileNotFoundError(f"GPU target description {path} not found (see ../shared/GPU_AOT.md)")
    _add_ptxas_to_path()
    topo = topologies.get_topology_desc(platform="cuda", topology="1x1x1", target_config=open(path).read())
    return topo.devices[0]


def _add_ptxas_to_path():
    try:
        import nvidia.cuda_nvcc as nvcc
    except ImportError:
        return
    bin_dir = os.path.join(list(nvcc.__path__)[0], "bin")
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")


def v3_moe_config() -> Config:
    return Config.preset("deepseek-v3")


def compile_moe_layer(config: Config, tokens: int, device, *, backward: bool, implementation: str | None = None):
    """Compiles one MoE layer on `tokens` tokens for `device`. Returns (compiled, seconds)."""
    abstract = nnx.eval_shape(lambda: MoE(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    sharding = jax.sharding.SingleDeviceSharding(device)
    state = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding), state)
    x = jax.ShapeDtypeStruct((1, tokens, config.hidden_size), jnp.bfloat16, sharding=sharding)

    def forward(state, x):
        y, _ = nnx.merge(graphdef, state)(x, implementation=implementation)
        return y

    def loss(state, x):
        return jnp.sum(forward(state, x).astype(jnp.float32) ** 2)

    fn = jax.grad(loss, argnums=(0, 1)) if backward else forward
    start = time.perf_counter()
    with jax.default_device(device):
        compiled = jax.jit(fn).trace(state, x).lower().compile()
    return compiled, time.perf_counter() - start


_DOT = re.compile(r"=\s*(\w+)\[([\d,]*)\][^=]*?\bdot\(([^)]*)\).*?lhs_contracting_dims=\{([\d,]*)\}")


def dots(hlo_text: str) -> list[dict]:
    """Every dot of an optimized HLO module: result shape, operand names, contraction size."""
    shapes = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*\w+\[([\d,]*)\]", line)
        if m:
            shapes[m.group(1)] = [int(v) for v in m.group(2).split(",") if v]
        # parameters of fused computations are declared in the signature: "(param_0.1: bf16[8,16], ...)"
        for name, dims in re.findall(r"([\w.\-]+): \w+\[([\d,]*)\]", line):
            shapes.setdefault(name, [int(v) for v in dims.split(",") if v])
    found = []
    for line in hlo_text.splitlines():
        m = _DOT.search(line)
        if not m:
            continue
        operands = [o.strip().lstrip("%") for o in m.group(3).split(",")]
        lhs_shape = shapes.get(operands[0])
        contracting = [int(v) for v in m.group(4).split(",") if v]
        size = 1
        for c in contracting:
            size *= lhs_shape[c] if lhs_shape else 0
        found.append({"result": [int(v) for v in m.group(2).split(",") if v], "lhs": lhs_shape,
                      "contraction": size, "line": line.strip()[:240]})
    return found


def dots_spanning_experts(hlo_text: str, config: Config) -> list[dict]:
    """Dots contracting over (at least) all experts times an expert's smaller dimension."""
    limit = config.n_routed_experts * min(config.hidden_size, config.moe_intermediate_size)
    return [d for d in dots(hlo_text) if d["contraction"] >= limit]


def check_moe_layer(tokens: int = 32768, target: str = "h100_sxm", implementation: str | None = None) -> dict:
    config = v3_moe_config()
    device = gpu_device(target)
    result = {"layer": "DeepSeek-V3 MoE layer (hidden 7168, 256 experts of 2048, top-8, 1 shared; bf16)",
              "tokens": tokens, "target": device.device_kind, "implementation": implementation or "auto"}
    for name, backward, budget in (("forward", False, 4 * GiB), ("forward_backward", True, 16 * GiB)):
        compiled, seconds = compile_moe_layer(config, tokens, device, backward=backward,
                                              implementation=implementation)
        mem = compiled.memory_analysis()
        hlo = compiled.as_text()
        bad = dots_spanning_experts(hlo, config)
        custom = sorted(set(re.findall(r'custom_call_target="([\w\-.]+)"', hlo)))
        row = {"compile_seconds": round(seconds, 1),
               "temp_GiB": mem.temp_size_in_bytes / GiB, "argument_GiB": mem.argument_size_in_bytes / GiB,
               "output_GiB": mem.output_size_in_bytes / GiB, "alias_GiB": mem.alias_size_in_bytes / GiB,
               "temp_budget_GiB": budget / GiB, "within_budget": mem.temp_size_in_bytes <= budget,
               "dots": len(dots(hlo)), "dots_spanning_experts": [d["line"] for d in bad],
               "custom_calls": custom}
        result[name] = row
        print(f"  {name:<17} compile {seconds:6.1f} s  temp {row['temp_GiB']:7.2f} GiB (budget {budget / GiB:.0f})"
              f"  args {row['argument_GiB']:.2f} GiB  out {row['output_GiB']:.2f} GiB  dots {row['dots']}"
              f"  spanning experts {len(bad)}  custom calls {custom}", flush=True)
    return result


def write_result(result: dict) -> str:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"gpu-compile-{datetime.date.today().isoformat()}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=32768)
    p.add_argument("--target", default="h100_sxm", help="a file name in ../shared/gpu_targets, without .txtpb")
    p.add_argument("--implementation", choices=("tokamax", "loops", "ragged_dot"), default=None,
                   help="grouped matmul override (default: what the target gets)")
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args()
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # tokamax warns of every autotuning-cache miss, arrays included
    print(f"bench/gpu_compile.py: V3 MoE layer, {args.tokens} tokens, for {args.target} (jax {jax.__version__})")
    result = check_moe_layer(args.tokens, args.target, args.implementation)
    import tokamax

    result.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "host": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "versions": {"jax": jax.__version__, "jaxlib": jax.lib.__version__ if hasattr(jax, "lib") else None,
                     "tokamax": tokamax.__version__},
        "method": "jax.jit(fn).trace(abstract inputs on a GPU topology device).lower().compile(); "
                  "memory_analysis() per device; dots parsed from compiled.as_text()",
    })
    if not args.no_write:
        print("wrote", write_result(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
