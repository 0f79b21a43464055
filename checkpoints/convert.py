"""`mla-jax convert SRC DST`: a Hugging Face / PyTorch DeepSeek directory -> an mla-jax checkpoint.

Everything is checked before a byte is written: the destination (never inside, equal to or
containing the source; replaced only if it is an mla-jax checkpoint), config.json, every file's
header, and every tensor's name, shape and dtype against what config.json implies. Then tensors
stream through one at a time (FP8 ones dequantized in the output dtype's precision: DeepSeek's own
rounding for bfloat16), routed experts are stacked per variable, and each
variable goes to disk in parts (`mla_jax.store`) as soon as it is whole: resident memory stays near
the largest variable, never the model. The result, with a checksum of every file, appears at DST
only once complete; an interrupt or a full disk leaves no temporary directory behind.

`weights` chooses quantized storage: "fp8" keeps a DeepSeek FP8 release as released (e4m3 values
and block scales, bit for bit; `checkpoints.fp8.keeping`), "int8" quantizes a bfloat16/float32
model per output channel (`checkpoints.int8`). The layout records the scheme (`mla_jax.json`
"quantization"), and `mla_jax.load` gives a model that computes with the quantized weights.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from checkpoints import fp8, int8, names
from checkpoints.readers import Prefetcher, Source, open_source
from checkpoints.state_dict import assemble, read_order, variable_at
from mla_jax import store
from mla_jax.config import Config
from mla_jax.quant.blocks import INT8_PER_CHANNEL, Scheme
from mla_jax.weights import QUANTIZATION_KEY, abstract_model, as_dtype

_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), fp8.BF16}
WEIGHTS = ("fp8", "int8")


@dataclasses.dataclass(frozen=True)
class Report:
    dst: str
    tensors: int
    bytes_read: int
    seconds: float
    mtp_tensors: int


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype="bfloat16", keep_mtp: bool = False,
            overwrite: bool = False, progress: bool = True, part_bytes: int = store.DEFAULT_PART_BYTES,
            weights: str | None = None) -> Report:
    """Converts the model directory `src` into an mla-jax checkpoint at `dst` (see module doc).

    dtype: "bfloat16" or "float32" for the stored weights. keep_mtp: also store the multi-token-
    prediction layer (hub layout, hub names) so that `export` writes it back; the model never runs it.
    weights: None (every weight in `dtype`), "fp8" (keep an FP8 release's weights and scales) or
    "int8" (quantize the projections per output channel); other weights are still in `dtype`.
    """
    if weights is not None and weights not in WEIGHTS:
        raise ValueError(f"weights={weights!r}; expected one of {WEIGHTS} or None")
    src, dst = store.user_path(src), store.user_path(dst)
    target = as_dtype(dtype)
    store.check_separate(dst, src)
    config_path = os.path.join(src, store.CONFIG_FILE)
    config = Config.from_hf(src if os.path.isdir(src) else config_path)
    with open(config_path) as f:
        raw = json.load(f)
    opened = open_source(src)  # headers only
    # Refused before minutes of reading: DST must keep clear of SRC and of every weight file (shards
    # may be links into another directory, as in the hub cache), and may replace only a checkpoint.
    sources = [src, *sorted({ref.file for ref in opened.refs.values()})]
    store.check_destination(dst, overwrite, kind=store.CHECKPOINT, sources=sources)
    quant = fp8.quantization(raw, config_path)
    scheme = None
    if weights is None:
        source = fp8.dequantizing(opened, quant, config_path, target)
    elif weights == "fp8":
        source, scale_dtype = fp8.keeping(opened, quant, config_path)
        scheme = Scheme("fp8", quant.block, quant.scale_fmt, scale_dtype)
    else:
        if quant is not None:
            raise store.CheckpointError(f"{config_path}: the model is an FP8 release; keep its weights with "
                                        "--weights fp8 (int8 quantizes bfloat16/float32 models)")
        scheme = INT8_PER_CHANNEL
        source = int8.quantizing(opened, config, scheme, config_path)
    with_scales = scheme is not None
    model = abstract_model(config, target, scheme)
    mtp = check_tensors(config, source, model, config_path, raw.get("torch_dtype") or raw.get("dtype"), scheme)
    mtp = mtp if keep_mtp else []
    wanted = [e.hf for e in names.entries(config, with_scales)] + mtp
    total = sum(source.refs[n].nbytes for n in wanted)

    from tqdm import tqdm

    start = time.perf_counter()
    with store.Writer(dst, overwrite=overwrite, part_bytes=part_bytes, sources=sources) as writer, \
            Prefetcher(source, read_order(config, with_scales) + mtp) as prefetch, tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1024, desc="convert", disable=not progress,
        dynamic_ncols=True,
    ) as bar:
        done = 0

        def read(name: str) -> np.ndarray:
            nonlocal done
            array = prefetch.get(name)
            done += 1
            bar.update(source.refs[name].nbytes)
            bar.set_postfix_str(f"tensors {done}/{len(wanted)}", refresh=False)
            return array

        for path, array, _ in assemble(config, model, read, borrowed=True, with_scales=with_scales):
            writer.add(path, array.astype(variable_at(model, path).dtype, copy=False))
            del array  # the writer holds it until written; the next variable must not wait on us
        writer.flush()  # the MTP layer gets parts of its own, so loading never touches them
        for name in mtp:
            # a copy: read() lends a buffer. Kept FP8 stays FP8 (its scales are MTP tensors too).
            kept = weights == "fp8" and source.refs[name].dtype in (fp8.FP8, np.dtype(np.float32))
            writer.add(("mtp", name), np.array(read(name), dtype=source.refs[name].dtype if kept else target))
        out_config = config.to_hf()
        if not mtp:
            out_config["num_nextn_predict_layers"] = 0  # say what is stored: no MTP weights
        extra = {"source": {"directory": os.path.abspath(src), "format": source.kind}, "mtp": mtp}
        if scheme is not None:
            extra[QUANTIZATION_KEY] = scheme.to_json()
            if scheme.to_hf() is not None:
                out_config["quantization_config"] = scheme.to_hf()
        writer.commit(out_config, dtype=target.name, tokenizer_from=src, extra=extra)
    return Report(dst, len(wanted), total, time.perf_counter() - start, len(mtp))


def check_tensors(config: Config, source: Source, model, config_path: str, declared_dtype,
                  scheme: Scheme | None = None) -> list[str]:
    """Every expected tensor present with the shape and a dtype config.json implies; nothing extra.

    With a quantization `scheme`, the quantized weights in its dtype and their float32 scales.
    Returns the MTP module's tensor names (present in the source, never expected).
    """
    refs = source.refs
    expected = list(names.entries(config, with_scales=scheme is not None))
    missing = [e.hf for e in expected if e.hf not in refs]
    if missing:
        raise store.CheckpointError(
            f"{source.directory}: {len(missing)} tensor(s) that {config_path} implies are missing, "
            f"e.g. {missing[:4]}"
        )
    for e in expected:
        ref = refs[e.hf]
        shape = tuple(variable_at(model, e.path).shape)
        want = names.hub_shape(e, shape[1:] if e.expert is not None else shape)
        if tuple(ref.shape) != want:
            raise store.CheckpointError(
                f"{ref.file}: tensor {e.hf!r} has shape {list(ref.shape)} but {config_path} implies {list(want)}"
            )
        if scheme is not None and (e.kind == names.SCALE or names.quantized(e)):
            want_dtype = np.dtype(np.float32) if e.kind == names.SCALE else scheme.storage_dtype
            if ref.dtype != want_dtype:
                raise store.CheckpointError(
                    f"{ref.file}: tensor {e.hf!r} has dtype {ref.dtype}; quantized ({scheme.method}) it should be {want_dtype}"
                )
        elif ref.dtype not in _FLOATS:
            raise store.CheckpointError(
                f"{ref.file}: tensor {e.hf!r} has dtype {ref.dtype} but {config_path} "
                f"(dtype {declared_dtype}) implies floating-point weights"
            )
    known = {e.hf for e in expected}
    mtp = [n for n in refs if n not in known and names.is_mtp(n, config)]
    unexpected = []
    for n in sorted(set(refs) - known - set(mtp)):
        try:  # transformers writes placeholders for shared experts a config turns off
            if not names.is_placeholder(n, tuple(refs[n].shape), config, lambda n=n: source.read(n)):
                unexpected.append(n)
        except ValueError as e:
            raise store.CheckpointError(f"{refs[n].file}: {e} ({config_path})") from None
    if unexpected:
        raise store.CheckpointError(
            f"{source.directory}: {len(unexpected)} unexpected tensor(s) that {config_path} does not "
            f"describe, e.g. {unexpected[:4]} (in {refs[unexpected[0]].file})"
        )
    return mtp
