"""Routed-expert computation (dropless MoE dispatch), one implementation per compile target.

`dispatch` sorts the M·K (token, expert) pairs by expert and runs the three expert projections as
grouped matmuls: pair rows of one expert multiply that expert's weights only, so the work is the
routed work (K experts per token), never all E. Which grouped matmul runs is chosen here, once:

* CUDA (Hopper and newer): tokamax's Mosaic GPU `ragged_dot`, forward and backward kernels.
  tokamax reads the architecture from the *default device*; when compiling for a GPU from a
  CPU-only process, trace under `jax.default_device(<a GPU topology device>)` (bench/gpu_compile.py).
  A GPU tokamax cannot serve (older than sm90, or tokamax missing) gets the loop form below.
* Anything else (CPU, TPU): `grouped_matmul_loops`, XLA while-loops over the experts that have
  rows and over row tiles inside each; float32 arithmetic on weights converted one expert at a time,
  because XLA:CPU multiplies bfloat16 by converting the whole weight to a fresh float32 buffer.
  A decode step (a few rows) touches only the chosen experts' weights.
* Experts held one array per expert (a tuple for each of w_gate, w_up, w_down: the CPU decode
  layout, `mla_jax.moe.with_expert_layout`) take `grouped_matmul_by_expert`, the same loops with
  each expert's product in its own `lax.switch` branch: every dot reads a whole buffer in place.
  (XLA:CPU copies a slice of a stacked [E,D,F], static or dynamic, into a fresh buffer before a
  dot reads it; at V2-Lite shapes that copy cost 4-5x the matrix-vector product itself.)
  Forward only: it serves generation.
* `MLA_JAX_PLATFORM=gpu|cpu` overrides the choice (mla_jax/ops/platform.py).

Quantized experts (`mla_jax.quant.Blocked`: FP8 or int8 values with block scales) take the loop
form on every target: each expert with rows is dequantized there, alone, into float32, so no
dequantized copy of a layer's experts ever exists. (tokamax's Mosaic kernel takes qwix QArrays,
whose tiles must divide the shape; DeepSeek's blocks need not.) Their gradient is not computed:
a quantized base is frozen.

`dispatch_reference` multiplies every token by every expert and combines with a dense [M,E]
weight matrix: the specification the implementations are tested against, never used to run.

Dimensions: M tokens, K experts per token, P = M·K pair rows, D model dim, E experts, F expert hidden.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from mla_jax.ops import platform
from mla_jax.ops.activations import activation
from mla_jax.quant.blocks import Blocked, index, materialize

# Row tiles of the loop form: whole tiles of BIG rows, then SMALL-row tiles, and an expert's last
# one or two rows (up to SINGLE_ROWS) one row at a time. One row is a matrix-vector product, which
# XLA:CPU runs about 2.5x faster per weight byte than a 6-row product of one real row and five
# padded ones (jax 0.10.2, 2048x1408 float32 experts, measured 2026-11-30): a decode step's single
# row per expert no longer pays for a SMALL tile.
BIG_TILE = 64
SMALL_TILE = 8
SINGLE_ROWS = 2


# ------------------------------------------------------------------------ the dispatch
# Pair rows per forward chunk: the forward's temporaries (the gathered rows [P,D], the expert
# outputs [P,D], the hidden [P,F] three times) are bounded by this, not by the token count. V3 at
# 65,536 rows: 0.9 GiB of gathered rows. The backward recomputes the whole batch in one piece.
MAX_ROWS = 65536


def dispatch(x, weights, experts, w_gate, w_up, w_down, *, implementation: str | None = None,
             max_rows: int = MAX_ROWS, act: str = "silu"):
    """Dropless routed experts. x [M,D]; weights [M,K] (float32), experts [M,K] int;
    w_gate, w_up [E,D,F]; w_down [E,F,D] -> [M,D] in the weights' dtype.

    The expert weights may also be tuples of E per-expert arrays ([D,F], [D,F], [F,D]; see the
    module doc), served by the loops whatever the platform.

    `implementation` ("tokamax" | "loops" | "ragged_dot") overrides the platform's choice; tests use it.
    Batches of more than `max_rows` pair rows run forward in token chunks. `act`: the config's
    `hidden_act` (mla_jax/ops/activations.py), applied to the gate projection.
    """
    activation(act)  # an unknown name fails here, before anything is traced
    m, k = experts.shape
    if implementation is not None and implementation not in IMPLEMENTATIONS:
        raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None")
    if isinstance(w_gate, tuple) and implementation not in (None, "loops"):
        raise ValueError(f"implementation={implementation!r}: experts held one array per expert run only "
                         f"in the loops (implementation='loops' or None)")
    if m * k <= max_rows:
        return _dispatch(x, weights, experts, w_gate, w_up, w_down, implementation, act)
    return _chunked(x, weights, experts.astype(jnp.int32), w_gate, w_up, w_down, implementation,
                    max(1, max_rows // k), act)


def _dispatch(x, weights, experts, w_gate, w_up, w_down, implementation, act):
    """All M tokens in one piece."""
    m, k = experts.shape
    n_experts = len(w_gate) if isinstance(w_gate, tuple) else w_gate.shape[0]
    flat_expert = experts.reshape(-1).astype(jnp.int32)  # [P]
    order = jnp.argsort(flat_expert, stable=True)
    token = order // k  # [P] source token of each sorted pair row
    group_sizes = jnp.bincount(flat_expert, length=n_experts).astype(jnp.int32)  # [E]
    xs = x[token].astype(_dtype(w_gate))  # [P,D], expert-major
    gmm = functools.partial(grouped_matmul, implementation=implementation)
    h = activation(act)(gmm(xs, w_gate, group_sizes)) * gmm(xs, w_up, group_sizes)  # [P,F]
    ys = gmm(h, w_down, group_sizes)  # [P,D]
    ys = ys * weights.reshape(-1)[order][:, None].astype(ys.dtype)
    return jnp.zeros((m, x.shape[-1]), ys.dtype).at[token].add(ys)


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _chunked(x, weights, experts, w_gate, w_up, w_down, implementation, chunk_tokens, act):
    """Forward in chunks of `chunk_tokens` tokens (memory bounded); gradients as `_dispatch`'s."""
    m, k = experts.shape
    n = -(-m // chunk_tokens)
    pad = n * chunk_tokens - m  # padded tokens go to expert 0 with weight 0

    def split(a):
        return jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n, chunk_tokens, *a.shape[1:])

    def one(chunk):
        return _dispatch(*chunk, w_gate, w_up, w_down, implementation, act)

    y = lax.map(one, (split(x), split(weights), split(experts)))  # [n, chunk, D]
    return y.reshape(n * chunk_tokens, -1)[:m]


