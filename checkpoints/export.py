"""`mla-jax export CKPT DST`: an mla-jax checkpoint -> a Hugging Face directory transformers loads.

Writes hub names (per-expert), [out, in] linear weights, safetensors shards (+ index when more than
one), config.json and the tokenizer. The shard plan is fixed up front from the stored shapes, then
each stored part is restored, turned into hub tensors and streamed into the shards: memory stays near
one part. Transposes are exact, so HF -> mla-jax -> HF in the same dtype gives back identical bytes.

The checkpoint's checksums are verified as it is read. The output is staged and published like a
checkpoint (`mla_jax.staging`): never inside, equal to or containing the checkpoint, and
`overwrite` replaces only an earlier export, recognised by the small `mla_jax_export.json` this
writes beside config.json (format, source, dtype). A marker file rather than a field in config.json
or the safetensors metadata: transformers copies unknown config fields into every model it saves,
so a config field would mark directories we did not write, and the file is plain to see in a listing.

An FP8 checkpoint (`convert --weights fp8`) exports as an FP8 release: e4m3 weights, their
`weight_scale_inv` in the dtype the source stored them in, and `quantization_config`; unmodified,
every tensor is bit-identical to the source's. An int8 checkpoint has no hub format that
transformers loads, and is refused.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
from typing import Iterator

import jax
import numpy as np

from checkpoints import names
from checkpoints import safetensors_io as st
from mla_jax import store
from mla_jax.config import Config
from mla_jax.errors import UsageError
from mla_jax.weights import as_dtype, stored_scheme

SAFETENSORS_INDEX = "model.safetensors.index.json"
DEFAULT_SHARD_BYTES = 5 << 30
MARKER_FILE = "mla_jax_export.json"
MARKER_FORMAT = "mla-jax-hf-export"


def is_export(path: str) -> bool:
    """A directory written by `export` (it holds our marker file)."""
    return store.json_field_is(path, MARKER_FILE, "format", MARKER_FORMAT)


EXPORT = store.Kind(f"a Hugging Face export written by mla-jax (no {MARKER_FILE})", is_export)


@dataclasses.dataclass(frozen=True)
class _Tensor:
    hf: str
    dtype: np.dtype
    shape: tuple[int, ...]
    path: store.Path
    entry: names.Entry | None  # None for an MTP tensor, stored in hub layout already

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


def export(ckpt: str | os.PathLike, dst: str | os.PathLike, *, dtype=None, overwrite: bool = False,
           max_shard_bytes: int = DEFAULT_SHARD_BYTES, progress: bool = True, verify: bool = True) -> str:
    """Writes the checkpoint at `ckpt` as a Hugging Face directory at `dst`; returns `dst`.

    dtype: None keeps each tensor's stored dtype; "bfloat16" / "float32" casts every tensor.
    verify: check the checkpoint's files against their recorded checksums while reading.
    """
    if not (isinstance(max_shard_bytes, (int, float)) and math.isfinite(max_shard_bytes) and max_shard_bytes > 0):
        raise UsageError(f"max_shard_bytes={max_shard_bytes!r}; expected a positive number of bytes")
    ckpt = store.user_path(ckpt)
    layout = store.read_layout(ckpt)
    config = Config.from_hf(os.path.join(ckpt, store.CONFIG_FILE))
    cast = None if dtype is None else as_dtype(dtype)
    scheme = stored_scheme(ckpt, layout)
    if scheme is not None and scheme.method != "fp8":
        raise UsageError(f"{ckpt}: its weights are quantized to {scheme.method}, which has no Hugging Face format "
                         "that transformers loads; export the bfloat16 checkpoint it was converted from instead")
    if scheme is not None and cast is not None:
        raise UsageError(f"{ckpt}: an FP8 checkpoint exports as FP8 with its block scales (a DeepSeek release); "
                         f"dtype={dtype!r} would need dequantizing, which export does not do: convert the "
                         "release without --weights for a bfloat16 model")
    plan = _plan(config, layout, cast, ckpt, scheme)
    shards = _shards(plan, max_shard_bytes)
    name = cast.name if cast is not None else layout["dtype"]

    from tqdm import tqdm

    with store.Staging(dst, overwrite=overwrite, kind=EXPORT, sources=[ckpt]) as stage, \
            store.write_errors(stage.dst):
        with tqdm(total=sum(t.nbytes for t in plan), unit="B", unit_scale=True, unit_divisor=1024,
                  desc="export", disable=not progress, dynamic_ncols=True) as bar:
            tensors = _hub_tensors(ckpt, layout, plan, bar, stage, verify)
            weight_map = {}
            for i, shard in enumerate(shards):
                file = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                st.write_file(os.path.join(stage.tmp, file), [(t.hf, t.dtype, t.shape) for t in shard],
                              (next(tensors) for _ in shard))
                weight_map.update({t.hf: file for t in shard})
        if len(shards) > 1:
            store.write_json(os.path.join(stage.tmp, SAFETENSORS_INDEX),
                             {"metadata": {"total_size": sum(t.nbytes for t in plan)}, "weight_map": weight_map})
        store.copy_tokenizer(ckpt, stage.tmp)
        store.write_json(os.path.join(stage.tmp, MARKER_FILE),
                         {"format": MARKER_FORMAT, "version": 1, "source": ckpt, "dtype": name})
        hf_config = config.to_hf()
        if scheme is not None:
            hf_config["quantization_config"] = scheme.to_hf()
        if name != "mixed":
            hf_config["torch_dtype"] = name
        store.write_json(os.path.join(stage.tmp, store.CONFIG_FILE), hf_config)
        return stage.publish()


def _plan(config: Config, layout: dict, cast, ckpt: str, scheme=None) -> list[_Tensor]:
    """Every hub tensor, in the order the stored parts will produce them."""
    stored = store.stored_variables(layout)
    by_path: dict[store.Path, list[names.Entry]] = {}
    for e in names.entries(config, with_scales=scheme is not None):
        by_path.setdefault(e.path, []).append(e)
    missing = [store.path_name(p) for p in by_path if p not in stored]
    if missing:
        raise store.CheckpointError(f"{ckpt}: variable(s) {missing[:4]} that its config.json implies are not stored")
    plan = []
    for item in layout["items"]:
        for v in item["variables"]:
            path, shape, dtype = tuple(v["path"]), tuple(v["shape"]), cast or store.dtype_named(v["dtype"])
            if path[0] == "mtp":
                plan.append(_Tensor(path[1], dtype, shape, path, None))
                continue
            if path not in by_path:
                raise store.CheckpointError(f"{ckpt}: stored variable {store.path_name(path)} is not part of the model config.json describes")
            for e in by_path[path]:
                own = shape[1:] if e.expert is not None else shape
                # scales are kept in float32 and go back out in the source's dtype (exact: powers of two)
                out_dtype = store.dtype_named(scheme.scale_dtype) if e.kind == names.SCALE else dtype
                plan.append(_Tensor(e.hf, out_dtype, names.hub_shape(e, own), path, e))
    return plan


def _shards(plan: list[_Tensor], max_bytes: int) -> list[list[_Tensor]]:
    shards: list[list[_Tensor]] = [[]]
    size = 0
    for t in plan:
        if shards[-1] and size + t.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _hub_tensors(ckpt: str, layout: dict, plan: list[_Tensor], bar, stage: store.Staging, verify: bool
                 ) -> Iterator[np.ndarray]:
    """Yields the plan's tensors in order, restoring one stored part at a time; an interrupt
    received meanwhile is acted on between tensors."""
    stored = store.stored_variables(layout)
    targets = {t.path: jax.ShapeDtypeStruct(stored[t.path][0], store.dtype_named(stored[t.path][1])
                                            if t.entry is not None and t.entry.kind == names.SCALE else t.dtype)
               for t in plan}
    groups = itertools.groupby(plan, key=lambda t: t.path)  # a variable's hub tensors are consecutive
    for path, array in store.restore(ckpt, layout, targets, verify=verify):
        group_path, group = next(groups)
        if group_path != path:
            raise AssertionError(f"export plan out of order: restored {path}, planned {group_path}")
        array = np.asarray(array)
        for t in group:
            if t.entry is None:
                out = array
            else:
                out = names.to_hub(t.entry, array if t.entry.expert is None else array[t.entry.expert])
                if out.dtype != t.dtype:  # a scale back to its source dtype
                    out = out.astype(t.dtype)
            bar.update(t.nbytes)
            stage.check()
            yield out
