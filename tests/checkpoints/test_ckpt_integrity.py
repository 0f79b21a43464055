"""Every weight file's size and CRC-32 are recorded when written and verified when read.

One flipped byte in any file of the state, a truncated file or a deleted one is refused by
`mla_jax.load`, by `export` and by `mla-jax generate`, with a message naming the file, never
tensorstore's pages of errors. Paths starting with `~` mean the user's home.
"""

import json
import os
import shutil
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from checkpoints.convert import convert
from checkpoints.export import export
from cli_helpers import error_line, run_cli
from ckpt_cli import TINY, temporaries
from mla_jax import store
from mla_jax.weights import load, model_variables, save


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("integrity") / "ckpt"
    convert(TINY, path, progress=False)
    return path


@pytest.fixture
def copy(ckpt, tmp_path):
    shutil.copytree(ckpt, tmp_path / "ckpt")
    return tmp_path / "ckpt"


def _state_files(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, fs in os.walk(path / store.STATE_DIR) for f in fs)


def _flip(path, offset_fraction: float = 0.5) -> None:
    with open(path, "r+b") as f:
        f.seek(int(os.path.getsize(path) * offset_fraction))
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def _weights(model) -> dict:
    return {p: np.asarray(jax.device_get(v.get_value())) for p, v in model_variables(model)}


def test_every_stored_file_has_a_recorded_checksum(ckpt):
    layout = store.read_layout(ckpt)
    assert layout["version"] == 2 and sorted(layout["files"]) == _state_files(ckpt)
    assert all(set(entry) == {"size", "crc32"} for entry in layout["files"].values())


def test_a_flipped_byte_in_any_weight_file_is_refused_by_load(copy):
    for rel in _state_files(copy):
        original = (copy / rel).read_bytes()
        _flip(copy / rel)
        with pytest.raises(store.CheckpointError, match=f"^{copy / rel}: checksum mismatch"):
            load(copy, dtype=jnp.float32)
        (copy / rel).write_bytes(original)
    load(copy, dtype=jnp.float32)  # all restored: loads again


def test_verify_false_skips_the_checksums(ckpt, copy):
    """The check is what notices: without it the damaged copy loads, with different weights."""
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    _flip(copy / data, 0.9)
    damaged, intact = _weights(load(copy, dtype=jnp.float32, verify=False)), _weights(load(ckpt, dtype=jnp.float32))
    assert any(not np.array_equal(damaged[p], intact[p]) for p in intact)


def test_a_truncated_weight_file_is_named(copy):
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    size = os.path.getsize(copy / data)
    os.truncate(copy / data, size // 2)
    with pytest.raises(store.CheckpointError, match=f"^{copy / data}: {size // 2} bytes but {size} were written"):
        load(copy, verify=False)  # the size check costs nothing and always runs


def test_a_deleted_weight_file_is_named_by_export(copy, tmp_path):
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    os.remove(copy / data)
    with pytest.raises(store.CheckpointError, match=f"^{copy / data}: missing; the checkpoint is damaged"):
        export(copy, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out") and temporaries(tmp_path) == []


def test_a_damaged_file_is_refused_by_export_before_anything_is_published(copy, tmp_path):
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    _flip(copy / data)
    with pytest.raises(store.CheckpointError, match=f"^{copy / data}: checksum mismatch"):
        export(copy, tmp_path / "out", progress=False)
    assert not os.path.exists(tmp_path / "out") and temporaries(tmp_path) == []


def test_generate_refuses_a_flipped_byte_in_one_line(copy):
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    _flip(copy / data)
    result = run_cli("generate", "--ckpt", copy, "--prompt", "hello", "--max-new-tokens", "2")
    assert result.rc == 1 and result.out == ""
    assert error_line(result).startswith(f"mla-jax generate: error: {copy / data}: checksum mismatch (CRC-32 ")


def test_version_1_checkpoints_load_unverified_with_a_warning(ckpt, copy):
    """Written before checksums were recorded: read as they are, and the user is told."""
    layout = json.loads((copy / store.LAYOUT_FILE).read_text())
    layout["version"] = 1
    del layout["files"]
    (copy / store.LAYOUT_FILE).write_text(json.dumps(layout))
    with pytest.warns(UserWarning, match="format version 1.*without an integrity check"):
        model = load(copy, dtype=jnp.float32)
    assert all(np.array_equal(a, b) for a, b in zip(_weights(model).values(), _weights(load(ckpt, dtype=jnp.float32)).values()))


def test_a_truncated_file_of_an_unverifiable_checkpoint_is_one_line(copy):
    """No recorded sizes (version 1): what orbax cannot read is still named, not dumped."""
    layout = json.loads((copy / store.LAYOUT_FILE).read_text())
    layout["version"] = 1
    del layout["files"]
    (copy / store.LAYOUT_FILE).write_text(json.dumps(layout))
    data = max(_state_files(copy), key=lambda rel: os.path.getsize(copy / rel))
    os.truncate(copy / data, os.path.getsize(copy / data) // 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(store.CheckpointError) as info:
            load(copy)
    message = str(info.value)
    assert message.startswith(f"{copy / store.STATE_DIR / 'part_00000'}: cannot be read (")
    assert "\n" not in message and len(message) < 600


def test_home_relative_paths_mean_the_home_directory(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    model = load(ckpt, dtype=jnp.float32)
    written = save(model, "~/ckpt/tuned")
    assert written == str(tmp_path / "ckpt" / "tuned") and not os.path.exists("~")
    again = load("~/ckpt/tuned", dtype=jnp.float32)
    assert all(np.array_equal(a, b) for a, b in zip(_weights(again).values(), _weights(model).values()))