def _chunked_fwd(x, weights, experts, w_gate, w_up, w_down, implementation, chunk_tokens, act):
    y = _chunked(x, weights, experts, w_gate, w_up, w_down, implementation, chunk_tokens, act)
    return y, (x, weights, experts, w_gate, w_up, w_down)


def _chunked_bwd(implementation, chunk_tokens, act, res, dy):
    x, weights, experts, w_gate, w_up, w_down = res

    def whole(x, weights, w_gate, w_up, w_down):
        return _dispatch(x, weights, experts, w_gate, w_up, w_down, implementation, act)

    _, vjp = jax.vjp(whole, x, weights, w_gate, w_up, w_down)
    dx, dweights, dgate, dup, ddown = vjp(dy)
    return dx, dweights, None, dgate, dup, ddown


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


def dispatch_reference(x, weights, experts, w_gate, w_up, w_down, *, act: str = "silu"):
    """Every expert on every token, combined with a dense [M,E] weight matrix. For tests only."""
    m, _ = experts.shape
    w_gate, w_up, w_down = (jnp.stack(w) if isinstance(w, tuple) else materialize(w) for w in (w_gate, w_up, w_down))
    h = activation(act)(jnp.einsum("MD,EDF->MEF", x, w_gate)) * jnp.einsum("MD,EDF->MEF", x, w_up)
    y = jnp.einsum("MEF,EFD->MED", h, w_down)
    combine = jnp.zeros((m, w_gate.shape[0]), jnp.float32)
    combine = combine.at[jnp.arange(m)[:, None], experts].add(weights)
    return jnp.einsum("MED,ME->MD", y, combine.astype(y.dtype))


# ------------------------------------------------------------------------ the grouped matmul
IMPLEMENTATIONS = ("tokamax", "loops", "ragged_dot")


def _dtype(w):
    return w[0].dtype if isinstance(w, tuple) else w.dtype


