"""Run by tests/multihost/test_mh_io.py as each of two processes of one jax.distributed job (CPU
collectives, 2 host devices each, so a 4-device mesh spans both): checkpoint reading and writing
from every process. Prints one JSON line per result, prefixed "RESULT ".

Usage: python tests/multihost/io_check.py PROCESS_ID PORT WORKDIR
WORKDIR holds what the test prepared: `chunked/` and `unchunked/`, one tiny model saved twice.
"""

import json
import os
import sys

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

process_id, port, workdir = int(sys.argv[1]), sys.argv[2], sys.argv[3]
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(f"localhost:{port}", num_processes=2, process_id=process_id)

from flax import nnx  # noqa: E402

import mla_jax  # noqa: E402
from mla_jax import parallel  # noqa: E402


def report(name: str, **values) -> None:
    print("RESULT " + json.dumps({"case": name, "process": process_id, **values}), flush=True)


def bytes_read() -> int:
    """Bytes this process has read through read(2)/pread(2) so far, every thread included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("rchar:")).split()[1])


def bytes_written() -> int:
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith("wchar:")).split()[1])


def timed_load(path: str, mesh) -> tuple[int, object]:
    before = bytes_read()
    model = mla_jax.load(path, "float32", mesh, verify=False)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return bytes_read() - before, model


mesh = parallel.make_mesh("fsdp=4")  # every weight with a model dimension split 4 ways: 2 shards per process
timed_load(os.path.join(workdir, "chunked"), mesh)  # first load: imports and orbax set-up, not counted
for name in ("unchunked", "chunked"):
    nbytes, model = timed_load(os.path.join(workdir, name), mesh)
    report("read", layout=name, bytes=nbytes)

# Sharded save: each process writes the shards it holds; process 0 alone stages and publishes.
before = bytes_written()
path = mla_jax.save(model, os.path.join(workdir, "saved_by_job"), chunk_bytes=4 << 10)
report("save", path=path, written=bytes_written() - before, exists=os.path.isfile(os.path.join(path, "config.json")))
