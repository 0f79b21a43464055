"""Block-scaled weights: the scheme, quantizing (numpy, at convert time) and dequantizing (jax, in the step).

A quantized matrix W [I,O] (our input-first layout; the hub stores Wᵀ [O,I]) is kept as its
quantized values Q [I,O] (float8_e4m3fn or int8) and one float32 multiplier per block,
`scale_inv` [ceil(I/bi), ceil(O/bo)]: W ≈ float32(Q) · scale_inv[block]. Edge blocks may be
partial. DeepSeek's FP8 releases use 128×128 blocks (`weight_scale_inv`, hub orientation [O/bo, I/bi]);
our int8 uses one block per output channel (bi = I, bo = 1).

Why not qwix's QArray: it requires every dimension to be a whole number of tiles
(`qarray.get_scale_shape` raises otherwise), and DeepSeek's own shapes are not (V3's
kv_a_proj_with_mqa has 576 outputs: four and a half 128-blocks). Padding would change the stored
bytes; the dequantization here is a few lines and handles partial blocks exactly as DeepSeek's
`weight_dequant` does.

Dimensions: I in-features (flattened), O out-features (flattened), and any leading axes (layers of
a stack, experts) that values and scales share.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

FP8 = np.dtype(ml_dtypes.float8_e4m3fn)
INT8 = np.dtype(np.int8)
METHODS = {"fp8": (FP8, 448.0), "int8": (INT8, 127.0)}  # storage dtype, largest value used


class ScaleInv(nnx.Variable):
    """Per-block float32 multipliers of a quantized weight (DeepSeek's `weight_scale_inv`); never trained."""


@dataclasses.dataclass(frozen=True)
class Scheme:
    """How weights are quantized: method "fp8" | "int8", block in hub orientation (out rows, in columns).

    A block side 0 means the whole dimension: (1, 0) is one scale per output channel.
    `scale_dtype` is the dtype the source stored its scales in (exported back the same way).
    """

    method: str
    block: tuple[int, int]
    scale_fmt: str | None = None  # "ue8m0": every scale a power of two (DeepSeek V3.1)
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"quantization method {self.method!r}; expected one of {sorted(METHODS)}")
        if len(self.block) != 2 or any(not isinstance(b, int) or b < 0 for b in self.block):
            raise ValueError(f"quantization block {self.block!r}; expected two integers >= 0 (0 = whole dimension)")

    @property
    def storage_dtype(self) -> np.dtype:
        return METHODS[self.method][0]

    def ours(self, in_features: int, out_features: int) -> tuple[int, int]:
        """(bi, bo): the block of a weight [I,O] in our layout."""
        bo, bi = self.block
        return (bi or in_features, bo or out_features)

    def scale_shape(self, in_features: int, out_features: int) -> tuple[int, int]:
        bi, bo = self.ours(in_features, out_features)
        return (math.ceil(in_features / bi), math.ceil(out_features / bo))

    def to_json(self) -> dict:
        return {"method": self.method, "block": list(self.block), "scale_fmt": self.scale_fmt,
                "scale_dtype": self.scale_dtype}

    @classmethod
    def from_json(cls, d: dict, where: str) -> "Scheme":
        try:
            return cls(d["method"], tuple(d["block"]), d.get("scale_fmt"), d.get("scale_dtype", "float32"))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{where}: quantization {d!r} is not understood ({e})") from None

    def to_hf(self) -> dict | None:
        """The hub's `quantization_config` for an FP8 scheme (None: int8 has no hub form)."""
        if self.method != "fp8":
            return None
        out = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
               "weight_block_size": list(self.block)}
        if self.scale_fmt:
            out["scale_fmt"] = self.scale_fmt
        return out


FP8_BLOCK_128 = Scheme("fp8", (128, 128))
INT8_PER_CHANNEL = Scheme("int8", (1, 0))


@dataclasses.dataclass(frozen=True)
class Quantized:
    """Static marker on a module whose kernel holds quantized values: its scheme, how many of the
    kernel's trailing dims are inputs vs outputs, and the dtype it dequantizes to."""

    scheme: Scheme
    in_dims: int
    out_dims: int
    dtype: str


# ---------------------------------------------------------------------------------- in the step
def _matrix(shape: tuple[int, ...], q: Quantized) -> tuple[tuple[int, ...], int, int]:
    """(leading dims, I, O) of a kernel shape."""
    lead = len(shape) - q.in_dims - q.out_dims
    return shape[:lead], math.prod(shape[lead:lead + q.in_dims]), math.prod(shape[lead + q.in_dims:])


def expand_scales(scale_inv: jax.Array, q: Quantized, shape: tuple[int, ...]) -> jax.Array:
    """scale_inv [*lead, nI, nO] -> float32 [*lead, I, O]: each weight's block multiplier."""
    lead, i, o = _matrix(shape, q)
    bi, bo = q.scheme.ours(i, o)
    s = jnp.repeat(scale_inv.astype(jnp.float32), bi, axis=-2)[..., :i, :]
    return jnp.repeat(s, bo, axis=-1)[..., :o]


