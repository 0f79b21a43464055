"""`mla-jax plan`: will this model fit that GPU cluster? Answered by XLA, on a machine without GPUs.

The decode step (and, with `train`, the full fine-tuning step) is compiled for a cluster of
H100s / H200s described by a GPU target file (../shared/GPU_AOT.md): every input is abstract
(`jax.ShapeDtypeStruct` with a `NamedSharding` over the topology's devices), so nothing is
allocated and the full V3 compiles in a few GB of host memory. What comes back, per device:

  weights     the model's parameters as laid out on the mesh (counted from each array's shard)
  cache       the paged latent cache, block table and lengths (sharded by batch over `data`)
  optimizer   float32 master weights and AdamW moments (train only; laid out like the weights)
  temporaries what XLA allocates besides inputs and outputs (`memory_analysis().temp_size_in_bytes`)
  peak        XLA's arguments + outputs - aliased (donated) bytes + temporaries

and the collectives one step runs, counted in the optimized HLO with loop trip counts applied.

Mesh axes are the presets of `mla_jax.parallel.rules` (data, fsdp, expert, tensor; combinations
such as expert=8,tensor=2): that table says which dimension of every weight, the cache and the batch
each one splits, and the plan lays the compiled step's inputs out by it. MLA's latent cache is
shared by all heads, so no preset splits it by head; it splits with the batch. With no mesh given,
the plan proposes one by counting (`propose_mesh`).

Bytes per parameter are never assumed: they are counted from the arrays of the model built in the
weights format (`WEIGHT_FORMATS`), so a quantized format (values + scales) plugs in there.

Dimensions: B batch, T tokens per cached sequence (context), L layers, P pages, S page size.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import re
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AbstractMesh, Mesh, NamedSharding, PartitionSpec

from mla_jax import cache as kv
from mla_jax import quant
from mla_jax.config import Config
from mla_jax.errors import UsageError
from mla_jax.parallel import rules

GIB = 1 << 30
MESH_AXES = tuple(rules.PRESETS)  # data, fsdp, expert, tensor
# Communication a preset costs a decode step, least first (the order `propose_mesh` prefers):
# data none; expert sends tokens to the experts' devices; tensor reduces activations every layer;
# fsdp gathers every weight every step.
COST_ORDER = ("fsdp", "tensor", "expert")
TARGETS_DIR = pathlib.Path(__file__).parent / "gpu_targets"
# --gpus names -> GPU target descriptions (device_memory_size is read from them)
GPUS = {"h100": "h100_sxm", "h200": "h200_sxm"}


# ------------------------------------------------------------------------ the cluster
@dataclasses.dataclass(frozen=True)
class Cluster:
    gpu: str  # a key of GPUS
    hosts: int
    per_host: int

    @property
    def devices(self) -> int:
        return self.hosts * self.per_host

    @property
    def topology(self) -> str:
        """XLA's topology string: hosts x 1 x GPUs per host."""
        return f"{self.hosts}x1x{self.per_host}"

    def target_config(self) -> str:
        return (TARGETS_DIR / f"{GPUS[self.gpu]}.txtpb").read_text()

    @property
    def memory_bytes(self) -> int:
        """Device memory of one GPU, from its target description."""
        m = re.search(r"device_memory_size:\s*(\d+)", self.target_config())
        if not m:
            raise ValueError(f"{GPUS[self.gpu]}.txtpb has no device_memory_size")
        return int(m.group(1))

    def __str__(self) -> str:
        host = f"{self.gpu}x{self.per_host}"
        return host if self.hosts == 1 else f"{self.hosts}x{host}"


_GPUS_RE = re.compile(r"^(?:(\d+)x)?([a-z]\d+)(?:x(\d+))?$")


def parse_gpus(text: str) -> Cluster:
    """"h100" / "h100x1" (one GPU), "h200x8" (one host of 8), "2xh200x8" (two hosts of 8 each)."""
    m = _GPUS_RE.match(text.replace(" ", "").lower())
    if not m or m.group(2) not in GPUS:
        raise UsageError(f"--gpus {text!r}: expected [HOSTSx]GPUxCOUNT with GPU one of {sorted(GPUS)}, "
                         f"e.g. h100x1, h200x8, 2xh200x8")
    hosts, per_host = int(m.group(1) or 1), int(m.group(3) or 1)
    if hosts < 1 or per_host < 1:
        raise UsageError(f"--gpus {text!r}: host and GPU counts must be at least 1")
    return Cluster(m.group(2), hosts, per_host)


