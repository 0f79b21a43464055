"""The shipped tiny V3 checkpoint: the demo passes on it, and it is exactly what make_tiny builds."""

import json
import os

import numpy as np
import pytest

from checkpoints.make_tiny import SHIPPED, make
from mla_jax.cli import main


def test_demo_checks_logits_and_prints_cache_sizes(capsys):
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "expanded attention vs transformers' logits" in out and "[ok" in out and "FAIL" not in out
    assert "deepseek-v3             70,272 B     4,997,120 B" in out  # 61 x 576 x 2 vs 61 x 40960 x 2
    assert "cache measured from its arrays: 288 B/token (= 3 layers x (32 + 16) x 2 B: ok)" in out


def test_demo_fails_loudly_when_reference_disagrees(tmp_path, capsys):
    import shutil

    copy = tmp_path / "tiny"
    shutil.copytree(SHIPPED, copy)
    ref = dict(np.load(copy / "reference_logits.npz"))
    ref["logits"] = ref["logits"] * 1.01
    np.savez(copy / "reference_logits.npz", **ref)
    assert main(["demo", "--path", str(copy)]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_regenerating_gives_the_shipped_files(tmp_path):
    """Weights, config fields, tokenizer and reference logits are rebuilt exactly.

    Compared by meaning, not bytes: a new transformers or tokenizers release stamps its own version
    into config.json and may order or format the JSON differently, which changes nothing we use.
    """
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from safetensors.numpy import load_file

    made_with = json.load(open(os.path.join(SHIPPED, "provenance.json")))["torch"]
    if torch.__version__ != made_with:
        pytest.skip(f"shipped files were made with torch {made_with}; random init differs across versions")
    out = tmp_path / "tiny_v3"
    make(str(out))

    def config(directory):
        fields = json.load(open(os.path.join(directory, "config.json")))
        fields.pop("transformers_version", None)  # the writer's version stamp, not a model property
        return fields

    assert config(out) == config(SHIPPED)
    fresh_w, shipped_w = load_file(out / "model.safetensors"), load_file(os.path.join(SHIPPED, "model.safetensors"))
    assert sorted(fresh_w) == sorted(shipped_w)
    for name, value in shipped_w.items():
        assert fresh_w[name].dtype == value.dtype and fresh_w[name].shape == value.shape, name
        np.testing.assert_array_equal(fresh_w[name], value, err_msg=name)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        assert json.load(open(out / name)) == json.load(open(os.path.join(SHIPPED, name))), name
    fresh, shipped = np.load(out / "reference_logits.npz"), np.load(os.path.join(SHIPPED, "reference_logits.npz"))
    np.testing.assert_array_equal(fresh["tokens"], shipped["tokens"])
    # transformers' float32 logits: releases reorder reductions (5.23 -> 5.24 moved them by ~2e-6),
    # so they agree to float32 rounding, not bit for bit; the demo's bound on us is 1e-4.
    scale = np.abs(shipped["logits"]).max()
    assert np.abs(fresh["logits"] - shipped["logits"]).max() <= 1e-5 * scale
