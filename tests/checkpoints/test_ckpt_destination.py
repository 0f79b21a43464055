"""A destination is never a source, and `--overwrite` replaces only the same kind of output.

Each case is a command a user could type (run through `mla-jax`'s own `main`): it must end in
exit 1 with one line naming the directory, and leave the source byte for byte as it was, the old
destination intact, and no temporary directory behind.
"""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from checkpoints.convert import convert
from checkpoints.export import MARKER_FILE, export
from ckpt_cli import TINY, cli, fingerprint, temporaries
from mla_jax import staging, store
from mla_jax.config import Config
from mla_jax.model import Transformer
from mla_jax.weights import save

NOT_A_CHECKPOINT = "not an mla-jax checkpoint (no mla_jax.json of format 'mla-jax-orbax')"
NOT_AN_EXPORT = f"not a Hugging Face export written by mla-jax (no {MARKER_FILE})"
REFUSE_TAIL = "; --overwrite replaces only that, so remove it yourself or choose another destination"


@pytest.fixture
def hub(tmp_path):
    """A user's hub directory (the shipped tiny model), with a file of their own beside the weights."""
    shutil.copytree(TINY, tmp_path / "hf")
    (tmp_path / "hf" / "notes.txt").write_text("mine\n")
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("converted") / "ckpt"
    convert(TINY, path, progress=False)
    return path


def test_convert_onto_its_own_source_is_refused(hub, capsys):
    before = fingerprint(hub)
    code, lines = cli(capsys, "convert", hub, hub, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {hub} is the source {hub}; write to a new directory"])
    assert fingerprint(hub) == before and temporaries(hub.parent) == []


def test_convert_onto_the_directory_holding_the_source_is_refused(tmp_path, capsys):
    par = tmp_path / "par"
    shutil.copytree(TINY, par / "hf")
    (par / "notes.txt").write_text("unrelated\n")
    before = fingerprint(par)
    code, lines = cli(capsys, "convert", par / "hf", par, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {par} contains the source {par / 'hf'}; "
                                 "replacing it would delete the source"])
    assert fingerprint(par) == before and temporaries(tmp_path) == []


def test_convert_into_the_source_is_refused(hub, capsys):
    before = fingerprint(hub)
    code, lines = cli(capsys, "convert", hub, hub / "out")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {hub / 'out'} lies inside the source {hub}; "
                                 "choose a directory outside it"])
    assert fingerprint(hub) == before


def test_convert_onto_a_link_to_the_source_is_refused(hub, tmp_path, capsys):
    os.symlink(hub, tmp_path / "link")
    before = fingerprint(hub)
    code, lines = cli(capsys, "convert", hub, tmp_path / "link", "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {tmp_path / 'link'} is the source {hub}; "
                                 "write to a new directory"])
    assert fingerprint(hub) == before and os.path.islink(tmp_path / "link")


def test_convert_onto_the_directory_holding_linked_shards_is_refused(tmp_path, capsys):
    """Hub cache layout: snapshots/REV/*.safetensors are links into blobs/, which holds the data."""
    blobs, snapshot = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / "rev"
    shutil.copytree(TINY, snapshot)
    os.makedirs(blobs)
    shutil.move(snapshot / "model.safetensors", blobs / "abc123")
    os.symlink(blobs / "abc123", snapshot / "model.safetensors")
    before = fingerprint(blobs)
    code, lines = cli(capsys, "convert", snapshot, blobs, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {blobs} contains the source "
                                 f"{snapshot / 'model.safetensors'}; replacing it would delete the source"])
    assert fingerprint(blobs) == before


