"""Checkpoint I/O in a two-process jax.distributed job on localhost (tests/multihost/io_check.py):
each process reads only its own shards of a checkpoint; `mla_jax.save` from a mesh that spans both
processes writes each process's shards from that process; run checkpoints of a sharded state save
and restore in both; a fine-tuning run on that mesh stops and resumes (slow).

One pair of processes runs every case; the model is tiny, so the storage chunks are made small
too (`chunk_bytes` 64 KiB: chunks of 4-64 KiB) to give its weights several chunks each, as a real
model's weights have (16 MiB: chunks of 1-16 MiB). Far smaller chunks would not do: every chunk adds
an entry to orbax's index (its OCDBT b-tree), which readers read too; in chunks of 256 B - 4 KiB this
model's files came to 4.3 MB for 1.8 MB of weights.
"""

import json
import math
import os
import shutil

import jax
import numpy as np
import pytest

import mla_jax
from mla_jax import Config, store
from mla_jax.training.checkpointing import RunCheckpoints
from mla_jax.training.config import TrainConfig
from mla_jax.weights import abstract_model, model_variables
from multihost.launch import launch

HERE = os.path.dirname(os.path.abspath(__file__))
# Every weight with a model dimension splits over fsdp=4 (D=128); big enough that the weights, not
# orbax's metadata, are most of what a load reads.
CONFIG = Config.preset("deepseek-v3").replace(
    num_hidden_layers=2, vocab_size=256, hidden_size=128, intermediate_size=256, moe_intermediate_size=64,
    num_attention_heads=4, kv_lora_rank=32, q_lora_rank=48, qk_nope_head_dim=16, qk_rope_head_dim=8,
    v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=2, topk_group=1,
    first_k_dense_replace=1, max_position_embeddings=128)
CHUNK_BYTES = 64 << 10
FINETUNE = TrainConfig(steps=2, seq_len=16, batch_size=4, lr=1e-2, warmup_steps=0, param_dtype="float32",
                       save_every=1, keep=2, log_every=100)


def random_model(seed: int = 0):
    """CONFIG's model with random weights set straight from numpy (building it eagerly takes far longer)."""
    model = abstract_model(CONFIG, np.float32)
    rng = np.random.default_rng(seed)
    for _, var in model_variables(model):
        var.set_value(rng.standard_normal(var.shape).astype(var.dtype) * 0.05)
    return model


def run_pair(*args: str, timeout: int = 600) -> list[dict]:
    """io_check.py ARGS as the two processes of one job; the RESULT lines both printed."""
    # Without the test run's persistent compilation cache: reading its entries would count as reads.
    procs = launch([os.path.join(HERE, "io_check.py"), *args], python=True, num_processes=2, devices_per_process=2,
                   timeout=timeout, env={"JAX_COMPILATION_CACHE_DIR": None})
    return [json.loads(line[len("RESULT "):]) for p in procs for line in p.out.splitlines()
            if line.startswith("RESULT ")]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One model saved twice, in small chunks and whole, and a little pre-tokenized data."""
    work = tmp_path_factory.mktemp("mh_io")
    model = random_model()
    mla_jax.save(model, work / "chunked", chunk_bytes=CHUNK_BYTES)
    mla_jax.save(model, work / "unchunked", chunk_bytes=1 << 40)
    shutil.copytree(work / "chunked", work / "damaged")
    damaged = max((f for f in (work / "damaged" / store.STATE_DIR).rglob("*") if f.is_file()), key=lambda f: f.stat().st_size)
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF
    damaged.write_bytes(bytes(data))
    rng = np.random.default_rng(0)
    (work / "data.jsonl").write_text("".join(json.dumps({"input_ids": rng.integers(2, 256, size=int(n)).tolist()}) + "\n"
                                             for n in rng.integers(5, 40, size=12)))
    return work


@pytest.fixture(scope="module")
def job(workdir):
    """The two processes' results for the "io" group of io_check.py."""
    return {"dir": workdir, "results": run_pair(str(workdir), "io")}


def weight_bytes(path) -> int:
    """Bytes of the checkpoint's weight files (what mla_jax.json records for every file under state/)."""
    return sum(entry["size"] for entry in store.read_layout(path)["files"].values())


def model_bytes(path) -> int:
    """Bytes of the weights themselves (the files add orbax's metadata and, per chunk, an index entry)."""
    return sum(math.prod(shape) * store.dtype_named(dtype).itemsize
               for shape, dtype in store.stored_variables(store.read_layout(path)).values())


def reads(results, layout: str) -> dict[int, int]:
    return {r["process"]: r["bytes"] for r in results if r["case"] == "read" and r["layout"] == layout}


def test_each_process_reads_about_half_of_a_chunked_checkpoint(job):
    total = model_bytes(job["dir"] / "chunked")
    per_process = reads(job["results"], "chunked")
    assert sorted(per_process) == [0, 1]
    for process, nbytes in per_process.items():
        assert 0.4 * total < nbytes < 0.6 * total, (process, nbytes, total)


