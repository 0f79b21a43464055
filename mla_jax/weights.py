"""`mla_jax.load` and `mla_jax.save`: a model from / to an mla-jax checkpoint directory.

`load` builds the model abstractly (shapes only), then orbax restores every weight straight into its
device buffers, part by part: host memory never holds a second copy of the model, and with a mesh
each device reads only its own shard. `save` writes the same layout as `mla-jax convert` (see
`mla_jax.store`), atomically. Neither imports torch or safetensors.

Checkpoints store one entry per layer (("layers", i, ...)); the model stacks the layers of a run
along a leading axis (`mla_jax.model`). Loading places each stored layer into its slot of the
stacked array in place; saving writes the slots back out one by one.
"""

from __future__ import annotations

import os
import dataclasses
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from mla_jax import store
from mla_jax.config import Config
from mla_jax.layers import RouterBias
from mla_jax.model import Transformer, checkpoint_paths, model_path
from mla_jax.quant.blocks import ScaleInv, Scheme
from mla_jax.parallel.rules import param_sharding

_DTYPES = {"bfloat16": jnp.bfloat16, "float32": jnp.float32, "float16": jnp.float16}


def as_dtype(dtype) -> jnp.dtype:
    """'bfloat16' / jnp.bfloat16 / np.float32 ... -> a numpy dtype, refusing what weights cannot be."""
    name = dtype if isinstance(dtype, str) else np.dtype(dtype).name
    if name not in _DTYPES:
        raise ValueError(f"dtype={dtype!r} is not supported; expected one of {sorted(_DTYPES)}")
    return np.dtype(_DTYPES[name])


def abstract_model(config: Config, dtype=jnp.float32, quantization: Scheme | None = None) -> Transformer:
    """The model with shapes and dtypes only: no memory is allocated for weights.

    With a `quantization` scheme its projections hold quantized values and scales (`mla_jax.quant`).
    """
    from mla_jax.quant.apply import apply_scheme

    def make():
        model = Transformer(config, param_dtype=dtype, rngs=nnx.Rngs(0))
        if quantization is not None:
            apply_scheme(model, quantization, dtype)
        return model

    return nnx.eval_shape(make)


QUANTIZATION_KEY = "quantization"  # in mla_jax.json: the Scheme of a quantized checkpoint


def stored_scheme(path: str, layout: dict) -> Scheme | None:
    """The quantization a checkpoint's layout records, or None."""
    q = layout.get(QUANTIZATION_KEY)
    if q is None:
        return None
    try:
        return Scheme.from_json(q, os.path.join(path, store.LAYOUT_FILE))
    except ValueError as e:
        raise store.CheckpointError(str(e)) from None


def model_variables(model: nnx.Module) -> Iterator[tuple[store.Path, nnx.Variable]]:
    """(path, variable) of every weight, e.g. (("stacks", 0, "self_attn", "o_proj", "kernel"), Param)."""
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable):
            yield tuple(path), node


@dataclasses.dataclass(frozen=True)
class Slot:
    """What a checkpoint path names in the model: a whole variable, or one layer of a stacked one."""

    variable: nnx.Variable
    index: int | None  # along the stacked variable's layer axis

    @property
    def shape(self) -> tuple[int, ...]:
        shape = tuple(self.variable.shape)
        return shape if self.index is None else shape[1:]

    @property
    def dtype(self):
        return self.variable.dtype

    def get_value(self):
        value = self.variable.get_value()
        return value if self.index is None else value[self.index]

    def set_value(self, value) -> None:
        """Sets the variable (or its layer), e.g. on a model from `abstract_model`: unset layers are 0."""
        if self.index is None:
            self.variable.set_value(value)
            return
        whole = self.variable.get_value()
        if not isinstance(whole, jax.Array):
            whole = jnp.zeros(self.variable.shape, self.variable.dtype)
        self.variable.set_value(whole.at[self.index].set(jnp.asarray(value, whole.dtype)))


def checkpoint_slots(model: Transformer) -> dict[store.Path, tuple[store.Path, int | None]]:
    """{checkpoint path: (model path, layer index or None)} for every weight, layer by layer."""
    plain, layers = {}, {}
    for path, _ in model_variables(model):
        for ckpt, index in checkpoint_paths(model.config, path):
            (plain if index is None else layers)[ckpt] = (path, index)
    return plain | dict(sorted(layers.items(), key=lambda item: item[0][1]))  # stable: layer-major


def slot(model: Transformer, path: store.Path) -> Slot:
    """The model's variable (or layer of one) that checkpoint `path` names."""
    mpath, index = model_path(model.config, tuple(path))
    node = model
    for key in mpath:
        node = node[key] if isinstance(key, int) else getattr(node, key)
    if not isinstance(node, nnx.Variable):
        raise KeyError(f"{store.path_name(path)} is not a model variable")
    return Slot(node, index)