# ------------------------------------------------------------------------ weights formats
@dataclasses.dataclass(frozen=True)
class WeightsFormat:
    """How parameters are stored on the device: the dtype the model is built (and computes) in, and
    the quantization of its projections (`mla_jax.quant`: values + block scales), if any."""

    name: str
    dtype: Any
    quantization: Any = None

    @property
    def dtype_name(self) -> str:
        return jnp.dtype(self.dtype).name


WEIGHT_FORMATS = {
    "bf16": WeightsFormat("bf16", jnp.bfloat16),
    "f32": WeightsFormat("f32", jnp.float32),
    # `mla-jax convert --weights fp8|int8`: projections quantized, the rest (and the arithmetic) bf16
    "fp8": WeightsFormat("fp8", jnp.bfloat16, quant.FP8_BLOCK_128),
    "int8": WeightsFormat("int8", jnp.bfloat16, quant.INT8_PER_CHANNEL),
}
PENDING_FORMATS = ()  # formats named before the model can hold them


def weights_format(name: str) -> WeightsFormat:
    if name in WEIGHT_FORMATS:
        return WEIGHT_FORMATS[name]
    if name in PENDING_FORMATS:
        raise UsageError(f"--weights {name}: the model cannot hold {name} weights yet; expected one of "
                         f"{sorted(WEIGHT_FORMATS)}")
    raise UsageError(f"--weights {name!r}: expected one of {sorted(WEIGHT_FORMATS)}")


