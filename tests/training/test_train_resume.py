"""A run stopped at step k and resumed reproduces the uninterrupted run exactly; its result loads."""

import dataclasses
import json

import jax
import numpy as np
import pytest
from flax import nnx

from mla_jax.weights import load
from mla_jax.training.config import TrainConfig
from mla_jax.training.loop import RunError, finetune, read_metrics
from train_helpers import tiny_model

STEPS, STOP = 6, 3
TC = TrainConfig(steps=STEPS, seq_len=16, batch_size=2, grad_accum=2, lr=1e-2, warmup_steps=2,
                 param_dtype="float32", bias_update_speed=0.01, save_every=2, keep=2, log_every=100)
FIELDS = ["step", "loss", "aux_loss", "lr", "tokens_per_s", "expert_load_max_over_mean"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    rng = np.random.default_rng(0)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps({"input_ids": rng.integers(2, 64, size=int(n)).tolist()}) + "\n"
                            for n in rng.integers(5, 40, size=12)))
    model = tiny_model()
    quiet = dict(progress=False, log=lambda *_: None)
    whole = finetune(model, data, root / "whole", TC, **quiet)
    finetune(model, data, root / "split", TC, stop_after=STOP, **quiet)
    stopped = read_metrics(str(root / "split" / "metrics.jsonl"))
    resumed = finetune(model, data, root / "split", TC, resume=True, **quiet)
    return root, data, model, whole, stopped, resumed


def _losses(records):
    return [(r["step"], r["loss"], r["aux_loss"], r["expert_load_max_over_mean"], r["grad_norm"]) for r in records]


def test_resumed_run_reproduces_the_uninterrupted_metrics_exactly(runs):
    root, *_ = runs
    whole = read_metrics(str(root / "whole" / "metrics.jsonl"))
    split = read_metrics(str(root / "split" / "metrics.jsonl"))
    assert _losses(split) == _losses(whole) and len(whole) == STEPS


def test_stopped_run_ends_at_its_step(runs):
    *_, stopped, _ = runs
    assert [r["step"] for r in stopped] == list(range(1, STOP + 1))


def test_every_metrics_line_has_the_documented_fields(runs):
    root, *_ = runs
    records = read_metrics(str(root / "whole" / "metrics.jsonl"))
    assert all(set(FIELDS) <= set(r) for r in records)


def test_resumed_result_equals_the_uninterrupted_result(runs):
    *_, whole, _, resumed = runs
    a, b = load(whole["model"], dtype="float32"), load(resumed["model"], dtype="float32")
    same = jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), nnx.state(a), nnx.state(b))
    assert jax.tree.all(same)


def test_result_loads_with_the_trained_weights(runs):
    *_, whole, _, _ = runs
    trained = load(whole["model"], dtype="float32")
    bias = np.asarray(trained.stacks[1].mlp.e_score_correction_bias[...])
    # 6 bias updates of ±0.01 (or 0) from 0: a multiple of 0.01, and not all zero
    assert np.allclose(bias * 100, np.round(bias * 100), atol=1e-4) and np.any(bias != 0)


def test_fresh_run_into_an_existing_run_is_refused(runs):
    root, data, model, *_ = runs
    with pytest.raises(RunError, match="already holds a fine-tuning run; resume continues it, overwrite starts it again"):
        finetune(model, data, root / "whole", TC, progress=False, log=lambda *_: None)


def test_resume_with_another_config_is_refused(runs):
    root, data, model, *_ = runs
    other = dataclasses.replace(TC, lr=2e-2)
    with pytest.raises(RunError, match="lr: run has 0.01, now 0.02"):
        finetune(model, data, root / "whole", other, resume=True, progress=False, log=lambda *_: None)


def test_resume_from_an_earlier_checkpoint_reproduces_the_run(runs, tmp_path):
    root, data, model, *_ = runs
    out = tmp_path / "again"
    quiet = dict(progress=False, log=lambda *_: None)
    finetune(model, data, out, TC, stop_after=5, **quiet)  # saves 2, 4, 5; keeps the last 2: 4, 5
    finetune(model, data, out, TC, resume=4, **quiet)
    whole = read_metrics(str(root / "whole" / "metrics.jsonl"))
    assert _losses(read_metrics(str(out / "metrics.jsonl"))) == _losses(whole)


def test_lora_run_resumes_exactly(runs, tmp_path):
    _, data, model, *_ = runs
    lora = dataclasses.replace(TC, steps=4, lora_rank=4, save_every=10)
    quiet = dict(progress=False, log=lambda *_: None, save_model=False)
    finetune(model, data, tmp_path / "whole", lora, **quiet)
    finetune(model, data, tmp_path / "split", lora, stop_after=2, **quiet)
    finetune(model, data, tmp_path / "split", lora, resume=True, **quiet)
    whole, split = (read_metrics(str(tmp_path / d / "metrics.jsonl")) for d in ("whole", "split"))
    assert _losses(split) == _losses(whole)
