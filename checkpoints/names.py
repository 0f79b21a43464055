"""THE map between Hugging Face / DeepSeek tensor names and the model's tree.

One `Entry` per hub tensor: its name, the path of the model variable it fills, how to reshape it,
and (for routed experts) which slice of the stacked [E, ...] array it is. The converter, the exporter
and the parity tests all use this table; nothing else knows a hub name.

Hub linear weights are [out, in]; our kernels are [in, *out] (q_b_proj [Q,N,H+R], kv_b_proj [C,N,H+Hv],
o_proj [N,Hv,D], experts [E,D,F] / [E,F,D], router [D,E]).

A quantized checkpoint (DeepSeek's FP8 releases; our int8) also has, for each quantized weight
`<w>.weight`, its block scales `<w>.weight_scale_inv` [nO, nI]; ours are their transpose [nI, nO] in the
sibling variable `<kernel>_scale_inv`. `entries(config, with_scales=True)` lists them after their weight.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Iterator

import numpy as np

from mla_jax.config import Config

Path = tuple  # e.g. ("layers", 3, "self_attn", "q_b_proj", "kernel")

# How a hub tensor becomes our array: "linear" transposes [out,in] -> [in,out] then reshapes out;
# "out_proj" transposes [D, N·Hv] -> [N·Hv, D] then splits heads; "copy" keeps it as it is.
LINEAR, OUT_PROJ, COPY = "linear", "out_proj", "copy"
SCALE = "scale"  # block scales of a quantized weight: hub [nO, nI] -> ours [nI, nO] by a transpose
SCALE_SUFFIX = "_scale_inv"


@dataclasses.dataclass(frozen=True)
class Entry:
    hf: str
    path: Path
    kind: str
    expert: int | None = None  # index along the stacked expert axis


def _linear(prefix: str, path: Path, bias: bool) -> list[Entry]:
    out = [Entry(f"{prefix}.weight", (*path, "kernel"), LINEAR)]
    if bias:
        out.append(Entry(f"{prefix}.bias", (*path, "bias"), COPY))
    return out


def _mlp(prefix: str, path: Path, bias: bool) -> list[Entry]:
    return [e for name in ("gate_proj", "up_proj", "down_proj") for e in _linear(f"{prefix}.{name}", (*path, name), bias)]


def layer_entries(config: Config, i: int) -> list[Entry]:
    c = config
    p, hp = ("layers", i), f"model.layers.{i}"
    a, ha = (*p, "self_attn"), f"{hp}.self_attn"
    out = [Entry(f"{hp}.input_layernorm.weight", (*p, "input_layernorm", "weight"), COPY)]
    if c.q_lora_rank is None:
        out += _linear(f"{ha}.q_proj", (*a, "q_proj"), False)
    else:
        out += _linear(f"{ha}.q_a_proj", (*a, "q_a_proj"), c.attention_bias)
        out.append(Entry(f"{ha}.q_a_layernorm.weight", (*a, "q_a_layernorm", "weight"), COPY))
        out += _linear(f"{ha}.q_b_proj", (*a, "q_b_proj"), False)
    out += _linear(f"{ha}.kv_a_proj_with_mqa", (*a, "kv_a_proj_with_mqa"), c.attention_bias)
    out.append(Entry(f"{ha}.kv_a_layernorm.weight", (*a, "kv_a_layernorm", "weight"), COPY))
    out += _linear(f"{ha}.kv_b_proj", (*a, "kv_b_proj"), False)
    out.append(Entry(f"{ha}.o_proj.weight", (*a, "o_proj", "kernel"), OUT_PROJ))
    if c.attention_bias:
        out.append(Entry(f"{ha}.o_proj.bias", (*a, "o_proj", "bias"), COPY))
    out.append(Entry(f"{hp}.post_attention_layernorm.weight", (*p, "post_attention_layernorm", "weight"), COPY))
    m, hm = (*p, "mlp"), f"{hp}.mlp"
    if not c.is_moe_layer(i):
        return out + _mlp(hm, m, c.mlp_bias)
    out.append(Entry(f"{hm}.gate.weight", (*m, "gate"), LINEAR))
    if c.topk_method == "noaux_tc":
        out.append(Entry(f"{hm}.gate.e_score_correction_bias", (*m, "e_score_correction_bias"), COPY))
    for e in range(c.n_routed_experts):
        for name in ("gate_proj", "up_proj", "down_proj"):
            out.append(Entry(f"{hm}.experts.{e}.{name}.weight", (*m, "experts", name), LINEAR, expert=e))
    if c.n_shared_experts > 0:
        out += _mlp(f"{hm}.shared_experts", (*m, "shared_experts"), c.mlp_bias)
    return out


def quantized(entry: Entry) -> bool:
    """Whether a quantized checkpoint stores this tensor quantized: every projection inside the decoder
    layers (as DeepSeek's FP8 releases do), not the router, norms, embeddings or lm_head."""
    return entry.path[0] == "layers" and entry.kind in (LINEAR, OUT_PROJ) and entry.path[-1] != "gate"


def scale_entry(entry: Entry) -> Entry:
    """The block scales of a quantized weight's entry."""
    return Entry(entry.hf + SCALE_SUFFIX, (*entry.path[:-1], entry.path[-1] + SCALE_SUFFIX), SCALE, entry.expert)


def entries(config: Config, with_scales: bool = False) -> Iterator[Entry]:
    """Every hub tensor of the model (MTP layers excluded), layer by layer as the hub stores them;
    `with_scales` (a quantized checkpoint): each quantized weight followed by its scales."""
    yield Entry("model.embed_tokens.weight", ("embed_tokens",), COPY)
    for i in range(config.num_hidden_layers):
        for e in layer_entries(config, i):
            yield e
            if with_scales and quantized(e):
                yield scale_entry(e)
    yield Entry("model.norm.weight", ("norm", "weight"), COPY)
    if not config.tie_word_embeddings:
        yield Entry("lm_head.weight", ("lm_head", "kernel"), LINEAR)


_LAYER = re.compile(r"^model\.layers\.(\d+)\.")
_FUSED = re.compile(r"^(?P<prefix>.+\.mlp\.experts)\.(?P<kind>gate_up_proj|down_proj)$")


def split_fused(name: str, shape: tuple[int, ...]) -> list[tuple[str, int, int, int]] | None:
    """transformers keeps a layer's experts fused in memory: `mlp.experts.gate_up_proj` [E,2F,D]
    (gate rows first) and `mlp.experts.down_proj` [E,D,F]. For such a name, returns the hub's
    per-expert names as (name, expert, first row, end row); None for any other tensor."""
    m = _FUSED.match(name)
    if not m or len(shape) != 3:
        return None
    n_experts, rows, _ = shape
    if m["kind"] == "gate_up_proj":
        if rows % 2:
            raise ValueError(f"fused tensor {name!r} has shape {tuple(shape)}; expected [E, 2F, D]")
        parts = (("gate_proj", 0, rows // 2), ("up_proj", rows // 2, rows))
    else:
        parts = (("down_proj", 0, rows),)
    return [(f"{m['prefix']}.{e}.{proj}.weight", e, lo, hi) for e in range(n_experts) for proj, lo, hi in parts]


def layer_of(hf_name: str) -> int | None:
    m = _LAYER.match(hf_name)
    return int(m.group(1)) if m else None


def is_mtp(hf_name: str, config: Config) -> bool:
    """Tensors of DeepSeek's multi-token-prediction module (layers numbered past the last one)."""
    layer = layer_of(hf_name)
    return layer is not None and layer >= config.num_hidden_layers


def is_placeholder(hf_name: str, shape: tuple[int, ...], config: Config, values) -> bool:
    """Whether a tensor no entry names is what transformers writes for shared experts a config
    turns off (n_shared_experts=0): an MLP of width 0, so zero-element weights, and with mlp_bias a
    down_proj bias of the hidden size, which that MLP still adds to every MoE layer's output. Such a
    bias is harmless only if it is all zeros: `values()` reads it, and a non-zero one is a ValueError
    naming it (this model has no shared experts to carry it)."""
    if math.prod(shape) == 0:
        return True
    if config.n_shared_experts == 0 and hf_name.endswith(".mlp.shared_experts.down_proj.bias"):
        if np.any(values()):
            raise ValueError(f"tensor {hf_name!r} is not zero, but n_shared_experts=0: transformers adds it to every "
                             "MoE layer's output, and this model has no shared experts to carry it")
        return True
    return False


def to_ours(entry: Entry, tensor: np.ndarray, shape: tuple[int, ...], out: np.ndarray | None = None) -> np.ndarray:
    """Hub tensor -> our array of `shape` (for an expert entry: the shape of one expert's slice).

    With `out` (contiguous, `shape`, the tensor's dtype) the result is written there: never a view
    of `tensor`, so `tensor`'s memory may be reused afterwards.
    """
    expected = hub_shape(entry, shape)
    if tuple(tensor.shape) != expected:
        raise ValueError(f"{entry.hf}: shape {tuple(tensor.shape)} disagrees with config.json, which implies {expected}")
    if entry.kind == COPY:
        if out is None:
            return np.ascontiguousarray(tensor.reshape(shape))
        raw(out)[...] = raw(tensor.reshape(shape))
        return out
    flat = None if out is None else out.reshape(tensor.shape[::-1])
    return transpose(tensor, flat).reshape(shape)


def to_hub(entry: Entry, array: np.ndarray) -> np.ndarray:
    """Our array (an expert's slice for expert entries) -> the hub tensor."""
    if entry.kind == COPY:
        return np.ascontiguousarray(array)
    if entry.kind in (LINEAR, SCALE):
        return transpose(array.reshape(array.shape[0], -1))
    if entry.kind == OUT_PROJ:
        return transpose(array.reshape(-1, array.shape[-1]))
    raise AssertionError(entry.kind)


_TILE = 128
_UINTS = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def raw(x: np.ndarray) -> np.ndarray:
    """The same memory as unsigned integers of the same width (bf16, fp8: numpy copies those fast)."""
    return x.view(_UINTS[x.dtype.itemsize]) if x.dtype.itemsize in _UINTS else x


def transpose(x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """x [M,N] -> contiguous x.T [N,M] (into `out` when given), tile by tile.

    numpy's whole-array strided copy runs at ~0.2 GB/s on large bf16 weights (every read misses the
    cache); 128×128 tiles over a same-width integer view run ~10x faster, and the converter spends
    most of its time here.
    """
    if out is None:
        out = np.empty(x.shape[::-1], x.dtype)
    if x.ndim != 2 or x.dtype.itemsize not in _UINTS or out.dtype != x.dtype or not out.flags.c_contiguous:
        out[...] = x.T
        return out
    bits, dst = raw(x), raw(out)
    m, n = bits.shape
    for j in range(0, m, _TILE):
        for i in range(0, n, _TILE):
            dst[i:i + _TILE, j:j + _TILE] = bits[j:j + _TILE, i:i + _TILE].T
    return out


def hub_shape(entry: Entry, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The hub tensor shape that corresponds to our (per-expert) `shape`."""
    shape = tuple(int(d) for d in shape)
    if entry.kind == COPY:
        return shape
    if entry.kind in (LINEAR, SCALE):
        return (int(np.prod(shape[1:])), shape[0])
    if entry.kind == OUT_PROJ:
        return (shape[-1], int(np.prod(shape[:-1])))
    raise AssertionError(entry.kind)
