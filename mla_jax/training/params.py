"""The model as flat dicts of arrays keyed by dotted variable path ("layers.1.mlp.gate"), and back.

Training works on plain dicts: optax, the weight-decay mask, LoRA and orbax all see the same names,
and `ModelParts.merge` turns them back into a `Transformer` inside or outside `jax.jit`.
Parameters (`nnx.Param`) and the other variables (the router's `RouterBias`) are kept apart, so that
differentiating with respect to the parameters never touches the bias.
"""

from __future__ import annotations

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


class _Flat:
    """One nnx.State <-> {name: leaf}."""

    def __init__(self, state: nnx.State):
        leaves, self.treedef = jax.tree_util.tree_flatten_with_path(state)
        self.names = [_name(p) for p, _ in leaves]
        if len(set(self.names)) != len(self.names):
            raise AssertionError("two model variables share a dotted name")
        self.initial = {n: leaf for n, (_, leaf) in zip(self.names, leaves)}

    def unflatten(self, flat: dict) -> nnx.State:
        missing = [n for n in self.names if n not in flat]
        if missing:
            raise KeyError(f"model variable(s) {missing[:4]} missing")
        return jax.tree_util.tree_unflatten(self.treedef, [flat[n] for n in self.names])


class ModelParts:
    """A model split once into its graph, its parameters and its other variables."""

    def __init__(self, model: Transformer):
        self.config = model.config
        self.graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        self._params, self._rest = _Flat(params), _Flat(rest)

    def params(self) -> dict[str, jax.Array]:
        return dict(self._params.initial)

    def rest(self) -> dict[str, jax.Array]:
        return dict(self._rest.initial)

    def merge(self, params: dict[str, jax.Array], rest: dict[str, jax.Array]) -> Transformer:
        return nnx.merge(self.graphdef, self._params.unflatten(params), self._rest.unflatten(rest))
