"""Run by tests/multihost/test_launch.py in every process of a job: joins it with
`mla_jax.parallel.initialize()` (the job from $MLA_JAX_*), sums each process's id + 1 over a mesh
spanning all processes' devices, and prints one JSON line of what it saw."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from mla_jax import parallel

joined = parallel.initialize()
mesh = jax.make_mesh((jax.device_count(),), ("data",))
sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
mine = np.full((jax.local_device_count(),), jax.process_index() + 1, np.float32)
x = jax.make_array_from_process_local_data(sharding, mine)
total = jax.jit(jnp.sum, out_shardings=jax.sharding.NamedSharding(mesh, jax.P()))(x)
print(json.dumps({"joined": joined, "process": jax.process_index(), "processes": jax.process_count(),
                  "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                  "collectives": jax.config.jax_cpu_collectives_implementation, "sum": float(total),
                  "main": parallel.is_main_process()}))
