"""Weight-only int8 at convert time (`mla-jax convert --weights int8`), for bfloat16/float32 models.

Every weight `checkpoints.names.quantized` names (the decoder layers' projections, routed experts
included) is quantized per output channel (`mla_jax.quant.INT8_PER_CHANNEL`: one float32 scale per
row of the hub's [out, in] weight, the row's largest magnitude mapped to 127, round to nearest) and
offered as int8 next to a synthetic `<name>_scale_inv` [out, 1], the layout of an FP8 release.
The rest of the converter then treats it like one. Both come from one read of the weight.
"""

from __future__ import annotations

import threading

import numpy as np

from checkpoints import names
from checkpoints.readers import Ref, Source
from mla_jax.config import Config
from mla_jax.quant.blocks import Scheme, quantize
from mla_jax.store import CheckpointError

_FLOATS = ("float32", "float16", "bfloat16")


def quantizing(source: Source, config: Config, scheme: Scheme, config_path: str) -> Source:
    """The source with each quantized weight read as int8 and its scale offered beside it."""
    refs = dict(source.refs)
    scales: dict[str, np.ndarray] = {}  # weight name -> its scales, until the scale's read
    lock = threading.Lock()

    def values(ref: Ref) -> np.ndarray:
        q, s = quantize(ref.read(), scheme)
        with lock:
            scales[ref.name] = s
        return q

    def scale(ref: Ref) -> np.ndarray:
        with lock:
            s = scales.pop(ref.name, None)
        return s if s is not None else quantize(ref.read(), scheme)[1]

    for entry in names.entries(config):
        if not names.quantized(entry) or entry.hf not in refs:
            continue  # a missing tensor is reported by the converter's check
        ref = refs[entry.hf]
        if ref.dtype.name not in _FLOATS or len(ref.shape) != 2:
            raise CheckpointError(
                f"{ref.file}: tensor {entry.hf!r} is {ref.dtype} {list(ref.shape)}; --weights int8 quantizes "
                f"float matrices ({', '.join(_FLOATS)}) (an FP8 release is kept with --weights fp8)"
            )
        o, i = ref.shape
        refs[entry.hf] = Ref(entry.hf, ref.file, np.dtype(np.int8), ref.shape, lambda r=ref: values(r))
        name = entry.hf + names.SCALE_SUFFIX
        if name in source.refs:
            raise CheckpointError(f"{source.refs[name].file}: the model already has {name!r}: it is quantized")
        refs[name] = Ref(name, ref.file, np.dtype(np.float32), scheme.scale_shape(i, o)[::-1], lambda r=ref: scale(r))
    return Source(source.directory, refs, source.kind)
