"""Interrupted, killed or starved of disk space, `mla-jax convert` loses nothing and says one line.

Each case runs the real command in a child process. To be sure the signal lands mid-work, with
orbax writes in flight, the child reads the source as a slow disk would (a short sleep per tensor)
and writes a part per variable; the signal is sent once several parts are on their way.
"""

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from checkpoints.convert import convert
from cli_helpers import ROOT, cli_env
from ckpt_cli import TINY, error_lines, fingerprint, temporaries

# The command as a user runs it, on a slow disk and with small parts (see module doc).
_SLOW_CLI = """
import sys, time
from checkpoints import convert, safetensors_io
read = safetensors_io.read_tensor
safetensors_io.read_tensor = lambda info, buffer=None: (time.sleep(0.03), read(info, buffer))[1]
convert.convert.__kwdefaults__["part_bytes"] = 16 << 10
from mla_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


# Export, as slow: a short sleep per hub tensor it turns out.
_SLOW_EXPORT_CLI = """
import sys, time
from checkpoints import names
to_hub = names.to_hub
names.to_hub = lambda *a, **k: (time.sleep(0.03), to_hub(*a, **k))[1]
from mla_jax.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start(*argv, script: str = _SLOW_CLI) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", script, *map(str, argv)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=cli_env(), cwd=ROOT)


def _when_writing(child: subprocess.Popen, dst, parts: int = 3, timeout: float = 120, under: str = "state") -> None:
    """Waits until the child's staging directory holds `parts` entries under `under` (orbax items or
    shards, some still being written)."""
    state = os.path.join(os.path.dirname(dst), f".{os.path.basename(dst)}.tmp-{child.pid}", under)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if os.path.isdir(state) and len(os.listdir(state)) >= parts:
            return
        if child.poll() is not None:
            raise AssertionError(f"convert ended before it was interrupted: {child.communicate()}")
        time.sleep(0.005)
    child.kill()
    raise AssertionError("convert never started writing")


@pytest.fixture
def hub(tmp_path):
    shutil.copytree(TINY, tmp_path / "hf")
    return tmp_path / "hf"


@pytest.fixture(scope="module")
def old_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("old") / "ckpt"
    convert(TINY, path, dtype="float32", progress=False)
    return path


SIGNALS = {"SIGINT": (signal.SIGINT, "interrupted (Ctrl-C)"), "SIGTERM": (signal.SIGTERM, "terminated (SIGTERM)")}


@pytest.mark.parametrize("name", sorted(SIGNALS))
def test_a_signal_mid_convert_exits_130_and_leaves_everything_as_it_was(hub, old_ckpt, tmp_path, name):
    signum, said = SIGNALS[name]
    out = tmp_path / "out"
    shutil.copytree(old_ckpt, out)  # an earlier conversion that --overwrite would replace
    source, previous = fingerprint(hub), fingerprint(out)
    child = _start("convert", hub, out, "--overwrite")
    _when_writing(child, out)
    child.send_signal(signum)
    stdout, stderr = child.communicate(timeout=120)
    lines = error_lines(stderr)
    assert (child.returncode, lines) == (130, [f"mla-jax convert: {said}"]), stderr
    assert fingerprint(hub) == source and fingerprint(out) == previous and temporaries(tmp_path) == []


def test_ctrl_c_mid_export_leaves_the_old_export_and_no_temporary(old_ckpt, tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-m", "mla_jax.cli", "export", str(old_ckpt), str(out)], check=True,
                   capture_output=True, env=cli_env(), cwd=ROOT, timeout=240)
    source, previous = fingerprint(old_ckpt), fingerprint(out)
    child = _start("export", old_ckpt, out, "--overwrite", "--max-shard-gb", "0.0002", script=_SLOW_EXPORT_CLI)
    _when_writing(child, out, parts=2, under="")
    child.send_signal(signal.SIGINT)
    _, stderr = child.communicate(timeout=120)
    assert (child.returncode, error_lines(stderr)) == (130, ["mla-jax export: interrupted (Ctrl-C)"]), stderr
    assert fingerprint(old_ckpt) == source and fingerprint(out) == previous and temporaries(tmp_path) == []


def test_a_killed_convert_leaves_a_temporary_that_the_next_run_sweeps(hub, tmp_path):
    out = tmp_path / "out"
    child = _start("convert", hub, out)
    _when_writing(child, out)
    child.kill()
    child.wait()
    assert temporaries(tmp_path) == [f".out.tmp-{child.pid}"]  # SIGKILL: nothing can clean up
    result = subprocess.run([sys.executable, "-m", "mla_jax.cli", "convert", str(hub), str(out)],
                            capture_output=True, text=True, env=cli_env(), cwd=ROOT, timeout=240)
    assert result.returncode == 0, result.stderr
    assert temporaries(tmp_path) == [] and os.path.isfile(out / "config.json")


def _can_mount_tmpfs() -> str | None:
    """None if `unshare -m` + a tmpfs mount work here, else why not."""
    if shutil.which("unshare") is None:
        return "no unshare(1)"
    probe = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=64k none /mnt"],
                           capture_output=True, text=True)
    return None if probe.returncode == 0 else f"cannot mount a tmpfs in a private mount namespace: {probe.stderr.strip()}"


def test_a_full_disk_mid_convert_is_one_line_and_leaves_nothing(hub, tmp_path):
    """A 600 kB tmpfs (private to the child) fills up while orbax writes the 1 MB checkpoint."""
    why = _can_mount_tmpfs()
    if why:
        pytest.skip(why)
    small, listing = tmp_path / "small", tmp_path / "listing"
    small.mkdir()
    source = fingerprint(hub)
    script = (f'mount -t tmpfs -o size=600k none "{small}" && "{sys.executable}" -m mla_jax.cli convert '
              f'"{hub}" "{small}/out" --dtype float32; rc=$?; ls -A "{small}" > "{listing}"; exit $rc')
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, env=cli_env(),
                            cwd=ROOT, timeout=240)
    assert (result.returncode, error_lines(result.stderr)) == (
        1, [f"mla-jax convert: error: no space left on device writing {small}/out"]), result.stderr
    assert listing.read_text() == "" and fingerprint(hub) == source, listing.read_text()
