"""`mla-jax finetune --demo`: the shipped tiny DeepSeek-V3-layout checkpoint learns the bundled text.

The model is `checkpoints/tiny_v3/` (MLA, 8 routed experts + 1 shared, noaux_tc routing; random
weights written by transformers, router correction bias included), fine-tuned on the bundled
public-domain text (`mla_jax/data/corpus.txt`) with DeepSeek-V3's balancing defaults: the bias
update at γ = 0.001 and the sequence-wise loss at α = 0.0001. The shipped bias was not made for this
text, so a few experts start out over-loaded; the log shows the loss and that imbalance falling.
With `--bias-update-speed 0` the imbalance stays where it started (about 1.5). At the end the saved
result is loaded back with `mla_jax.load` and continues a line of the text greedily.

The checkpoint is in the hub layout, which only `checkpoints` reads; the CLI loads it and hands the
model in, so this module needs nothing above `mla_jax`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import tempfile

from mla_jax.model import Transformer
from mla_jax.training.config import TrainConfig
from mla_jax.training.data import load_tokenizer
from mla_jax.training.loop import finetune

CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "corpus.txt")

DEMO = TrainConfig(
    steps=300, seq_len=64, batch_size=8, lr=3e-3, warmup_steps=20, min_lr_ratio=0.1, weight_decay=0.01,
    param_dtype="float32", save_every=100, log_every=25,
)


def tiny_checkpoint_dir() -> str:
    """`checkpoints/tiny_v3`, found beside the installed `checkpoints` package (located, not imported)."""
    spec = importlib.util.find_spec("checkpoints")
    roots = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    for root in roots:
        path = os.path.join(root, "tiny_v3")
        if os.path.exists(os.path.join(path, "config.json")):
            return path
    raise FileNotFoundError("the demo needs checkpoints/tiny_v3 (config.json, tokenizer.json), shipped with "
                            f"mla-jax; not found under {roots or 'any installed checkpoints package'}")


def run_demo(model: Transformer, tiny_dir: str, out: str | None = None, *, overrides: dict | None = None,
             resume: bool | int = False, overwrite: bool = False, stop_after: int | None = None,
             progress: bool = True, log=print) -> dict:
    """Fine-tunes `model` (the tiny checkpoint at `tiny_dir`) on the bundled text; returns the summary."""
    tc = dataclasses.replace(DEMO, **(overrides or {}))
    out = out or tempfile.mkdtemp(prefix="mla-jax-finetune-demo-")
    c = model.config
    log(f"demo: fine-tuning {tiny_dir} ({c.num_hidden_layers} layers, {c.n_routed_experts} routed experts, "
        f"top-{c.num_experts_per_tok}) on {CORPUS}; output in {out}")
    summary = finetune(model, CORPUS, out, tc, tokenizer=load_tokenizer(tiny_dir), tokenizer_from=tiny_dir,
                       base=tiny_dir, resume=resume, overwrite=overwrite, stop_after=stop_after, progress=progress,
                       log=log)
    log(story(summary["records"]))
    if summary.get("model"):
        from mla_jax.weights import load

        log(sample(load(summary["model"], dtype="float32"), tiny_dir))
    return summary


def sample(model: Transformer, tiny_dir: str, prompt: str = "Four score and seven years ago") -> str:
    """A greedy continuation from the fine-tuned model, through the paged-cache generation path."""
    from mla_jax.generate import generate
    from mla_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(tiny_dir)
    new = generate(model, [tok.encode(prompt)], 24)[0]
    return f"after fine-tuning, greedy: {prompt!r} -> {tok.decode(new)!r}"


def story(records: list[dict]) -> str:
    """First and last tenth of the run, averaged: the loss and the expert-load imbalance."""
    n = max(1, len(records) // 10)
    head, tail = records[:n], records[-n:]

    def avg(rs, k):
        return sum(r[k] for r in rs) / len(rs)

    return (f"loss {avg(head, 'loss'):.3f} -> {avg(tail, 'loss'):.3f}; expert load max/mean "
            f"{avg(head, 'expert_load_max_over_mean'):.3f} -> {avg(tail, 'expert_load_max_over_mean'):.3f} "
            f"(means over the first and last {n} steps)")
