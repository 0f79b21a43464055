"""`mla-jax finetune` misuse: one line (exit 1), nothing lost, and a run directory that stays usable.

Most cases run `mla_jax.cli.main` in this process (the same boundary a user meets, without paying
for a jax import each); the signal cases run the CLI in a subprocess and signal it mid-training.
"""

import contextlib
import io
import os
import re
import signal

import pytest
from flax import nnx

from cli_helpers import error_line, run_cli_signalled
from mla_jax.cli import main
from mla_jax.config import Config
from mla_jax.model import Transformer
from mla_jax.training.demo import CORPUS, tiny_checkpoint_dir
from mla_jax.training.loop import read_metrics
from mla_jax.weights import save
from train_helpers import TINY_V3

SMALL = ["--seq-len", "32", "--batch-size", "2", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    path = tmp_path_factory.mktemp("base") / "ckpt"
    config = Config.from_hf({**TINY_V3, "vocab_size": 512})
    save(Transformer(config, rngs=nnx.Rngs(0)), path, tokenizer_from=tiny_checkpoint_dir())
    return str(path)


def finetune(capsys, *argv) -> tuple[int, str, str]:
    code = main(["finetune", *map(str, argv)])
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    return code, captured.out, captured.err


def failed(capsys, *argv) -> tuple[int, str]:
    """(exit code, the one stderr line) of a finetune that must fail."""
    code, _, err = finetune(capsys, *argv)
    lines = err.splitlines()
    assert len(lines) == 1, err
    return code, lines[0]


def snapshot(path) -> dict:
    """Every file under `path` (or the file itself) with its bytes."""
    if os.path.isfile(path):
        return {"": open(path, "rb").read()}
    return {os.path.relpath(os.path.join(d, f), path): open(os.path.join(d, f), "rb").read()
            for d, _, files in os.walk(path) for f in files}


# ---------------------------------------------------------------------------- options, before any work
@pytest.mark.parametrize("option, value, message", [
    ("--lr", "nan", "--lr nan: expected a finite number > 0"),
    ("--lr", "0", "--lr 0.0: expected a finite number > 0"),
    ("--lr", "inf", "--lr inf: expected a finite number > 0"),
    ("--clip-norm", "-1", "--clip-norm -1.0: expected a finite number > 0"),
    ("--min-lr-ratio", "2", "--min-lr-ratio 2.0: expected a number in [0, 1]"),
    ("--weight-decay", "nan", "--weight-decay nan: expected a finite number >= 0"),
    ("--steps", "0", "--steps 0: expected a positive integer"),
    ("--seq-len", "1", "--seq-len 1: expected at least 2 (input and target)"),
    ("--warmup-steps", "-1", "--warmup-steps -1: expected an integer >= 0"),
])
def test_bad_numbers_are_refused_before_anything_is_loaded(capsys, tmp_path, option, value, message):
    out = tmp_path / "run"
    got = failed(capsys, "--ckpt", tmp_path / "no-such-ckpt", "--data", CORPUS, "--out", out, "--steps", "2",
                 *SMALL, option, value)
    assert got == (1, f"mla-jax finetune: error: {message}") and not out.exists()


# ---------------------------------------------------------------------------- what --out may be
def test_out_naming_a_file_is_refused_and_the_file_kept(capsys, tmp_path, base):
    out = tmp_path / "notes.txt"
    out.write_text("my notes")
    got = failed(capsys, "--ckpt", base, "--data", CORPUS, "--out", out, "--steps", "2", *SMALL)
    assert got == (1, f"mla-jax finetune: error: {out}: a file, not a directory; the run needs a new or empty "
                      "directory (or an earlier run to resume)")
    assert out.read_text() == "my notes"


@pytest.mark.parametrize("overwrite", [[], ["--overwrite"]])
def test_out_a_directory_that_is_not_a_run_is_refused_and_kept(capsys, tmp_path, base, overwrite):
    out = tmp_path / "mine"
    (out / "model").mkdir(parents=True)
    (out / "model" / "weights.bin").write_bytes(b"\x01\x02")
    (out / "metrics.jsonl").write_text("{}\n")
    before = snapshot(out)
    got = failed(capsys, "--ckpt", base, "--data", CORPUS, "--out", out, "--steps", "2", *overwrite, *SMALL)
    assert got == (1, f"mla-jax finetune: error: {out}: exists, is not empty and is not a fine-tuning run (no "
                      "run.json); choose a new or empty output directory (overwrite replaces only a run)")
    assert snapshot(out) == before


def test_out_inside_the_base_checkpoint_is_refused(capsys, tmp_path, base):
    out = os.path.join(base, "run")
    got = failed(capsys, "--ckpt", base, "--data", CORPUS, "--out", out, "--steps", "2", *SMALL)
    assert got == (1, f"mla-jax finetune: error: {out}: the run directory lies inside the base checkpoint {base}; "
                      "choose another output directory") and not os.path.exists(out)


def test_binary_data_is_one_line_naming_the_file(capsys, tmp_path, base):
    data = tmp_path / "train.txt"
    data.write_bytes(b"text \xff\xfe\x00\x01 more")
    out = tmp_path / "run"
    got = failed(capsys, "--ckpt", base, "--data", data, "--out", out, "--steps", "2", *SMALL)
    assert got == (1, f"mla-jax finetune: error: {data}: not UTF-8 text (byte 0xff at offset 5); expected JSONL "
                      "or plain text") and not out.exists()


def test_python_finetune_reads_text_with_the_checkpoints_tokenizer(tmp_path, base):
    # The README's call: a checkpoint path finds its tokenizer.json; a loaded model is told how to.
    from mla_jax.training import TrainConfig, finetune
    from mla_jax.training.data import DataError
    from mla_jax.weights import load

    tc = TrainConfig(steps=1, seq_len=32, batch_size=2, param_dtype="float32")
    quiet = dict(progress=False, log=lambda *_: None, save_model=False)
    with pytest.raises(DataError, match="text needs a tokenizer, and none was found .* without tokenizer_from="):
        finetune(load(base, dtype="float32"), CORPUS, tmp_path / "a", tc, **quiet)
    assert not (tmp_path / "a").exists()
    assert finetune(base, CORPUS, tmp_path / "b", tc, **quiet)["steps_done"] == 1


# ---------------------------------------------------------------------------- a run that went wrong
@pytest.fixture(scope="module")
def diverged_late(base, tmp_path_factory):
    """--lr 1e9 after a warm-up: a few good steps (checkpointed every step), then a non-finite loss."""
    out = tmp_path_factory.mktemp("late") / "run"
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = main(["finetune", "--ckpt", base, "--data", CORPUS, "--out", str(out), "--steps", "8", "--lr", "1e9",
                     "--warmup-steps", "4", "--save-every", "1", "--keep", "10", *SMALL])
    return code, out, err.getvalue()


def test_a_diverged_run_says_where_it_resumes_and_resume_continues(capsys, diverged_late):
    code, out, err = diverged_late
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    message = err.splitlines()[0]
    m = re.fullmatch(rf"mla-jax finetune: error: {out}: the loss is (nan|inf) at step (\d+) \(learning rate \S+\): "
                     r"training diverged, most likely because lr=1e\+09 is too high; resume \(--resume\) continues "
                     r"from step (\d+), the last good checkpoint, or start again with a lower lr and overwrite "
                     r"\(--lr \.\.\. --overwrite\)", message)
    assert code == 1 and m, message
    bad, good = int(m.group(2)), int(m.group(3))
    assert good == bad - 2 and max(int(s) for s in os.listdir(out / "checkpoints") if s.isdigit()) == good
    code, printed, _ = finetune(capsys, "--out", out, "--resume", "--stop-after", good + 1, "--no-progress")
    assert (code, f"resuming {out} from step {good}" in printed) == (0, True)
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, good + 2))


