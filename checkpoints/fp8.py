"""DeepSeek's block-scaled FP8 weights (V3, R1, V3.1 releases) dequantized to the output dtype.

A quantized linear weight `W` [M,N] is stored as `float8_e4m3fn` next to `W_scale_inv` float32
[ceil(M/bm), ceil(N/bm)] (one scale per bm×bn block, edge blocks partial; `scale_fmt: ue8m0` makes
every scale a power of two, possibly stored as float8_e8m0fnu). DeepSeek's reference
(`inference/kernel.py` weight_dequant, used by `fp8_cast_bf16.py`) computes, per block,
`float32(W) * scale` and rounds once to bfloat16; `dequantize` does exactly that, so the result is
bit-identical to theirs. For float32 output the float32 product is kept as it is: rounding it
through bfloat16 would throw away 16 bits the checkpoint holds (issue 9 found the logits of a small
V3-layout MoE model moved by 17% that way, router choices flipped). Which tensors are quantized is decided by the presence of `<name>_scale_inv`
and checked against each weight's dtype and `config.json`'s `quantization_config`.

`keeping` is the other road (`mla-jax convert --weights fp8`): the e4m3 values and their scales go
into the checkpoint as they are (scales as float32, exact for every stored format), and the model
computes with them (`mla_jax.quant`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import ml_dtypes
import numpy as np

from checkpoints.readers import Ref, Source
from mla_jax.store import CheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
BF16 = np.dtype(ml_dtypes.bfloat16)
_SCALE_DTYPES = (np.dtype(np.float32), np.dtype(ml_dtypes.float8_e8m0fnu), np.dtype(np.float16), BF16)


@dataclasses.dataclass(frozen=True)
class Quantization:
    block: tuple[int, int]
    scale_fmt: str | None = None  # None or "ue8m0"


def quantization(raw_config: Mapping[str, Any], config_path: str) -> Quantization | None:
    """The FP8 scheme of a hub config.json, or None; an unsupported scheme is an error."""
    q = raw_config.get("quantization_config")
    if q is None:
        return None
    where = f"{config_path}: quantization_config"
    if q.get("quant_method") != "fp8":
        raise CheckpointError(f"{where}.quant_method={q.get('quant_method')!r}; only 'fp8' (DeepSeek block FP8) is supported")
    if q.get("fmt", "e4m3") != "e4m3":
        raise CheckpointError(f"{where}.fmt={q.get('fmt')!r}; expected 'e4m3'")
    block = q.get("weight_block_size")
    if not (isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block)):
        raise CheckpointError(f"{where}.weight_block_size={block!r}; expected two positive integers, e.g. [128, 128]")
    scale_fmt = q.get("scale_fmt")
    if scale_fmt not in (None, "ue8m0"):
        raise CheckpointError(f"{where}.scale_fmt={scale_fmt!r}; expected null or 'ue8m0'")
    return Quantization((block[0], block[1]), scale_fmt)


def scale_shape(weight_shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, int]:
    m, n = weight_shape
    return (math.ceil(m / block[0]), math.ceil(n / block[1]))


def dequantize(weight: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int], dtype=BF16) -> np.ndarray:
    """float8 W [M,N] and scales [ceil(M/bm), ceil(N/bn)] -> float32(W) * scale, rounded once to `dtype`.

    bfloat16 gives DeepSeek's rounding; float32 keeps the product exactly as computed. Works one row
    of blocks at a time so the float32 temporaries stay small.
    """
    bm, bn = block
    m, n = weight.shape
    scale = scale_inv.astype(np.float32)
    out = np.empty((m, n), dtype)
    for i in range(scale.shape[0]):
        rows = slice(i * bm, min((i + 1) * bm, m))
        per_column = np.repeat(scale[i], bn)[:n]  # each block's scale spread over its bn columns
        out[rows] = weight[rows].astype(np.float32) * per_column  # float32 product, one rounding on storing
    return out


def dequantizing(source: Source, quant: Quantization | None, config_path: str, dtype=BF16) -> Source:
    """The source with every FP8 weight replaced by its dequantization in `dtype` (bfloat16 or
    float32), scales hidden."""
    dtype = np.dtype(dtype)
    if dtype not in (BF16, np.dtype(np.float32)):
        raise ValueError(f"FP8 weights dequantize to bfloat16 or float32, not {dtype}")
    refs = source.refs
    fp8_names = sorted(n for n, r in refs.items() if r.dtype == FP8)
    scale_names = sorted(n for n in refs if n.endswith(SCALE_SUFFIX))
    if not fp8_names and not scale_names:
        return source
    if quant is None:
        first = fp8_names[0] if fp8_names else scale_names[0]
        raise CheckpointError(
            f"{refs[first].file}: tensor {first!r} is {refs[first].dtype} but {config_path} has no "
            "quantization_config (expected quant_method 'fp8' with weight_block_size)"
        )
    out = {n: r for n, r in refs.items() if n not in scale_names}
    for weight, scale in _pairs(refs, fp8_names, scale_names, quant):
        out[weight.name] = Ref(weight.name, weight.file, dtype, weight.shape,
                               lambda w=weight, s=scale: _read(w, s, quant, dtype))
    return Source(source.directory, out, source.kind)


def _pairs(refs: Mapping[str, Ref], fp8_names, scale_names, quant: Quantization) -> list[tuple[Ref, Ref]]:
    """(weight, scale) of every quantized tensor, each checked: dtypes, the scale's shape for the
    block size, no scale without its FP8 weight and no FP8 weight without its scale."""
    pairs = []
    for name in scale_names:
        weight_name = name[: -len(SCALE_SUFFIX)]
        scale = refs[name]
        weight = refs.get(weight_name)
        if weight is None or weight.dtype != FP8:
            found = "missing" if weight is None else f"{weight.dtype}"
            raise CheckpointError(f"{scale.file}: scale {name!r} has no float8_e4m3fn weight {weight_name!r} (found {found})")
        expected = scale_shape(weight.shape, quant.block) if len(weight.shape) == 2 else None
        if tuple(scale.shape) != expected:
            raise CheckpointError(
                f"{scale.file}: scale {name!r} has shape {scale.shape}; weight {weight.shape} in blocks of "
                f"{list(quant.block)} needs {expected}"
            )
        if scale.dtype not in _SCALE_DTYPES:
            raise CheckpointError(f"{scale.file}: scale {name!r} has dtype {scale.dtype}; expected float32 or float8_e8m0fnu")
        pairs.append((weight, scale))
    unscaled = [n for n in fp8_names if n + SCALE_SUFFIX not in refs]
    if unscaled:
        raise CheckpointError(
            f"{refs[unscaled[0]].file}: float8_e4m3fn tensor(s) {unscaled[:4]} have no {SCALE_SUFFIX} scale"
        )
    return pairs


def keeping(source: Source, quant: Quantization | None, config_path: str) -> tuple[Source, str]:
    """The source with its FP8 weights as they are and their scales read as float32 (checked as
    `dequantizing` checks them); also the scales' stored dtype name, for export to write back."""
    refs = source.refs
    fp8_names = sorted(n for n, r in refs.items() if r.dtype == FP8)
    scale_names = sorted(n for n in refs if n.endswith(SCALE_SUFFIX))
    if quant is None or not scale_names:
        raise CheckpointError(
            f"{config_path}: --weights fp8 keeps the FP8 weights of a DeepSeek FP8 release, but this model "
            "has none (no quantization_config with quant_method 'fp8', or no weight_scale_inv tensors); "
            "for a bfloat16/float32 model use --weights int8, or leave --weights out"
        )
    out = dict(refs)
    stored = set()
    for _, scale in _pairs(refs, fp8_names, scale_names, quant):
        stored.add(scale.dtype.name)
        out[scale.name] = Ref(scale.name, scale.file, np.dtype(np.float32), scale.shape,
                              lambda s=scale: _scales(s, quant))
    if len(stored) > 1:
        raise CheckpointError(f"{source.directory}: scales stored in several dtypes {sorted(stored)}; expected one")
    return Source(source.directory, out, source.kind), stored.pop()


def _scales(scale: Ref, quant: Quantization) -> np.ndarray:
    scale_inv = scale.read().astype(np.float32)
    if quant.scale_fmt == "ue8m0":
        mantissa, _ = np.frexp(scale_inv)
        if not np.all(mantissa == 0.5):
            raise CheckpointError(f"{scale.file}: scale {scale.name!r} is declared ue8m0 but holds values that are not powers of two")
    return scale_inv


def _read(weight: Ref, scale: Ref, quant: Quantization, dtype: np.dtype) -> np.ndarray:
    return dequantize(weight.read(), _scales(scale, quant), quant.block, dtype)
