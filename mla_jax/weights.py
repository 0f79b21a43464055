"""`mla_jax.load` and `mla_jax.save`: a model from / to an mla-jax checkpoint directory.

`load` builds the model abstractly (shapes only), then orbax restores every weight straight into its
device buffers, part by part: host memory never holds a second copy of the model, and with a mesh
each device reads only its own shard. `save` writes the same layout as `mla-jax convert` (see
`mla_jax.store`), atomically. Neither imports torch or safetensors.
"""

from __future__ import annotations

import os
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, SingleDeviceSharding

from mla_jax import store
from mla_jax.config import Config
from mla_jax.layers import RouterBias
from mla_jax.model import Transformer
from mla_jax.sharding import Rules, named_sharding

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    """'bfloat16' / jnp.bfloat16 / np.float32 ... -> a numpy dtype, refusing what weights cannot be."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[name])


def abstract_model(config: Config, dtype=jnp.float32) -> Transformer:
    """The model with shapes and dtypes only: no memory is allocated for weights."""
    return nnx.eval_shape(lambda: Transformer(config, param_dtype=dtype, rngs=nnx.Rngs(0)))


def model_variables(model: nnx.Module) -> Iterator[tuple[store.Path, nnx.Variable]]:
    """(path, variable) of every weight, e.g. (("layers", 0, "self_attn", "o_proj", "kernel"), Param)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            yield tuple(path), node


def load(path: str | os.PathLike, dtype=jnp.bfloat16, mesh: Mesh | None = None, rules: Rules | None = None,
         *, verify: bool = True) -> Transformer:
    """The Transformer stored at `path` (written by `mla-jax convert` or `save`), weights in `dtype`.

    With a `mesh`, each weight is laid out by the sharding rules (`mla_jax.sharding`; default: experts
    over E, attention over heads N); without, everything lands on the first device. Weights kept
    in float32 by the model (the router's correction bias) stay float32. `verify` checks every
    file against the checksum recorded when it was written (a damaged file is a CheckpointError
    naming it); False skips the reading that costs, not the size check.
    """
    path = store.user_path(path)
    layout = store.read_layout(path)
    config = Config.from_hf(os.path.join(path, store.CONFIG_FILE))
    model = abstract_model(config, as_dtype(dtype))
    variables = dict(model_variables(model))
    stored = store.stored_variables(layout)
    _check_matches(path, variables, stored)
    device = SingleDeviceSharding(jax.devices()[0])
    targets = {}
    for p, var in variables.items():
        shape = tuple(var.shape)
        sharding = device if mesh is None else named_sharding(store.path_name(p), shape, mesh, rules)
        targets[p] = jax.ShapeDtypeStruct(shape, var.dtype, sharding=sharding)
    for p, array in store.restore(path, layout, targets, verify=verify):
        variables[p].set_value(array)
    return model


def _check_matches(path: str, variables: dict, stored: dict) -> None:
    where = os.path.join(path, store.LAYOUT_FILE)
    missing = [store.path_name(p) for p in variables if p not in stored]
    if missing:
        raise store.CheckpointError(f"{where}: variable(s) {missing[:8]} that config.json implies are not stored")
    unexpected = [store.path_name(p) for p in stored if p not in variables and p[0] != "mtp"]
    if unexpected:
        raise store.CheckpointError(f"{where}: stored variable(s) {unexpected[:8]} are not part of the model config.json describes")
    for p, var in variables.items():
        if tuple(stored[p][0]) != tuple(var.shape):
            raise store.CheckpointError(
                f"{where}: {store.path_name(p)} is stored with shape {stored[p][0]}, "
                f"but config.json implies {tuple(var.shape)}"
            )


def save(model: Transformer, path: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
         overwrite: bool = False) -> str:
    """Writes `model` as an mla-jax checkpoint at `path` (atomic; the layout `mla-jax convert` writes).

    Sharded weights are written shard by shard from their devices. `tokenizer_from` is a directory
    whose tokenizer files are copied along. `overwrite` replaces only an existing mla-jax
    checkpoint. Every file's checksum is recorded for `load` to verify. Returns the absolute path.
    """
    dtypes = {np.dtype(var.dtype).name for p, var in model_variables(model) if not isinstance(var, RouterBias)}
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    with store.Writer(path, overwrite=overwrite) as writer:
        for p, var in model_variables(model):
            writer.add(p, var.get_value())
        return writer.commit(model.config.to_hf(), dtype=dtype, tokenizer_from=tokenizer_from)

