"""How weights are cut into storage chunks (`store.chunk_shape`): a device restoring its shard reads
the chunks its shard overlaps, so on every preset's split the big weights' shards cover whole chunks.
Pure shape arithmetic on DeepSeek-V3's shapes (bfloat16), against abstract meshes: no arrays."""

import itertools
import math

import pytest
from jax.sharding import AbstractMesh

from mla_jax import store
from mla_jax.parallel import rules

BOUND = store.DEFAULT_CHUNK_BYTES
# checkpoint path -> shape, DeepSeek-V3 (D 7168, 128 heads, 256 experts of F 2048, vocabulary 129280)
V3 = {
    ("layers", 3, "mlp", "experts", "gate_proj"): (256, 7168, 2048),
    ("layers", 3, "mlp", "experts", "down_proj"): (256, 2048, 7168),
    ("layers", 0, "self_attn", "q_a_proj", "kernel"): (7168, 1536),
    ("layers", 0, "self_attn", "q_b_proj", "kernel"): (1536, 128, 192),
    ("layers", 0, "self_attn", "kv_a_proj_with_mqa", "kernel"): (7168, 576),
    ("layers", 0, "self_attn", "kv_b_proj", "kernel"): (512, 128, 256),
    ("layers", 0, "self_attn", "o_proj", "kernel"): (128, 128, 7168),
    ("layers", 0, "mlp", "gate_proj", "kernel"): (7168, 18432),
    ("layers", 0, "mlp", "down_proj", "kernel"): (18432, 7168),
    ("layers", 3, "mlp", "gate"): (7168, 256),
    ("embed_tokens",): (129280, 7168),
    ("lm_head", "kernel"): (7168, 129280),
    ("norm", "weight"): (7168,),
}
MESHES = ["expert=8", "fsdp=8", "tensor=8", "data=2,tensor=4", "expert=2,fsdp=2,tensor=2"]


def read_per_shard(shape, chunk, pieces) -> float:
    """The most any device reads (bytes of the chunks its shard overlaps) over its shard's size."""
    worst = 0.0
    for index in itertools.product(*map(range, pieces)):
        read = 1
        for size, c, n, i in zip(shape, chunk, pieces, index):
            lo, hi = size * i // n, size * (i + 1) // n
            read *= (math.ceil(hi / c) - lo // c) * c
        worst = max(worst, read / (math.prod(shape) / math.prod(pieces)))
    return worst


@pytest.mark.parametrize("axes", MESHES)
def test_every_big_weight_shard_covers_whole_chunks(axes):
    sizes = {a: int(n) for a, n in (part.split("=") for part in axes.split(","))}
    mesh = AbstractMesh(tuple(sizes.values()), tuple(sizes))
    for path, shape in V3.items():
        if math.prod(shape) * 2 < BOUND:
            continue
        spec = tuple(rules.spec(mesh, rules.param_axes(store.path_name(path), len(shape)), shape))
        spec += (None,) * (len(shape) - len(spec))
        pieces = [1 if s is None else math.prod(sizes[a] for a in ((s,) if isinstance(s, str) else s)) for s in spec]
        chunk = store.chunk_shape(path, shape, 2, BOUND)
        assert read_per_shard(shape, chunk, pieces) == 1.0, (store.path_name(path), shape, chunk, pieces)


def test_chunks_stay_within_the_bound_and_small_arrays_whole():
    for path, shape in V3.items():
        chunk = store.chunk_shape(path, shape, 2, BOUND)
        assert all(s % c == 0 for s, c in zip(shape, chunk)) and math.prod(chunk) * 2 <= BOUND, (path, chunk)
        if math.prod(shape) * 2 <= BOUND // 16:
            assert chunk == shape, path
    assert store.chunk_shape(("layers", 0, "input_layernorm", "weight"), (7168,), 2, BOUND) == (7168,)


def test_a_name_the_table_does_not_know_is_cut_along_its_largest_dimension():
    """MTP extras are stored under their hub names; still cut to the bound."""
    chunk = store.chunk_shape(("mtp", "model.layers.61.eh_proj.weight"), (7168, 14336), 2, BOUND)
    assert math.prod(chunk) * 2 <= BOUND and chunk[1] < 14336
