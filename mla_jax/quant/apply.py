"""Which weights of the model are quantized, putting a scheme on a model, and what it then weighs.

The quantized weights are those DeepSeek's FP8 releases quantize: every projection inside the
decoder layers (attention q/kv/o, dense MLPs, shared and routed experts). Embeddings, norms, the
router and lm_head keep the model's dtype. `checkpoints.names.quantized` says the same of hub names.

A quantized kernel keeps its variable (same path, same shape) with the scheme's dtype
(float8_e4m3fn or int8) and gains a sibling `<name>_scale_inv` (`ScaleInv`, float32
[*lead, nI, nO]); the owning module's `quant` marker says how to dequantize it.
"""

from __future__ import annotations

import math
from typing import Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mla_jax.layers import Linear, OutProj
from mla_jax.moe import Experts
from mla_jax.quant.blocks import Quantized, ScaleInv, Scheme, dequantize, quantize


def _targets(model) -> Iterator[tuple[tuple, nnx.Module, str, int, int]]:
    """(module path, module, kernel attribute, in dims, out dims) of every quantizable kernel."""
    for path, node in nnx.iter_graph(model):
        path = tuple(path)
        if not path or path[0] != "stacks":
            continue
        if isinstance(node, Linear):
            yield path, node, "kernel", 1, len(node.out_shape)
        elif isinstance(node, OutProj):
            yield path, node, "kernel", 2, 1
        elif isinstance(node, Experts):
            for name in Experts.NAMES:
                yield path, node, name, 1, 1


def _scale_shape(shape, scheme: Scheme, in_dims: int, out_dims: int) -> tuple[int, ...]:
    lead = len(shape) - in_dims - out_dims
    i, o = math.prod(shape[lead:lead + in_dims]), math.prod(shape[lead + in_dims:])
    return (*shape[:lead], *scheme.scale_shape(i, o))


def apply_scheme(model, scheme: Scheme, dtype=None) -> None:
    """Gives `model` the quantized structure in place: quantized kernels of zeros, scales of ones.

    For building the abstract model a checkpoint is loaded into (under `nnx.eval_shape`, nothing is
    allocated). `dtype`: what the kernels dequantize to (default: the model's param dtype).
    """
    dtype = np.dtype(dtype or model.param_dtype).name
    for _, module, name, in_dims, out_dims in _targets(model):
        shape = tuple(getattr(module, name).shape)
        setattr(module, name, nnx.Param(jnp.zeros(shape, scheme.storage_dtype)))
        setattr(module, f"{name}_scale_inv", ScaleInv(jnp.ones(_scale_shape(shape, scheme, in_dims, out_dims), jnp.float32)))
        module.quant = Quantized(scheme, in_dims, out_dims, dtype)


def _quantize_kernel(w: np.ndarray, scheme: Scheme, in_dims: int, out_dims: int) -> tuple[np.ndarray, np.ndarray]:
    """A float kernel [*lead, *in, *out] -> (values, scale_inv [*lead, nI, nO]), matrix by matrix."""
    lead = w.ndim - in_dims - out_dims
    i = math.prod(w.shape[lead:lead + in_dims])
    mats = w.reshape(-1, i, w.size // max(1, math.prod(w.shape[:lead])) // i)
    qs, ss = zip(*(quantize(m.T, scheme) for m in mats))  # hub orientation [O,I]
    values = np.stack([q.T for q in qs]).reshape(w.shape)
    return values, np.stack([s.T for s in ss]).reshape(_scale_shape(w.shape, scheme, in_dims, out_dims))


def quantize_model(model, scheme: Scheme) -> None:
    """Quantizes a concrete float model's projections in place (host-side, numpy, matrix by matrix)."""
    dtype = np.dtype(model.param_dtype).name
    for _, module, name, in_dims, out_dims in _targets(model):
        w = np.asarray(jax.device_get(getattr(module, name)[...]), np.float32)
        values, scales = _quantize_kernel(w, scheme, in_dims, out_dims)
        setattr(module, name, nnx.Param(jnp.asarray(values)))
        setattr(module, f"{name}_scale_inv", ScaleInv(jnp.asarray(scales)))
        module.quant = Quantized(scheme, in_dims, out_dims, dtype)


def requantized(model) -> dict[tuple, np.ndarray]:
    """{model path: array} replacing each quantized kernel that holds float values (a LoRA merge) and
    its scales: W' (what the model computes with) quantized afresh, block scales recomputed, since
    W' need not fit the base's blocks' range."""
    out = {}
    for path, module, name, in_dims, out_dims in _targets(model):
        kernel = getattr(module, name)
        if module.quant is None or np.dtype(kernel.dtype) == module.quant.scheme.storage_dtype:
            continue
        merged = dequantize(kernel[...], getattr(module, f"{name}_scale_inv")[...], module.quant, jnp.float32)
        values, scales = _quantize_kernel(np.asarray(jax.device_get(merged)), module.quant.scheme, in_dims, out_dims)
        out[(*path, name)], out[(*path, f"{name}_scale_inv")] = values, scales
    return out


def scheme_of(model) -> Scheme | None:
    """The model's quantization scheme, or None for a model with plain weights."""
    schemes = {module.quant.scheme for _, module, _, _, _ in _targets(model) if module.quant is not None}
    if len(schemes) > 1:
        raise ValueError(f"model mixes quantization schemes {sorted(map(str, schemes))}")
    return schemes.pop() if schemes else None


def quantized_bytes(model) -> tuple[int, int]:
    """(bytes of quantized values + their scales, number of quantized parameters), from the arrays."""
    nbytes = params = 0
    for _, module, name, _, _ in _targets(model):
        if module.quant is None:
            continue
        values, scales = getattr(module, name), getattr(module, f"{name}_scale_inv")
        params += math.prod(values.shape)
        nbytes += math.prod(values.shape) * np.dtype(values.dtype).itemsize
        nbytes += math.prod(scales.shape) * np.dtype(scales.dtype).itemsize
    return nbytes, params


def weight_bytes(config, dtype="bfloat16", scheme: Scheme | None = None) -> int:
    """Bytes of all the model's weights when loaded in `dtype` with `scheme` (shapes only, no memory).

    What `mla-jax plan` needs: `mla_jax.load(path, dtype)` of a checkpoint quantized with `scheme`
    puts exactly this many weight bytes on the devices (summed over all of them, unsharded).
    """
    from mla_jax.weights import abstract_model

    model = abstract_model(config, dtype, quantization=scheme)
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(nnx.state(model)))


def bytes_per_parameter(config, dtype="bfloat16", scheme: Scheme | None = None) -> float:
    """Average weight bytes per parameter of the whole model (scales counted, parameters as in the
    float model): ~2.0 for bfloat16, just over 1 for V3's FP8 release."""
    from mla_jax.weights import abstract_model

    plain = abstract_model(config, dtype)
    n = sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(plain)))
    return weight_bytes(config, dtype, scheme) / n
