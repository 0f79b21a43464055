"""The feed-forward activations a hub config's `hidden_act` may name, as transformers computes them.

Every DeepSeek release uses "silu" (SwiGLU); transformers' DeepSeek-V2/V3 models apply whatever
`hidden_act` names, in the dense MLP, the shared experts and the routed experts alike, and its own
test configs use "gelu". Names not here are refused by `Config.from_hf`.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def _relu2(x):
    r = jax.nn.relu(x)
    return r * r


def _gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


def _quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),  # erf form
    "gelu_new": _gelu_tanh,  # three names for the tanh form
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu_fast": _gelu_tanh,
    "quick_gelu": _quick_gelu,
    "relu": jax.nn.relu,
    "relu2": _relu2,
    "relu6": jax.nn.relu6,
    "sigmoid": jax.nn.sigmoid,
    "tanh": jnp.tanh,
}


def activation(name: str) -> Callable[[jax.Array], jax.Array]:
    """The function `hidden_act` = name denotes; a ValueError naming the choices for any other name."""
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ValueError(f"hidden_act={name!r}; expected one of {sorted(ACTIVATIONS)}") from None
