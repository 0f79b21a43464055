"""`export` writes a Hugging Face directory that transformers loads, and HF -> mla-jax -> HF is
bit-identical in the same dtype. The `convert` / `export` CLI commands drive the same functions.
"""

import json
import os

import numpy as np
import pytest

pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from checkpoints.convert import convert  # noqa: E402
from checkpoints.export import export  # noqa: E402
from ckpt_helpers import read_all, save_hub, shard_files, write_single  # noqa: E402
from hf_models import hf_logits  # noqa: E402

MODELS = ["v2_lite_like", "v3_like_noaux_tc_yarn", "v2_bias_tied_plain_rope"]


@pytest.fixture(scope="module", params=MODELS)
def round_trip(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_model = save_hub(request.param, str(root / "hf"), "sharded")
    convert(root / "hf", root / "ckpt", dtype="float32", progress=False)
    export(root / "ckpt", root / "out", max_shard_bytes=100_000, progress=False)
    return request.param, hf_model, root


def _bits(a: np.ndarray) -> tuple:
    return a.dtype.name, a.shape, a.tobytes()


def test_round_trip_is_bit_identical(round_trip):
    name, _, root = round_trip
    before, after = read_all(str(root / "hf")), read_all(str(root / "out"))
    assert {k: _bits(v) for k, v in before.items()} == {k: _bits(v) for k, v in after.items()}, name


def test_export_is_sharded_with_an_index(round_trip):
    _, _, root = round_trip
    index = json.loads((root / "out" / "model.safetensors.index.json").read_text())
    assert sorted(set(index["weight_map"].values())) == shard_files(root / "out") and len(shard_files(root / "out")) > 1


def test_transformers_loads_export_without_missing_or_unexpected_keys(round_trip):
    _, _, root = round_trip
    _, info = transformers.AutoModelForCausalLM.from_pretrained(root / "out", output_loading_info=True)
    assert (info["missing_keys"], info["unexpected_keys"], info["mismatched_keys"]) == (set(), set(), set())


def test_transformers_gives_the_same_logits_from_export(round_trip):
    _, hf_model, root = round_trip
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(root / "out").eval()
    tokens = np.random.default_rng(0).integers(0, hf_model.config.vocab_size, (2, 17))
    assert np.array_equal(hf_logits(reloaded, tokens), hf_logits(hf_model, tokens))


def test_mtp_layer_kept_by_convert_is_exported(tmp_path):
    save_hub("v3_like_noaux_tc_yarn", str(tmp_path / "hf"), "safetensors")
    tensors = read_all(str(tmp_path / "hf"))
    mtp = {"model.layers.3.eh_proj.weight": np.random.default_rng(0).standard_normal((48, 96)).astype(np.float32)}
    write_single(str(tmp_path / "hf"), {**tensors, **mtp})
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", keep_mtp=True, progress=False)
    export(tmp_path / "ckpt", tmp_path / "out", progress=False)
    assert _bits(read_all(str(tmp_path / "out"))["model.layers.3.eh_proj.weight"]) == _bits(mtp["model.layers.3.eh_proj.weight"])


def test_export_casts_to_requested_dtype(tmp_path):
    save_hub("v2_lite_like", str(tmp_path / "hf"), "safetensors")
    convert(tmp_path / "hf", tmp_path / "ckpt", dtype="float32", progress=False)
    export(tmp_path / "ckpt", tmp_path / "out", dtype="bfloat16", progress=False)
    dtypes = {v.dtype.name for v in read_all(str(tmp_path / "out")).values()}
    assert (dtypes, json.loads((tmp_path / "out" / "config.json").read_text())["torch_dtype"]) == ({"bfloat16"}, "bfloat16")


def _cli(argv):
    from mla_jax.cli import main

    return main(argv)


def test_cli_convert_then_export(tmp_path, capsys):
    save_hub("v2_lite_like", str(tmp_path / "hf"), "safetensors")
    codes = (_cli(["convert", str(tmp_path / "hf"), str(tmp_path / "ckpt"), "--dtype", "float32"]),
             _cli(["export", str(tmp_path / "ckpt"), str(tmp_path / "out")]))
    printed = capsys.readouterr().out
    assert codes == (0, 0) and f"wrote {tmp_path / 'ckpt'}: 83 tensors" in printed and f"wrote {tmp_path / 'out'}" in printed


def test_cli_reports_bad_input_as_an_error_line(tmp_path, capsys):
    os.makedirs(tmp_path / "dst")
    code = _cli(["convert", str(tmp_path / "nowhere"), str(tmp_path / "dst")])
    assert (code, capsys.readouterr().err) == (1, f"mla-jax convert: error: {tmp_path / 'nowhere' / 'config.json'}: "
                                                  "no config.json found\n")
