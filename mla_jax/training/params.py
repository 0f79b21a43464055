"""The model as flat dicts of arrays keyed by dotted variable path ("stacks.1.mlp.gate"), and back.

Training works on plain dicts: optax, the weight-decay mask, LoRA and orbax all see the same names,
and `Layout.merge` turns them back into a `Transformer` inside or outside `jax.jit`. Parameters
(`nnx.Param`) and the other variables (the router's `RouterBias`) are kept apart, so that
differentiating with respect to the parameters never touches the bias. A `Layout` is hashable and
compares equal for equal models, so compiled steps are shared between runs of the same model.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx
from jax.tree_util import DictKey, GetAttrKey, SequenceKey

from mla_jax.model import Transformer


def _name(path) -> str:
    parts = []
    for key in path:
        if isinstance(key, DictKey):
            parts.append(str(key.key))
        elif isinstance(key, SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, GetAttrKey):
            if key.name != "value":  # the Variable's payload, not a level of the model tree
                parts.append(key.name)
        else:
            parts.append(str(key))
    return ".".join(parts)


def _flatten(state: nnx.State):
    leaves, treedef = jax.tree_util.tree_flatten_with_path(state)
    names = tuple(_name(p) for p, _ in leaves)
    if len(set(names)) != len(names):
        raise AssertionError("two model variables share a dotted name")
    return treedef, names, {n: leaf for n, (_, leaf) in zip(names, leaves)}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How flat {name: array} dicts become the model again: its graph and the two trees' structure."""

    graphdef: nnx.GraphDef
    params_def: jax.tree_util.PyTreeDef
    param_names: tuple[str, ...]
    rest_def: jax.tree_util.PyTreeDef
    rest_names: tuple[str, ...]

    def merge(self, params: dict, rest: dict) -> Transformer:
        def tree(treedef, names, flat, what):
            missing = [n for n in names if n not in flat]
            if missing:
                raise KeyError(f"model {what} {missing[:4]} missing")
            return jax.tree_util.tree_unflatten(treedef, [flat[n] for n in names])

        return nnx.merge(self.graphdef, tree(self.params_def, self.param_names, params, "parameter(s)"),
                         tree(self.rest_def, self.rest_names, rest, "variable(s)"))


def split(model: Transformer) -> tuple[Layout, dict[str, jax.Array], dict[str, jax.Array]]:
    """(layout, parameters {name: array}, other variables {name: array}) of a model."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    params_def, param_names, flat_params = _flatten(params)
    rest_def, rest_names, flat_rest = _flatten(rest)
    return Layout(graphdef, params_def, param_names, rest_def, rest_names), flat_params, flat_rest