def grouped_matmul(lhs, rhs, group_sizes, *, implementation: str | None = None):
    """lhs [P,D] (rows sorted by group) · rhs [E,D,F] per group -> [P,F] in lhs' dtype.

    Same contract as `jax.lax.ragged_dot`: group e owns the next group_sizes[e] rows; rows past
    sum(group_sizes) come out zero. rhs may be a tuple of E arrays [D,F] (`grouped_matmul_by_expert`).
    """
    if isinstance(rhs, tuple):
        return grouped_matmul_by_expert(lhs, rhs, group_sizes)
    if lhs.ndim != 2 or rhs.ndim != 3 or group_sizes.shape != (rhs.shape[0],) or lhs.shape[1] != rhs.shape[1]:
        raise ValueError(f"grouped_matmul: expected lhs [P,D], rhs [E,D,F], group_sizes [E]; found "
                         f"{lhs.shape=}, {rhs.shape=}, {group_sizes.shape=}")
    if implementation is not None:
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation={implementation!r}; expected one of {IMPLEMENTATIONS} or None")
        return _BY_NAME[implementation](lhs, rhs, group_sizes)
    return platform.by_platform(lhs, rhs, group_sizes, gpu=_gpu, default=grouped_matmul_loops)


def _gpu(lhs, rhs, group_sizes):
    """tokamax's Mosaic GPU kernel where tokamax can build it for the default device, else the loops
    (and for quantized experts, see the module doc)."""
    if isinstance(rhs, Blocked) or not tokamax_serves():
        return grouped_matmul_loops(lhs, rhs, group_sizes)
    return grouped_matmul_tokamax(lhs, rhs, group_sizes)


def tokamax_serves() -> bool:
    """Whether tokamax's Mosaic GPU ragged_dot supports the default device (sm90 or sm100)."""
    try:
        from tokamax._src import gpu_utils
    except ImportError:
        return False
    return gpu_utils.is_sm90() or gpu_utils.is_sm100()


def grouped_matmul_tokamax(lhs, rhs, group_sizes):
    import tokamax

    from mla_jax.ops import _tokamax

    _tokamax.prepare()
    return tokamax.ragged_dot(lhs, materialize(rhs), group_sizes, implementation="mosaic")


def grouped_matmul_ragged_dot(lhs, rhs, group_sizes):
    """`jax.lax.ragged_dot` as XLA lowers it (jax 0.10: one dense dot over all groups)."""
    return lax.ragged_dot(lhs, materialize(rhs), group_sizes)


# ------------------------------------------------------------------------ the loop form
def _tiles(p: int) -> tuple[int, int]:
    """(big, small) row tiles for P rows, never taller than P."""
    return min(BIG_TILE, p), min(SMALL_TILE, p)


def _row_tile(arr, row0, tile, first, end):
    """arr[row0 : row0+tile] (clamped inside arr) as float32, rows outside [first, end) zeroed;
    also returns the clamped start and the row mask [tile]."""
    start = jnp.minimum(row0, arr.shape[0] - tile)
    rows = start + jnp.arange(tile)
    mine = (rows >= first) & (rows < end)
    block = lax.dynamic_slice_in_dim(arr, start, tile, axis=0).astype(jnp.float32)
    return jnp.where(mine[:, None], block, 0.0), start, mine


def _loop(n, offset, tile, body, carry):
    return lax.fori_loop(0, n, lambda j, c: body(offset + j * tile, tile, c), carry)


def _for_each_tile(size, p: int, body, carry):
    """Runs body(row_offset, tile, carry) over an expert's `size` rows: BIG tiles, SMALL tiles, then
    the last rows one at a time when at most SINGLE_ROWS are left (else one more SMALL tile)."""
    big, small = _tiles(p)
    n_big = size // big if big > small else 0
    rest = size - n_big * big
    n_single = jnp.where(rest % small <= SINGLE_ROWS, rest % small, 0)
    n_small = (rest - n_single + small - 1) // small
    carry = _loop(n_big, 0, big, body, carry)
    carry = _loop(n_small, n_big * big, small, body, carry)
    if small == 1:
        return carry
    return _loop(n_single, n_big * big + n_small * small, 1, body, carry)


def _active_experts(group_sizes):
    """(experts with rows first [E], how many have rows, first row of each expert [E])."""
    has_rows = group_sizes > 0
    order = jnp.argsort(~has_rows, stable=True).astype(jnp.int32)
    starts = jnp.cumsum(group_sizes) - group_sizes
    return order, jnp.sum(has_rows).astype(jnp.int32), starts


def _over_experts(lhs, f: int, group_sizes, product):
    """out [P,F] in lhs.dtype: for each expert e with rows, product(e) is a function taking a float32
    row tile [tile,D] of e's rows to float32 [tile,F]. product(e) runs once per expert (per-expert
    preparation goes there), the function it returns once per row tile."""
    p = lhs.shape[0]
    active, n_active, starts = _active_experts(group_sizes)

    def expert(i, out):
        e = active[i]
        first, size = starts[e], group_sizes[e]
        times = product(e)

        def tile_body(offset, tile, out):
            x, start, mine = _row_tile(lhs, first + offset, tile, first + offset, first + size)
            y = times(x)  # [tile,F] float32
            old = lax.dynamic_slice_in_dim(out, start, tile, axis=0)
            return lax.dynamic_update_slice_in_dim(out, jnp.where(mine[:, None], y.astype(out.dtype), old), start, 0)

        return _for_each_tile(size, p, tile_body, out)

    return lax.fori_loop(0, n_active, expert, jnp.zeros((p, f), lhs.dtype))