# ------------------------------------------------------------------------ meshes
def parse_mesh(text: str, cluster: Cluster) -> dict[str, int]:
    """"expert=4,tensor=2" -> sizes of every preset axis (1 where not named; -1: the remaining devices)."""
    from mla_jax.parallel.mesh import parse_mesh as parse

    try:
        given = parse(text)
    except ValueError as e:
        raise UsageError(str(e)) from None
    known = math.prod(v for v in given.values() if v != -1)
    if -1 in given.values():
        if cluster.devices % known:
            raise UsageError(f"--mesh {text}: {cluster.devices} devices do not divide by {known}")
        given = {a: cluster.devices // known if v == -1 else v for a, v in given.items()}
    return {a: given.get(a, 1) for a in MESH_AXES}


def check_mesh(axes: dict[str, int], cluster: Cluster, batch: int) -> None:
    n = math.prod(axes.values())
    if n != cluster.devices:
        raise UsageError(f"--mesh {format_mesh(axes)} has {n} devices; --gpus {cluster} has {cluster.devices}")
    split = batch_split(axes)
    if batch % split:
        raise UsageError(f"--mesh {format_mesh(axes)} splits the batch {split} ways; --batch {batch} does not divide")


def batch_split(axes: dict[str, int]) -> int:
    """How many ways the mesh splits the batch (every preset that splits `batch`)."""
    return math.prod(axes[a] for a, splits in rules.PRESETS.items() if "batch" in splits)


def format_mesh(axes: dict[str, int]) -> str:
    named = [f"{a}={axes[a]}" for a in MESH_AXES if axes[a] > 1]
    return ",".join(named) or "data=1"


@functools.lru_cache(maxsize=8)
def topology_devices(cluster: Cluster) -> tuple:
    """The cluster's devices, described but absent (needs the CUDA plugin; JAX_PLATFORMS=cpu)."""
    from jax.experimental import topologies

    try:
        topo = topologies.get_topology_desc(platform="cuda", topology=cluster.topology,
                                            target_config=cluster.target_config())
    except Exception as e:  # the plugin missing or refusing: say how to get it
        raise UsageError(f"cannot describe {cluster} for XLA ({type(e).__name__}: {e}); compiling for GPUs "
                         f"without one needs the CUDA plugin (pip install 'mla-jax[gpu-compile]') and "
                         f"JAX_PLATFORMS=cpu, or use --no-compile to count bytes only") from None
    return tuple(topo.devices)


def abstract_mesh(axes: dict[str, int]) -> AbstractMesh:
    """For counting: shard shapes depend only on the mesh's shape."""
    return AbstractMesh(tuple(axes[a] for a in MESH_AXES), MESH_AXES)


def device_mesh(axes: dict[str, int], devices) -> Mesh:
    """A mesh over the topology's devices, Auto axes: the plan lays out the step's inputs and XLA
    propagates the rest (the model's own Explicit-axes regions run the same way, `parallel.mesh`)."""
    from mla_jax.parallel.mesh import make_mesh

    return make_mesh(dict(axes), axis_types="auto", devices=list(devices))


# ------------------------------------------------------------------------ layouts
def _model_names(model) -> list[tuple[str, Any]]:
    """(dotted model path, abstract array) of every model variable, in `nnx.state` order."""
    from flax import nnx

    out = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        keys = tuple(k.key if hasattr(k, "key") else getattr(k, "idx", getattr(k, "name", k)) for k in path)
        out.append((".".join(str(k) for k in keys if k != "value"), leaf))
    return out


def weight_shardings(model, mesh) -> list[NamedSharding]:
    """One sharding per leaf of `nnx.state(model)`, by the logical-axis table."""
    return [rules.param_sharding(mesh, name, tuple(leaf.shape)) for name, leaf in _model_names(model)]


@functools.lru_cache(maxsize=4)
def _abstract_model(config: Config, dtype_name: str, quantization=None):
    """The model's shapes (built once per config: a V3 takes seconds to trace); never mutated here."""
    from mla_jax.weights import abstract_model

    return abstract_model(config, jnp.dtype(dtype_name), quantization)


def shard_bytes(shape, dtype, sharding: NamedSharding) -> int:
    return math.prod(sharding.shard_shape(tuple(shape))) * np.dtype(dtype).itemsize


def layout_bytes(arrays, shardings) -> int:
    """Bytes one device holds of `arrays` laid out by `shardings` (every device holds as much)."""
    return sum(shard_bytes(a.shape, a.dtype, s) for a, s in zip(arrays, shardings, strict=True))


def abstract_cache(config: Config, batch: int, context: int, page_size: int, dtype) -> kv.PagedCache:
    pages = kv.pages_needed(context, page_size)
    return jax.eval_shape(lambda: kv.init_cache(config, batch * pages, batch, pages, page_size=page_size, dtype=dtype))


# ------------------------------------------------------------------------ the plan
@dataclasses.dataclass
class Plan:
    config_name: str
    cluster: Cluster
    weights_format: str
    mesh: dict[str, int]
    mesh_proposed: bool
    batch: int
    context: int
    train_seq_len: int | None
    device_memory: int
    weights: int  # bytes per device, counted from the shards
    cache: int
    optimizer: int = 0
    compiled: bool = False
    temporaries: int | None = None  # XLA's, per device
    arguments: int | None = None
    outputs: int | None = None
    aliased: int | None = None
    collectives: dict[str, dict[str, int]] = dataclasses.field(default_factory=dict)
    train: "Plan | None" = None  # the train step's plan, when asked for

    @property
    def peak(self) -> int:
        """XLA's peak when compiled; the counted inputs otherwise (temporaries unknown)."""
        if not self.compiled:
            return self.weights + self.cache + self.optimizer
        return self.arguments + self.outputs - self.aliased + self.temporaries

    @property
    def fits(self) -> bool:
        return self.peak <= self.device_memory

    @property
    def margin(self) -> int:
        """Device memory left (positive) or missing (negative) per device."""
        return self.device_memory - self.peak


def count_plan(config: Config, cluster: Cluster, fmt: WeightsFormat, axes: dict[str, int], *, batch: int,
               context: int, page_size: int = kv.DEFAULT_PAGE_SIZE, cache_dtype=jnp.bfloat16, name: str = "") -> Plan:
    """Bytes per device from the arrays' shapes alone (no compilation, no devices)."""
    mesh = abstract_mesh(axes)
    model = _abstract_model(config, fmt.dtype_name, fmt.quantization)
    weights = layout_bytes([leaf for _, leaf in _model_names(model)], weight_shardings(model, mesh))
    cache = abstract_cache(config, batch, context, page_size, cache_dtype)
    cache_bytes = layout_bytes(jax.tree.leaves(cache), jax.tree.leaves(rules.cache_sharding(mesh, cache)))
    return Plan(name, cluster, fmt.name, axes, False, batch, context, None, cluster.memory_bytes, weights, cache_bytes)


def candidate_meshes(cluster: Cluster, batch: int) -> list[dict[str, int]]:
    """Every split of the devices over the preset axes whose batch split divides the batch."""
    n, out = cluster.devices, []

    def split(rest: int, names: tuple, sizes: dict):
        if not names:
            if rest == 1 and batch % batch_split(sizes) == 0:
                out.append({a: sizes[a] for a in MESH_AXES})
            return
        for size in range(1, rest + 1):
            if rest % size == 0:
                split(rest // size, names[1:], {**sizes, names[0]: size})

    split(n, MESH_AXES, {})
    return out


HEADROOM = 0.9  # counted bytes may fill this share of a device; XLA's temporaries need the rest


def propose_mesh(config: Config, cluster: Cluster, fmt: WeightsFormat, *, batch: int, context: int,
                 **kw) -> dict[str, int]:
    """Among the meshes whose counted bytes fill at most HEADROOM of a device, the one that
    communicates least (fsdp, then tensor, then expert kept smallest: `COST_ORDER`); when none fits,
    the one with the fewest bytes per device."""
    candidates = candidate_meshes(cluster, batch)
    if not candidates:
        raise UsageError(f"--batch {batch}: no split of {cluster.devices} devices divides it")
    cost = lambda axes: tuple(axes[a] for a in COST_ORDER)  # noqa: E731
    counted = [(count_plan(config, cluster, fmt, axes, batch=batch, context=context, **kw).peak, axes)
               for axes in candidates]
    fitting = [axes for peak, axes in counted if peak <= HEADROOM * cluster.memory_bytes]
    if fitting:
        return min(fitting, key=cost)
    return min(counted, key=lambda pa: (pa[0], cost(pa[1])))[1]


# ------------------------------------------------------------------------ compiling
def decode_placement(model, mesh: Mesh):
    """`place` for `generate.lower_decode_step`: weights, cache and per-sequence inputs by the
    logical-axis table; the sampling key and stop ids replicated."""
    weights = weight_shardings(model, mesh)

    def place(args):
        state, cache, tokens, done, key, stop = args
        leaves, treedef = jax.tree.flatten(state)
        if len(leaves) != len(weights):
            raise AssertionError(f"{len(leaves)} state leaves, {len(weights)} weight shardings")
        whole = rules.replicated(mesh)
        return (jax.tree.unflatten(treedef, weights), rules.cache_sharding(mesh, cache),
                rules.batch_sharding(mesh, tokens.shape), rules.batch_sharding(mesh, done.shape), whole, whole)

    return place


def compile_decode(config: Config, cluster: Cluster, fmt: WeightsFormat, axes: dict[str, int], *, batch: int,
                   context: int, page_size: int = kv.DEFAULT_PAGE_SIZE, cache_dtype=jnp.bfloat16,
                   implementation: str | None = None):
    """The decode step compiled for `cluster` under the mesh `axes` (nothing allocated)."""
    from mla_jax import generate

    _ptxas_on_path()
    mesh = device_mesh(axes, topology_devices(cluster))
    model = _abstract_model(config, fmt.dtype_name, fmt.quantization)
    lowered = generate.lower_decode_step(model, batch, context, page_size=page_size, cache_dtype=cache_dtype,
                                         implementation=implementation, place=decode_placement(model, mesh))
    return lowered.compile()


def _ptxas_on_path() -> None:
    """XLA calls ptxas for GPU targets; the pip wheel nvidia-cuda-nvcc-cu12 ships one."""
    try:
        import nvidia.cuda_nvcc as nvcc
    except ImportError:
        return
    bin_dir = f"{list(nvcc.__path__)[0]}/bin"
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"


def with_compiled(plan: Plan, compiled) -> Plan:
    m = compiled.memory_analysis()
    return dataclasses.replace(plan, compiled=True, temporaries=m.temp_size_in_bytes,
                               arguments=m.argument_size_in_bytes, outputs=m.output_size_in_bytes,
                               aliased=m.alias_size_in_bytes, collectives=collectives(compiled.as_text()))


# ------------------------------------------------------------------------ collectives in the HLO
COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "ragged-all-to-all",
               "collective-permute", "collective-broadcast")
_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "c64": 8, "c128": 16}
_COMPUTATION = re.compile(r"^(?:ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$")  # "%name (params) -> shape {"
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.+?)\s+([a-z][\w\-]*)\((.*)$")
_ARRAY = re.compile(r"([a-z]\w*)\[([\d,]*)\]")


def _shape_bytes(shape: str) -> list[int]:
    """Bytes of each array in an HLO shape ("bf16[8,7168]{1,0}" or a tuple of them)."""
    return [math.prod(int(d) for d in dims.split(",") if d) * _DTYPE_BYTES.get(dt, 0)
            for dt, dims in _ARRAY.findall(shape) if dt in _DTYPE_BYTES]


def collectives(hlo: str) -> dict[str, dict[str, int]]:
    """{op: {"count": executions per step, "bytes": bytes they produce per device}} from optimized HLO.

    An op inside a while loop counts once per trip (XLA records `known_trip_count` on scanned
    loops); asynchronous pairs count at their `-start`. Bytes are those of each op's result on one
    device (for an async start: its last array, the result buffer; contexts excluded)."""
    bodies: dict[str, list[tuple[str, str, str]]] = {}
    entry, current = None, None
    for line in hlo.splitlines():
        m = _COMPUTATION.match(line)  # headers start at column 0, instructions are indented
        if m:
            current = m.group(1)
            bodies[current] = []
            if line.startswith("ENTRY"):
                entry = current
            continue
        m = _INSTRUCTION.match(line)
        if m and current is not None:
            bodies[current].append(m.groups())
    totals: dict[str, dict[str, int]] = {}

    def visit(name: str, times: int, depth: int = 0):
        if depth > 64 or name not in bodies:
            return
        for shape, op, rest in bodies[name]:
            base = op[:-len("-start")] if op.endswith("-start") else op
            if base in COLLECTIVES:
                sizes = _shape_bytes(shape)
                if op.endswith("-start") and len(sizes) > 1:
                    sizes = [max(sizes)] if base in ("all-reduce",) else sizes[1:2]
                entry_ = totals.setdefault(base, {"count": 0, "bytes": 0})
                entry_["count"] += times
                entry_["bytes"] += times * sum(sizes)
            trips = 1
            if op == "while":
                t = re.search(r'"known_trip_count":\{"n":"(\d+)"', rest)
                trips = int(t.group(1)) if t else 1
            for attr, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations|"
                                           r"true_computation|false_computation)=\{?%?([\w.\-]+)", rest):
                if attr in ("condition", "to_apply"):
                    continue  # reductions' combiners and loop conditions hold no collectives
                visit(callee, times * (trips if attr == "body" else 1), depth + 1)

    if entry is not None:
        visit(entry, 1)
    return totals


