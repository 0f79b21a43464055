"""Training data: read documents, tokenize them, pack them into fixed-length rows, serve batches.

Inputs
* JSONL, one object per line: {"text": ...}; {"prompt": ..., "completion": ...} (loss only on the
  completion); or pre-tokenized {"input_ids": [...]} (taken as they are, every token a target).
* Any other file is plain text: the whole file is one document.
Text documents become [bos] + tokens + [eos] (bos/eos from config.json, when it names them); the
tokenizer's own post-processor is not used, so what is added is explicit and the same for every
tokenizer. Prompt and completion are tokenized separately, so the boundary is where the user put it.

Packing concatenates the documents into one stream and cuts it into rows of `seq_len`. Targets are
taken from the stream before cutting: the target of token t is token t+1 of the same document, so a
document split across two rows loses no target, and the last token of a document has none (no
cross-document targets). Within a row, `segment_ids` number the documents 1..n (0 = padding) and
`positions` restart at 0 at every document start and at every row start (a row cannot see the row
before it).

Batches are a pure function of (seed, step): epoch e visits the rows in the order of a permutation
seeded by (seed, e); step s takes the next batch_size·grad_accum rows of that endless sequence. The
data position is therefore the step count alone, which is what makes resuming exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os

import numpy as np


class DataError(ValueError):
    """Training data that cannot be read, tokenized or packed as asked."""


@dataclasses.dataclass(frozen=True)
class Document:
    ids: np.ndarray  # [n] int32 token ids
    loss: np.ndarray  # [n] bool: True where the token is a target (predicted from the one before)


@dataclasses.dataclass(frozen=True)
class Packed:
    """Rows [R,T] ready for the model; `loss_mask[r,t]` says whether `targets[r,t]` is trained on."""

    tokens: np.ndarray  # int32
    targets: np.ndarray  # int32
    loss_mask: np.ndarray  # bool
    segment_ids: np.ndarray  # int32, 1..n per row, 0 = padding
    positions: np.ndarray  # int32, restarting per document and per row

    @property
    def rows(self) -> int:
        return self.tokens.shape[0]

    def fingerprint(self) -> str:
        """A hash of everything trained on: resuming with other data is refused."""
        h = hashlib.sha256()
        for a in (self.tokens, self.targets, self.loss_mask, self.segment_ids, self.positions):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()[:16]


def load_tokenizer(directory: str | os.PathLike):
    """The `tokenizer.json` of a checkpoint directory, or None when it has none."""
    path = os.path.join(os.fspath(directory), "tokenizer.json")
    if not os.path.exists(path):
        return None
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path)


class _Encoder:
    """Text -> token ids -> `Document`, with the checkpoint's special tokens and vocabulary size."""

    def __init__(self, tokenizer, bos: int | None, eos: int | None, vocab_size: int):
        self.tokenizer, self.bos, self.eos, self.vocab_size = tokenizer, bos, eos, vocab_size

    def encode(self, text: str, where: str) -> list[int]:
        if self.tokenizer is None:
            raise DataError(f"{where}: text needs a tokenizer, and none was found (no tokenizer.json in the "
                            "checkpoint, or a model passed to finetune() without tokenizer_from=); give "
                            "pre-tokenized {\"input_ids\": [...]} lines instead")
        # Whole, never in pieces: a split point can change the tokens around it (e.g. "\n\n" is one token).
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def document(self, prompt: list[int], body: list[int], where: str) -> Document:
        head = ([self.bos] if self.bos is not None else []) + prompt
        tail = [self.eos] if self.eos is not None else []
        ids = np.asarray(head + body + tail, np.int32)
        loss = np.zeros(len(ids), bool)
        # Token t is a target when it is predicted from t-1: the first token never is.
        loss[max(len(head), 1):] = True
        return self.checked(Document(ids, loss), where)

    def checked(self, doc: Document, where: str) -> Document:
        bad = (doc.ids < 0) | (doc.ids >= self.vocab_size)
        if bad.any():
            raise DataError(f"{where}: token id {int(doc.ids[bad][0])} outside the vocabulary [0, {self.vocab_size})")
        return doc


def _special(value) -> int | None:
    if isinstance(value, (tuple, list)):
        return int(value[0]) if value else None
    return None if value is None else int(value)


def read_documents(path: str | os.PathLike, *, tokenizer, vocab_size: int, bos_token_id=None,
                   eos_token_id=None) -> list[Document]:
    """Every document of a JSONL or plain-text file (see the module docstring for the formats)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such data file")
    enc = _Encoder(tokenizer, _special(bos_token_id), _special(eos_token_id), vocab_size)
    content = _read_text(path)
    if not path.endswith((".jsonl", ".json")):
        if not content.strip():
            raise DataError(f"{path}: the text file is empty")
        return [enc.document([], enc.encode(content, path), path)]
    docs = []
    for n, line in enumerate(content.split("\n"), 1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{n}: not valid JSON ({e.msg}): {line.strip()[:60]!r}") from None
        docs.append(_json_document(obj, enc, f"{path}:{n}"))
    if not docs:
        raise DataError(f"{path}: no documents (every line is empty)")
    return docs


def _read_text(path: str) -> str:
    """The file as UTF-8 text; a binary file (undecodable, or holding NUL bytes) is a DataError."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); expected JSONL or "
                        "plain text") from None
    if "\x00" in text:
        raise DataError(f"{path}: a binary file (NUL byte at offset {text.index(chr(0))}); expected JSONL or plain "
                        "text")
    return text


