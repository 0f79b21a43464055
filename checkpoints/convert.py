"""`mla-jax convert SRC DST`: a Hugging Face / PyTorch DeepSeek directory -> an mla-jax checkpoint.

Everything is checked before a byte is written: the destination (never inside, equal to or
containing the source; replaced only if it is an mla-jax checkpoint), config.json, every file's
header, and every tensor's name, shape and dtype against what config.json implies. Then tensors
stream through one at a time (FP8 ones dequantized in the output dtype's precision: DeepSeek's own
rounding for bfloat16), routed experts are stacked per variable, and each
variable goes to disk in parts (`mla_jax.store`) as soon as it is whole: resident memory stays near
the largest variable, never the model. The result, with a checksum of every file, appears at DST
only once complete; an interrupt or a full disk leaves no temporary directory behind.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time

import numpy as np

from checkpoints import fp8, names
from checkpoints.readers import Prefetcher, Source, open_source
from checkpoints.state_dict import assemble, read_order, variable_at
from mla_jax import store
from mla_jax.config import Config
from mla_jax.weights import abstract_model, as_dtype

_FLOATS = {np.dtype(np.float32), np.dtype(np.float16), np.dtype(np.float64), fp8.BF16}


@dataclasses.dataclass(frozen=True)
class Report:
    dst: str
    tensors: int
    bytes_read: int
    seconds: float
    mtp_tensors: int


def convert(src: str | os.PathLike, dst: str | os.PathLike, *, dtype="bfloat16", keep_mtp: bool = False,
            overwrite: bool = False, progress: bool = True, part_bytes: int = store.DEFAULT_PART_BYTES) -> Report:
    """Converts the model directory `src` into an mla-jax checkpoint at `dst` (see module doc).

    dtype: "bfloat16" or "float32" for the stored weights. keep_mtp: also store the multi-token-
    prediction layer (hub layout, hub names) so that `export` writes it back; the model never runs it.
    """
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
    source = fp8.dequantizing(opened, fp8.quantization(raw, config_path), config_path, target)
    model = abstract_model(config, target)
    mtp = check_tensors(config, source, model, config_path, raw.get("torch_dtype") or raw.get("dtype"))
    mtp = mtp if keep_mtp else []
    wanted = [e.hf for e in names.entries(config)] + mtp
    total = sum(source.refs[n].nbytes for n in wanted)

    from tqdm import tqdm

    start = time.perf_counter()
    with store.Writer(dst, overwrite=overwrite, part_bytes=part_bytes, sources=sources) as writer, \
            Prefetcher(source, read_order(config) + mtp) as prefetch, tqdm(
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

        for path, array, _ in assemble(config, model, read, borrowed=True):
            writer.add(path, array.astype(variable_at(model, path).dtype, copy=False))
            del array  # the writer holds it until written; the next variable must not wait on us
        writer.flush()  # the MTP layer gets parts of its own, so loading never touches them
        for name in mtp:
            writer.add(("mtp", name), np.array(read(name), dtype=target))  # a copy: read() lends a buffer
        out_config = config.to_hf()
        if not mtp:
            out_config["num_nextn_predict_layers"] = 0  # say what is stored: no MTP weights
        writer.commit(out_config, dtype=target.name, tokenizer_from=src,
                      extra={"source": {"directory": os.path.abspath(src), "format": source.kind}, "mtp": mtp})
    return Report(dst, len(wanted), total, time.perf_counter() - start, len(mtp))


def check_tensors(config: Config, source: Source, model, config_path: str, declared_dtype) -> list[str]:
    """Every expected tensor present with the shape and a dtype config.json implies; nothing extra.

    Returns the MTP module's tensor names (present in the source, never expected).
    """
    refs = source.refs
    expected = list(names.entries(config))
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
        if ref.dtype not in _FLOATS:
            raise store.CheckpointError(
                f"{ref.file}: tensor {e.hf!r} has dtype {ref.dtype} but {config_path} "
                f"(dtype {declared_dtype}) implies floating-point weights"
            )
    known = {e.hf for e in expected}
    mtp = [n for n in refs if n not in known and names.is_mtp(n, config)]
    # transformers writes zero-element placeholders for absent modules (no shared experts): no data.
    unexpected = sorted(n for n in refs if n not in known and n not in mtp and np.prod(refs[n].shape) != 0)
    if unexpected:
        raise store.CheckpointError(
            f"{source.directory}: {len(unexpected)} unexpected tensor(s) that {config_path} does not "
            f"describe, e.g. {unexpected[:4]} (in {refs[unexpected[0]].file})"
        )
    return mtp
