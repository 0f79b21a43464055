"""Misuse of `mla-jax convert` / `export` ends in one line that says what to do, before any work."""

import shutil
import sys

import pytest

from checkpoints.convert import convert
from checkpoints.export import export
from ckpt_cli import TINY, cli, fingerprint, temporaries
from mla_jax.errors import UsageError


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "ckpt"
    convert(TINY, path, progress=False)
    return path


def test_a_bin_checkpoint_without_torch_says_how_to_proceed(tmp_path, capsys, monkeypatch):
    shutil.copytree(TINY, tmp_path / "hf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    (tmp_path / "hf" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 a torch zip archive")
    monkeypatch.setitem(sys.modules, "torch", None)  # what `import torch` meets where it is not installed
    code, lines = cli(capsys, "convert", tmp_path / "hf", tmp_path / "out")
    assert (code, lines) == (1, [
        f"mla-jax convert: error: {tmp_path / 'hf' / 'pytorch_model.bin'}: a PyTorch checkpoint, and reading it "
        "needs torch, which is not installed: `pip install torch` (the CPU build is enough), or convert it to "
        "safetensors first"])
    assert temporaries(tmp_path) == [] and not (tmp_path / "out").exists()


@pytest.mark.parametrize("size", ["0", "-1", "nan", "inf"])
def test_max_shard_size_must_be_a_positive_size(ckpt, tmp_path, capsys, size):
    before = fingerprint(ckpt)
    code, lines = cli(capsys, "export", ckpt, tmp_path / "out", f"--max-shard-gb={size}")
    assert code == 2 and lines[-1] == (f"mla-jax export: error: argument --max-shard-gb: expected a size in GB "
                                       f"above 0, got {size}")
    assert fingerprint(ckpt) == before and not (tmp_path / "out").exists()


def test_export_refuses_a_shard_size_of_zero_bytes(ckpt, tmp_path):
    with pytest.raises(UsageError, match=r"max_shard_bytes=0; expected a positive number of bytes"):
        export(ckpt, tmp_path / "out", max_shard_bytes=0, progress=False)
    assert not (tmp_path / "out").exists()