def test_convert_overwrite_refuses_a_directory_that_is_not_a_checkpoint(hub, tmp_path, capsys):
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / "notes.txt").write_text("keep me\n")
    code, lines = cli(capsys, "convert", hub, dst, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {dst} is a directory but {NOT_A_CHECKPOINT}{REFUSE_TAIL}"])
    assert fingerprint(dst) == {"notes.txt": fingerprint(dst)["notes.txt"]} and (dst / "notes.txt").read_text() == "keep me\n"


def test_convert_overwrite_refuses_a_file(hub, tmp_path, capsys):
    (tmp_path / "dst").write_text("a file\n")
    code, lines = cli(capsys, "convert", hub, tmp_path / "dst", "--overwrite")
    assert (code, lines) == (1, [f"mla-jax convert: error: destination {tmp_path / 'dst'} is a file but {NOT_A_CHECKPOINT}{REFUSE_TAIL}"])
    assert (tmp_path / "dst").read_text() == "a file\n"


def test_convert_overwrite_replaces_an_earlier_checkpoint(hub, tmp_path, capsys):
    dst = tmp_path / "ckpt"
    assert cli(capsys, "convert", hub, dst)[0] == 0
    code, _ = cli(capsys, "convert", hub, dst, "--overwrite", "--dtype", "float32")
    assert code == 0 and store.read_layout(dst)["dtype"] == "float32" and temporaries(tmp_path) == []


def test_export_onto_its_own_checkpoint_is_refused(ckpt, capsys):
    before = fingerprint(ckpt)
    code, lines = cli(capsys, "export", ckpt, ckpt, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax export: error: destination {ckpt} is the source {ckpt}; write to a new directory"])
    assert fingerprint(ckpt) == before and temporaries(ckpt.parent) == []


def test_export_overwrite_replaces_an_earlier_export_only(ckpt, hub, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(capsys, "export", ckpt, out)[0] == 0
    assert json.loads((out / MARKER_FILE).read_text())["format"] == "mla-jax-hf-export"
    assert cli(capsys, "export", ckpt, out, "--overwrite", "--dtype", "float32")[0] == 0
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "float32"
    before = fingerprint(hub)  # a hub directory someone downloaded is not ours to replace
    code, lines = cli(capsys, "export", ckpt, hub, "--overwrite")
    assert (code, lines) == (1, [f"mla-jax export: error: destination {hub} is a directory but {NOT_AN_EXPORT}{REFUSE_TAIL}"])
    assert fingerprint(hub) == before and temporaries(tmp_path) == []


def test_save_overwrite_refuses_what_is_not_a_checkpoint(hub):
    model = Transformer(Config.from_hf(str(hub)), rngs=nnx.Rngs(0))
    before = fingerprint(hub)
    with pytest.raises(store.CheckpointError, match=re.escape(f"destination {hub} is a directory but {NOT_A_CHECKPOINT}")):
        save(model, hub, overwrite=True)
    assert fingerprint(hub) == before


def test_check_separate_is_there_for_other_writers(tmp_path):
    """What `finetune --out` calls against its base checkpoint and data."""
    base, data = tmp_path / "base", tmp_path / "data.txt"
    store.check_separate(tmp_path / "run", base, data)  # separate: no error
    with pytest.raises(store.CheckpointError, match=re.escape(f"destination {tmp_path} contains the source {base}")):
        store.check_separate(tmp_path, base, data)
    with pytest.raises(store.CheckpointError, match=re.escape(f"destination {base / 'run'} lies inside the source {base}")):
        store.check_separate(base / "run", data, base)


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temporaries_of_dead_runs_are_swept(hub, tmp_path, capsys):
    dead, alive = _dead_pid(), os.getppid()
    for pid in (dead, alive):
        os.makedirs(tmp_path / f".ckpt.tmp-{pid}" / "state")
        (tmp_path / f".ckpt.tmp-{pid}" / "state" / "junk").write_bytes(np.zeros(1000, np.uint8).tobytes())
    assert cli(capsys, "convert", hub, tmp_path / "ckpt")[0] == 0
    assert temporaries(tmp_path) == [f".ckpt.tmp-{alive}"]  # a live process's work is left alone


def test_a_publish_killed_midway_gets_the_old_destination_back(ckpt, tmp_path):
    """Killed between moving the old destination aside and renaming the new one into place."""
    dead = _dead_pid()
    shutil.copytree(ckpt, tmp_path / f".ckpt.tmp-{dead}.old")
    shutil.copytree(ckpt, tmp_path / f".ckpt.tmp-{dead}")  # the complete new one, never published
    removed = staging.sweep_stale(str(tmp_path / "ckpt"))
    assert removed == [str(tmp_path / f".ckpt.tmp-{dead}")]
    assert fingerprint(tmp_path / "ckpt") == fingerprint(ckpt) and temporaries(tmp_path) == []