def test_verifying_checksums_is_shared_out_among_the_processes(job):
    """With `verify` (the default) the job reads every weight file once for its checksum, the
    files shared out among the processes: the extra bytes both read add up to one checkpoint, not
    one per process. (How evenly depends on file sizes: this tiny one has a few files, one big.)"""
    total = weight_bytes(job["dir"] / "chunked")
    plain, verified = reads(job["results"], "chunked"), reads(job["results"], "chunked, verified")
    extra = sum(verified[p] - plain[p] for p in (0, 1))
    assert 0.85 * total < extra < 1.2 * total, (verified, plain, total)


def test_a_damaged_file_stops_the_load_in_every_process(job):
    errors = {r["process"]: r["error"] for r in job["results"] if r["case"] == "damaged"}
    assert sorted(errors) == [0, 1]
    assert all(e is not None and "damaged" in e and "/damaged/state/" in e for e in errors.values()), errors


def test_whole_chunks_make_every_process_read_everything(job):
    """The check above can fail: stored in one chunk per array, each shard read reads the array."""
    total = model_bytes(job["dir"] / "unchunked")
    for process, nbytes in reads(job["results"], "unchunked").items():
        assert nbytes > 0.9 * total, (process, nbytes, total)


def test_a_save_from_both_processes_loads_in_one(job):
    saved = mla_jax.load(job["dir"] / "saved_by_job", "float32")
    expected = dict(model_variables(random_model()))
    for path, var in model_variables(saved):
        np.testing.assert_array_equal(np.asarray(var.get_value()), np.asarray(expected[path].get_value()),
                                      err_msg=".".join(map(str, path)))


def test_each_process_wrote_its_own_shards(job):
    """Both processes wrote about half of the weights (orbax's per-process databases hold them) and
    read back only what they wrote to checksum it; both returned once the checkpoint was published."""
    saves = {r["process"]: r for r in job["results"] if r["case"] == "save"}
    assert sorted(saves) == [0, 1] and all(r["exists"] for r in saves.values())
    total = model_bytes(job["dir"] / "saved_by_job")
    for process, r in saves.items():
        assert 0.3 * total < r["written"] < 0.7 * total, (process, r["written"], total)
        assert r["read"] < 0.75 * total, (process, r["read"], total)
    layout = store.read_layout(job["dir"] / "saved_by_job")
    assert any("/ocdbt.process_1/" in f for f in layout["files"]), sorted(layout["files"])[:20]


def test_run_checkpoint_of_a_sharded_state_restores_in_both_processes(job):
    runs = {r["process"]: r for r in job["results"] if r["case"] == "run_checkpoint"}
    assert sorted(runs) == [0, 1]
    assert all(r["same"] and r["meta"] == {"data_position": 12} for r in runs.values())


def test_run_checkpoint_restores_in_one_process_and_each_process_read_its_half(job):
    ckpts = RunCheckpoints(job["dir"] / "run_checkpoints", keep=2)
    expected = {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in model_variables(random_model())}
    target = {"params": {n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in expected.items()},
              "step": jax.ShapeDtypeStruct((), np.int32)}
    state, _ = ckpts.restore(3, target)
    ckpts.close()
    assert int(state["step"]) == 3
    for name, value in expected.items():
        np.testing.assert_array_equal(np.asarray(state["params"][name]), value, err_msg=name)
    step_bytes = sum(f.stat().st_size for f in (job["dir"] / "run_checkpoints" / "3").rglob("*") if f.is_file())
    for r in job["results"]:
        if r["case"] == "run_checkpoint":
            assert r["read"] < 0.7 * step_bytes, (r["process"], r["read"], step_bytes)


@pytest.mark.slow
def test_finetune_on_a_two_process_mesh_stops_and_resumes_as_one_process_runs(workdir, tmp_path):
    """Stopped after step 1 and resumed from its checkpoint, the run on the mesh of both processes
    ends where the uninterrupted single-process run ends."""
    from mla_jax.training.loop import finetune

    results = run_pair(str(workdir), "finetune")
    whole = finetune(workdir / "chunked", workdir / "data.jsonl", tmp_path / "whole", FINETUNE, progress=False,
                     log=lambda *_: None)
    runs = {r["process"]: r for r in results if r["case"] == "finetune"}
    assert sorted(runs) == [0, 1] and all((r["stopped"], r["done"]) == (1, 2) for r in runs.values())
    np.testing.assert_allclose([r["loss"] for r in whole["records"]], runs[0]["losses"], rtol=1e-5)
    on_mesh, alone = mla_jax.load(runs[0]["model"], "float32"), mla_jax.load(whole["model"], "float32")
    expected = dict(model_variables(alone))
    for path, var in model_variables(on_mesh):
        a, b = np.asarray(var.get_value()), np.asarray(expected[path].get_value())
        assert np.linalg.norm(a - b) <= 1e-5 * max(np.linalg.norm(b), 1e-30), path
