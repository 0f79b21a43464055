"""Builders shared by the checkpoint tests: hub directories in each storage format, and edits to them.

Every builder writes a real directory the way a user would have it: `save_pretrained` output
(safetensors, optionally sharded), a torch `.bin` state dict, or a block-quantized FP8 copy.
"""

from __future__ import annotations

import json
import math
import os

import ml_dtypes
import numpy as np

from checkpoints import safetensors_io as st
from checkpoints.readers import open_source
from hf_models import save_tiny

SMALL_SHARD = "60KB"  # several shards even for the tiny models


def save_hub(name: str, directory: str, storage: str, seed: int = 0):
    """Writes the named tiny model to `directory` in `storage`; returns the torch model.

    storage: "safetensors" (one file), "sharded" (several files + index), "bin" (per-expert names,
    pytorch_model.bin), "bin_fused" (transformers' in-memory state dict: fused expert tensors).
    """
    import torch

    if storage in ("safetensors", "sharded"):
        kwargs = {"max_shard_size": SMALL_SHARD} if storage == "sharded" else {"max_shard_size": "1GB"}
        return save_tiny(name, directory, seed, **kwargs)
    model = save_tiny(name, directory, seed)
    if storage == "bin":
        state = {k: torch.from_numpy(np.array(v)) for k, v in read_all(directory).items()}
    elif storage == "bin_fused":
        state = model.state_dict()
        state = {k: v for k, v in state.items() if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    else:
        raise ValueError(f"storage={storage!r}")
    for f in os.listdir(directory):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(directory, f))
    torch.save(state, os.path.join(directory, "pytorch_model.bin"))
    return model


def read_all(directory: str) -> dict[str, np.ndarray]:
    source = open_source(directory)
    return {name: source.read(name) for name in source.refs}


def write_single(directory: str, tensors: dict[str, np.ndarray]) -> None:
    """Replaces the directory's weights by one model.safetensors holding `tensors`."""
    for f in os.listdir(directory):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(directory, f))
    st.save_file(os.path.join(directory, "model.safetensors"), tensors)


def edit_config(directory: str, **changes) -> None:
    path = os.path.join(directory, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump(config, f)


def shard_files(directory: str) -> list[str]:
    return sorted(f for f in os.listdir(directory) if f.endswith(".safetensors"))


# ------------------------------------------------------------------------------- FP8
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def block_quantize(weight: np.ndarray, block: tuple[int, int], ue8m0: bool) -> tuple[np.ndarray, np.ndarray]:
    """float32 W [M,N] -> (float8_e4m3fn W, float32 scale_inv [ceil(M/bm), ceil(N/bn)]), as DeepSeek's
    training recipe stores them: each block scaled so its largest magnitude maps to 448."""
    bm, bn = block
    m, n = weight.shape
    scales = np.empty((math.ceil(m / bm), math.ceil(n / bn)), np.float32)
    q = np.empty((m, n), ml_dtypes.float8_e4m3fn)
    for i in range(scales.shape[0]):
        for j in range(scales.shape[1]):
            blk = weight[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn].astype(np.float32)
            s = max(float(np.abs(blk).max()), 1e-12) / FP8_MAX
            if ue8m0:
                s = float(2.0 ** math.ceil(math.log2(s)))
            scales[i, j] = s
            q[i * bm:(i + 1) * bm, j * bn:(j + 1) * bn] = (blk / s).astype(ml_dtypes.float8_e4m3fn)
    return q, scales


def quantizable(name: str, array: np.ndarray) -> bool:
    """The tensors DeepSeek's release stores in FP8: linear weights, not embeddings, router or head."""
    return (array.ndim == 2 and name.endswith("proj.weight") or name.endswith("proj_with_mqa.weight")) \
        and "embed_tokens" not in name and not name.endswith("mlp.gate.weight") and name != "lm_head.weight"
