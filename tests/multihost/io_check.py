"""Run by tests/multihost/test_mh_io.py as each of two processes of one jax.distributed job (CPU
collectives, 2 host devices each, so a 4-device mesh spans both): checkpoint reading and writing
from every process. Prints one JSON line per result, prefixed "RESULT ".

Usage (through tests/multihost/launch.py, which gives each process its job): io_check.py WORKDIR GROUP
WORKDIR holds what the test prepared: `chunked/` and `unchunked/` (one tiny model saved twice),
`damaged/` (a copy of chunked/ with one weight file altered) and `data.jsonl`. GROUP is "io" (reads,
a sharded save, a run checkpoint) or "finetune" (a run on the mesh stopped after one step and resumed).
"""

import json
import os
import sys

from mla_jax import parallel

parallel.initialize()  # the job from $MLA_JAX_*, before anything touches a device

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import mla_jax  # noqa: E402
from mla_jax.training.checkpointing import RunCheckpoints  # noqa: E402

workdir, group = sys.argv[1], sys.argv[2]
process_id = jax.process_index()
# every weight with a model dimension split 4 ways: 2 of the shards in each process
MESH = parallel.make_mesh("fsdp=4")


def report(name: str, **values) -> None:
    print("RESULT " + json.dumps({"case": name, "process": process_id, **values}), flush=True)


def io_counter(field: str) -> int:
    """/proc/self/io `rchar` (bytes read through read(2)/pread(2)) or `wchar`, every thread included."""
    with open("/proc/self/io") as f:
        return int(next(line for line in f if line.startswith(field + ":")).split()[1])


def counted_load(path: str, verify: bool = False) -> tuple[int, nnx.Module]:
    before = io_counter("rchar")
    model = mla_jax.load(path, "float32", MESH, verify=verify)
    jax.block_until_ready(jax.tree.leaves(nnx.state(model)))
    return io_counter("rchar") - before, model


def same_shards(a: jax.Array, b: jax.Array) -> bool:
    """Same layout, and every shard this process holds equal."""
    return a.sharding == b.sharding and all(
        np.array_equal(np.asarray(x.data), np.asarray(y.data)) for x, y in zip(a.addressable_shards, b.addressable_shards))


def io_cases() -> None:
    counted_load(os.path.join(workdir, "chunked"))  # first load: imports and orbax set-up, not counted
    for name in ("unchunked", "chunked"):
        nbytes, model = counted_load(os.path.join(workdir, name))
        report("read", layout=name, bytes=nbytes)
    report("read", layout="chunked, verified", bytes=counted_load(os.path.join(workdir, "chunked"), verify=True)[0])
    try:
        mla_jax.load(os.path.join(workdir, "damaged"), "float32", MESH)
        report("damaged", error=None)
    except mla_jax.store.CheckpointError as e:
        report("damaged", error=str(e))

    # Sharded save: each process writes the shards it holds; process 0 alone stages and publishes.
    before, read_before = io_counter("wchar"), io_counter("rchar")
    path = mla_jax.save(model, os.path.join(workdir, "saved_by_job"), chunk_bytes=64 << 10)
    report("save", path=path, written=io_counter("wchar") - before, read=io_counter("rchar") - read_before,
           exists=os.path.isfile(os.path.join(path, "config.json")))

    # A run checkpoint of a sharded state (the weights, a replicated step): saved, then restored
    # into the same layout by both processes.
    state = {"params": {".".join(map(str, p)): v.get_value() for p, v in nnx.iter_graph(model)
                        if isinstance(v, nnx.Variable)},
             "step": jax.device_put(np.int32(3), parallel.rules.replicated(MESH))}
    ckpts = RunCheckpoints(os.path.join(workdir, "run_checkpoints"), keep=2)
    ckpts.save(3, state, {"data_position": 12})
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
    before = io_counter("rchar")
    restored, meta = ckpts.restore(3, target)
    jax.block_until_ready(restored)
    read = io_counter("rchar") - before
    ckpts.close()
    report("run_checkpoint", read=read, meta=meta,
           same=all(jax.tree.leaves(jax.tree.map(same_shards, restored, state))))


def finetune_case() -> None:
    from mla_jax.training.loop import finetune

    from test_mh_io import FINETUNE  # noqa: E402  (the test's train config)

    quiet = dict(progress=False, log=lambda *_: None, mesh=MESH)
    args = (os.path.join(workdir, "chunked"), os.path.join(workdir, "data.jsonl"), os.path.join(workdir, "run"), FINETUNE)
    stopped = finetune(*args, stop_after=1, **quiet)
    resumed = finetune(*args, resume=True, **quiet)
    report("finetune", stopped=stopped["steps_done"], done=resumed["steps_done"], model=resumed.get("model"),
           losses=[r["loss"] for r in resumed["records"]])


HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [HERE, os.path.dirname(HERE)]  # the test module (FINETUNE) and what it imports
{"io": io_cases, "finetune": finetune_case}[group]()
