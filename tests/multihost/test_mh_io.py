"""Checkpoint I/O in a two-process jax.distributed job on localhost (tests/multihost/io_check.py):
each process reads only its own shards of a checkpoint, and `mla_jax.save` from a mesh that spans
both processes writes each process's shards from that process.

One pair of processes runs every case; the model is tiny, so the storage chunks are made tiny
too (`chunk_bytes`) to give its weights several chunks each, as a real model's weights have.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

import mla_jax
from mla_jax import Config, store
from mla_jax.weights import abstract_model, model_variables

HERE = os.path.dirname(os.path.abspath(__file__))
# Every weight with a model dimension splits over fsdp=4 (D=128); big enough that the weights, not
# orbax's metadata, are most of what a load reads.
CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=2, vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=128)
CHUNK_BYTES = 4 << 10


def random_model(seed: int = 0):
    """CONFIG's model with random weights set straight from numpy (building it eagerly takes far longer)."""
    model = abstract_model(CONFIG, np.float32)
    rng = np.random.default_rng(seed)
    for _, var in model_variables(model):
        var.set_value(rng.standard_normal(var.shape).astype(var.dtype) * 0.05)
    return model


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def run_pair(script: str, *args: str, timeout: int = 240) -> list[dict]:
    """Runs `script PROCESS_ID PORT *args` as processes 0 and 1 of one job; their RESULT lines."""
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(HERE)), env.get("PYTHONPATH", "")])
    procs = [subprocess.Popen([sys.executable, os.path.join(HERE, script), str(i), port, *args], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=timeout))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for i, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"process {i} exited with {p.returncode}:\n{out}\n{err[-4000:]}"
    return [json.loads(line[len("RESULT "):]) for out, _ in outs for line in out.splitlines()
            if line.startswith("RESULT ")]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    """The two processes' results, after the test saved one model twice: in small chunks and whole."""
    work = tmp_path_factory.mktemp("mh_io")
    model = random_model()
    mla_jax.save(model, work / "chunked", chunk_bytes=CHUNK_BYTES)
    mla_jax.save(model, work / "unchunked", chunk_bytes=1 << 40)
    results = run_pair("io_check.py", str(work))
    return {"dir": work, "results": results}


def weight_bytes(path) -> int:
    """Bytes of the checkpoint's weight files (what mla_jax.json records for every file under state/)."""
    return sum(entry["size"] for entry in store.read_layout(path)["files"].values())


def reads(results, layout: str) -> dict[int, int]:
    return {r["process"]: r["bytes"] for r in results if r["case"] == "read" and r["layout"] == layout}


def test_each_process_reads_about_half_of_a_chunked_checkpoint(job):
    total = weight_bytes(job["dir"] / "chunked")
    per_process = reads(job["results"], "chunked")
    assert sorted(per_process) == [0, 1]
    for process, nbytes in per_process.items():
        assert 0.4 * total < nbytes < 0.6 * total, (process, nbytes, total)


def test_whole_chunks_make_every_process_read_everything(job):
    """The check above can fail: stored in one chunk per array, each shard read reads the array."""
    total = weight_bytes(job["dir"] / "unchunked")
    for process, nbytes in reads(job["results"], "unchunked").items():
        assert nbytes > 0.9 * total, (process, nbytes, total)


def test_a_save_from_both_processes_loads_in_one(job):
    saved = mla_jax.load(job["dir"] / "saved_by_job", "float32")
    expected = dict(model_variables(random_model()))
    for path, var in model_variables(saved):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(expected[path].get_value()),
                                      err_msg=".".join(map(str, path)))


def test_each_process_wrote_its_own_shards(job):
    """Both processes wrote about half of the weights (orbax's per-process databases hold them), and
    both returned only once the checkpoint was published."""
    saves = {r["process"]: r for r in job["results"] if r["case"] == "save"}
    assert sorted(saves) == [0, 1] and all(r["exists"] for r in saves.values())
    total = weight_bytes(job["dir"] / "saved_by_job")
    for process, r in saves.items():
        assert 0.3 * total < r["written"] < 0.7 * total, (process, r["written"], total)
    layout = store.read_layout(job["dir"] / "saved_by_job")
    assert any("/ocdbt.process_1/" in f for f in layout["files"]), sorted(layout["files"])[:20]
