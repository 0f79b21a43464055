"""Decode speed of `mla_jax.generate` against transformers' `generate`, measured in one run.

CPU mode (default off a GPU): the shipped tiny V3 checkpoint (`checkpoints/tiny_v3`), loaded by both
libraries in float32, the same batch of prompts cut from the bundled corpus, greedy, a fixed number
of new tokens (no stop token). Warm-up runs (compilation) are excluded; each figure is the median
of `--repeats`. Decode tokens/s is measured end to end for both sides the same way:
batch x (N - 1) / (time to generate N tokens - time to generate 1 token), so prefill is excluded.

GPU mode (when JAX sees a GPU): V2-Lite layer shapes with random bf16 weights and fewer layers,
over several batch sizes, the latent-cache decode through the Mosaic GPU kernel and the XLA
reference; transformers joins only when torch sees a GPU too.

V2-Lite mode (`--mode v2-lite`, CPU): V2-Lite layer shapes with `--layers` layers (the first dense),
random bf16 weights made once by transformers and loaded by both sides (ours as `--param-dtype`;
float32 holds the bf16 values exactly), random prompts of `--prompt` tokens, greedy, 32 new tokens,
at `--batches`. Prefill tok/s = batch x prompt / time to generate 1 token; the memory-bandwidth
roofline (host copy GB/s over the bf16 weight bytes a decode step reads) measured in the same run.

Writes bench/results/generate-<cpu|gpu|v2-lite>-<date>[-<param dtype>].json (machine, versions,
settings, figures).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from mla_jax import Config  # noqa: E402
from mla_jax.generate import generate  # noqa: E402


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: compilation, allocator, caches
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def decode_rate(run, batch: int, new_tokens: int, repeats: int) -> dict:
    """Tokens/s of decoding alone: (N-1) steps' worth of tokens over the time they add to 1 step."""
    t_n = median_seconds(lambda: run(new_tokens), repeats)
    t_1 = median_seconds(lambda: run(1), repeats)
    return {"seconds_for_n_tokens": t_n, "seconds_for_1_token": t_1,
            "decode_tokens_per_s": batch * (new_tokens - 1) / (t_n - t_1)}


def corpus_prompts(tokenizer, batch: int, lengths: list[int]) -> list[list[int]]:
    text = open(os.path.join(os.path.dirname(HERE), "mla_jax", "data", "corpus.txt")).read()
    ids = tokenizer.encode(text, add_bos=False)
    return [ids[i * 97: i * 97 + lengths[i % len(lengths)]] for i in range(batch)]


def ours_runner(model, prompts, **kwargs):
    def run(n):
        return generate(model, prompts, n, **kwargs)
    return run


def hf_runner(hf, prompts, device: str = "cpu"):
    import torch

    width = max(map(len, prompts))
    ids = torch.zeros((len(prompts), width), dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)

    def run(n):
        with torch.no_grad():
            out = hf.generate(input_ids=ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n,
                              do_sample=False, pad_token_id=0)
        if device != "cpu":
            torch.cuda.synchronize()
        return out.cpu()
    return run


