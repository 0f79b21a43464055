"""`mla-jax finetune`: the demo's loss and expert imbalance fall; a CLI run stops, resumes, loads."""

import argparse
import os

import pytest
from flax import nnx

from mla_jax.config import Config
from mla_jax.weights import load, save
from mla_jax.model import Transformer
from mla_jax.training import cli
from mla_jax.training.demo import CORPUS, tiny_checkpoint_dir
from mla_jax.training.loop import RunError, read_metrics
from train_helpers import TINY_V3


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    args = parser.parse_args(["finetune", *argv, "--no-progress"])
    return args.func(args)


def _mean(records, key):
    return sum(r[key] for r in records) / len(records)


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "run"
    assert _run(["--demo", "--out", str(out)]) == 0
    return out, read_metrics(str(out / "metrics.jsonl"))


@pytest.mark.parametrize("metric", ["loss", "expert_load_max_over_mean"])
def test_demo_metric_falls_over_training(demo, metric):
    _, records = demo
    assert _mean(records[-30:], metric) < _mean(records[:30], metric)


def test_demo_writes_the_loss_curve_and_a_loadable_model(demo):
    out, _ = demo
    model = load(out / "model", dtype="float32")
    assert os.path.getsize(out / "loss.png") > 0 and model.config.n_routed_experts == 8


@pytest.mark.slow
def test_demo_without_the_bias_update_stays_imbalanced(demo, tmp_path):
    _, with_bias = demo
    out = tmp_path / "no_bias"
    _run(["--demo", "--out", str(out), "--bias-update-speed", "0"])
    without = read_metrics(str(out / "metrics.jsonl"))
    assert _mean(without[-30:], "expert_load_max_over_mean") > _mean(with_bias[-30:], "expert_load_max_over_mean") + 0.1


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    config = Config.from_hf({**TINY_V3, "vocab_size": 512})
    save(Transformer(config, rngs=nnx.Rngs(0)), root / "base", tokenizer_from=tiny_checkpoint_dir())
    out = root / "run"
    common = ["--out", str(out)]
    _run(["--ckpt", str(root / "base"), "--data", CORPUS, *common, "--steps", "4", "--seq-len", "32",
          "--batch-size", "2", "--dtype", "float32", "--save-every", "1", "--stop-after", "2"])
    stopped = read_metrics(str(out / "metrics.jsonl"))
    _run([*common, "--resume"])
    return out, stopped, read_metrics(str(out / "metrics.jsonl"))


def test_cli_stops_then_resumes_to_the_end(cli_run):
    _, stopped, finished = cli_run
    assert ([r["step"] for r in stopped], [r["step"] for r in finished]) == ([1, 2], [1, 2, 3, 4])


def test_cli_result_loads_with_its_tokenizer(cli_run):
    out, *_ = cli_run
    model = load(out / "model", dtype="float32")
    assert model.config.vocab_size == 512 and os.path.exists(out / "model" / "tokenizer.json")


def test_cli_result_loads_by_a_relative_path(cli_run, monkeypatch):
    out, *_ = cli_run
    monkeypatch.chdir(out)
    assert load("model", dtype="float32").config.vocab_size == 512


def test_cli_resume_with_another_value_is_refused(cli_run):
    out, *_ = cli_run
    with pytest.raises(RunError, match="lr: run has 0.0001, now 0.5"):
        _run(["--out", str(out), "--resume", "--lr", "0.5"])


def test_finetune_is_a_command_of_mla_jax():
    from mla_jax.cli import COMMAND_MODULES

    assert "mla_jax.training.cli" in COMMAND_MODULES
