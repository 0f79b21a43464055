"""Hub state dicts <-> the model, in memory, through the one name map.

`assemble` walks the map variable by variable (stacking routed experts) and pulls each hub tensor
through a getter, so the streaming converter and the in-memory loader share one code path.
"""

from __future__ import annotations

import itertools
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from checkpoints import names
from mla_jax.config import Config
from mla_jax.model import Transformer
from mla_jax.weights import Slot, abstract_model, slot


def variable_at(model: nnx.Module, path: names.Path) -> Slot:
    """The model's variable that a checkpoint path names: shape, dtype, get_value, set_value (one
    layer of a stacked variable for a layer's path)."""
    return slot(model, path)


def _as_numpy(tensor) -> np.ndarray:
    if isinstance(tensor, np.ndarray):
        return tensor
    if hasattr(tensor, "detach"):  # a torch tensor; torch itself is never imported here
        t = tensor.detach().cpu()
        if str(t.dtype) == "torch.bfloat16":
            return t.float().numpy().astype(jnp.bfloat16)
        return t.numpy()
    return np.asarray(tensor)


def _by_variable(entries) -> Iterator[tuple[names.Path, list[names.Entry]]]:
    """Groups entries per variable; the experts of one layer interleave, so group per layer."""
    for _, layer_entries in itertools.groupby(entries, key=lambda e: e.path[:2] if e.path[0] == "layers" else e.path):
        groups: dict[names.Path, list[names.Entry]] = {}
        for e in layer_entries:
            groups.setdefault(e.path, []).append(e)
        yield from groups.items()


def read_order(config: Config, with_scales: bool = False) -> list[str]:
    """The hub names in the order `assemble` asks for them (a layer's experts grouped per variable)."""
    return [e.hf for _, group in _by_variable(names.entries(config, with_scales)) for e in group]


def assemble(
    config: Config, model: nnx.Module, get: Callable[[str], np.ndarray], *, borrowed: bool = False,
    with_scales: bool = False,
) -> Iterator[tuple[names.Path, np.ndarray, list[names.Entry]]]:
    """Yields (path, array in our layout, entries used) for every variable, in hub order.

    `model` (abstract is enough) gives each variable's shape; `get(hf_name)` returns a hub tensor.
    `borrowed`: what `get` returns may be overwritten by its next call (a reused read buffer), so
    every yielded array is copied out of it. `with_scales`: a quantized model's scales too.
    """
    for path, group in _by_variable(names.entries(config, with_scales)):
        shape = tuple(variable_at(model, path).shape)
        if group[0].expert is None:
            (entry,) = group
            tensor = _as_numpy(get(entry.hf))
            out = np.empty(shape, tensor.dtype) if borrowed and entry.kind == names.COPY else None
            yield path, names.to_ours(entry, tensor, shape, out), group
            continue
        # Each expert goes straight into its slot of one preallocated [E, ...] array: a list of
        # slices plus np.stack would hold the variable twice, and these stacks are the largest
        # variables of a real model.
        stacked = None
        for e in group:
            tensor = _as_numpy(get(e.hf))
            if stacked is None:
                stacked = np.empty((len(group), *shape[1:]), tensor.dtype)
            if tensor.dtype == stacked.dtype:
                names.to_ours(e, tensor, shape[1:], stacked[e.expert])
            else:
                stacked[e.expert] = names.to_ours(e, tensor, shape[1:])
            del tensor
        yield path, stacked, group
        del stacked  # before the next variable is read: one stack alive at a time


def unfuse_experts(tensors: Mapping[str, object]) -> dict[str, object]:
    """Offers transformers' in-memory fused expert tensors under the hub's per-expert names."""
    out: dict[str, object] = {}
    for name, tensor in tensors.items():
        parts = names.split_fused(name, tuple(tensor.shape))
        if parts is None:
            out[name] = tensor
            continue
        for part_name, expert, lo, hi in parts:
            out[part_name] = tensor[expert, lo:hi]
    return out


def load_state_dict(
    config: Config, tensors: Mapping[str, object], *, param_dtype=jnp.float32
) -> Transformer:
    """A concrete model from a hub state dict (numpy arrays or torch tensors), checked strictly.

    Accepts the files' per-expert names and the fused experts of a live transformers model's
    `state_dict()` alike.

    Missing and unexpected tensors are errors; the MTP module's tensors (layers past the last) are
    ignored, as the model does not run them.
    """
    model = abstract_model(config, param_dtype)
    tensors = unfuse_experts(tensors)
    used: set[str] = set()

    def get(name: str):
        if name not in tensors:
            raise KeyError(f"tensor {name!r} missing from the state dict")
        used.add(name)
        return tensors[name]

    for path, array, _ in assemble(config, model, get):
        var = variable_at(model, path)
        var.set_value(jnp.asarray(array, dtype=var.dtype))
    if config.tie_word_embeddings and "lm_head.weight" in tensors:
        # a live tied model lists the shared matrix twice; accept it only if it really is shared
        if not np.array_equal(_as_numpy(tensors["lm_head.weight"]), _as_numpy(tensors["model.embed_tokens.weight"])):
            raise ValueError("lm_head.weight differs from model.embed_tokens.weight but tie_word_embeddings is true")
        used.add("lm_head.weight")
    unexpected = sorted(k for k in tensors if k not in used and not names.is_mtp(k, config) and not
                        names.is_placeholder(k, tuple(tensors[k].shape), config, lambda k=k: _as_numpy(tensors[k])))
    if unexpected:
        raise KeyError(f"unexpected tensor(s) in the state dict: {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}")
    return model


def state_dict(model: Transformer) -> dict[str, np.ndarray]:
    """The hub state dict of a model (per-expert names, [out,in] linear weights; a quantized model's
    values and `weight_scale_inv` scales as stored)."""
    from mla_jax.quant.apply import scheme_of

    out: dict[str, np.ndarray] = {}
    for entry in names.entries(model.config, with_scales=scheme_of(model) is not None):
        array = np.asarray(jax.device_get(variable_at(model, entry.path).get_value()))
        if entry.expert is not None:
            array = array[entry.expert]
        out[entry.hf] = names.to_hub(entry, array)
    return out