# ------------------------------------------------------------------------ the train step
def abstract_train(config: Config, fmt: WeightsFormat, *, batch: int, seq_len: int, remat: str = "none"):
    """(trainer, abstract state, abstract batch [1,B,T]) of full fine-tuning: float32 masters of
    every parameter, AdamW's moments, the routers' biases; weights computed in `fmt`."""
    from mla_jax.training.config import TrainConfig
    from mla_jax.training.step import Trainer

    if fmt.quantization is not None:
        raise UsageError(f"--weights {fmt.name}: the train step planned is full fine-tuning, which a quantized "
                         "base refuses (it fine-tunes with LoRA); plan training with --weights bf16")
    tc = TrainConfig(seq_len=seq_len, batch_size=batch, param_dtype=fmt.dtype_name, remat=remat)
    trainer = Trainer(_abstract_model(config, fmt.dtype_name, fmt.quantization), tc)
    f32 = lambda tree: {n: jax.ShapeDtypeStruct(v.shape, jnp.float32) for n, v in tree.items()}  # noqa: E731
    params = f32(trainer._base)
    state = {"params": params, "bias": f32(trainer._rest), "opt": jax.eval_shape(trainer.optimizer.init, params),
             "rng": jax.ShapeDtypeStruct((2,), jnp.uint32), "step": jax.ShapeDtypeStruct((), jnp.int32)}
    row = jax.ShapeDtypeStruct((1, batch, seq_len), jnp.int32)
    data = {"tokens": row, "targets": row, "segment_ids": row, "positions": row,
            "loss_mask": jax.ShapeDtypeStruct(row.shape, jnp.bool_)}
    return trainer, state, data


