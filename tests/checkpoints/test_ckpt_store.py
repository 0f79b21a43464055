"""The checkpoint layout writer (`mla_jax.store`): bounded parts, atomic publication, strict reading.

These use plain numpy arrays, so they pin down the layout contract shared by `convert` and `save`
without building a model.
"""

import os

import numpy as np
import pytest

from mla_jax import store

PART = 1000  # bytes


def _write(dst, arrays, **kwargs):
    with store.Writer(dst, part_bytes=PART, **kwargs) as writer:
        for path, array in arrays.items():
            writer.add(path, array)
        return writer.commit({"model_type": "none"}, dtype="float32")


ARRAYS = {  # float32: 400 B, 400 B, 2400 B (one variable larger than a part), 40 B, 800 B
    ("a",): np.arange(100, dtype=np.float32),
    ("b", 0, "w"): np.ones((10, 10), np.float32),
    ("c", "big"): np.full((600,), 2.0, np.float32),
    ("d",): np.zeros(10, np.float32),
    ("e", "x"): np.arange(200, dtype=np.float32),
}


def _part_sizes(path):
    layout = store.read_layout(path)
    return [sum(int(np.prod(v["shape"])) * 4 for v in item["variables"]) for item in layout["items"]]


def test_no_part_exceeds_the_budget_or_its_one_variable(tmp_path):
    _write(tmp_path / "ckpt", ARRAYS)
    largest = max(a.nbytes for a in ARRAYS.values())
    assert all(size <= max(PART, largest) for size in _part_sizes(tmp_path / "ckpt"))


def test_parts_are_filled_in_order_up_to_the_budget(tmp_path):
    _write(tmp_path / "ckpt", ARRAYS)
    assert _part_sizes(tmp_path / "ckpt") == [800, 2400, 840]  # [a, b] [c] [d, e]


def test_restore_gives_back_every_array(tmp_path):
    _write(tmp_path / "ckpt", ARRAYS)
    layout = store.read_layout(tmp_path / "ckpt")
    import jax

    targets = {p: jax.ShapeDtypeStruct(a.shape, a.dtype) for p, a in ARRAYS.items()}
    restored = dict(store.restore(tmp_path / "ckpt", layout, targets))
    assert restored.keys() == ARRAYS.keys() and all(np.array_equal(restored[p], ARRAYS[p]) for p in ARRAYS)


def test_subset_restore_skips_the_rest(tmp_path):
    _write(tmp_path / "ckpt", ARRAYS)
    layout = store.read_layout(tmp_path / "ckpt")
    import jax

    wanted = {("c", "big"): jax.ShapeDtypeStruct((600,), np.float32), ("d",): jax.ShapeDtypeStruct((10,), np.float32)}
    assert sorted(p for p, _ in store.restore(tmp_path / "ckpt", layout, wanted)) == sorted(wanted)


def test_the_same_variable_twice_is_refused(tmp_path):
    with pytest.raises(store.CheckpointError, match="variable a written twice"):
        with store.Writer(tmp_path / "ckpt") as writer:
            writer.add(("a",), np.zeros(1))
            writer.add(("a",), np.zeros(1))


def test_leaving_without_commit_leaves_nothing(tmp_path):
    with store.Writer(tmp_path / "ckpt", part_bytes=PART) as writer:
        writer.add(("a",), np.zeros(1000, np.float32))
    assert os.listdir(tmp_path) == []


def test_missing_part_is_reported(tmp_path):
    _write(tmp_path / "ckpt", ARRAYS)
    os.rename(tmp_path / "ckpt" / store.STATE_DIR / "part_00001", tmp_path / "elsewhere")
    with pytest.raises(store.CheckpointError, match=r"item state/part_00001 listed in mla_jax\.json is missing"):
        store.read_layout(tmp_path / "ckpt")
