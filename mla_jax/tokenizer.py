"""Text <-> token ids for generation, from a checkpoint directory's `tokenizer.json`.

Reads what the hub ships beside the weights: `tokenizer.json` (through the `tokenizers` package),
`tokenizer_config.json` (bos / eos tokens, `add_bos_token`, `chat_template`) and, when present,
`generation_config.json` / `config.json` for the eos ids. Chat templates are Jinja; they render
only when `jinja2` is installed (a clear error says so otherwise). `TextStream` turns tokens that
arrive one at a time into printable text without splitting a multi-byte character.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"


class TokenizerError(ValueError):
    """A checkpoint directory whose tokenizer files are missing or unusable."""


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path}: not valid JSON ({e})") from e


def _token_text(value) -> str | None:
    """tokenizer_config.json writes special tokens as a string or as {"content": ...}."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special-token rules and chat template of one checkpoint."""

    def __init__(self, tokenizer, *, bos_token: str | None = None, eos_token: str | None = None,
                 eos_token_ids: Iterable[int] = (), add_bos: bool = False, chat_template: str | None = None,
                 source: str = "tokenizer"):
        self.tokenizer = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = None if bos_token is None else tokenizer.token_to_id(bos_token)
        eos = list(eos_token_ids)
        if eos_token is not None and tokenizer.token_to_id(eos_token) is not None:
            eos.append(tokenizer.token_to_id(eos_token))
        self.eos_token_ids = tuple(sorted(set(eos)))
        self.add_bos = add_bos and self.bos_token_id is not None
        self.chat_template = chat_template
        self.source = source

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> "Tokenizer":
        """The tokenizer stored in a checkpoint (or hub model) directory."""
        from tokenizers import Tokenizer as HFTokenizer

        path = os.fspath(path)
        file = os.path.join(path, TOKENIZER_FILE)
        if not os.path.exists(file):
            raise TokenizerError(f"{file}: not found; generation from text needs the checkpoint's tokenizer.json")
        try:
            tok = HFTokenizer.from_file(file)
        except Exception as e:  # tokenizers raises a bare Exception on malformed files
            raise TokenizerError(f"{file}: cannot be read by the tokenizers package ({e})") from e
        cfg = _read_json(os.path.join(path, TOKENIZER_CONFIG))
        eos_ids = _ids(_read_json(os.path.join(path, "generation_config.json")).get("eos_token_id"))
        eos_ids += _ids(_read_json(os.path.join(path, "config.json")).get("eos_token_id"))
        template = cfg.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        return cls(tok, bos_token=_token_text(cfg.get("bos_token")), eos_token=_token_text(cfg.get("eos_token")),
                   eos_token_ids=eos_ids, add_bos=bool(cfg.get("add_bos_token", False)),
                   chat_template=template, source=path)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size()

    def encode(self, text: str, *, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; the bos token is prepended when the checkpoint asks for it."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos) and self.bos_token_id is not None:
            if not ids or ids[0] != self.bos_token_id:
                ids = [self.bos_token_id, *ids]
        return ids

    def decode(self, ids: Sequence[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: Sequence[dict], *, add_generation_prompt: bool = True) -> str:
        """The prompt text the checkpoint's chat template makes of [{"role", "content"}, ...]."""
        if not self.chat_template:
            raise TokenizerError(f"{os.path.join(self.source, TOKENIZER_CONFIG)}: no chat_template; "
                                 "prompt the model with plain text instead")
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as e:
            raise TokenizerError("rendering the chat template needs jinja2 (pip install jinja2)") from e

        def raise_exception(message):
            raise TokenizerError(f"chat template: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "", eos_token=self.eos_token or "")

    def encode_chat(self, messages: Sequence[dict]) -> list[int]:
        """Ids of the rendered chat; the template places bos itself, so none is added."""
        return self.encode(self.apply_chat_template(messages), add_bos=False)


class TextStream:
    """Incremental detokenizer for one sequence: `push(token)` returns the newly printable text.

    Byte-level vocabularies can split one character over several tokens; text ending in an
    incomplete character (U+FFFD) is held back until the next token completes it.
    """

    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix = 0  # tokens before this one have been printed and are context only
        self.read = 0  # tokens up to here are printed

    def push(self, token: int) -> str:
        self.ids.append(int(token))
        printed = self.tokenizer.decode(self.ids[self.prefix: self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if len(text) > len(printed) and not text.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return text[len(printed):]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end)."""
        printed = self.tokenizer.decode(self.ids[self.prefix: self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return text[len(printed):]
