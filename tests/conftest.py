import os
import shutil
import sys
import tempfile
from pathlib import Path

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
# subprocess the CLI tests start compile the same tiny programs again and again, and so do tests that
# build a new jitted function for a program compiled before. The settings travel through the
# environment (jax reads JAX_* variables when it is imported), so subprocesses share the cache with no
# code of their own. The thresholds are at zero because the defaults (1 s of compile time) leave out
# nearly every program a tiny model makes. A size limit turns on jax's file lock, so one process never
# reads an entry another is still writing (jax needs the filelock package for it; without it, no cache).
# The directory is new for each run and removed after it: a test that needs a real compile (the sm90
# ptxas report reads what the compiler dumps) never meets an entry from an earlier run.
_OWN_CACHE_DIR: str | None = None


def _start_compilation_cache() -> None:
    global _OWN_CACHE_DIR
    try:
        import filelock  # noqa: F401
    except ImportError:
        return
    _OWN_CACHE_DIR = tempfile.mkdtemp(prefix="mla_jax_test_jit_cache_")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE_DIR, JAX_COMPILATION_CACHE_MAX_SIZE=str(8 << 30),
                      JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")


# The files that take a minute or more of CI time (2 cores), longest first: they start first, and the
# many short files fill in behind them, so neither xdist worker idles at the end of the run. The
# seconds are per-file sums of the 40 slowest CI durations (2026-11-30, a lower bound; the unnumbered
# files have many tests, none in that list). xdist's own order (most tests first) put the README,
# gradient and prefill files, few tests each but minutes long, last on one worker.
# A file missing here only runs later; a stale entry costs balance, never a result.
LONGEST_FIRST = (
    "tests/pallas_kernels/test_mla_decode.py",         # ~250: interpret-mode kernel grid
    "tests/training/test_train_cli_errors.py",         # ~200: CLI subprocesses that train
    "tests/test_parallel_mesh.py",                     # ~180 (lead's estimate): an 8-device subprocess
    "tests/test_readme.py",                            # ~150: every README snippet
    "tests/training/test_train_gradients.py",          # ~135: four configs against torch autograd
    "tests/training/test_train_cli.py",                # ~130: the 300-step demo, stop and resume
    "tests/test_cli.py",                               # CLI subprocesses
    "tests/pallas_kernels/test_mla_decode_poison.py",  # ~120
    "tests/training/test_train_step.py",               # ~110
    "tests/test_generate_api.py",                      # ~100
    "tests/training/test_train_resume.py",             # ~80
    "tests/test_parity.py",
    "tests/multihost/test_launch.py",                  # jax.distributed processes
    "tests/training/test_train_data.py",               # ~60
    "tests/test_moe_dispatch.py",                      # ~60
    "tests/test_moe.py",                               # ~60
    "tests/test_quant.py",                             # ~60
    "tests/checkpoints/test_ckpt_fp8_kept.py",         # ~60
    "tests/training/test_train_remat.py",              # ~50
    "tests/test_generate_text.py",                     # ~50
    "tests/checkpoints/test_ckpt_destination.py",      # ~50
    "tests/test_scan_layers.py",                       # ~45
    "tests/checkpoints/test_ckpt_load.py",             # ~45
    "tests/training/test_train_balance.py",            # ~40
    "tests/test_tiny_checkpoint.py",                   # ~35
    "tests/test_prefill_memory.py",                    # ~30
)


def pytest_collection_modifyitems(session, config, items):
    # Every worker sorts the same collection the same way (xdist checks that they agree); a stable
    # sort keeps each file's tests in their written order.
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    root = config.rootpath
    items.sort(key=lambda item: rank.get(Path(os.path.relpath(item.path, root)).as_posix(), len(rank)))


def pytest_configure(config):
    # xdist's --dist loadfile orders files by their number of tests unless told not to; ours is
    # LONGEST_FIRST (the option exists only where xdist is installed).
    if getattr(config.option, "loadscopereorder", False):
        config.option.loadscopereorder = False
    if not hasattr(config, "workerinput"):  # xdist workers inherit the controller's environment
        _start_compilation_cache()


def pytest_unconfigure(config):
    if _OWN_CACHE_DIR is not None:
        shutil.rmtree(_OWN_CACHE_DIR, ignore_errors=True)
