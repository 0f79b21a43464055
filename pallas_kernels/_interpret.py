"""Version-dependent bits of Pallas Mosaic GPU, kept in one place.

Everything here exists because an API moved between jax 0.10.x and 0.11.x, or
because GPU interpret mode (the CPU simulator of Mosaic GPU kernels) does not
implement a primitive that the compiled kernel uses.  Kernels import these
helpers instead of touching `jax._src` or version-specific names themselves.
"""

from __future__ import annotations

import functools

import jax
from jax import lax
import jax.experimental.pallas.mosaic_gpu as plgpu


@functools.cache
def interpret_params_class() -> type:
  """The class of the `interpret=` argument that selects GPU interpret mode."""
  cls = getattr(plgpu, "InterpretGPUParams", None)  # public in newer jax
  if cls is None:
    from jax._src.pallas.mosaic_gpu.interpret import params  # jax 0.10.x

    cls = params.InterpretGPUParams
  return cls


def gpu_interpret_params(**kwargs):
  """An `InterpretGPUParams(...)` instance, whatever the jax version.

  Uninitialised shared memory and kernel outputs are filled with NaN, so any
  element a kernel forgets to write poisons the result.
  """
  kwargs.setdefault("uninitialized_memory", "nan")
  return interpret_params_class()(**kwargs)


def min_host_threads() -> int:
  """Host threads XLA:CPU needs so that GPU interpret mode cannot deadlock.

  Interpret mode runs every simulated warpgroup of a CTA as its own XLA:CPU
  computation on its own Python thread; a warpgroup blocked on a barrier holds
  one of XLA:CPU's client threads.  That pool has one thread per core (or
  `$NPROC`), so on a 2-core machine the three warpgroups of the MLA kernel can
  starve each other.  Set `NPROC` to at least this before jax starts its CPU
  backend (tests do it in their conftest).
  """
  return 8


def reset_interpret_state() -> None:
  """Resets the simulator after a kernel raised inside GPU interpret mode."""
  try:
    from jax._src.pallas.mosaic_gpu.interpret import interpret_pallas_call as ipc
  except ImportError:  # pragma: no cover - layout changed again
    return
  reset = getattr(ipc, "reset_gpu_interpret_mode_state", None)
  if reset is not None:
    reset()


def transposed(ref):
  """A 2-D SMEM ref viewed transposed (a K-major wgmma operand).

  `plgpu.transpose_ref` is deprecated in 0.11; `Ref.transpose` exists in both.
  """
  return ref.transpose((1, 0))


def layout_cast(x, layout, *, interpret: bool):
  """`plgpu.layout_cast`, which GPU interpret mode cannot evaluate."""
  return x if interpret else plgpu.layout_cast(x, layout)


def iota(shape, dimension: int, layout, *, interpret: bool):
  """int32 iota in a register layout (plain iota under interpret mode)."""
  if interpret:
    return lax.broadcasted_iota(jax.numpy.int32, shape, dimension)
  return plgpu.broadcasted_iota(jax.numpy.int32, shape, dimension, layout=layout)


def has_sm90_gpu() -> bool:
  """True when the default backend is a CUDA GPU of compute capability >= 9.0."""
  try:
    dev = jax.devices()[0]
  except RuntimeError:  # pragma: no cover
    return False
  if dev.platform != "gpu":
    return False
  cc = getattr(dev, "compute_capability", None)
  try:
    return cc is not None and float(cc) >= 9.0
  except (TypeError, ValueError):  # pragma: no cover
    return False


def load_vector(ref, layout, *, interpret: bool):
  """A 1-D SMEM ref loaded into registers in `layout` (plain load when interpreted)."""
  if interpret:
    return ref[...]
  return plgpu.load(ref, (), layout=layout)
