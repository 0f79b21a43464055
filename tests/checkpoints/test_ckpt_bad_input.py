"""Bad input is refused before anything is written, with a message naming the file or tensor and
saying what was expected and what was found; a failed run leaves no directory behind.

Each case damages a copy of a real `save_pretrained` directory (tiny V2-Lite-like model) the way a
broken download or a wrong file would, then runs `convert`.
"""

import json
import os
import re
import shutil

import ml_dtypes
import numpy as np
import pytest

pytest.importorskip("torch")

from checkpoints import readers  # noqa: E402
from checkpoints.convert import convert  # noqa: E402
from ckpt_helpers import edit_config, read_all, save_hub, shard_files, write_single  # noqa: E402

MOE_WEIGHT = "model.layers.1.mlp.experts.3.up_proj.weight"
ATTN_WEIGHT = "model.layers.0.self_attn.kv_b_proj.weight"


@pytest.fixture(scope="module")
def templates(tmp_path_factory):
    root = tmp_path_factory.mktemp("templates")
    save_hub("v2_lite_like", str(root / "sharded"), "sharded")
    save_hub("v2_lite_like", str(root / "single"), "safetensors")
    return root


def _rewrite(d, change):
    tensors = read_all(str(d))
    change(tensors)
    write_single(str(d), tensors)


def _truncate(path, keep_fraction):
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * keep_fraction))


def _damage_header(path, payload: bytes):
    with open(path, "r+b") as f:
        f.write(payload)


def _swap(name, new):
    def change(t):
        t[name] = new(t[name])
    return change


def _fp8_weight_only(d):
    _rewrite(d, _swap(ATTN_WEIGHT, lambda w: w.astype(ml_dtypes.float8_e4m3fn)))