def dequantize(values: jax.Array, scale_inv: jax.Array, q: Quantized, dtype=None) -> jax.Array:
    """values [*lead, *in, *out], scale_inv [*lead, nI, nO] -> float32(values)·scale per block, in `dtype`
    (default: the marker's), shape of `values`. The product is float32 and rounded once.

    `values` may also be floats (a LoRA-adapted kernel: W' divided by the base's scales, see
    `mla_jax.training.lora`); the same product then gives W' back.
    """
    lead, i, o = _matrix(values.shape, q)
    w = values.reshape(*lead, i, o).astype(jnp.float32)
    return (w * expand_scales(scale_inv, q, values.shape)).astype(dtype or q.dtype).reshape(values.shape)




@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Blocked:
    """A quantized weight travelling as one array-like value (routed experts into the grouped matmul).

    `values` [*lead, *in, *out], `scale_inv` [*lead, nI, nO]; `shape`/`dtype` are those of the weight
    it stands for (dtype: what it dequantizes to). `take(e)` is one slice of the first axis.
    """

    values: jax.Array
    scale_inv: jax.Array
    q: Quantized = dataclasses.field(metadata=dict(static=True))

    @property
    def shape(self):
        return self.values.shape

    @property
    def dtype(self):
        return jnp.dtype(self.q.dtype)

    @property
    def ndim(self):
        return self.values.ndim

    def take(self, index, dtype=None) -> jax.Array:
        """Dequantized [*in, *out] of leading index `index` (a traced int is fine): one expert, one copy."""
        v = jax.lax.dynamic_index_in_dim(self.values, index, axis=0, keepdims=False)
        s = jax.lax.dynamic_index_in_dim(self.scale_inv, index, axis=0, keepdims=False)
        return dequantize(v, s, self.q, dtype)

    def dequantize(self, dtype=None) -> jax.Array:
        """The whole weight (tests and references only: this is the copy the format exists to avoid)."""
        return dequantize(self.values, self.scale_inv, self.q, dtype)


def materialize(w, dtype=None):
    """A plain array for `w`, dequantizing a Blocked (reference paths only)."""
    if isinstance(w, Blocked):
        return w.dequantize(dtype)
    return w if dtype is None else w.astype(dtype)


def index(w, e, dtype):
    """w[e] as a plain array in `dtype`; a Blocked dequantizes only that slice."""
    if isinstance(w, Blocked):
        return w.take(e, dtype)
    return jax.lax.dynamic_index_in_dim(w, e, axis=0, keepdims=False).astype(dtype)


# ---------------------------------------------------------------------------------- at convert time
def quantize(weight: np.ndarray, scheme: Scheme) -> tuple[np.ndarray, np.ndarray]:
    """A hub weight [O,I] -> (values [O,I] in the scheme's dtype, float32 scale_inv [nO,nI]).

    Each block's largest magnitude maps to the format's largest value (448 for e4m3, 127 for int8);
    int8 rounds to nearest. Works one row of blocks at a time (float32 temporaries stay small).
    """
    if weight.ndim != 2:
        raise ValueError(f"quantize: expected a matrix [O,I], found shape {weight.shape}")
    dtype, top = METHODS[scheme.method]
    o, i = weight.shape
    bi, bo = scheme.ours(i, o)
    n_o, n_i = math.ceil(o / bo), math.ceil(i / bi)
    values = np.empty((o, i), dtype)
    scales = np.empty((n_o, n_i), np.float32)
    pad_i = n_i * bi - i
    for r in range(n_o):
        rows = weight[r * bo:(r + 1) * bo].astype(np.float32)
        padded = np.pad(rows, ((0, 0), (0, pad_i)))
        amax = np.abs(padded.reshape(rows.shape[0], n_i, bi)).max(axis=(0, 2))  # [nI]
        s = np.where(amax > 0, amax / top, 1.0).astype(np.float32)
        if scheme.scale_fmt == "ue8m0":
            s = np.exp2(np.ceil(np.log2(s))).astype(np.float32)
        scaled = rows / np.repeat(s, bi)[:i]
        if scheme.method == "int8":
            values[r * bo:(r + 1) * bo] = np.clip(np.rint(scaled), -top, top).astype(np.int8)
        else:
            values[r * bo:(r + 1) * bo] = scaled.astype(dtype)
        scales[r] = s
    return values, scales


def dequantize_numpy(values: np.ndarray, scale_inv: np.ndarray, scheme: Scheme, dtype=np.float32) -> np.ndarray:
    """Hub values [O,I] and scale_inv [nO,nI] -> float32(values)·scale, rounded once to `dtype`."""
    o, i = values.shape
    bi, bo = scheme.ours(i, o)
    s = np.repeat(np.repeat(scale_inv.astype(np.float32), bo, 0)[:o], bi, 1)[:, :i]
    return (values.astype(np.float32) * s).astype(dtype)
