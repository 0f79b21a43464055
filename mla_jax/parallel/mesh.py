"""Meshes from text (`--mesh data=2,tensor=4`), and a model placed on one.

`make_mesh("data=2,tensor=4")` builds a `jax.make_mesh` mesh over the job's devices (all
processes'), with Explicit axes by default (jax's default) or Auto ones; `shard_model` lays each
weight out by the table in `rules`.
"""

from __future__ import annotations

import contextlib
import math
import re

import jax
import numpy as np
from flax import nnx
from jax.sharding import AxisType, Mesh

from mla_jax.parallel.rules import PRESETS, param_sharding

AXIS_TYPES = {"explicit": AxisType.Explicit, "auto": AxisType.Auto}


def parse_mesh(text: str) -> dict[str, int]:
    """"data=2,tensor=4" -> {"data": 2, "tensor": 4}; a single "fsdp" means fsdp over every device (-1)."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"--mesh {text!r}: expected axis=size pairs such as data=2,tensor=4 (axes: {', '.join(PRESETS)})")
    out: dict[str, int] = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*([a-z]+)\s*(?:=\s*(-?\d+))?\s*", part)
        if not m:
            raise ValueError(f"--mesh {text!r}: {part!r} is not axis=size (e.g. tensor=4)")
        axis, size = m.group(1), int(m.group(2)) if m.group(2) is not None else -1
        if axis not in PRESETS:
            raise ValueError(f"--mesh {text!r}: unknown axis {axis!r}; expected one of {', '.join(PRESETS)}")
        if axis in out:
            raise ValueError(f"--mesh {text!r}: axis {axis!r} given twice")
        if size == 0 or size < -1:
            raise ValueError(f"--mesh {text!r}: {axis}={size}; expected a positive size (or -1: the rest)")
        out[axis] = size
    if list(out.values()).count(-1) > 1:
        raise ValueError(f"--mesh {text!r}: at most one axis may take the remaining devices")
    return out


def make_mesh(axes: str | dict[str, int], *, axis_types: str = "explicit", devices=None) -> Mesh:
    """A mesh with the given preset axes over `devices` (default: every device of the job).

    Sizes must multiply to the device count; one size may be -1 (or left out): the rest.
    """
    if axis_types not in AXIS_TYPES:
        raise ValueError(f"axis_types={axis_types!r}; expected one of {sorted(AXIS_TYPES)}")
    shape = parse_mesh(axes) if isinstance(axes, str) else dict(axes)
    devices = list(jax.devices() if devices is None else devices)
    known = math.prod(s for s in shape.values() if s != -1)
    if -1 in shape.values():
        if len(devices) % known:
            raise ValueError(f"mesh {shape}: {len(devices)} devices do not divide by {known}")
        shape = {a: (len(devices) // known if s == -1 else s) for a, s in shape.items()}
    if math.prod(shape.values()) != len(devices):
        raise ValueError(f"mesh {shape} needs {math.prod(shape.values())} devices; the job has {len(devices)}")
    types = (AXIS_TYPES[axis_types],) * len(shape)
    return jax.make_mesh(tuple(shape.values()), tuple(shape), axis_types=types, devices=devices)


def variable_name(path) -> str:
    return ".".join(str(p) for p in path)


def shard_model(model: nnx.Module, mesh: Mesh) -> nnx.Module:
    """Moves every weight of `model` to its place on `mesh` (in place; returns the model)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            value = node.get_value()
            node.set_value(jax.device_put(value, param_sharding(mesh, variable_name(path), tuple(value.shape))))
    return model


def on_mesh(mesh: Mesh | None):
    """`jax.set_mesh(mesh)`, or nothing for None: the context the model's mesh-aware parts (expert
    parallelism) read the mesh from while a step is traced."""
    return contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh)


def mesh_of(tree) -> Mesh | None:
    """The mesh the first array of `tree` is laid out on (a NamedSharding's), or None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(leaf, "sharding", None)
        if isinstance(sharding, jax.sharding.NamedSharding):
            return sharding.mesh
    return None


# ------------------------------------------------------------------------ several processes
def put(tree, shardings):
    """`jax.device_put(tree, shardings)` that also works in a job of several processes.

    Every leaf is a value each process holds whole and alike (a numpy array, a python number, an
    array on a device of this process: a prompt batch, a PRNG key, a block table). Where a sharding
    spans other processes' devices too, each process places only its own devices' shards
    (`jax.make_array_from_callback`), with no cross-process check of the values; an array already
    laid out over the whole job is resharded by `jax.device_put`. `shardings`: one Sharding for
    every leaf, or a matching tree.
    """
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, tree)
    return jax.tree.map(_put_leaf, tree, shardings)


def _put_leaf(x, sharding):
    if sharding.is_fully_addressable or (isinstance(x, jax.Array) and not x.is_fully_addressable):
        return jax.device_put(x, sharding)
    if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):  # its key data, placed alike
        return jax.random.wrap_key_data(_put_leaf(jax.random.key_data(x), sharding), impl=jax.random.key_impl(x))
    host = np.asarray(x)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def to_host(x) -> np.ndarray:
    """The whole of array `x` as numpy, also when its shards live in several processes (then every
    process of the job must call this: the shards are gathered by a collective)."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable and not x.is_fully_replicated:
        from jax.experimental import multihost_utils

        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ------------------------------------------------------------------------ Explicit axes
def explicit_mesh(tree):
    """The mesh of the first array in `tree` laid out over Explicit mesh axes (abstract when traced), else None."""
    for leaf in jax.tree.leaves(tree):
        sharding = getattr(jax.typeof(leaf), "sharding", None)
        mesh = getattr(sharding, "mesh", None)
        if mesh is None or mesh.empty or AxisType.Explicit not in mesh.axis_types:
            continue
        if isinstance(leaf, jax.core.Tracer):
            return mesh
        return leaf.sharding.mesh
    return None


def auto_axes(fn, args: tuple, out_specs):
    """fn(*args), its body with the Explicit mesh axes of `args` made Auto; outputs laid out by
    `out_specs` (a pytree of PartitionSpecs matching the outputs).

    Under Explicit axes every op whose output layout is ambiguous (a contraction over a split
    dimension, a gather from a split table) is a type error until told its layout. The model's
    maths stays free of mesh code instead: inside this region XLA's sharding propagation lays out
    the intermediates from the weights' and inputs' layouts, as it does under Auto axes, and the
    outputs come back with the Explicit layouts `out_specs` gives. Without Explicit axes: fn(*args).
    """
    mesh = explicit_mesh(args)
    if mesh is None:
        return fn(*args)
    context = jax.sharding.use_abstract_mesh(mesh) if isinstance(mesh, jax.sharding.AbstractMesh) else jax.set_mesh(mesh)
    with context:
        return jax.sharding.auto_axes(fn, out_sharding=out_specs)(*args)


def leading_spec(x, ndim: int) -> jax.sharding.PartitionSpec:
    """PartitionSpec of `ndim` dims splitting the first like `x`'s first dimension (None if unsplit)."""
    spec = getattr(getattr(jax.typeof(x), "sharding", None), "spec", None)
    first = spec[0] if spec else None
    return jax.sharding.PartitionSpec(first, *([None] * (ndim - 1)))
