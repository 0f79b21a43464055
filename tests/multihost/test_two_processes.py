"""Two processes on localhost, 2 host devices each, one mesh of 4 devices spanning both, compute what
one process computes: `mla_jax.load(path, mesh=...)` of a checkpoint transformers wrote, float32
logits, 16 greedy tokens per prompt and one fine-tuning step (updated weights and metrics), within
1e-5 relative (the bound of tests/test_parallel_mesh.py). And `mla-jax generate` started as each host
would be started (`--coordinator`, `--num-processes`, `--process-id`; here through its `main`, in the
same two processes) prints the one-process text once.

The job runs through tests/multihost/launch.py; each process writes its results (shards gathered
across processes) for this test to compare with the same computation in the test's own process.
"""

import os

import numpy as np
import pytest

from multihost.launch import launch
from multihost.mesh_cases import CLI_BEGIN, CLI_END, compare, compute

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5
PROMPT, NEW = "We hold these truths", 12


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """checkpoints/tiny_v3 (save_pretrained output of transformers) converted by `mla-jax convert`, float32."""
    from checkpoints.convert import convert
    from checkpoints.make_tiny import SHIPPED

    path = tmp_path_factory.mktemp("multihost") / "tiny"
    convert(SHIPPED, path, dtype="float32", progress=False)
    return str(path)


@pytest.fixture(scope="module")
def one_process(checkpoint):
    import mla_jax

    return compute(mla_jax.load(checkpoint, dtype="float32"))


def run_job(checkpoint, out, cases, cli=()):
    """Runs the cases (and `mla-jax generate CLI...`) in a two-process job: ({case: [results of
    process 0, of process 1]}, [what the CLI printed on process 0's stdout, on process 1's])."""
    cli = ["--cli", *cli] if cli else []
    procs = launch([os.path.join(HERE, "mesh_worker.py"), checkpoint, str(out), *cases, *cli], python=True,
                   num_processes=2, devices_per_process=2, timeout=1200)
    printed = [p.out.partition(CLI_BEGIN + "\n")[2].partition(CLI_END)[0] for p in procs]
    return {case: [dict(np.load(out / f"{case}.{i}.npz")) for i in range(2)] for case in cases}, printed


def check(case, per_process, want):
    for i, got in enumerate(per_process):
        errors = compare(got, want)
        assert errors.pop("generated") == 0, (case, i, got["generated"], want["generated"])
        worst = max(errors, key=errors.get)
        assert errors[worst] <= TOL, (case, i, worst, errors[worst])


def one_process_text(checkpoint) -> str:
    """What `mla-jax generate --prompt PROMPT` prints first in one process: the prompt and its continuation."""
    import mla_jax
    from mla_jax.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(checkpoint)
    model = mla_jax.load(checkpoint, dtype="float32")
    new = mla_jax.generate(model, [tokenizer.encode(PROMPT)], NEW, stop_tokens=tokenizer.eos_token_ids,
                           cache_dtype="float32")[0]
    return PROMPT + tokenizer.decode(new) + "\n"


def test_two_processes_load_generate_and_train_as_one_process_and_the_cli_prints_once(checkpoint, one_process,
                                                                                     tmp_path):
    """data=2 spans the processes (tensor=2 inside each); fsdp=4 splits every weight over both. Explicit
    axes. Then `mla-jax generate --mesh data=2,tensor=2` in the same two processes."""
    cases = ["data=2,tensor=2@explicit", "fsdp=4@explicit"]
    cli = ["--ckpt", checkpoint, "--prompt", PROMPT, "--max-new-tokens", str(NEW), "--dtype", "float32",
           "--cache-dtype", "float32", "--mesh", "data=2,tensor=2"]
    results, printed = run_job(checkpoint, tmp_path, cases, cli)
    for case, per_process in results.items():
        check(case, per_process, one_process)
    text, _, stats = printed[0].partition("\n")
    assert text + "\n" == one_process_text(checkpoint)
    assert stats.startswith("prefill: ") and stats.count("\n") == 1, printed[0]  # one stats line
    assert printed[1] == "", printed[1]  # process 1 generates with process 0 and prints nothing


@pytest.mark.slow
def test_every_preset_across_processes_matches_one_process(checkpoint, one_process, tmp_path):
    cases = ["tensor=4@explicit", "expert=4@explicit", "data=4@auto", "fsdp=2,expert=2@auto"]
    for case, per_process in run_job(checkpoint, tmp_path, cases)[0].items():
        check(case, per_process, one_process)
