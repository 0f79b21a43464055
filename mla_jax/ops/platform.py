"""Which platform a computation is compiled for, read in one place.

Implementation choices follow the *target*, not the host: a CPU-only process that compiles for an
H100 (`jax.jit(f).trace(...).lower().compile()` over GPU topology devices) must pick the GPU
implementations, although `jax.default_backend()` is "cpu" there. Two mechanisms, in this order:

1. `MLA_JAX_PLATFORM=gpu|cpu|tpu` in the environment decides everywhere, at trace time.
2. Otherwise `by_platform` stages both branches with `jax.lax.platform_dependent`, and the lowering
   keeps only the branch of the platform it lowers for.

Model code never asks `jax.default_backend()` itself; it calls `by_platform` (or `forced()`).
"""

from __future__ import annotations

import os
from typing import Any, Callable

import jax

ENV = "MLA_JAX_PLATFORM"
PLATFORMS = ("gpu", "cpu", "tpu")


def forced() -> str | None:
    """The platform named by $MLA_JAX_PLATFORM, or None when it is unset (choose at lowering)."""
    value = os.environ.get(ENV, "").strip().lower()
    if not value:
        return None
    if value == "cuda":
        value = "gpu"
    if value not in PLATFORMS:
        raise ValueError(f"${ENV}={os.environ[ENV]!r}: expected one of {', '.join(PLATFORMS)} (or unset)")
    return value


def by_platform(*args: Any, gpu: Callable | None = None, default: Callable) -> Any:
    """`gpu(*args)` when compiled for a CUDA GPU, `default(*args)` for anything else.

    Both branches must return the same shapes and dtypes (they are traced together unless the
    platform is forced by the environment).
    """
    chosen = forced()
    if gpu is None or chosen is not None:
        return (gpu if chosen == "gpu" and gpu is not None else default)(*args)
    return jax.lax.platform_dependent(*args, cuda=gpu, default=default)