def _json_document(obj, enc: _Encoder, where: str) -> Document:
    if not isinstance(obj, dict):
        raise DataError(f"{where}: expected a JSON object, found {type(obj).__name__}")
    keys = set(obj)
    if keys == {"input_ids"}:
        ids = obj["input_ids"]
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) for i in ids):
            raise DataError(f"{where}: 'input_ids' must be a non-empty list of integers")
        arr = np.asarray(ids, np.int32)
        loss = np.ones(len(arr), bool)
        loss[0] = False
        return enc.checked(Document(arr, loss), where)
    if keys == {"text"} and isinstance(obj["text"], str):
        return enc.document([], enc.encode(obj["text"], where), where)
    if keys == {"prompt", "completion"} and all(isinstance(obj[k], str) for k in keys):
        return enc.document(enc.encode(obj["prompt"], where), enc.encode(obj["completion"], where), where)
    raise DataError(
        f"{where}: expected {{\"text\": str}}, {{\"prompt\": str, \"completion\": str}} or "
        f"{{\"input_ids\": [int, ...]}}, found keys {sorted(keys)}"
    )


def pack(documents: list[Document], seq_len: int) -> Packed:
    """Documents -> rows of `seq_len` (see the module docstring); the last row is padded."""
    if seq_len < 2:
        raise DataError(f"seq_len={seq_len}; expected at least 2")
    if not documents:
        raise DataError("no documents to pack")
    ids = np.concatenate([d.ids for d in documents])
    is_target = np.concatenate([d.loss for d in documents])
    doc = np.concatenate([np.full(len(d.ids), i, np.int64) for i, d in enumerate(documents)])
    n = len(ids)
    targets = np.zeros(n, np.int32)
    targets[:-1] = ids[1:]
    mask = np.zeros(n, bool)
    mask[:-1] = (doc[1:] == doc[:-1]) & is_target[1:]

    rows = -(-n // seq_len)
    pad = rows * seq_len - n

    def cut(a, fill):
        return np.concatenate([a, np.full(pad, fill, a.dtype)]).reshape(rows, seq_len)

    tokens, targets, mask, doc = cut(ids, 0), cut(targets, 0), cut(mask, False), cut(doc, -1)
    # A new segment starts at each row start and at each document change within a row.
    starts = np.ones_like(doc, bool)
    starts[:, 1:] = doc[:, 1:] != doc[:, :-1]
    segment_ids = np.cumsum(starts, axis=1).astype(np.int32)
    segment_ids[doc < 0] = 0
    index = np.broadcast_to(np.arange(seq_len), doc.shape)
    start_index = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    positions = (index - start_index).astype(np.int32)
    positions[doc < 0] = 0
    if not mask.any():
        raise DataError("the data has no target token (every document is a single token or all prompt)")
    return Packed(tokens.astype(np.int32), targets, mask, segment_ids, positions)


class Batches:
    """Deterministic batches of `batch_size·grad_accum` rows, shaped [A,B,T], a function of the step."""

    def __init__(self, packed: Packed, batch_size: int, grad_accum: int = 1, *, seed: int = 0, shuffle: bool = True):
        if batch_size < 1 or grad_accum < 1:
            raise DataError(f"batch_size={batch_size}, grad_accum={grad_accum}; expected both >= 1")
        self.packed, self.batch_size, self.grad_accum = packed, batch_size, grad_accum
        self.seed, self.shuffle = seed, shuffle

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def _order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.packed.rows)
        return np.random.default_rng([self.seed, epoch]).permutation(self.packed.rows)

    def rows(self, step: int) -> np.ndarray:
        """Row indices of batch `step` (0-based)."""
        r = self.packed.rows
        flat = np.arange(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        epochs = flat // r
        orders = {int(e): self._order(int(e)) for e in np.unique(epochs)}
        return np.array([orders[int(e)][i] for e, i in zip(epochs, flat % r)], np.int64)

    def batch(self, step: int) -> dict[str, np.ndarray]:
        idx = self.rows(step)
        shape = (self.grad_accum, self.batch_size, self.packed.tokens.shape[1])
        p = self.packed
        return {
            "tokens": p.tokens[idx].reshape(shape),
            "targets": p.targets[idx].reshape(shape),
            "loss_mask": p.loss_mask[idx].reshape(shape),
            "segment_ids": p.segment_ids[idx].reshape(shape),
            "positions": p.positions[idx].reshape(shape),
        }
