import os
import sys

# Tests run on the CPU; 4 host devices let the sharding tests build a small mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# GPU interpret mode runs each simulated warpgroup as an XLA:CPU computation that holds a client
# thread while it waits on a barrier; XLA sizes that pool from $NPROC (default: the core count), so
# on a 2-core machine the kernel tests can deadlock. It must be set before any backend starts,
# hence here, ahead of every test module's import.
os.environ.setdefault("NPROC", "8")
sys.path.insert(0, os.path.dirname(__file__))
