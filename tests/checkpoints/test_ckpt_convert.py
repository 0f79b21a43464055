"""`convert` then `mla_jax.load` gives transformers' logits, from every storage format a user may hold.

Tiny random V2 and V3 models are saved by transformers (sharded safetensors with an index, one
safetensors file, a per-expert pytorch_model.bin, and the fused-expert state dict torch keeps in
memory), converted in float32, loaded, and run on the same tokens as transformers.
"""

import json
import os

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from checkpoints.convert import convert  # noqa: E402
from checkpoints.state_dict import state_dict  # noqa: E402
from ckpt_helpers import read_all, save_hub, shard_files, write_single  # noqa: E402
from hf_models import hf_logits  # noqa: E402
from mla_jax import store  # noqa: E402
from mla_jax.weights import load  # noqa: E402

# max |ours - theirs| / max |theirs|: the bound, far above float32 rounding (~1e-6 seen).
TOL = 1e-4

CASES = {
    "v2_lite_sharded": ("v2_lite_like", "sharded"),
    "v3_noaux_tc_sharded": ("v3_like_noaux_tc_yarn", "sharded"),
    "v2_tied_bias_single_file": ("v2_bias_tied_plain_rope", "safetensors"),
    "v2_lite_bin": ("v2_lite_like", "bin"),
    "v3_noaux_tc_bin": ("v3_like_noaux_tc_yarn", "bin"),
    "v3_tied_fused_experts_bin": ("v3_top1_attention_factor", "bin_fused"),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, tmp_path_factory):
    name, storage = CASES[request.param]
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_hub(name, str(root / "hf"), storage)
    convert(root / "hf", root / "ckpt", dtype="float32", progress=False)
    return request.param, hf_model, root


def test_logits_match_transformers(converted):
    case, hf_model, root = converted
    model = load(root / "ckpt", dtype=jnp.float32)
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (2, 23))
    reference = hf_logits(hf_model, tokens)
    ours = np.asarray(model(jnp.asarray(tokens)))
    assert np.max(np.abs(ours - reference)) / np.max(np.abs(reference)) <= TOL, case


def test_sharded_source_really_has_several_shards(tmp_path):
    save_hub("v2_lite_like", str(tmp_path), "sharded")
    assert len(shard_files(tmp_path)) > 1 and os.path.exists(tmp_path / "model.safetensors.index.json")


def test_bfloat16_conversion_rounds_each_weight_once(tmp_path):
    """Stored bf16 weights are exactly the hub float32 weights rounded to nearest bf16."""
    save_hub("v3_like_noaux_tc_yarn", str(tmp_path / "hf"), "safetensors")
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    hub = read_all(str(tmp_path / "hf"))
    ours = state_dict(load(tmp_path / "ckpt", dtype=jnp.bfloat16))
    mismatched = [
        k for k, v in ours.items()
        if not k.endswith("e_score_correction_bias")  # the model keeps the router bias in float32
        and not np.array_equal(v.astype(np.float32), hub[k].astype(ml_dtypes.bfloat16).astype(np.float32))
    ]
    assert not mismatched


def test_tokenizer_files_are_copied(tmp_path):
    save_hub("v2_lite_like", str(tmp_path / "hf"), "safetensors")
    (tmp_path / "hf" / "tokenizer.json").write_text('{"version": "1.0"}')
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert (tmp_path / "ckpt" / "tokenizer.json").read_text() == '{"version": "1.0"}'


def _add_mtp_layer(directory, rng):
    """A fake MTP module (layer numbered past the last, as DeepSeek-V3 stores it)."""
    tensors = read_all(str(directory))
    config = json.loads((directory / "config.json").read_text())
    n, d = config["num_hidden_layers"], config["hidden_size"]
    mtp = {
        f"model.layers.{n}.enorm.weight": rng.standard_normal(d).astype(np.float32),
        f"model.layers.{n}.eh_proj.weight": rng.standard_normal((d, 2 * d)).astype(np.float32),
        f"model.layers.{n}.shared_head.norm.weight": rng.standard_normal(d).astype(np.float32),
    }
    write_single(str(directory), {**tensors, **mtp})
    config["num_nextn_predict_layers"] = 1
    (directory / "config.json").write_text(json.dumps(config))
    return mtp


@pytest.mark.parametrize("keep_mtp", [False, True], ids=["mtp_skipped", "mtp_kept"])
def test_mtp_layer_is_skipped_unless_kept(tmp_path, keep_mtp):
    save_hub("v3_like_noaux_tc_yarn", str(tmp_path / "hf"), "safetensors")
    mtp = _add_mtp_layer(tmp_path / "hf", np.random.default_rng(0))
    report = convert(tmp_path / "hf", tmp_path / "ckpt", keep_mtp=keep_mtp, progress=False)
    stored = {p[1] for p in store.stored_variables(store.read_layout(tmp_path / "ckpt")) if p[0] == "mtp"}
    assert (stored, report.mtp_tensors) == ((set(mtp), len(mtp)) if keep_mtp else (set(), 0))


def test_checkpoint_without_mtp_says_so_in_its_config(tmp_path):
    save_hub("v3_like_noaux_tc_yarn", str(tmp_path / "hf"), "safetensors")
    _add_mtp_layer(tmp_path / "hf", np.random.default_rng(0))
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=False)
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["num_nextn_predict_layers"] == 0


def test_loading_skips_a_kept_mtp_layer(tmp_path):
    hf_model = save_hub("v3_like_noaux_tc_yarn", str(tmp_path / "hf"), "safetensors")
    _add_mtp_layer(tmp_path / "hf", np.random.default_rng(0))
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", keep_mtp=True, progress=False)
    tokens = np.arange(12)[None]
    reference = hf_logits(hf_model, tokens)
    ours = np.asarray(load(tmp_path / "ckpt", dtype=jnp.float32)(jnp.asarray(tokens)))
    assert np.max(np.abs(ours - reference)) / np.max(np.abs(reference)) <= TOL


def test_progress_bar_shows_bytes_tensors_and_rate(tmp_path, capsys):
    save_hub("v2_lite_like", str(tmp_path / "hf"), "safetensors")
    convert(tmp_path / "hf", tmp_path / "ckpt", progress=True)
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert all(part in bar for part in ("100%", "502k/502k", "B/s", "tensors 83/83")), bar
