"""`mla-jax` command line: argument parsing only; every command calls a library function.

Each command lives in the module that owns it, which exposes `register(subparsers)`; that function
adds the sub-parser and sets `func` (called with the parsed args, returning an exit code).
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Modules that register a sub-command, in the order `mla-jax --help` lists them. `checkpoints` sits
# above `mla_jax` in the import graph, so its commands are imported only when the CLI starts.
COMMAND_MODULES = [
    "checkpoints.demo",
    "checkpoints.cli",
    "mla_jax.training.cli",
    "mla_jax.generate_cli",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mla-jax", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
