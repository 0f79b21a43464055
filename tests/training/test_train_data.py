"""Reading, tokenizing, packing and batching training data."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mla_jax.config import Config
from mla_jax.model import Transformer
from mla_jax.training.data import Batches, DataError, Document, pack, read_documents, load_tokenizer

TINY = os.path.join(os.path.dirname(__file__), "..", "..", "checkpoints", "tiny_v3")
BOS, EOS = 0, 1  # tiny_v3's config.json


def _doc(ids, first_target=1):
    ids = np.asarray(ids, np.int32)
    loss = np.arange(len(ids)) >= first_target
    return Document(ids, loss)


@pytest.fixture(scope="module")
def two_docs():
    # stream 10 11 12 | 20 21, rows of 4: [10 11 12 20] [21 pad pad pad]
    return pack([_doc([10, 11, 12]), _doc([20, 21])], seq_len=4)


@pytest.mark.parametrize("field,expected", [
    ("tokens", [[10, 11, 12, 20], [21, 0, 0, 0]]),
    ("segment_ids", [[1, 1, 1, 2], [1, 0, 0, 0]]),
    ("positions", [[0, 1, 2, 0], [0, 0, 0, 0]]),
    # 12 -> 20 crosses documents; 20 -> 21 crosses rows but stays in its document, so it is kept
    ("loss_mask", [[True, True, False, True], [False, False, False, False]]),
])
def test_packing_layout(two_docs, field, expected):
    np.testing.assert_array_equal(getattr(two_docs, field), expected)


def test_targets_are_the_next_token_of_the_same_document(two_docs):
    kept = two_docs.targets[two_docs.loss_mask]
    np.testing.assert_array_equal(kept, [11, 12, 21])


def _write(tmp_path, name, lines):
    path = tmp_path / name
    path.write_text("".join((json.dumps(l) if not isinstance(l, str) else l) + "\n" for l in lines))
    return str(path)


def test_prompt_completion_trains_on_the_completion_and_eos_only(tmp_path):
    tok = load_tokenizer(TINY)
    path = _write(tmp_path, "pc.jsonl", [{"prompt": "Four score and", "completion": " seven years ago"}])
    (doc,) = read_documents(path, tokenizer=tok, vocab_size=512, bos_token_id=BOS, eos_token_id=EOS)
    completion = tok.encode(" seven years ago", add_special_tokens=False).ids
    np.testing.assert_array_equal(doc.ids[doc.loss], completion + [EOS])


def test_text_documents_get_bos_and_eos(tmp_path):
    tok = load_tokenizer(TINY)
    path = _write(tmp_path, "t.jsonl", [{"text": "We hold these truths"}])
    (doc,) = read_documents(path, tokenizer=tok, vocab_size=512, bos_token_id=BOS, eos_token_id=EOS)
    assert doc.ids.tolist() == [BOS] + tok.encode("We hold these truths", add_special_tokens=False).ids + [EOS]


def test_pretokenized_ids_are_kept_as_given(tmp_path):
    path = _write(tmp_path, "ids.jsonl", [{"input_ids": [5, 6, 7]}])
    (doc,) = read_documents(path, tokenizer=None, vocab_size=512, bos_token_id=BOS, eos_token_id=EOS)
    assert doc.ids.tolist() == [5, 6, 7] and doc.loss.tolist() == [False, True, True]


def test_plain_text_file_is_one_document(tmp_path):
    tok = load_tokenizer(TINY)
    path = tmp_path / "book.txt"
    path.write_text("First paragraph.\n\nSecond one.\n")
    docs = read_documents(str(path), tokenizer=tok, vocab_size=512, bos_token_id=BOS, eos_token_id=EOS)
    body = tok.encode("First paragraph.\n\nSecond one.\n", add_special_tokens=False).ids
    assert len(docs) == 1 and docs[0].ids.tolist() == [BOS] + body + [EOS]


@pytest.mark.parametrize("name,lines,message", [
    ("bad json", ['{"input_ids": [1, 2]}', '{"text": '], "bad.jsonl:2: not valid JSON"),
    ("unknown keys", [{"txt": "a"}], "found keys ['txt']"),
    ("id outside vocabulary", [{"input_ids": [3, 600]}], "token id 600 outside the vocabulary [0, 512)"),
    ("ids not integers", [{"input_ids": ["a"]}], "'input_ids' must be a non-empty list of integers"),
    ("text without tokenizer", [{"text": "a"}], "needs a tokenizer"),
    ("nothing", ["", "  "], "no documents"),
])
def test_bad_data_is_refused_naming_file_and_line(tmp_path, name, lines, message):
    path = _write(tmp_path, "bad.jsonl", lines)
    with pytest.raises(DataError) as err:
        read_documents(path, tokenizer=None, vocab_size=512, bos_token_id=BOS, eos_token_id=EOS)
    assert message in str(err.value) and "bad.jsonl" in str(err.value)


@pytest.fixture(scope="module")
def rows():
    return pack([_doc(np.arange(1, 40) % 50)], seq_len=4)  # 10 rows


def test_batches_are_a_function_of_the_step(rows):
    a, b = Batches(rows, 2, 2, seed=3), Batches(rows, 2, 2, seed=3)
    b.batch(0), b.batch(7)  # other calls first change nothing
    np.testing.assert_array_equal(a.batch(5)["tokens"], b.batch(5)["tokens"])


def test_each_epoch_visits_every_row_once(rows):
    batches = Batches(rows, 5, 1, seed=1)
    first_epoch = np.concatenate([batches.rows(0), batches.rows(1)])
    assert sorted(first_epoch.tolist()) == list(range(10))


def test_packed_documents_do_not_see_each_other():
    """A row holding two documents gives each the logits it has alone (segment_ids + positions)."""
    config = Config.from_hf(TINY)
    model = Transformer(config, rngs=nnx.Rngs(0))
    a, b = [0, 5, 9, 33, 7, 1], [0, 61, 2, 8, 1]
    packed = pack([_doc(a), _doc(b)], seq_len=16)

    @jax.jit
    def run(tokens, positions, segment_ids):
        return model(tokens, positions=positions, segment_ids=segment_ids)

    together = run(packed.tokens, packed.positions, packed.segment_ids)[0]
    alone_b = run(jnp.asarray([b]), jnp.arange(len(b))[None], jnp.ones((1, len(b)), jnp.int32))[0]
    np.testing.assert_allclose(together[len(a):len(a) + len(b)], alone_b, rtol=1e-5, atol=1e-5)
