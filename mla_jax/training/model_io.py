"""The one place where fine-tuning reads a base model and writes the result: `mla_jax.load`.

The result is written in the layout `mla-jax convert` writes, so it loads with `mla_jax.load` and
exports with `mla-jax export` like any converted checkpoint.
"""

from __future__ import annotations

import os

from mla_jax.model import Transformer


def load_base(path: str | os.PathLike, dtype: str, mesh=None) -> Transformer:
    from mla_jax.weights import load

    return load(path, dtype=dtype, mesh=mesh)


def save_result(model: Transformer, path: str | os.PathLike, tokenizer_from: str | os.PathLike | None) -> str:
    from mla_jax.weights import save

    return save(model, path, tokenizer_from=tokenizer_from, overwrite=True)