def train_shardings(state: dict, data: dict, mesh) -> tuple[dict, dict]:
    """Shardings of the train state (masters, their moments, biases by the table) and of the batch
    [A,B,T] (rows B split like any batch)."""
    params = {n: rules.param_sharding(mesh, n, tuple(v.shape)) for n, v in state["params"].items()}
    whole = rules.replicated(mesh)

    def like_param(path, leaf):
        for k in reversed(path):  # optax keeps per-parameter trees keyed by the parameters' names
            name = getattr(k, "key", None)
            if name in params and tuple(state["params"][name].shape) == tuple(leaf.shape):
                return params[name]
        return whole

    shardings = {"params": params,
                 "bias": {n: rules.param_sharding(mesh, n, tuple(v.shape)) for n, v in state["bias"].items()},
                 "opt": jax.tree_util.tree_map_with_path(like_param, state["opt"]),
                 "rng": whole, "step": whole}
    rows = {k: NamedSharding(mesh, rules.spec(mesh, (None, "batch", None), tuple(v.shape))) for k, v in data.items()}
    return shardings, rows


def count_train(config: Config, cluster: Cluster, fmt: WeightsFormat, axes: dict[str, int], *, batch: int,
                seq_len: int, name: str = "", remat: str = "none") -> Plan:
    mesh = abstract_mesh(axes)
    _, state, data = abstract_train(config, fmt, batch=batch, seq_len=seq_len, remat=remat)
    shardings, _ = train_shardings(state, data, mesh)
    part = lambda key: layout_bytes(jax.tree.leaves(state[key]), jax.tree.leaves(shardings[key]))  # noqa: E731
    weights = part("params") + part("bias")
    optimizer = part("opt") + part("rng") + part("step")
    return Plan(name, cluster, fmt.name, axes, False, batch, 0, seq_len, cluster.memory_bytes, weights, 0, optimizer)


