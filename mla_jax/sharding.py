"""Where each weight lives on a device mesh: one rule table, used by `mla_jax.load` (and trainers).

A rule is (regex over the variable's dotted path, partition spec: one mesh-axis name or None per
array dimension). The first matching rule wins; no match, or a dimension that the mesh axis does not
divide, means replicated along that dimension. The default table splits the expert axis E of the
routed experts and the head axis N of the attention projections over one mesh axis: the two axes
that hold nearly all of a DeepSeek model's bytes and that the computation splits without
communication inside an expert or a head.
"""

from __future__ import annotations

import re
from typing import Sequence

from jax.sharding import Mesh, NamedSharding, PartitionSpec

Rules = Sequence[tuple[str, tuple]]


def default_rules(axis: str) -> Rules:
    """Experts [E,D,F]/[E,F,D] (and their block scales) over E; q/kv_b projections [in,N,H] and
    o_proj [N,Hv,D] over N (their block scales, over flattened N·H, are replicated)."""
    return (
        (r"^layers\.\d+\.mlp\.experts\.(gate_proj|up_proj|down_proj)$", (axis, None, None)),
        # block scales of quantized experts [E,nI,nO] go with their experts
        (r"^layers\.\d+\.mlp\.experts\.(gate_proj|up_proj|down_proj)_scale_inv$", (axis, None, None)),
        (r"^layers\.\d+\.self_attn\.(q_proj|q_b_proj|kv_b_proj)\.kernel$", (None, axis, None)),
        (r"^layers\.\d+\.self_attn\.o_proj\.kernel$", (axis, None, None)),
    )


def default_axis(mesh: Mesh) -> str:
    return "model" if "model" in mesh.axis_names else mesh.axis_names[0]


def partition_spec(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules) -> PartitionSpec:
    for pattern, spec in rules:
        if re.search(pattern, name):
            if len(spec) != len(shape):
                raise ValueError(f"sharding rule {pattern!r}: spec {spec} has {len(spec)} dims, {name} has shape {shape}")
            return PartitionSpec(*(_fits(axis, dim, mesh) for axis, dim in zip(spec, shape)))
    return PartitionSpec()


def _fits(axis, dim: int, mesh: Mesh):
    """The axis (or axes) if they divide `dim`, else None: an uneven split is never worth padding."""
    if axis is None:
        return None
    axes = (axis,) if isinstance(axis, str) else tuple(axis)
    unknown = [a for a in axes if a not in mesh.shape]
    if unknown:
        raise ValueError(f"sharding rule names mesh axis {unknown}; the mesh has {tuple(mesh.axis_names)}")
    size = 1
    for a in axes:
        size *= mesh.shape[a]
    return axis if dim % size == 0 else None


def named_sharding(name: str, shape: tuple[int, ...], mesh: Mesh, rules: Rules | None = None) -> NamedSharding:
    rules = default_rules(default_axis(mesh)) if rules is None else rules
    return NamedSharding(mesh, partition_spec(name, shape, mesh, rules))
