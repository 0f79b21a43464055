import os
import shutil
import sys
import tempfile

# Tests run on the CPU; 4 host devices let the sharding tests build a small mesh.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# GPU interpret mode runs each simulated warpgroup as an XLA:CPU computation that holds a client
# thread while it waits on a barrier; XLA sizes that pool from $NPROC (default: the core count), so
# on a 2-core machine the kernel tests can deadlock. It must be set before any backend starts,
# hence here, ahead of every test module's import.
os.environ.setdefault("NPROC", "8")
sys.path.insert(0, os.path.dirname(__file__))

# One persistent compilation cache for the whole run: the xdist workers and every `mla-jax`
# subprocess the CLI tests start compile the same tiny programs again and again, and XLA:CPU's
# compile is most of what such a test costs. The settings travel through the environment (jax reads
# JAX_* variables when it is imported), so subprocesses share the cache with no code of their own.
# The thresholds are lowered because the defaults (1 s of compile time) leave out nearly every
# program a tiny model makes. A cache directory given by the caller is used as it is (and kept).
_OWN_CACHE_DIR: str | None = None


def pytest_configure(config):
    global _OWN_CACHE_DIR
    if hasattr(config, "workerinput"):
        return  # an xdist worker: the controller's environment, inherited, already says it all
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="mla_jax_test_jit_cache_")
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _OWN_CACHE_DIR
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
