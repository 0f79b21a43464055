"""`mla-jax demo`: load the shipped tiny DeepSeek-V3-layout checkpoint and show what MLA buys.

No download and no torch: the checkpoint in `checkpoints/tiny_v3/` was written by transformers'
`save_pretrained`, and transformers' logits for a fixed prompt are stored beside it. The demo loads
it through the same name map as the converter, checks our logits against those, checks that the
absorbed (decode) form of attention agrees with the expanded one, and prints the latent cache's
bytes per token (measured from the cache a short greedy generation used) next to what standard
multi-head attention would cache.
"""

from __future__ import annotations

import glob
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from checkpoints.make_tiny import SHIPPED
from checkpoints.state_dict import load_state_dict
from mla_jax.config import Config

PARITY_TOL = 1e-4


def load_tiny(path: str = SHIPPED, param_dtype=jnp.float32):
    from safetensors.numpy import load_file

    config = Config.from_hf(path)
    tensors = {}
    for shard in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        tensors.update(load_file(shard))
    return config, load_state_dict(config, tensors, param_dtype=param_dtype)


def _describe(c: Config) -> str:
    rs = c.rope_scaling
    rope = f"YaRN x{rs.factor:g}" if rs.type == "yarn" else rs.type
    return (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"latent {c.kv_lora_rank} + rope {c.qk_rope_head_dim}, {c.n_routed_experts} routed experts "
            f"(top-{c.num_experts_per_tok}, {c.topk_method}, {c.scoring_func}) + {c.n_shared_experts} shared, {rope}")


def cache_table(configs: dict[str, Config], dtype_bytes: int = 2) -> list[str]:
    rows = [f"  {'model':<18}{'MLA latent':>14}{'standard MHA':>16}{'smaller by':>12}"]
    for name, c in configs.items():
        b = c.kv_cache_bytes_per_token(dtype_bytes)
        rows.append(f"  {name:<18}{b['mla']:>12,} B{b['mha']:>14,} B{b['mha'] / b['mla']:>11.1f}x")
    return rows


def run(path: str = SHIPPED) -> int:
    print(f"mla-jax demo · jax {jax.__version__} on {jax.devices()[0].platform}")
    t0 = time.perf_counter()
    config, model = load_tiny(path)
    print(f"loaded {path}\n  {_describe(config)}  ({time.perf_counter() - t0:.1f} s)")

    ref = np.load(os.path.join(path, "reference_logits.npz"))
    tokens = jnp.asarray(ref["tokens"])
    forward = jax.jit(lambda t, form: model(t, attention_form=form), static_argnums=1)
    ok = True
    for form in ("expanded", "absorbed"):
        logits = np.asarray(forward(tokens, form))
        err = float(np.max(np.abs(logits - ref["logits"])) / np.max(np.abs(ref["logits"])))
        passed = err <= PARITY_TOL
        ok &= passed
        print(f"  {form:>8} attention vs transformers' logits: max rel err {err:.1e} "
              f"[{'ok' if passed else 'FAIL'}, bound {PARITY_TOL:g}]")
    print(f'  prompt: "{ref["prompt"]}" ({tokens.shape[1]} tokens)')

    ok &= _generate(path, model, config)

    print("latent cache per token, all layers, bf16 (computed from each config):")
    presets = {name: Config.preset(name) for name in ("deepseek-v2-lite", "deepseek-v2", "deepseek-v3")}
    for row in cache_table({"tiny_v3 (this)": config, **presets}):
        print(row)
    print("demo " + ("passed" if ok else "FAILED"))
    return 0 if ok else 1


def _generate(path: str, model, config: Config) -> bool:
    """Greedy continuation through the paged latent cache; checks the cache's measured size."""
    from mla_jax.generate import generate_stream
    from mla_jax.tokenizer import Tokenizer

    tok = Tokenizer.from_dir(path)
    prompts = ["Four score and seven years ago", "It was the best of times,"]
    stream = generate_stream(model, [tok.encode(p) for p in prompts], 24)
    steps = [step for step in stream]
    s = stream.stats
    print(f"generated 24 tokens for {len(prompts)} prompts through the paged latent cache (bf16 pages; "
          f"the weights are random, so the text is too):")
    for i, p in enumerate(prompts):
        new = [int(step[i]) for step in steps if int(step[i]) >= 0]
        print(f"  {p!r} -> {tok.decode(new)!r}")
    expected = config.kv_cache_bytes_per_token(2)
    ok = s.cache_bytes_per_token == expected["mla"]
    print(f"  cache measured from its arrays: {s.cache_bytes_per_token} B/token "
          f"(= {config.num_hidden_layers} layers x ({config.kv_lora_rank} + {config.qk_rope_head_dim}) x 2 B: "
          f"{'ok' if ok else 'FAIL'}); standard MHA would cache {expected['mha']} B/token")
    return ok


def register(subparsers) -> None:
    p = subparsers.add_parser("demo", help="run the shipped tiny DeepSeek-V3 checkpoint (no download, no torch)")
    p.add_argument("--path", default=SHIPPED, help="a hub-layout checkpoint directory with reference_logits.npz")
    p.set_defaults(func=lambda args: run(args.path))
