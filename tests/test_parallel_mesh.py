"""Every preset on an 8-device CPU mesh computes what one device computes, with the collectives it implies.

One subprocess (8 host devices; the other tests run with 4) runs, per case: float32 logits, 16
greedy tokens through the paged cache, and one fine-tuning step (updated weights and metrics),
against the same model on one device, and reads the collectives in the optimized HLO of the
forward pass and of the train step (tests/parallel_mesh_check.py).
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
TOL = 1e-5


def run_cases(cases):
    env = dict(os.environ, PYTHONPATH=os.path.dirname(HERE), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, os.path.join(HERE, "parallel_mesh_check.py"), *cases], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["case"] for r in results] == list(cases)
    return results


def check(r):
    case = r["case"]
    assert r["logits"] <= TOL, case
    assert r["tokens_equal"], case
    assert r["params"] <= TOL, case
    assert max(r["metrics"].values()) <= TOL, (case, r["metrics"])
    axes = {a.split("=")[0] for a in case.split("@")[0].split(",")}
    fwd, step = r["forward"], r["step"]
    if "data" in axes:  # gradients summed over the data replicas
        assert step["all-reduce"] > 0, r
    if "fsdp" in axes:  # weights gathered for use
        assert fwd["all-gather"] > 0 and step["all-gather"] > 0, r
    if "tensor" in axes:  # partial sums over the split heads / hidden reduced
        assert fwd["all-reduce"] + fwd["reduce-scatter"] > 0, r
    if "expert" in axes:  # tokens gathered to the experts, outputs reduce-scattered back (parallel/experts.py)
        assert fwd["all-gather"] > 0 and fwd["reduce-scatter"] > 0, r


def test_a_combination_matches_one_device():
    """fsdp x tensor x expert under Explicit axes (jax's default); every preset alone, under both axis
    types, in the slow test below (the default run keeps one case for CI's time budget)."""
    for r in run_cases(["fsdp=2,tensor=2,expert=2@explicit"]):
        check(r)


@pytest.mark.slow
def test_every_preset_and_axis_type_matches_one_device():
    cases = [f"{m}@{t}" for m in ("data=8", "fsdp=8", "tensor=8", "expert=8", "data=2,tensor=4")
             for t in ("explicit", "auto")]
    for r in run_cases(cases):
        check(r)
