"""Small parameter holders shared by the model: linear maps, RMSNorm, the SwiGLU MLP.

Kernels are stored input-first ([in, *out]); a hub `nn.Linear` weight [out, in] maps to them by a
transpose and reshape in `checkpoints.names`. A kernel may hold quantized values instead
(`mla_jax.quant.apply` sets `quant` and `kernel_scale_inv`); `weight()` then dequantizes it, inside
the step, one layer's matrix at a time. Dimensions: D model, F hidden, and any out shape.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from mla_jax.quant.blocks import Quantized, dequantize

INIT_STD = 0.02


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: steered by the aux-loss-free update, never by gradients."""


class Linear(nnx.Module):
    """x [..., in] -> [..., *out_shape]; kernel [in, *out_shape], optional bias [*out_shape]."""

    def __init__(self, in_features: int, out_shape: int | tuple[int, ...], *, bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.in_features, self.out_shape = in_features, out_shape
        init = jax.nn.initializers.normal(INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (in_features, *out_shape), param_dtype))
        self.bias = nnx.Param(jnp.zeros(out_shape, param_dtype)) if bias else None
        self.quant: Quantized | None = None
        self.kernel_scale_inv = nnx.data(None)

    def weight(self) -> jax.Array:
        """The kernel [in, *out], dequantized when it is stored quantized."""
        return _weight(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.weight()
        y = jnp.tensordot(x.astype(kernel.dtype), kernel, axes=((x.ndim - 1,), (0,)))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


class OutProj(nnx.Module):
    """Per-head outputs [..., N, H] -> [..., D]; kernel [N, H, D]."""

    def __init__(self, heads: int, head_dim: int, out_features: int, *, bias: bool = False,
                 param_dtype=jnp.float32, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(INIT_STD)
        self.kernel = nnx.Param(init(rngs.params(), (heads, head_dim, out_features), param_dtype))
        self.bias = nnx.Param(jnp.zeros((out_features,), param_dtype)) if bias else None
        self.quant: Quantized | None = None
        self.kernel_scale_inv = nnx.data(None)

    def weight(self) -> jax.Array:
        """The kernel [N, H, D], dequantized when it is stored quantized."""
        return _weight(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.weight()
        n, h, d = kernel.shape
        # One contraction over the flattened (N,H): as a two-axis einsum XLA:CPU put H before N and
        # copied the whole [N,H,D] kernel into that order on every call.
        y = jnp.einsum("BTK,KD->BTD", x.astype(kernel.dtype).reshape(*x.shape[:-2], n * h), kernel.reshape(n * h, d))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def _weight(module) -> jax.Array:
    if module.quant is None:
        return module.kernel[...]
    return dequantize(module.kernel[...], module.kernel_scale_inv[...], module.quant)


class RMSNorm(nnx.Module):
    """x / rms(x) in float32, cast back to x's dtype, then scaled (DeepSeek's order of operations)."""

    def __init__(self, dim: int, eps: float = 1e-6, *, param_dtype=jnp.float32):
        self.eps = eps
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...]
        return weight * normed.astype(x.dtype).astype(weight.dtype)


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        kw = dict(bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, **kw)
        self.up_proj = Linear(dim, hidden, **kw)
        self.down_proj = Linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