def test_a_run_that_diverged_before_any_checkpoint_restarts_with_overwrite(capsys, tmp_path, base):
    out = tmp_path / "run"
    common = ["--ckpt", base, "--data", CORPUS, "--out", out, "--steps", "3", "--warmup-steps", "0",
              "--save-every", "1", *SMALL]
    code, message = failed(capsys, *common, "--lr", "1e9")
    assert code == 1 and message.endswith("no checkpoint was saved before it: start again with a lower lr and "
                                          "overwrite (--lr ... --overwrite)"), message
    assert failed(capsys, "--out", out, "--resume", "--no-progress") == (
        1, f"mla-jax finetune: error: {out}: nothing to resume, checkpoints/ holds no checkpoint; start the run "
           "again with overwrite (--overwrite)")
    assert failed(capsys, *common, "--lr", "1e-3") == (
        1, f"mla-jax finetune: error: {out} already holds a fine-tuning run; resume continues it, overwrite starts "
           "it again (replacing it), or choose another output directory")
    code, printed, _ = finetune(capsys, *common, "--lr", "1e-3", "--overwrite")
    assert code == 0 and [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == [1, 2, 3]
    assert f"replacing the run in {out}" in printed


def test_resume_with_another_seq_len_names_seq_len(capsys, diverged_late):
    _, out, _ = diverged_late
    code, message = failed(capsys, "--out", out, "--resume", "--seq-len", "16", "--no-progress")
    assert code == 1 and message == (
        f"mla-jax finetune: error: {out}/run.json: resuming with a different train config changes the run "
        "(seq_len: run has 32, now 16)")


# ---------------------------------------------------------------------------- signals, as a user sends them
# Both stop at once through the same path; the default run keeps the cheaper SIGTERM (CI budget).
@pytest.mark.parametrize("signals, said", [pytest.param((signal.SIGINT, signal.SIGINT), r"interrupted \(Ctrl-C\)",
                                                        id="double Ctrl-C", marks=pytest.mark.slow),
                                           pytest.param((signal.SIGTERM,), r"terminated \(SIGTERM\)", id="SIGTERM")])
def test_stopping_at_once_leaves_a_run_that_resumes(tmp_path, capsys, signals, said):
    # The first Ctrl-C asks to stop after the step in flight; a second one, or SIGTERM, stops at once.
    out = tmp_path / "demo"
    r = run_cli_signalled("finetune", "--demo", "--out", out, "--save-every", "1", "--log-every", "1", "--no-progress",
                          marker="step     2", signals=signals, gap=0.05)
    line = error_line(r)
    m = re.fullmatch(rf"mla-jax finetune: {said}; {out} resumes from step (\d+), its last checkpoint, with --resume",
                     line)
    assert r.rc == 130 and m, line
    last = int(m.group(1))
    code, printed, err = finetune(capsys, "--demo", "--out", out, "--resume", "--stop-after", last + 1, "--no-progress")
    assert (code, f"resuming {out} from step {last}" in printed) == (0, True), err
    assert [r["step"] for r in read_metrics(str(out / "metrics.jsonl"))] == list(range(1, last + 2))
