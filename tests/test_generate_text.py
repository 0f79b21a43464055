"""Text side of generation: the checkpoint's tokenizer, chat template, streamed text, the CLI."""

import json
import re
import shutil

import jax.numpy as jnp
import pytest

from checkpoints.make_tiny import SHIPPED
from mla_jax.cli import main
from mla_jax.generate import generate
from mla_jax.generate_cli import load_model
from mla_jax.tokenizer import TextStream, Tokenizer, TokenizerError

TEXTS = {
    "ascii": "Four score and seven years ago our fathers brought forth",
    "accents and dashes": "naïve café — déjà vu",
    "multi-byte characters": "日本語 😀 ok",
}
# A DeepSeek-style template: bos once, role markers, the assistant turn opened on request.
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'user' %}<|User|>{{ m['content'] }}"
            "{% else %}<|Assistant|>{{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<|Assistant|>{% endif %}")


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_dir(SHIPPED)


@pytest.fixture
def chat_dir(tmp_path):
    shutil.copy(f"{SHIPPED}/tokenizer.json", tmp_path)
    config = json.load(open(f"{SHIPPED}/tokenizer_config.json")) | {"chat_template": TEMPLATE}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return tmp_path


@pytest.mark.parametrize("name", list(TEXTS))
def test_encoding_equals_transformers_tokenizer(tokenizer, name):
    from transformers import AutoTokenizer

    want = AutoTokenizer.from_pretrained(SHIPPED)(TEXTS[name], add_special_tokens=False)["input_ids"]
    assert tokenizer.encode(TEXTS[name], add_bos=False) == want


@pytest.mark.parametrize("add_bos_token", [True, False])
def test_bos_is_prepended_as_tokenizer_config_asks(tmp_path, add_bos_token):
    shutil.copy(f"{SHIPPED}/tokenizer.json", tmp_path)
    config = json.load(open(f"{SHIPPED}/tokenizer_config.json")) | {"add_bos_token": add_bos_token}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    tokenizer = Tokenizer.from_dir(tmp_path)
    assert (tokenizer.encode("Four")[0] == tokenizer.bos_token_id == 0) == add_bos_token


def test_eos_ids_come_from_the_checkpoint(tokenizer):
    assert tokenizer.eos_token_ids == (1,)


@pytest.mark.parametrize("name", list(TEXTS))
def test_streamed_pieces_join_to_the_decoded_text(tokenizer, name):
    ids = tokenizer.encode(TEXTS[name], add_bos=False)
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tokenizer.decode(ids) == TEXTS[name]


def test_no_streamed_piece_ends_inside_a_character(tokenizer):
    stream = TextStream(tokenizer)
    pieces = [stream.push(i) for i in tokenizer.encode(TEXTS["multi-byte characters"], add_bos=False)]
    assert not [p for p in pieces if "\ufffd" in p]


def test_chat_template_renders_as_transformers_does(chat_dir):
    from transformers import AutoTokenizer

    messages = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi"},
                {"role": "user", "content": "Go on"}]
    want = AutoTokenizer.from_pretrained(chat_dir).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert Tokenizer.from_dir(chat_dir).apply_chat_template(messages) == want


def test_missing_chat_template_is_a_clear_error(tokenizer):
    with pytest.raises(TokenizerError, match="tokenizer_config.json: no chat_template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "hi"}])


def test_missing_tokenizer_file_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerError, match=r"tokenizer\.json: not found"):
        Tokenizer.from_dir(tmp_path)


# ------------------------------------------------------------------------ CLI
PROMPT = "Four score and seven years ago"
CLI_ARGS = ["generate", "--ckpt", SHIPPED, "--prompt", PROMPT, "--max-new-tokens", "12",
            "--dtype", "float32", "--cache-dtype", "float32", "--page-size", "8"]


@pytest.fixture(scope="module")
def cli_output(tokenizer):
    """(stdout lines of `mla-jax generate` on the shipped checkpoint, the text generate() gives)."""
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = main(CLI_ARGS)
    assert code == 0, out.getvalue()
    model = load_model(SHIPPED, "float32")
    new = generate(model, [tokenizer.encode(PROMPT)], 12, stop_tokens=tokenizer.eos_token_ids,
                   cache_dtype=jnp.float32, page_size=8)[0]
    return out.getvalue().splitlines(), PROMPT + tokenizer.decode(new)


def test_cli_prints_the_prompt_and_the_generated_text(cli_output):
    lines, text = cli_output
    assert "\n".join(lines[:-1]) == text


def test_cli_closes_with_prefill_and_decode_speed(cli_output):
    lines, _ = cli_output
    assert re.match(r"prefill: [\d,]+\.\d tok/s, decode: [\d,]+\.\d tok/s \(batch 1, ", lines[-1])


def test_cli_reads_an_mla_jax_checkpoint_like_the_hub_directory(cli_output, tmp_path, capsys):
    from mla_jax.weights import save

    save(load_model(SHIPPED, "float32"), tmp_path / "ckpt", tokenizer_from=SHIPPED)
    args = list(CLI_ARGS)
    args[args.index(SHIPPED)] = str(tmp_path / "ckpt")
    assert main(args) == 0
    assert capsys.readouterr().out.splitlines()[:-1] == cli_output[0][:-1]


def test_cli_reports_an_unusable_checkpoint_directory(tmp_path, capsys):
    shutil.copy(f"{SHIPPED}/tokenizer.json", tmp_path)
    assert main(["generate", "--ckpt", str(tmp_path), "--prompt", "x"]) == 1
    assert "neither an mla-jax checkpoint" in capsys.readouterr().err