def load(path: str | os.PathLike, dtype=jnp.bfloat16, mesh: Mesh | None = None, *,
         verify: bool = True) -> Transformer:
    """The Transformer stored at `path` (written by `mla-jax convert` or `save`), weights in `dtype`.

    With a `mesh` (axes named after the presets of `mla_jax.parallel`: data, fsdp, tensor, expert),
    each weight is laid out by the logical-axis table and every device reads only its own shard;
    without, everything lands on the first device. Weights kept
    in float32 by the model (the router's correction bias) stay float32. `verify` checks every
    file against the checksum recorded when it was written (a damaged file is a CheckpointError
    naming it); False skips the reading that costs, not the size check.

    A quantized checkpoint (`mla-jax convert --weights fp8|int8`) stays quantized: its projections
    keep their stored values and block scales on the devices and are dequantized to `dtype` inside
    each step, one layer's matrix (one expert) at a time; `dtype` applies to everything else.
    """
    path = store.user_path(path)
    layout = store.read_layout(path)
    config = Config.from_hf(os.path.join(path, store.CONFIG_FILE))
    model = abstract_model(config, as_dtype(dtype), stored_scheme(path, layout))
    variables = dict(model_variables(model))
    slots = checkpoint_slots(model)
    stored = store.stored_variables(layout)
    _check_matches(path, {p: Slot(variables[m], i).shape for p, (m, i) in slots.items()}, stored)
    device = SingleDeviceSharding(jax.local_devices()[0])  # in a job of several processes: its own
    targets, whole = {}, {}
    for p, (m, i) in slots.items():
        var = variables[m]
        shape = Slot(var, i).shape
        sharding = device if mesh is None else param_sharding(mesh, store.path_name(p), shape)
        targets[p] = jax.ShapeDtypeStruct(shape, var.dtype, sharding=sharding)
        if i is not None and m not in whole:  # the stack takes its layers' layout, unsplit along L
            stacked = device if mesh is None else NamedSharding(mesh, PartitionSpec(None, *sharding.spec))
            whole[m] = jax.ShapeDtypeStruct(tuple(var.shape), var.dtype, sharding=stacked)
    stacks = {}
    for p, array in store.restore(path, layout, targets, verify=verify):
        m, i = slots[p]
        if i is None:
            variables[m].set_value(array)
            continue
        if m not in stacks:
            stacks[m] = _zeros(whole[m])
        stacks[m] = _put_layer(stacks[m], array, i)
    for m, array in stacks.items():
        variables[m].set_value(array)
    return model


def _zeros(target: jax.ShapeDtypeStruct) -> jax.Array:
    return jnp.zeros(target.shape, target.dtype, device=target.sharding)  # made on its devices, laid out


# In place (the stack is donated): a stacked variable never exists twice while its layers arrive.
_put_layer = jax.jit(lambda stack, layer, i: jax.lax.dynamic_update_index_in_dim(stack, layer, i, 0),
                     donate_argnums=0)


def _check_matches(path: str, shapes: dict, stored: dict) -> None:
    """shapes: {checkpoint path: the shape the model expects there}."""
    where = os.path.join(path, store.LAYOUT_FILE)
    missing = [store.path_name(p) for p in shapes if p not in stored]
    if missing:
        raise store.CheckpointError(f"{where}: variable(s) {missing[:8]} that config.json implies are not stored")
    unexpected = [store.path_name(p) for p in stored if p not in shapes and p[0] != "mtp"]
    if unexpected:
        raise store.CheckpointError(f"{where}: stored variable(s) {unexpected[:8]} are not part of the model config.json describes")
    for p, shape in shapes.items():
        if tuple(stored[p][0]) != tuple(shape):
            raise store.CheckpointError(
                f"{where}: {store.path_name(p)} is stored with shape {stored[p][0]}, "
                f"but config.json implies {tuple(shape)}"
            )


def save(model: Transformer, path: str | os.PathLike, *, tokenizer_from: str | os.PathLike | None = None,
         overwrite: bool = False, chunk_bytes: int = store.DEFAULT_CHUNK_BYTES) -> str:
    """Writes `model` as an mla-jax checkpoint at `path` (atomic; the layout `mla-jax convert` writes).

    Sharded weights are written shard by shard from their devices. `tokenizer_from` is a directory
    whose tokenizer files are copied along. `overwrite` replaces only an existing mla-jax
    checkpoint. Every file's checksum is recorded for `load` to verify. Weights bigger than
    `chunk_bytes` are stored in chunks a sharded `load` reads separately (`store.chunk_shape`).
    Returns the absolute path.
    """
    from mla_jax.quant.apply import requantized, scheme_of

    scheme = scheme_of(model)
    replaced = requantized(model)  # LoRA-merged quantized kernels, quantized again with their scales
    # quantized values and their scales are not "the dtype" of a quantized model
    dtypes = {np.dtype(var.dtype).name for p, var in model_variables(model)
              if not isinstance(var, (RouterBias, ScaleInv)) and np.dtype(var.dtype) != (scheme and scheme.storage_dtype)}
    dtype = dtypes.pop() if len(dtypes) == 1 else "mixed"
    variables = dict(model_variables(model))
    hf = model.config.to_hf()
    extra = {}
    if scheme is not None:
        extra[QUANTIZATION_KEY] = scheme.to_json()
        if scheme.to_hf() is not None:
            hf["quantization_config"] = scheme.to_hf()
    with store.Writer(path, overwrite=overwrite, chunk_bytes=chunk_bytes) as writer:
        for p, (m, i) in checkpoint_slots(model).items():
            value = Slot(variables[m], i).get_value() if m not in replaced else \
                replaced[m] if i is None else replaced[m][i]
            writer.add(p, value)
        return writer.commit(hf, dtype=dtype, tokenizer_from=tokenizer_from, extra=extra)

