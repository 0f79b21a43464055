"""`mla-jax finetune --demo`: a tiny DeepSeek-V3-layout model learns the bundled public-domain text.

The model has the config and tokenizer of the shipped tiny checkpoint (`checkpoints/tiny_v3/`: MLA,
8 routed experts + 1 shared, noaux_tc routing with the correction bias) and starts from random
weights, so the falling loss is learning, not recall. The bias update runs at γ = 0.01 (ten times
DeepSeek-V3's 0.001, which is tuned for runs of many thousand steps) so that the expert-load
imbalance visibly falls within the few hundred steps of a demo.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

import jax.numpy as jnp
from flax import nnx

from mla_jax.config import Config
from mla_jax.model import Transformer
from mla_jax.training.config import TrainConfig
from mla_jax.training.data import load_tokenizer
from mla_jax.training.loop import finetune

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")

DEMO = TrainConfig(
    steps=300, seq_len=64, batch_size=8, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.01,
    param_dtype="float32", bias_update_speed=0.01, seq_aux_alpha=1e-4, save_every=100, log_every=25,
)


def tiny_checkpoint_dir() -> str:
    """`checkpoints/tiny_v3`, found beside the installed `checkpoints` package (not imported: it needs torch)."""
    spec = importlib.util.find_spec("checkpoints")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        path = os.path.join(root, "tiny_v3")
        if os.path.exists(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError("the demo needs checkpoints/tiny_v3 (config.json, tokenizer.json), shipped with "
                            f"mla-jax; not found under {roots or 'any installed checkpoints package'}")


def run_demo(out: str | None = None, *, steps: int | None = None, resume: bool | int = False,
             progress: bool = True, log=print) -> dict:
    tiny = tiny_checkpoint_dir()
    config = Config.from_hf(tiny)
    tc = DEMO if steps is None else DEMO.__class__(**{**DEMO.to_dict(), "steps": steps})
    out = out or tempfile.mkdtemp(prefix="mla-jax-finetune-demo-")
    model = Transformer(config, param_dtype=jnp.float32, rngs=nnx.Rngs(tc.seed))
    log(f"demo: {config.num_hidden_layers}-layer DeepSeek-V3-layout model ({config.n_routed_experts} experts, "
        f"top-{config.num_experts_per_tok}), random init, on {CORPUS}; output in {out}")
    summary = finetune(model, CORPUS, out, tc, tokenizer=load_tokenizer(tiny), tokenizer_from=tiny,
                       base=f"random init, config of {tiny}", resume=resume, progress=progress, log=log)
    log(_story(summary["records"]))
    return summary


def _story(records: list[dict]) -> str:
    """First and last tenth of the run, averaged: the loss and the expert-load imbalance."""
    n = max(1, len(records) // 10)
    head, tail = records[:n], records[-n:]

    def avg(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    return (f"loss {avg(head, 'loss'):.3f} -> {avg(tail, 'loss'):.3f}; expert load max/mean "
            f"{avg(head, 'expert_load_max_over_mean'):.3f} -> {avg(tail, 'expert_load_max_over_mean'):.3f} "
            f"(means over the first and last {n} steps)")
