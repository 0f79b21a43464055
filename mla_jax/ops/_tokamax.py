"""What every use of tokamax needs first (one place for the ops that call it)."""

from __future__ import annotations


def prepare() -> None:
    """tokamax reads its absl flags on first use and, if nobody parsed them, parses sys.argv, which
    holds the arguments of whatever program imported us (pytest, our CLIs) and fails on them. Its
    defaults are what we want, so the flags are marked parsed."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
