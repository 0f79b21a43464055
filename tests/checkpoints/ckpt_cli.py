"""Running `mla-jax` in-process through `main` (subprocesses: tests/cli_helpers.py), and checking
that nothing was lost: directory fingerprints, leftover temporaries, one-line errors.

The shipped tiny checkpoint (`checkpoints/tiny_v3`, a hub safetensors directory of 1 MB) is the
source: converting it needs neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import os
import re

from cli_helpers import ROOT, plugin_noise

TINY = os.path.join(ROOT, "checkpoints", "tiny_v3")


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
    return [line for line in stderr.splitlines() if line.strip() and not plugin_noise(line)]


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
