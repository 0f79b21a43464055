"""`mla-jax generate`: text in, text streamed out, then prefill and decode speed.

`--ckpt` takes an mla-jax checkpoint (written by `mla-jax convert`) or a hub directory with
safetensors weights (read through `checkpoints`, imported only then). Several `--prompt`s run as
one batch; a single prompt's text is printed as it is generated.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time

from mla_jax.cache import DEFAULT_PAGE_SIZE, DTYPES as CACHE_DTYPES
from mla_jax.errors import UsageError
from mla_jax.parallel import launch

WEIGHT_DTYPES = ("bfloat16", "float32")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "generate", help="generate text from a checkpoint (streamed, paged latent cache)",
        description="Generate text with a DeepSeek-V2/V3 checkpoint over a paged latent KV cache.",
    )
    p.add_argument("--ckpt", required=True, help="mla-jax checkpoint or hub directory (config.json, "
                                                 "*.safetensors, tokenizer.json)")
    p.add_argument("--prompt", action="append", required=True,
                   help="prompt text; repeat for a batch")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user turn of the chat template")
    p.add_argument("--dtype", choices=WEIGHT_DTYPES, default="bfloat16", help="weight dtype (default bfloat16)")
    p.add_argument("--cache-dtype", choices=sorted(CACHE_DTYPES), default="bfloat16",
                   help="latent cache dtype; fp8 = float8_e4m3fn with per-token scales")
    p.add_argument("--page-size", type=int, default=DEFAULT_PAGE_SIZE, help="tokens per cache page")
    p.add_argument("--prefill-chunk", type=int, default=None, metavar="N",
                   help="prompt tokens per prefill step (default 2048); memory beyond the cache is set by it")
    p.add_argument("--implementation", choices=("xla", "mosaic_gpu"), default=None,
                   help="decode attention (default: the GPU kernel where it runs, else XLA)")
    launch.add_arguments(p)
    p.set_defaults(func=run)


def load_model(path: str, dtype: str, mesh=None):
    """An mla-jax checkpoint through `mla_jax.load`; a hub safetensors directory through checkpoints."""
    import glob

    import jax.numpy as jnp

    if os.path.exists(os.path.join(path, "mla_jax.json")):
        from mla_jax.weights import load

        return load(path, dtype=dtype, mesh=mesh)
    if glob.glob(os.path.join(path, "*.safetensors")):
        from checkpoints.demo import load_tiny

        from mla_jax.parallel.mesh import shard_model

        model = load_tiny(path, param_dtype=jnp.dtype(dtype))[1]
        return model if mesh is None else shard_model(model, mesh)
    raise UsageError(f"{path}: neither an mla-jax checkpoint (mla_jax.json) nor a hub directory with "
                            "*.safetensors; convert other formats with `mla-jax convert`")


def _print(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def check_args(args: argparse.Namespace) -> None:
    """Every option checked before the tokenizer, the weights or a compiler is touched."""
    from mla_jax.generate import check_implementation, check_options
    from mla_jax.sampling import Sampling

    check_options(max_new_tokens=args.max_new_tokens, page_size=args.page_size, seed=args.seed,
                  prefill_chunk=_prefill_chunk(args))
    Sampling(args.temperature, args.top_k, args.top_p)
    check_implementation(args.implementation)
    if not os.path.isdir(args.ckpt):
        raise UsageError(f"--ckpt {args.ckpt}: no such directory")


def run(args: argparse.Namespace) -> int:
    from mla_jax.generate import FINISHED, generate_stream
    from mla_jax.tokenizer import TextStream, Tokenizer

    try:
        check_args(args)
    except UsageError as e:  # say which option, in the option's own spelling
        raise UsageError(_as_option(str(e))) from None
    tokenizer = Tokenizer.from_dir(args.ckpt)
    if args.chat:
        prompts = [tokenizer.encode_chat([{"role": "user", "content": p}]) for p in args.prompt]
    else:
        prompts = [tokenizer.encode(p) for p in args.prompt]
    start = time.perf_counter()
    mesh = launch.start(args)
    # In a job of several processes every one generates (the steps are collective), process 0 prints.
    say = _print if launch.is_main_process() else (lambda text: None)
    model = load_model(args.ckpt, args.dtype, mesh)
    load_seconds = time.perf_counter() - start
    stop = set(tokenizer.eos_token_ids) | set(_as_tuple(model.config.eos_token_id))
    stream = generate_stream(
        model, prompts, args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, stop_tokens=sorted(stop), seed=args.seed, page_size=args.page_size,
        cache_dtype=args.cache_dtype, implementation=args.implementation, prefill_chunk=_prefill_chunk(args))

    single = len(prompts) == 1
    texts = [TextStream(tokenizer) for _ in prompts]
    try:
        if single:
            say(args.prompt[0])
        for step in stream:
            for i, token in enumerate(step.tolist()):
                if token == FINISHED:
                    continue
                piece = texts[i].push(token)
                if single:
                    say(piece)
    except BaseException:
        if single:  # end the streamed line, so that whatever is reported next starts on its own
            say("\n")
        raise
    if single:
        say(texts[0].flush() + "\n")
    else:
        for prompt, text in zip(args.prompt, texts):
            say(f"--- {prompt!r}\n{prompt}{tokenizer.decode(text.ids)}\n")

    s, c = stream.stats, model.config
    mha = c.kv_cache_bytes_per_token(2)["mha"]
    say(f"prefill: {s.prefill_tokens_per_second:,.1f} tok/s, decode: {s.decode_tokens_per_second:,.1f} tok/s "
        f"(batch {s.batch}, {s.prompt_tokens} prompt + {s.decode_tokens} decoded tokens; load "
        f"{load_seconds:.1f} s, compile {s.compile_seconds:.1f} s; {stream.implementation} decode attention; "
        f"cache {s.cache_bytes_per_token:,} B/token {args.cache_dtype} latent vs {mha:,} B/token bf16 MHA)\n")
    return 0


def _prefill_chunk(args: argparse.Namespace) -> int:
    from mla_jax.generate import PREFILL_CHUNK

    return PREFILL_CHUNK if args.prefill_chunk is None else args.prefill_chunk


def _as_option(message: str) -> str:
    """"page_size=0; expected ..." -> "--page-size 0: expected ..." (the library names its parameter)."""
    m = re.match(r"(\w+)=(\S+?)(; | )(.*)$", message)
    if not m:
        return message
    name, value, sep, rest = m.groups()
    return f"--{name.replace('_', '-')} {value.strip(chr(39))}{': ' if sep == '; ' else ' '}{rest}"


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