def cpu_bench(args) -> dict:
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    from checkpoints.demo import load_tiny
    from checkpoints.make_tiny import SHIPPED
    from mla_jax.tokenizer import Tokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    config, model = load_tiny(SHIPPED, param_dtype=jnp.float32)
    hf = AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32).eval()
    prompts = corpus_prompts(Tokenizer.from_dir(SHIPPED), args.batch, args.prompt_lengths)
    rows = []
    for name, run in [
        ("transformers generate (torch, float32, dynamic KV cache)", hf_runner(hf, prompts)),
        ("mla_jax generate (float32 latent cache)", ours_runner(model, prompts, cache_dtype=jnp.float32)),
        ("mla_jax generate (bfloat16 latent cache, default)", ours_runner(model, prompts)),
    ]:
        row = {"name": name, **decode_rate(run, len(prompts), args.new_tokens, args.repeats)}
        rows.append(row)
        print(f"  {name:<58} {row['decode_tokens_per_s']:>10,.1f} decode tok/s")
    same = [list(map(int, r[-args.new_tokens:])) for r in hf_runner(hf, prompts)(args.new_tokens).tolist()]
    ours = generate(model, prompts, args.new_tokens, cache_dtype=jnp.float32)
    speedup = rows[1]["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
    print(f"  float32 greedy tokens identical to transformers': {same == ours}; speed-up {speedup:.1f}x")
    return {"model": "checkpoints/tiny_v3 (" + _describe(config) + ")", "rows": rows,
            "greedy_tokens_identical": same == ours, "speedup_float32": speedup,
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def v2_lite_shapes(layers: int, smoke: bool) -> Config:
    """DeepSeek-V2-Lite's layer shapes, fewer layers (the first dense, the rest MoE).

    `smoke` shrinks every width so the GPU code path can be exercised on a CPU; never reported.
    """
    config = Config.preset("deepseek-v2-lite").replace(num_hidden_layers=layers)
    if smoke:
        config = config.replace(hidden_size=64, intermediate_size=96, moe_intermediate_size=32, vocab_size=512,
                                num_attention_heads=4, kv_lora_rank=64, qk_nope_head_dim=16, qk_rope_head_dim=16,
                                v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2, bos_token_id=None,
                                eos_token_id=None)
    return config


def random_pair(config: Config, torch_device: str | None, param_dtype=jnp.bfloat16):
    """(transformers model on torch_device or None, our model with the same random bf16 weights).

    Our side holds them as `param_dtype` (float32 keeps the bf16 values exactly).
    """
    from flax import nnx

    from mla_jax import Transformer

    if torch_device is None:
        return None, Transformer(config, param_dtype=param_dtype, rngs=nnx.Rngs(0))
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from checkpoints.state_dict import load_state_dict

    torch.manual_seed(0)
    hf_config = AutoConfig.for_model(**config.to_hf())
    hf = AutoModelForCausalLM.from_config(hf_config, dtype=torch.bfloat16).eval()
    ours = load_state_dict(config, hf.state_dict(), param_dtype=param_dtype)
    return hf.to(torch_device), ours


def gpu_bench(args) -> dict:
    config = v2_lite_shapes(args.gpu_layers, args.smoke)
    torch_device = None
    try:
        import torch

        torch_device = "cuda" if torch.cuda.is_available() else ("cpu" if args.smoke else None)
    except ImportError:
        pass
    hf, model = random_pair(config, torch_device)
    on_gpu = jax.default_backend() == "gpu"
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.gpu_batches:
        prompts = [rng.integers(0, config.vocab_size, args.gpu_prompt).tolist() for _ in range(batch)]
        runs = [(impl, ours_runner(model, prompts, implementation=impl))
                for impl in (("mosaic_gpu", "xla") if on_gpu else ("xla",))]
        if hf is not None:
            runs.append((f"transformers ({torch_device})", hf_runner(hf, prompts, torch_device)))
        for impl, run in runs:
            name = f"batch {batch}: " + (impl if impl.startswith("transformers") else f"mla_jax, {impl} decode attention")
            row = {"name": name, "batch": batch, **decode_rate(run, batch, args.new_tokens, args.repeats)}
            rows.append(row)
            print(f"  {name:<58} {row['decode_tokens_per_s']:>10,.1f} decode tok/s")
    return {"model": f"V2-Lite layer shapes, {args.gpu_layers} layers, random bf16 weights"
                     + (" (SMOKE: shrunk widths)" if args.smoke else ""),
            "rows": rows, "prompt_tokens": args.gpu_prompt}


def copy_bandwidth_gbs(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Memory traffic of a large host copy (bytes read + bytes written per second), median."""
    src = np.ones(nbytes // 8, np.float64)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # touch every page first
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


def weight_bytes_per_decode_step(config: Config, batch: int, bytes_per_param: int = 2) -> dict:
    """Weight bytes one decode step reads: everything but the embedding table and the routed
    experts, plus the routed experts a batch touches (expected distinct experts of `batch` tokens
    choosing K of E uniformly: E·(1 - (1 - K/E)^batch))."""
    from flax import nnx

    from mla_jax import Transformer
    from mla_jax.layers import param_count

    abstract = nnx.eval_shape(lambda: Transformer(config, param_dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    total = param_count(nnx.state(abstract))
    embed = config.vocab_size * config.hidden_size
    e, k = config.n_routed_experts, config.num_experts_per_tok
    per_expert = 3 * config.hidden_size * config.moe_intermediate_size
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    routed = moe_layers * e * per_expert
    touched = e * (1 - (1 - k / e) ** batch)
    params = total - embed - routed + moe_layers * touched * per_expert
    return {"bytes": int(params * bytes_per_param), "expected_distinct_experts": touched}


def prefill_decode(run, batch: int, prompt: int, new_tokens: int, repeats: int) -> dict:
    """Prefill tok/s = batch·prompt / t(1 token); decode tok/s as `decode_rate`."""
    row = decode_rate(run, batch, new_tokens, repeats)
    row["prefill_tokens_per_s"] = batch * prompt / row["seconds_for_1_token"]
    return row


def v2_lite_bench(args) -> dict:
    """V2-Lite layer shapes, random bf16 weights, both libraries side by side on CPU."""
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count() or 1)
    config = v2_lite_shapes(args.layers, args.smoke)
    param_dtype = {"bfloat16": jnp.bfloat16, "float32": jnp.float32}[args.param_dtype]
    hf, model = random_pair(config, "cpu", param_dtype)
    bandwidth = copy_bandwidth_gbs()
    print(f"  host copy bandwidth (read + write) {bandwidth:.1f} GB/s")
    rng = np.random.default_rng(0)
    rows = []
    for batch in args.batches:
        prompts = [rng.integers(0, config.vocab_size, args.prompt).tolist() for _ in range(batch)]
        weights = weight_bytes_per_decode_step(config, batch)
        roofline = batch * bandwidth * 1e9 / weights["bytes"]
        for name, run in [("transformers generate (torch, bf16 weights and compute)", hf_runner(hf, prompts)),
                          (f"mla_jax generate ({args.param_dtype} weights, bf16 latent cache)",
                           ours_runner(model, prompts))]:
            row = {"name": name, "batch": batch,
                   **prefill_decode(run, batch, args.prompt, args.new_tokens, args.repeats),
                   "bf16_weight_bytes_per_step": weights["bytes"],
                   "expected_distinct_experts": weights["expected_distinct_experts"],
                   "roofline_decode_tokens_per_s": roofline}
            row["fraction_of_roofline"] = row["decode_tokens_per_s"] / roofline
            rows.append(row)
            print(f"  batch {batch}: {name:<58} prefill {row['prefill_tokens_per_s']:>9,.1f} tok/s  decode "
                  f"{row['decode_tokens_per_s']:>7,.1f} tok/s ({row['fraction_of_roofline']:.0%} of roofline "
                  f"{roofline:,.1f})", flush=True)
        ours, theirs = rows[-1], rows[-2]
        ours["decode_speedup_vs_transformers"] = ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"]
        ours["prefill_speedup_vs_transformers"] = ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"]
        print(f"  batch {batch}: decode {ours['decode_speedup_vs_transformers']:.2f}x, prefill "
              f"{ours['prefill_speedup_vs_transformers']:.2f}x transformers'")
    return {"model": f"V2-Lite layer shapes, {args.layers} layers ({_describe(config)}), random bf16 weights "
                     "shared by both sides" + (" (SMOKE: shrunk widths)" if args.smoke else ""),
            "rows": rows, "prompt_tokens": args.prompt, "new_tokens": args.new_tokens,
            "copy_bandwidth_GBs": bandwidth,
            "roofline_method": "batch x copy bandwidth / bf16 weight bytes read per decode step",
            "load_average_at_end": os.getloadavg(),
            "versions": {"torch": torch.__version__, "transformers": transformers.__version__}}


def _describe(c: Config) -> str:
    return (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
            f"latent {c.kv_lora_rank}+{c.qk_rope_head_dim}, {c.n_routed_experts} experts top-{c.num_experts_per_tok}")


def write_result(kind: str, result: dict) -> str:
    os.makedirs(os.path.join(HERE, "results"), exist_ok=True)
    path = os.path.join(HERE, "results", f"generate-{kind}-{datetime.date.today().isoformat()}.json")
    if kind == "v2-lite":
        path = path.replace(".json", f"-{result['settings']['param_dtype']}.json")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(result, f, indent=2)
    os.replace(tmp, path)  # never a half-written result
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt-lengths", type=int, nargs="+", default=[24, 40, 31, 17])
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--gpu-layers", type=int, default=4)
    p.add_argument("--gpu-batches", type=int, nargs="+", default=[1, 16, 64])
    p.add_argument("--gpu-prompt", type=int, default=512)
    p.add_argument("--mode", choices=("auto", "cpu", "gpu", "v2-lite"), default="auto",
                   help="v2-lite: V2-Lite layer shapes on CPU, transformers side by side")
    p.add_argument("--layers", type=int, default=2, help="v2-lite mode: decoder layers (the first dense)")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="v2-lite mode")
    p.add_argument("--prompt", type=int, default=128, help="v2-lite mode: prompt tokens")
    p.add_argument("--param-dtype", choices=("bfloat16", "float32"), default="float32",
                   help="v2-lite mode: how our side holds the (bf16) weights")
    p.add_argument("--smoke", action="store_true", help="GPU / v2-lite mode with tiny widths; writes nothing")
    args = p.parse_args()
    kind = args.mode if args.mode != "auto" else ("gpu" if jax.default_backend() == "gpu" else "cpu")
    device = jax.devices()[0]
    print(f"bench/generate.py: {kind} mode on {device.device_kind} (jax {jax.__version__})")
    bench = {"cpu": cpu_bench, "gpu": gpu_bench, "v2-lite": v2_lite_bench}[kind]
    if kind == "v2-lite" and args.new_tokens == p.get_default("new_tokens"):
        args.new_tokens = 32
    result = bench(args)
    result.update({
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                    "cpu_count": os.cpu_count(), "jax_device": device.device_kind},
        "jax": jax.__version__,
        "settings": {k: v for k, v in vars(args).items()},
        "method": "median of repeats after a warm-up; decode tok/s = batch*(N-1)/(t(N tokens) - t(1 token))",
    })
    if args.smoke:
        print("smoke run: nothing written")
    else:
        print("wrote", write_result(kind, result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
