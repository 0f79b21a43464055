"""Where every array lives on a mesh: one table of logical axes, and the presets that split them.

Every dimension of every array the model touches has a logical name (`LOGICAL_AXES`). A mesh axis
is named after the preset it carries, and each preset splits a fixed set of logical axes:

  data    batch (and the cache pages that hold it)      weights replicated
  fsdp    batch, and the model dim of every weight       weights + optimizer state split, gathered
                                                         one layer at a time inside the layer scan
  tensor  heads, MLP / expert hidden, vocabulary         weights split, activations reduced
  expert  batch, and the routed experts                  tokens gathered to the experts' devices,
                                                         outputs reduce-scattered back (`experts.py`)

A combination is a mesh with several of these axes (`data=2,tensor=4`): a logical axis split by two
presets is split over both mesh axes, in the order of `PRESETS`. A split that does not divide the
dimension is dropped (that dimension stays replicated): an uneven split is never worth padding.

The latent cache holds one row per token for all heads (MLA), so no preset splits it by head: it is
split by batch (its page pool, `cache_pages`, in per-shard ranges) and replicated over `tensor`,
where each device attends its own heads over the whole latent.

Parameter names are the model's dotted paths ("stacks.1.mlp.experts.gate_proj") or a checkpoint's
("layers.4.mlp.experts.gate_proj"); a stacked weight gets `layers` first, never split, so that the
scan slices one layer and XLA gathers only that layer's shards.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

LOGICAL_AXES = ("batch", "sequence", "embed", "heads", "q_latent", "kv_latent", "mlp_hidden", "experts",
                "expert_hidden", "vocab", "cache_pages", "layers")

# Mesh axis (= preset) -> the logical axes it splits. Order matters: a dimension split by several
# presets lists their mesh axes in this order.
PRESETS: dict[str, tuple[str, ...]] = {
    "data": ("batch", "cache_pages"),
    "fsdp": ("batch", "cache_pages", "embed"),
    "expert": ("batch", "cache_pages", "experts"),
    "tensor": ("heads", "mlp_hidden", "expert_hidden", "vocab"),
}

# Parameter (suffix of its dotted path after the layer prefix) -> logical axis of each dimension.
_LINEAR_OUT = r"(q_a_proj|kv_a_proj_with_mqa)"
PARAMS: tuple[tuple[str, tuple], ...] = (
    (r"^embed_tokens$", (None, "embed")),  # a row gather: vocabulary kept whole
    (r"^lm_head\.kernel$", ("embed", "vocab")),
    (r"^self_attn\.(q_proj|q_b_proj)\.kernel$", (None, "heads", None)),  # [D or Q, N, H]
    (r"^self_attn\.q_a_proj\.kernel$", ("embed", "q_latent")),
    (r"^self_attn\.kv_a_proj_with_mqa\.kernel$", ("embed", "kv_latent")),
    (r"^self_attn\.kv_b_proj\.kernel$", ("kv_latent", "heads", None)),  # [C, N, H+Hv]
    (r"^self_attn\.o_proj\.kernel$", ("heads", None, "embed")),  # [N, Hv, D]
    (r"^mlp\.(shared_experts\.)?(gate_proj|up_proj)\.kernel$", ("embed", "mlp_hidden")),
    (r"^mlp\.(shared_experts\.)?down_proj\.kernel$", ("mlp_hidden", "embed")),
    (r"^mlp\.(shared_experts\.)?(gate_proj|up_proj)\.bias$", ("mlp_hidden",)),
    (r"^mlp\.experts\.(gate_proj|up_proj)$", ("experts", "embed", "expert_hidden")),  # [E, D, F]
    (r"^mlp\.experts\.down_proj$", ("experts", "expert_hidden", "embed")),  # [E, F, D]
    # block scales of quantized experts [E, nI, nO] (mla_jax.quant) stay with their experts
    (r"^mlp\.experts\.(gate_proj|up_proj|down_proj)_scale_inv$", ("experts", None, None)),
    (r"^mlp\.gate$", ("embed", None)),  # router [D, E]: every device routes every token it holds
)
_LAYER_PREFIX = re.compile(r"^(stacks|layers)\.\d+\.")


def param_axes(name: str, ndim: int) -> tuple:
    """Logical axes of parameter `name` with `ndim` dimensions (None: never split).

    A model path under "stacks.K." has the layer axis first; an unknown name (norms, biases, LoRA
    adapters) is replicated.
    """
    stacked = name.startswith("stacks.")
    local = _LAYER_PREFIX.sub("", name)
    axes: tuple = ()
    for pattern, logical in PARAMS:
        if re.search(pattern, local):
            axes = logical
            break
    if stacked:
        axes = ("layers", *axes) if axes else ()
    if not axes:
        return (None,) * ndim
    if len(axes) != ndim:
        raise ValueError(f"parameter {name}: the sharding table gives {len(axes)} logical axes {axes}, "
                         f"but it has {ndim} dimensions")
    return axes


def check_mesh(mesh: Mesh) -> None:
    unknown = [a for a in mesh.axis_names if a not in PRESETS]
    if unknown:
        raise ValueError(f"mesh axis {unknown[0]!r} is not a preset; mesh axes are named after presets: "
                         f"{sorted(PRESETS)} (e.g. data=2,tensor=4)")


def mesh_axes(mesh: Mesh, logical: str | None) -> tuple[str, ...]:
    """The mesh axes (of size > 1) that split logical axis `logical`, in `PRESETS` order."""
    if logical is None:
        return ()
    if logical not in LOGICAL_AXES:
        raise ValueError(f"logical axis {logical!r}; expected one of {LOGICAL_AXES}")
    return tuple(a for a, splits in PRESETS.items()
                 if a in mesh.axis_names and mesh.shape[a] > 1 and logical in splits)


def spec(mesh: Mesh, logical: tuple, shape: tuple[int, ...]) -> PartitionSpec:
    """PartitionSpec for an array of `shape` whose dims have the logical names `logical`."""
    check_mesh(mesh)
    out, used = [], set()
    for name, dim in zip(logical, shape):
        axes = tuple(a for a in mesh_axes(mesh, name) if a not in used)
        size = 1
        for a in axes:
            size *= mesh.shape[a]
        if not axes or dim % size:
            out.append(None)
            continue
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*out)


def param_sharding(mesh: Mesh, name: str, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(mesh, spec(mesh, param_axes(name, len(shape)), tuple(shape)))


def batch_sharding(mesh: Mesh, shape: tuple[int, ...]) -> NamedSharding:
    """An array whose first dimension is the batch (tokens [B,T], lengths [B], logits [B,V] ...)."""
    return NamedSharding(mesh, spec(mesh, ("batch",) + (None,) * (len(shape) - 1), tuple(shape)))


def batch_axes(mesh: Mesh, batch: int) -> tuple[str, ...]:
    """The mesh axes a batch of `batch` rows is split over (empty when none divides it)."""
    s = spec(mesh, ("batch",), (batch,))[0]
    return () if s is None else ((s,) if isinstance(s, str) else tuple(s))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def cache_sharding(mesh: Mesh, cache) -> Any:
    """Shardings for a `mla_jax.cache.PagedCache`: pages [L,P,S,C+R] and scales [L,P,S] split along
    the page pool P like the batch, block_table [B,W] and seq_lens [B] like the batch.

    The pool splits only when the batch does, and the same way: batch shard i's sequences own
    pages [i·P/n, (i+1)·P/n) (`PageAllocator(shards=n)`), so no device reads another's pages.
    """
    axes = batch_axes(mesh, cache.block_table.shape[0])
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    pool = (axes[0] if len(axes) == 1 else axes) if axes and cache.pages.shape[1] % size == 0 else None
    if axes and pool is None:
        raise ValueError(f"cache: {cache.pages.shape[1]} pages do not split over the batch's "
                         f"{size} shards ({'x'.join(axes)}); use a multiple of {size}")
    batch = (axes[0] if len(axes) == 1 else axes) if axes else None
    ns = lambda *s: NamedSharding(mesh, PartitionSpec(*s))
    return type(cache)(ns(None, pool, None, None), None if cache.scales is None else ns(None, pool, None),
                       ns(batch, None), ns(batch))


def shard_count(mesh: Mesh, axes: tuple[str, ...]) -> int:
    n = 1
    for a in axes:
        n *= mesh.shape[a]
    return n


@dataclasses.dataclass(frozen=True)
class Shardings:
    """A mesh's shardings for parameters (by name), a cache and a batch: what `mla-jax plan`,
    `load`, `generate` and fine-tuning place their arrays by."""

    mesh: Mesh

    def __post_init__(self):
        check_mesh(self.mesh)

    def param(self, name: str, shape) -> NamedSharding:
        return param_sharding(self.mesh, name, tuple(shape))

    def params(self, named: dict) -> dict:
        """{name: array or ShapeDtypeStruct} -> {name: NamedSharding}."""
        return {n: self.param(n, v.shape) for n, v in named.items()}

    def cache(self, cache):
        return cache_sharding(self.mesh, cache)

    def batch(self, shape) -> NamedSharding:
        return batch_sharding(self.mesh, tuple(shape))

    def replicated(self) -> NamedSharding:
        return replicated(self.mesh)


def shardings(mesh: Mesh) -> Shardings:
    return Shardings(mesh)