def compile_train(config: Config, cluster: Cluster, fmt: WeightsFormat, axes: dict[str, int], *, batch: int,
                  seq_len: int, remat: str = "none"):
    _ptxas_on_path()
    mesh = device_mesh(axes, topology_devices(cluster))
    trainer, state, data = abstract_train(config, fmt, batch=batch, seq_len=seq_len, remat=remat)
    shardings, rows = train_shardings(state, data, mesh)
    place = lambda tree, sh: jax.tree.map(  # noqa: E731
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, sh)
    return trainer.lower_step(place(state, shardings), place(data, rows)).compile()


# ------------------------------------------------------------------------ the API
def load_config(what: str) -> tuple[str, Config]:
    """(name, config) from a preset name, a config.json, or a directory holding one."""
    path = pathlib.Path(what)
    if path.is_dir():
        path = path / "config.json"
    if path.suffix == ".json" or path.exists():
        if not path.is_file():
            raise UsageError(f"{path}: no such config file")
        return str(path), Config.from_hf(str(path))
    return what, Config.preset(what)


def plan(model: str, gpus: str, *, weights: str = "bf16", batch: int = 32, context: int = 4096,
         mesh: str | None = None, train_seq_len: int | None = None, compile: bool = True,
         page_size: int = kv.DEFAULT_PAGE_SIZE, cache_dtype: str = "bfloat16", implementation: str | None = None,
         remat: str = "none") -> Plan:
    """What `mla-jax plan` prints: the decode step (and the train step when `train_seq_len` is given)
    of `model` (a preset name or config.json) on the cluster `gpus`, per device."""
    for name, v in (("batch", batch), ("context", context), ("page_size", page_size)):
        if not isinstance(v, int) or isinstance(v, bool) or v < 1:
            raise UsageError(f"{name}={v!r}; expected a positive integer")
    if train_seq_len is not None and (not isinstance(train_seq_len, int) or train_seq_len < 2):
        raise UsageError(f"seq_len={train_seq_len!r}; expected an integer >= 2")
    name, config = load_config(model)
    cluster, fmt, cache_dt = parse_gpus(gpus), weights_format(weights), kv.resolve_dtype(cache_dtype)
    counts = dict(batch=batch, context=context, page_size=page_size, cache_dtype=cache_dt)
    if mesh is None:
        axes, proposed = propose_mesh(config, cluster, fmt, **counts), True
    else:
        axes, proposed = parse_mesh(mesh, cluster), False
        check_mesh(axes, cluster, batch)
    result = count_plan(config, cluster, fmt, axes, name=name, **counts)
    result.mesh_proposed = proposed
    if compile:
        result = with_compiled(result, compile_decode(config, cluster, fmt, axes, implementation=implementation,
                                                      **counts))
    if train_seq_len is not None:
        train = count_train(config, cluster, fmt, axes, batch=batch, seq_len=train_seq_len, name=name, remat=remat)
        if compile:
            train = with_compiled(train, compile_train(config, cluster, fmt, axes, batch=batch, seq_len=train_seq_len,
                                                       remat=remat))
        result.train = train
    return result


