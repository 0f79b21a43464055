"""The README's Python snippets run as written, on the shipped tiny checkpoint.

HOME is a temporary directory holding the tiny checkpoint converted to `~/ckpt/v2-lite`, and the
working directory holds what the snippets name relative to it (`path/to/DeepSeek-V2-Lite`,
`v2-lite`, `train.jsonl`). The snippets run in order in one namespace, as a reader pastes them into
one session. The only edits are listed in SHORTER: fewer training steps, so the test stays quick.
"""

import os
import re
import shutil

import pytest

from checkpoints.make_tiny import SHIPPED

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
SHORTER = {"TrainConfig(steps=1000)": "TrainConfig(steps=2, seq_len=32, batch_size=2)"}


def python_snippets() -> list[str]:
    with open(README) as f:
        return re.findall(r"```python\n(.*?)```", f.read(), flags=re.S)


def test_the_readme_shows_every_public_entry_point():
    code = "\n".join(python_snippets())
    for call in ("Config.from_hf(", "mla_jax.load(", "mla_jax.save(", "mla_jax.generate(", "mla_jax.generate_stream(",
                 "finetune("):
        assert call in code, call
    assert all(key in code for key in SHORTER)


@pytest.fixture
def home(tmp_path, monkeypatch):
    from checkpoints.convert import convert

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    convert(SHIPPED, tmp_path / "home" / "ckpt" / "v2-lite", dtype="float32", progress=False)
    shutil.copytree(tmp_path / "home" / "ckpt" / "v2-lite", tmp_path / "v2-lite")
    os.makedirs("path/to")
    shutil.copytree(SHIPPED, "path/to/DeepSeek-V2-Lite")
    with open("train.jsonl", "w") as f:
        for line in open(os.path.join(os.path.dirname(README), "mla_jax", "data", "corpus.txt")):
            if line.strip():
                f.write('{"text": %s}\n' % __import__("json").dumps(line.strip()))
    return tmp_path


def test_the_python_snippets_run_as_written(home):
    namespace: dict = {}
    for snippet in python_snippets():
        for long, short in SHORTER.items():
            snippet = snippet.replace(long, short)
        exec(compile(snippet, README, "exec"), namespace)
    assert os.path.isfile(home / "home" / "ckpt" / "tuned" / "config.json")  # save expanded "~"
    assert not os.path.exists(home / "~")
    assert [len(t) for t in namespace["tokens"]] == [32, 32]  # no stop tokens given: all 32
    assert namespace["logits"].shape == (1, 4, 512)
    assert os.path.isfile(home / "runs" / "a" / "model" / "config.json")
    assert os.path.isfile(home / "runs" / "a" / "model" / "tokenizer.json")
