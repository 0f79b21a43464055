"""Running `mla-jax` the way a user does (in-process through `main`, or as a subprocess), and
checking that nothing was lost: directory fingerprints, leftover temporaries, one-line errors.

The shipped tiny checkpoint (`checkpoints/tiny_v3`, a hub safetensors directory of 1 MB) is the
source: converting it needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, "checkpoints", "tiny_v3")
# What importing jax with the CUDA compile-only plugin prints on a machine without a GPU.
_PLUGIN_NOISE = re.compile(r"^(WARNING: All log messages before absl::InitializeLog\(\)|.*cudart_stub\.cc.*Could not find cuda drivers)")


def cli(capsys, *argv) -> tuple[int, list[str]]:
    """Runs `mla-jax ARGV` in this process; returns (exit code, stderr lines). argparse exits count."""
    from mla_jax.cli import main

    try:
        code = main(list(map(str, argv)))
    except SystemExit as e:  # argparse errors
        code = e.code
    return code, error_lines(capsys.readouterr().err)


def error_lines(stderr: str) -> list[str]:
    """stderr's lines without the GPU plugin's start-up noise and blank lines."""
    return [line for line in stderr.splitlines() if line.strip() and not _PLUGIN_NOISE.match(line)]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), "JAX_PLATFORMS": "cpu"}


def run_cli(*argv, timeout: float = 240) -> subprocess.CompletedProcess:
    """`python -m mla_jax.cli ARGV` in a child process (this checkout first on its path)."""
    return subprocess.run([sys.executable, "-m", "mla_jax.cli", *map(str, argv)], capture_output=True, text=True,
                          env=env(), timeout=timeout, cwd=ROOT)


def fingerprint(directory) -> dict[str, str]:
    """{relative path: sha256} of every file under `directory`, hidden ones included."""
    out = {}
    for parent, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(parent, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def temporaries(parent) -> list[str]:
    """Hidden `.NAME.tmp-PID` staging directories (or their `.old`) left in `parent`."""
    return sorted(e for e in os.listdir(parent) if re.match(r"^\..+\.tmp-\d+(\.old)?$", e))