def _gib(n: int) -> str:
    return f"{n / GIB:9.2f} GiB"


def _bytes(n: int) -> str:
    for unit, size in (("GiB", GIB), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def format_plan(p: Plan) -> str:
    """The report `mla-jax plan` prints."""
    c = p.cluster
    lines = [f"{p.config_name}: {p.weights_format} weights on {c} ({c.devices} x {c.gpu.upper()}, "
             f"{p.device_memory / GIB:.1f} GiB each)",
             f"mesh {format_mesh(p.mesh)}" + ("  (proposed: the least communication that fits, else the fewest bytes; --mesh to choose)"
                                                if p.mesh_proposed else "")]
    lines += _section(f"decode step, batch {p.batch} x {p.context:,}-token context", p)
    if p.train is not None:
        lines += _section(f"train step (full fine-tuning, AdamW), batch {p.train.batch} x "
                          f"{p.train.train_seq_len:,} tokens", p.train)
    return "\n".join(lines)


def _section(title: str, p: Plan) -> list[str]:
    out = ["", f"{title}, per device:"]
    if p.train_seq_len is None:
        out += [f"  weights       {_gib(p.weights)}", f"  cache         {_gib(p.cache)}"]
    else:
        out += [f"  weights       {_gib(p.weights)}  (float32 masters)",
                f"  optimizer     {_gib(p.optimizer)}  (AdamW moments)"]
    if p.compiled:
        out += [f"  temporaries   {_gib(p.temporaries)}  (XLA)",
                f"  peak          {_gib(p.peak)}  (XLA: arguments + outputs - donated + temporaries)"]
    else:
        out += [f"  total         {_gib(p.peak)}  (counted; not compiled: XLA's temporaries not included)"]
    out.append(f"  device memory {_gib(p.device_memory)}")
    if p.fits:
        out.append(f"fits: {p.margin / GIB:.2f} GiB to spare per device")
    else:
        out.append(f"does NOT fit: {-p.margin / GIB:.2f} GiB more per device needed "
                   f"({p.peak / p.device_memory:.2f}x the device's memory)")
    if p.compiled:
        if p.collectives:
            out.append("collectives per step, per device (optimized HLO; an op in a loop counts once per trip):")
            out += [f"  {op:<20} {v['count']:6,} x, {_bytes(v['bytes'])} in all" for op, v in sorted(p.collectives.items())]
        else:
            out.append("collectives per step: none")
    return out
