"""Expert parallelism: routed experts split over the mesh axis `expert`, tokens brought to them.

Scheme (dropless, no capacity factor): the tokens of the `expert` axis's n devices are all-gathered
(each device then holds every token of its group and 1/n of the experts), each device runs its own
experts over the (token, expert) pairs routed to them, and the partial outputs are summed and
scattered back to the devices that own the tokens (reduce-scatter). Per layer and device that moves
M·D token rows in and M·D partial sums out (M tokens of the group), where an all-to-all exchange
moves about M·K·D/n each way; for the decode steps this serves (a few tokens per device) the gather is
smaller than one expert's weights, and it needs no ragged buffers sized for the worst case. The
optimized HLO holds one all-gather and one reduce-scatter per MoE layer (tests/test_parallel_mesh.py).

Pairs routed to another device's experts get the id `local experts` (one past the last): the sort
puts them last and the grouped matmul's group sizes leave them out, so they cost neither matmul nor
weight.

Dimensions: M tokens, D model dim, K experts per token, E experts, F expert hidden.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

AXIS = "expert"


def expert_axis_size(n_experts: int) -> int:
    """How many ways the context mesh splits the experts (1: no expert parallelism here)."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or AXIS not in mesh.axis_names:
        return 1
    n = mesh.shape[AXIS]
    return n if n > 1 and n_experts % n == 0 else 1


def sharded_dispatch(local_dispatch, x, routing, w_gate, w_up, w_down, **kwargs):
    """`local_dispatch` (x [M,D], routing, w_gate, w_up [E,D,F], w_down [E,F,D] -> [M,D]) with the
    experts split over the `expert` mesh axis; the same result as local_dispatch over all experts."""
    plain = all(isinstance(w, jax.Array) for w in (w_gate, w_up, w_down))  # quantized blocks: not split here
    n = expert_axis_size(w_gate.shape[0]) if plain else 1
    if n == 1:
        return local_dispatch(x, routing, w_gate, w_up, w_down, **kwargs)
    split = x.shape[0] % n == 0  # tokens split over the axis: gather them, scatter the sums back
    rows = P(AXIS) if split else P()

    def local(x, weights, experts, w_gate, w_up, w_down):
        if split:
            x, weights, experts = (jax.lax.all_gather(a, AXIS, axis=0, tiled=True) for a in (x, weights, experts))
        count = w_gate.shape[0]  # this device's experts: global ids first .. first + count - 1
        ids = experts - jax.lax.axis_index(AXIS) * count
        mine = (ids >= 0) & (ids < count)
        local_routing = routing._replace(weights=jnp.where(mine, weights, 0.0), experts=jnp.where(mine, ids, count),
                                         scores=None)
        y = local_dispatch(x, local_routing, w_gate, w_up, w_down, **kwargs)
        if split:
            return jax.lax.psum_scatter(y, AXIS, scatter_dimension=0, tiled=True)
        return jax.lax.psum(y, AXIS)

    experts_spec = P(AXIS)
    return jax.shard_map(local, in_specs=(rows, rows, rows, experts_spec, experts_spec, experts_spec),
                         out_specs=rows, axis_names={AXIS}, check_vma=False)(
        x, routing.weights, routing.experts, w_gate, w_up, w_down)
