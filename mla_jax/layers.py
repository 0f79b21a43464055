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

from mla_jax.ops.activations import activation
from mla_jax.quant.blocks import Quantized, dequantize

INIT_STD = 0.02


class RouterBias(nnx.Variable):
    """`e_score_correction_bias`: steered by the aux-loss-free update, never by gradients."""


class CpuLayout(nnx.Variable):
    """A kernel held output-first, [*out, in] (as torch stores it), for generation on CPUs
    (`with_cpu_layout`): derived once per generation, never trained or saved."""


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
        self.kernel_out_in = nnx.data(None)  # the CPU layout (`with_cpu_layout`), else None

    def weight(self) -> jax.Array:
        """The kernel [in, *out], dequantized when it is stored quantized."""
        return _weight(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        if use_out_in(self, x):
            kernel = self.kernel_out_in[...]  # [*out, in]
            y = jax.lax.dot_general(x.astype(kernel.dtype), kernel, (((x.ndim - 1,), (kernel.ndim - 1,)), ((), ())))
        else:
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
        self.kernel_out_in = nnx.data(None)  # [D, N*H], the CPU layout (`with_cpu_layout`), else None

    def weight(self) -> jax.Array:
        """The kernel [N, H, D], dequantized when it is stored quantized."""
        return _weight(self)

    def __call__(self, x: jax.Array) -> jax.Array:
        # One contraction over the flattened (N,H): as a two-axis einsum XLA:CPU put H before N and
        # copied the whole [N,H,D] kernel into that order on every call.
        heads = x.reshape(*x.shape[:-2], -1)  # [B,T,N*H]
        if use_out_in(self, x):
            kernel = self.kernel_out_in[...]  # [D, N*H]
            y = jnp.einsum("BTK,DK->BTD", heads.astype(kernel.dtype), kernel)
        else:
            kernel = self.weight()
            y = jnp.einsum("BTK,KD->BTD", heads.astype(kernel.dtype), kernel.reshape(-1, kernel.shape[-1]))
        if self.bias is not None:
            y = y + self.bias[...]
        return y


def use_out_in(module, x: jax.Array) -> bool:
    """Whether to multiply x [..., in] by the module's output-first kernel: held (`with_cpu_layout`)
    and x has more than one row. One row (batch-1 decode) stays on the [in, out] kernel: measured
    over whole V2-Lite-shaped decode steps, that was faster (11.2 / 9.7 against 8.0 / 8.3 tok/s)."""
    return module.kernel_out_in is not None and math.prod(x.shape[:-1]) > 1


def with_cpu_layout(model: nnx.Module) -> nnx.Module:
    """A view of `model` (sharing its arrays) whose float32 projections also hold their kernels
    output-first (what `generate` runs with on CPUs; used for more than one row, `use_out_in`).

    XLA:CPU multiplies a few rows by an [in, out] kernel far below memory speed once there is more
    than one row; by the same kernel held [out, in] it does not (2026-11-30, one 2-core CPU:
    lm_head-sized [2048, 102400] by 8 rows, 533 ms against 161 ms; V2-Lite-shaped batch-8 decode
    14.8 -> 22.4 tok/s in bench/generate.py). Extra memory: those kernels' size again. Quantized and
    non-float32 kernels keep their one layout.
    """
    view = nnx.merge(*nnx.split(model))
    for _, module in nnx.iter_graph(view):
        if type(module) not in (Linear, OutProj) or module.quant is not None:
            continue
        kernel = module.kernel[...]
        if kernel.dtype != jnp.float32:
            continue
        if isinstance(module, Linear):  # [..., in, *out] -> [..., *out, in] (a leading L when stacked)
            out_in = jnp.moveaxis(kernel, kernel.ndim - 1 - len(module.out_shape), -1)
        else:  # [..., N, H, D] -> [..., D, N*H]
            out_in = jnp.swapaxes(kernel.reshape(*kernel.shape[:-3], -1, kernel.shape[-1]), -1, -2)
        module.kernel_out_in = CpuLayout(out_in)
    return view


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
    """Gated feed-forward: down(act(gate(x)) * up(x)), SwiGLU with every DeepSeek release's
    act="silu" (mla_jax/ops/activations.py). Dense layers and shared experts."""

    def __init__(self, dim: int, hidden: int, *, bias: bool = False, act: str = "silu", param_dtype=jnp.float32,
                 rngs: nnx.Rngs):
        activation(act)  # an unknown name fails at construction
        self.act = act
        kw = dict(bias=bias, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = Linear(dim, hidden, **kw)
        self.up_proj = Linear(dim, hidden, **kw)
        self.down_proj = Linear(hidden, dim, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down_proj(activation(self.act)(self.gate_proj(x)) * self.up_proj(x))


def param_count(tree) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))