def _gmm_loops(lhs, rhs, group_sizes, transpose_rhs: bool):
    """Forward grouped matmul: lhs [P,D] · rhs[e] ([D,F], or [F,D] transposed) -> [P,F] lhs.dtype."""
    f = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    contract = (((1,), (1,)), ((), ())) if transpose_rhs else (((1,), (0,)), ((), ()))

    def product(e):
        w = index(rhs, e, jnp.float32)  # this expert only (dequantized here when quantized)
        return lambda x: lax.dot_general(x, w, contract)

    return _over_experts(lhs, f, group_sizes, product)


def grouped_matmul_by_expert(lhs, rhs: tuple, group_sizes):
    """The loop form over experts held one array each: rhs a tuple of E arrays [D,F] -> [P,F].

    Expert e's product runs in branch e of a `lax.switch`, whose dot reads rhs[e] where it lies:
    no slice, so no copy (see the module doc). Forward only (generation).
    """
    if not rhs or any(w.ndim != 2 or w.shape != rhs[0].shape for w in rhs) or lhs.ndim != 2 \
            or lhs.shape[1] != rhs[0].shape[0] or group_sizes.shape != (len(rhs),):
        raise ValueError(f"grouped_matmul_by_expert: expected lhs [P,D], rhs a tuple of E arrays [D,F], "
                         f"group_sizes [E]; found {lhs.shape=}, rhs shapes {[w.shape for w in rhs]}, "
                         f"{group_sizes.shape=}")
    branches = [functools.partial(_times, w) for w in rhs]
    return _over_experts(lhs, rhs[0].shape[1], group_sizes,
                         lambda e: lambda x: lax.switch(e, branches, x))


def _times(w, x):
    """x [tile,D] float32 · w [D,F] -> [tile,F] float32."""
    return lax.dot_general(x, w.astype(jnp.float32), (((1,), (0,)), ((), ())))


def _tgmm_loops(lhs, dout, group_sizes, rhs_like):
    """Per-group lhsᵀ·dout: lhs [P,D], dout [P,F] -> [E,D,F] in rhs_like's dtype (0 for empty groups)."""
    p = lhs.shape[0]
    active, n_active, starts = _active_experts(group_sizes)

    def expert(i, grad):
        e = active[i]
        first, size = starts[e], group_sizes[e]

        def tile_body(offset, tile, acc):
            x, start, _ = _row_tile(lhs, first + offset, tile, first + offset, first + size)
            dy, _, _ = _row_tile(dout, first + offset, tile, first + offset, first + size)
            return acc + lax.dot_general(x, dy, (((0,), (0,)), ((), ())))

        acc = _for_each_tile(size, p, tile_body, jnp.zeros(rhs_like.shape[1:], jnp.float32))
        return lax.dynamic_update_index_in_dim(grad, acc.astype(grad.dtype), e, axis=0)

    return lax.fori_loop(0, n_active, expert, jnp.zeros(rhs_like.shape, rhs_like.dtype))


@jax.custom_vjp
def grouped_matmul_loops(lhs, rhs, group_sizes):
    """The grouped matmul as XLA loops: only experts with rows, only their rows (plus tile padding)."""
    return _gmm_loops(lhs, rhs, group_sizes, transpose_rhs=False)


def _loops_fwd(lhs, rhs, group_sizes):
    return _gmm_loops(lhs, rhs, group_sizes, transpose_rhs=False), (lhs, rhs, group_sizes)


def _loops_bwd(res, dout):
    lhs, rhs, group_sizes = res
    dlhs = _gmm_loops(dout, rhs, group_sizes, transpose_rhs=True).astype(lhs.dtype)  # dout · rhs[e]ᵀ
    if isinstance(rhs, Blocked):  # a quantized base is frozen
        return dlhs, jax.tree.map(jnp.zeros_like, rhs), None
    drhs = _tgmm_loops(lhs, dout, group_sizes, rhs)
    return dlhs, drhs, None


grouped_matmul_loops.defvjp(_loops_fwd, _loops_bwd)

_BY_NAME = {"tokamax": grouped_matmul_tokamax, "loops": grouped_matmul_loops, "ragged_dot": grouped_matmul_ragged_dot}
