"""LoRA as a reparametrisation: W' = W + (α/r)·A·B for the kernels an NNX filter selects.

The model itself is untouched: the adapted kernels are computed from the frozen base and the
adapters before the model runs, so every path that reads a kernel (including MLA's absorbed W_UK /
W_UV slices of kv_b_proj) sees the adapted weight, and the hub name map never meets LoRA. Export
merges: the saved model holds W', plain kernels, loadable and exportable like any other.

On a quantized base (`mla-jax convert --weights fp8|int8`) the base stays quantized: the adapted
kernel is (dequantized W + ΔW) divided by the base's own block scales, so that the model's
dequantization (values · scale) yields W + ΔW; only the adapted attention kernels exist in float,
inside the step. Saving such a model quantizes W + ΔW afresh, new block scales included
(`mla_jax.quant.apply.requantized`).

A kernel [*in, *out] is adapted as a matrix [I,O] (I = product of the input dims: one for `Linear`,
two, heads × head dim, for `OutProj`). A [I,L] starts random and B [L,O] at zero, so training starts
from the base model exactly. The scanned layers' kernels carry a leading layer axis [Y, *in, *out];
each layer gets its own adapters, A [Y,I,L] and B [Y,L,O].
Dimensions: Y layers of a stack, I in-features, O out-features, L the LoRA rank.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.layers import Linear, OutProj
from mla_jax.quant.blocks import dequantize, expand_scales

# Default targets: every projection of the attention block (q, kv down/up, o); experts, dense MLPs,
# norms, the router and embeddings stay frozen.
ATTENTION_PROJECTIONS = nnx.All(nnx.Param, nnx.PathContains("self_attn"), lambda path, _: path[-1] == "kernel")


def targets(model: nnx.Module, where=ATTENTION_PROJECTIONS) -> dict[str, tuple[tuple[int, ...], int, int]]:
    """{kernel name: (kernel shape, number of leading layer dims, number of input dims)} for the
    kernels `where` selects."""
    select = nnx.filterlib.to_predicate(where)
    modules = {tuple(p): node for p, node in nnx.iter_graph(model) if isinstance(node, (Linear, OutProj))}
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, nnx.Variable) and select(tuple(path), node):
            owner = modules.get(tuple(path[:-1]))
            if owner is None:
                raise ValueError(f"LoRA target {'.'.join(map(str, path))} is not the kernel of a Linear or OutProj")
            in_dims, out_dims = (2, 1) if isinstance(owner, OutProj) else (1, len(owner.out_shape))
            out[".".join(map(str, path))] = (tuple(node.shape), len(node.shape) - in_dims - out_dims, in_dims)
    if not out:
        raise ValueError("the LoRA filter selects no kernel")
    return out


def _io(shape: tuple[int, ...], lead: int, in_dims: int) -> tuple[tuple[int, ...], int, int]:
    """(layer dims, I, O) of a kernel."""
    return shape[:lead], math.prod(shape[lead:lead + in_dims]), math.prod(shape[lead + in_dims:])


def init(targets_: dict, rank: int, key: jax.Array) -> dict[str, jax.Array]:
    """Float32 adapters {"<kernel>.lora_a": [*Y,I,L], "<kernel>.lora_b": [*Y,L,O]} (B = 0: no change yet)."""
    if rank < 1:
        raise ValueError(f"lora rank={rank}; expected >= 1")
    adapters = {}
    for n, (name, (shape, lead, in_dims)) in enumerate(sorted(targets_.items())):
        layers, i, o = _io(shape, lead, in_dims)
        a = jax.random.normal(jax.random.fold_in(key, n), (*layers, i, rank), jnp.float32)
        adapters[f"{name}.lora_a"] = a / math.sqrt(i)
        adapters[f"{name}.lora_b"] = jnp.zeros((*layers, rank, o), jnp.float32)
    return adapters


def quantized_targets(model: nnx.Module, targets_: dict) -> dict[str, object]:
    """{target kernel name: its module's `Quantized` marker} for the targets stored quantized."""
    out = {}
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (Linear, OutProj)) and node.quant is not None:
            name = ".".join(map(str, (*path, "kernel")))
            if name in targets_:
                out[name] = node.quant
    return out


def apply(params: dict[str, jax.Array], adapters: dict[str, jax.Array], targets_: dict, scale: float,
          quantized: dict | None = None, variables: dict | None = None) -> dict[str, jax.Array]:
    """The adapted parameters: each target kernel + scale·A·B, computed in float32, in the kernel's dtype.

    `quantized` {name: Quantized} marks targets stored quantized; their scales are read from
    `variables` ("<name>_scale_inv") and the result is W + ΔW divided by them, in the compute dtype.
    """
    out = dict(params)
    for name, (shape, _, _) in targets_.items():
        w = params[name]
        delta = scale * jnp.einsum("...IL,...LO->...IO", adapters[f"{name}.lora_a"],
                                   adapters[f"{name}.lora_b"]).reshape(shape)
        q = (quantized or {}).get(name)
        if q is None:
            out[name] = (w.astype(jnp.float32) + delta).astype(w.dtype)
            continue
        scales = variables[f"{name}_scale_inv"]
        merged = dequantize(w, scales, q, jnp.float32) + delta
        out[name] = (merged / expand_scales(scales, q, shape).reshape(shape)).astype(q.dtype)
    return out
