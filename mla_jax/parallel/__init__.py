"""Running on several devices: logical axes to mesh axes, meshes, and `plan` (what fits where).

    mesh = parallel.make_mesh("data=2,tensor=4")           # Explicit axes; axis_types="auto" too
    s = parallel.shardings(mesh)                           # .param(name, shape), .cache(cache), .batch(shape)
    model = mla_jax.load(path, mesh=mesh)                  # or parallel.shard_model(model, mesh)

Several processes (hosts): `parallel.initialize()` first in each (coordinator, process count and id as
arguments or $MLA_JAX_COORDINATOR / $MLA_JAX_NUM_PROCESSES / $MLA_JAX_PROCESS_ID); the mesh then
spans every process's devices.
"""

from mla_jax.parallel.launch import initialize, is_main_process
from mla_jax.parallel.mesh import make_mesh, mesh_of, on_mesh, parse_mesh, shard_model
from mla_jax.parallel.rules import LOGICAL_AXES, PARAMS, PRESETS, Shardings, param_axes, shardings

__all__ = ["LOGICAL_AXES", "PARAMS", "PRESETS", "Shardings", "initialize", "is_main_process", "make_mesh",
           "mesh_of", "on_mesh", "param_axes", "parse_mesh", "shard_model", "shardings"]