def _fp8_quant_config(d):
    edit_config(str(d), quantization_config={"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [16, 16]})


def _index_claims_extra_tensor(d):
    path = os.path.join(d, "model.safetensors.index.json")
    index = json.load(open(path))
    index["weight_map"]["model.layers.0.self_attn.extra.weight"] = shard_files(d)[0]
    json.dump(index, open(path, "w"))


# name -> (template, damage(dir), regex the message must match)
CASES = {
    "missing_shard": ("sharded", lambda d: (os.remove(d / "model.safetensors.index.json"),
                                            os.remove(d / shard_files(d)[1])),
                      r"missing shard\(s\) \['model-00002-of-\d+\.safetensors'\]"),
    "index_names_missing_file": ("sharded", lambda d: os.remove(d / shard_files(d)[1]),
                                 r"model\.safetensors\.index\.json maps \d+ tensor\(s\) .* to model-00002-of-\d+\.safetensors, which is missing"),
    "index_names_tensor_its_shard_lacks": ("sharded", _index_claims_extra_tensor,
                                           r"puts tensor\(s\) \['model\.layers\.0\.self_attn\.extra\.weight'\] in model-00001-of-\d+\.safetensors, which does not hold them"),
    "truncated_safetensors": ("single", lambda d: _truncate(d / "model.safetensors", 0.5),
                              r"model\.safetensors: truncated: tensor '.*' ends at byte \d+ but the file has \d+ bytes"),
    "corrupt_safetensors_header_length": ("single", lambda d: _damage_header(d / "model.safetensors", b"\xff" * 8),
                                          r"model\.safetensors: corrupt or truncated: header claims \d+ bytes but the file has \d+"),
    "corrupt_safetensors_header_json": ("single", lambda d: _damage_header(d / "model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json!!"),
                                        r"model\.safetensors: corrupt safetensors header"),
    "corrupt_bin": ("single", lambda d: (os.remove(d / "model.safetensors"),
                                         (d / "pytorch_model.bin").write_bytes(b"not a zip file at all")),
                    r"pytorch_model\.bin: cannot be read as a PyTorch state dict"),
    "no_weights": ("single", lambda d: os.remove(d / "model.safetensors"),
                   r"no weights found \(expected model\.safetensors\.index\.json, \*\.safetensors"),
    "missing_tensor": ("single", lambda d: _rewrite(d, lambda t: t.pop(MOE_WEIGHT)),
                       r"1 tensor\(s\) that .*config\.json implies are missing, e\.g\. \['model\.layers\.1\.mlp\.experts\.3\.up_proj\.weight'\]"),
    "unexpected_tensor": ("single", lambda d: _rewrite(d, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones((2, 2), np.float32)})),
                          r"1 unexpected tensor\(s\) that .*config\.json does not describe, e\.g\. \['model\.layers\.0\.mlp\.extra\.weight'\] \(in .*model\.safetensors\)"),
    "shape_disagrees_with_config": ("single", lambda d: _rewrite(d, _swap(ATTN_WEIGHT, lambda w: np.ascontiguousarray(w.T))),
                                    r"model\.safetensors: tensor 'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has shape \[32, 112\] but .*config\.json implies \[112, 32\]"),
    "kv_lora_rank_disagrees_with_tensors": ("single", lambda d: edit_config(str(d), kv_lora_rank=16),
                                            r"has shape \[\d+, \d+\] but .*config\.json implies \[\d+, \d+\]"),
    "dtype_disagrees_with_config": ("single", lambda d: _rewrite(d, _swap(ATTN_WEIGHT, lambda w: w.astype(np.int32))),
                                    r"tensor 'model\.layers\.0\.self_attn\.kv_b_proj\.weight' has dtype int32 but .*config\.json \(dtype float32\) implies floating-point weights"),
    "fp8_weight_without_quantization_config": ("single", _fp8_weight_only,
                                               r"tensor 'model\.layers\.0\.self_attn\.kv_b_proj\.weight' is float8_e4m3fn but .*config\.json has no quantization_config"),
    "fp8_weight_without_scale": ("single", lambda d: (_fp8_weight_only(d), _fp8_quant_config(d)),
                                 r"float8_e4m3fn tensor\(s\) \['model\.layers\.0\.self_attn\.kv_b_proj\.weight'\] have no _scale_inv scale"),
    "fp8_scale_of_wrong_shape": ("single", lambda d: (_rewrite(d, lambda t: t.update({
        ATTN_WEIGHT: t[ATTN_WEIGHT].astype(ml_dtypes.float8_e4m3fn),
        ATTN_WEIGHT + "_scale_inv": np.ones((1, 1), np.float32)})), _fp8_quant_config(d)),
                                 r"scale 'model\.layers\.0\.self_attn\.kv_b_proj\.weight_scale_inv' has shape \(1, 1\); weight \(112, 32\) in blocks of \[16, 16\] needs \(7, 2\)"),
    "unsupported_quantization": ("single", lambda d: edit_config(str(d), quantization_config={"quant_method": "gptq"}),
                                 r"quantization_config\.quant_method='gptq'; only 'fp8'"),
    "unknown_model_type": ("single", lambda d: edit_config(str(d), model_type="llama"),
                           r"config\.json: model_type='llama' is not supported; expected one of \('deepseek_v2', 'deepseek_v3'\)"),
    "unsupported_config_field": ("single", lambda d: edit_config(str(d), sliding_window_pattern=4),
                                 r"config\.json: unsupported config field\(s\) \['sliding_window_pattern'\]"),
    "missing_config": ("single", lambda d: os.remove(d / "config.json"), r"config\.json: no config\.json found"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_is_refused_with_a_clear_message(templates, tmp_path, case):
    template, damage, message = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(templates / template, src)
    damage(src)
    with pytest.raises(ValueError, match=message):
        convert(src, tmp_path / "dst", progress=False)


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_leaves_no_destination(templates, tmp_path, case):
    template, damage, _ = CASES[case]
    src = tmp_path / "src"
    shutil.copytree(templates / template, src)
    damage(src)
    with pytest.raises(ValueError):
        convert(src, tmp_path / "dst", progress=False)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_existing_destination_is_refused(templates, tmp_path):
    (tmp_path / "dst").mkdir()
    with pytest.raises(ValueError, match=re.escape(f"destination {tmp_path / 'dst'} already exists; pass --overwrite")):
        convert(templates / "single", tmp_path / "dst", progress=False)


def test_overwrite_replaces_an_earlier_checkpoint(templates, tmp_path):
    """(A directory that is not a checkpoint is refused: test_ckpt_destination.py.)"""
    convert(templates / "single", tmp_path / "dst", progress=False)
    (tmp_path / "dst" / "stale.txt").write_text("old")
    convert(templates / "single", tmp_path / "dst", overwrite=True, progress=False)
    assert not (tmp_path / "dst" / "stale.txt").exists() and (tmp_path / "dst" / "config.json").exists()


def test_unwritable_destination_is_refused(templates, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=re.escape(f"destination {tmp_path / 'a_file' / 'dst'} is not writable: {tmp_path / 'a_file'} is a file")):
        convert(templates / "single", tmp_path / "a_file" / "dst", progress=False)


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_parent_is_refused(templates, tmp_path):
    parent = tmp_path / "ro"
    parent.mkdir(mode=0o555)
    with pytest.raises(ValueError, match="is not writable: no write permission"):
        convert(templates / "single", parent / "dst", progress=False)


def test_interrupted_conversion_leaves_nothing(templates, tmp_path, monkeypatch):
    """A failure half-way (disk full, Ctrl-C) leaves neither DST nor a half-written temp directory."""
    real_read, calls = readers.Source.read, []

    def failing_read(self, name, *args):
        calls.append(name)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real_read(self, name, *args)

    monkeypatch.setattr(readers.Source, "read", failing_read)
    with pytest.raises(KeyboardInterrupt):
        convert(templates / "single", tmp_path / "dst", progress=False, part_bytes=1)
    assert os.listdir(tmp_path) == []
