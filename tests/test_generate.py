"""Generation is exact: transformers' greedy tokens, and cached logits equal to a full recomputation.

Tiny random V2 / V3 models are built with transformers, saved the way the hub stores them, and
loaded through the project's loader; both sides run in float32.
"""

import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import hf_models
from checkpoints.state_dict import load_state_dict
from mla_jax import Config
from mla_jax import generate as generation
from mla_jax.generate import FINISHED, generate, generate_stream

MODELS = ["v2_lite_like", "v3_like_noaux_tc_yarn"]
PROMPT_LENGTHS = [5, 11, 3]
NEW_TOKENS = 32


@pytest.fixture(scope="module", params=MODELS)
def pair(request, tmp_path_factory):
    """(transformers model, our model loaded from its save_pretrained files, prompts)."""
    from safetensors.numpy import load_file

    directory = tmp_path_factory.mktemp(request.param)
    hf = hf_models.save_tiny(request.param, directory)
    tensors = {}
    for name in sorted(os.listdir(directory)):
        if name.endswith(".safetensors"):
            tensors.update(load_file(directory / name))
    config = Config.from_hf(directory)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, config.vocab_size, n).tolist() for n in PROMPT_LENGTHS]
    return hf, load_state_dict(config, tensors), prompts


def hf_greedy(hf, prompts, new_tokens, eos):
    """transformers' generate over the left-padded batch, each row cut after its first eos."""
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    with torch.no_grad():
        out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, do_sample=False,
                          eos_token_id=eos, pad_token_id=0)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos) + 1] if eos in row else row)
    return rows


def run_stream(model, prompts, **kwargs):
    """Stream to the end: (full token sequences, per-sequence float32 logits [steps, V] they came from)."""
    stream = generate_stream(model, prompts, NEW_TOKENS, **kwargs)
    seqs, logits = [list(p) for p in prompts], [[] for _ in prompts]
    for step in stream:
        step_logits = np.asarray(stream.logits)
        for i, t in enumerate(step.tolist()):
            if t != FINISHED:
                seqs[i].append(t)
                logits[i].append(step_logits[i])
    return seqs, [np.stack(x) for x in logits]


@nnx.jit
def full_logits(model, tokens):
    return model(tokens)


def recomputed(model, prompts, seqs):
    """Logits a full forward pass over each final sequence gives where each new token was chosen.

    The model is causal, so position t of the full pass is exactly a recomputation over tokens 0..t;
    right-padding the batch to one width leaves every real position unchanged.
    """
    width = max(map(len, seqs))
    tokens = np.zeros((len(seqs), width), np.int32)
    for i, s in enumerate(seqs):
        tokens[i, : len(s)] = s
    full = np.asarray(full_logits(model, jnp.asarray(tokens)))
    return [full[i, len(p) - 1: len(s) - 1] for i, (p, s) in enumerate(zip(prompts, seqs))]


def max_relative_error(got, want):
    return max(float(np.max(np.abs(g - w)) / np.max(np.abs(w))) for g, w in zip(got, want))


@pytest.mark.parametrize("chunk", [2048, 4], ids=lambda c: f"prefill_chunk={c}")
def test_greedy_tokens_equal_transformers_generate(pair, chunk):
    """Prompts of 5, 11 and 3 tokens in one chunk, or 4 at a time (a chunk size that divides none)."""
    hf, ours, prompts = pair
    eos = hf.config.eos_token_id
    want = hf_greedy(hf, prompts, NEW_TOKENS, eos)
    got = generate(ours, prompts, NEW_TOKENS, stop_tokens=(eos,), cache_dtype=jnp.float32, page_size=4,
                   prefill_chunk=chunk)
    assert got == want


@pytest.mark.parametrize("page_size", [1, 5, 64], ids=lambda s: f"page_size={s}")
def test_cached_logits_equal_full_recompute_at_every_step(pair, page_size):
    _, ours, prompts = pair
    seqs, logits = run_stream(ours, prompts, cache_dtype=jnp.float32, page_size=page_size)
    assert max_relative_error(logits, recomputed(ours, prompts, seqs)) < 1e-5


def test_chunked_prefill_logits_equal_full_recompute(pair, monkeypatch):
    """Prompts (5, 11, 3 tokens) prefilled 7 tokens at a time: each chunk attends to the latents
    earlier chunks left in the pages (page size 5, not aligned with the chunks) and to its own, in
    key blocks of 2 tokens; the first and every later token's logits equal a full pass."""
    _, ours, prompts = pair
    monkeypatch.setattr(generation, "ATTENTION_BLOCK", 2)
    seqs, logits = run_stream(ours, prompts, cache_dtype=jnp.float32, page_size=5, prefill_chunk=7)
    assert max_relative_error(logits, recomputed(ours, prompts, seqs)) < 1e-5
