"""`finetune`: a whole run in an output directory, resumable at any saved step.

OUT/
  run.json        what the run is (resolved train config, data file and fingerprint, base model)
  metrics.jsonl   one JSON object per step: step, loss, aux_loss, lr, tokens_per_s,
                  expert_load_max_over_mean (mean over MoE layers of max/mean tokens per expert;
                  null without MoE), grad_norm, tokens
  checkpoints/    orbax steps (last `keep`), what `--resume` continues from
  model/          the fine-tuned model, in `mla-jax convert`'s layout (written when the run ends)
  loss.png        the loss curve (and expert-load imbalance), beside model/

OUT is new or empty for a fresh run, or an earlier run (it has run.json): `resume` continues it,
`overwrite` replaces it (its own files only). Anything else there is refused, never replaced.

Ctrl-C stops after the step in flight and saves it; a second Ctrl-C (or SIGTERM) stops at once, and
the run resumes from its last checkpoint.

In a job of several processes (`jax.distributed`, a `mesh` spanning them) every process runs
`finetune` with the same arguments and OUT on a shared file system: each checks OUT, all wait for
each other, and then process 0 alone writes run.json, metrics.jsonl and loss.png, while the
checkpoints and the final model are written by every process for the shards it holds. A non-finite loss stops the run and drops the checkpoints
that hold the diverged state. A resumed run restores the state saved at step k, cuts metrics.jsonl
back to steps <= k, and then computes exactly what the uninterrupted run computed: the batches are a
function of the step, and the step function is the same compiled program over the same state.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import threading
import tempfile
import time

import jax
from tqdm.auto import tqdm

from mla_jax.errors import Terminated, raise_interrupt
from mla_jax.model import Transformer
from mla_jax.parallel.launch import is_main_process
from mla_jax.training import model_io
from mla_jax.training.checkpointing import RunCheckpoints
from mla_jax.training.config import RunError, TrainConfig
from mla_jax.training.data import Batches, load_tokenizer, pack, read_documents
from mla_jax.training.plot import plot_metrics
from mla_jax.training.step import Trainer

RUN_FILE, METRICS_FILE, CKPT_DIR, MODEL_DIR, PLOT_FILE = "run.json", "metrics.jsonl", "checkpoints", "model", "loss.png"


def write_json_atomic(path: str, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def read_metrics(path: str, up_to: int | None = None) -> list[dict]:
    """The records of metrics.jsonl (those with step <= up_to); a torn last line is dropped."""
    records = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    r = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if up_to is None or r["step"] <= up_to:
                    records.append(r)
    return records


def _rewrite_metrics(path: str, records: list[dict]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(path))
    with os.fdopen(fd, "w") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


def _check_same_run(out: str, stored: dict, current: dict) -> None:
    # Settings first: a changed seq_len also repacks the data, and the setting is the cause to name.
    where = os.path.join(out, RUN_FILE)
    old, new = stored.get("train_config", {}), current["train_config"]
    diff = {k: (old.get(k), v) for k, v in new.items() if old.get(k) != v}
    if diff:
        listed = ", ".join(f"{k}: run has {a!r}, now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise RunError(f"{where}: resuming with a different train config changes the run ({listed})")
    if stored.get("model_config") != current["model_config"]:
        raise RunError(f"{where}: the run trained a model with another config.json than {current['base'] or 'the one given'}")
    if stored.get("data_fingerprint") != current["data_fingerprint"]:
        raise RunError(f"{where}: the run trained on data with fingerprint {stored.get('data_fingerprint')} "
                       f"({stored.get('data')}); --data {current['data']} packs to {current['data_fingerprint']}")


def is_run(path: str) -> bool:
    """Whether `path` is a fine-tuning run directory (it has run.json)."""
    return os.path.isfile(os.path.join(path, RUN_FILE))


def _relation(a: str, b: str) -> str | None:
    """How directory path `a` relates to path `b`: "is", "lies inside", "contains" or None."""
    a, b = os.path.realpath(a), os.path.realpath(b)
    if a == b:
        return "is"
    if a.startswith(b.rstrip(os.sep) + os.sep):
        return "lies inside"
    if b.startswith(a.rstrip(os.sep) + os.sep):
        return "contains"
    return None


def check_out(out: str, *, resume: bool | int, overwrite: bool, sources: dict[str, str | None]) -> None:
    """What may become the run directory `out`, checked before any work (see the module docstring).

    New or empty: a fresh run. A run (run.json): continued with `resume`, replaced with `overwrite`
    (only its own files). Anything else (a file, a directory with other things in it) is refused, and
    so is a run directory that is, holds or lies inside a `sources` path (the base checkpoint).
    """
    if resume is not False and overwrite:
        raise RunError("resume and overwrite exclude each other: continue the run, or replace it")
    if os.path.exists(out) and not os.path.isdir(out):
        raise RunError(f"{out}: a file, not a directory; the run needs a new or empty directory (or an earlier run "
                       "to resume)")
    for what, path in sources.items():
        how = path and _relation(out, path)
        if how:
            raise RunError(f"{out}: the run directory {how} the {what} {path}; choose another output directory")
    if resume is not False:
        if not is_run(out):
            raise RunError(f"{os.path.join(out, RUN_FILE)}: missing; {out} is not a fine-tuning run to resume")
        return
    if is_run(out):
        if not overwrite:
            raise RunError(f"{out} already holds a fine-tuning run; resume continues it, overwrite starts it "
                           "again (replacing it), or choose another output directory")
        return
    if os.path.isdir(out) and os.listdir(out):
        raise RunError(f"{out}: exists, is not empty and is not a fine-tuning run (no {RUN_FILE}); choose a new or "
                       f"empty output directory (overwrite replaces only a run)")


def _clear_run(out: str) -> None:
    """Removes a run's own files from `out` (what `overwrite` replaces); anything else stays."""
    import shutil

    for name in (RUN_FILE, METRICS_FILE, PLOT_FILE, CKPT_DIR, MODEL_DIR):
        path = os.path.join(out, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        elif os.path.lexists(path):
            os.remove(path)


def _path(p) -> str:
    return os.path.abspath(os.path.expanduser(os.fspath(p)))


def finetune(
    model: Transformer | str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    tc: TrainConfig,
    *,
    tokenizer=None,
    tokenizer_from: str | os.PathLike | None = None,
    base: str = "",
    resume: bool | int = False,
    overwrite: bool = False,
    stop_after: int | None = None,
    progress: bool = True,
    save_model: bool = True,
    log=print,
    mesh=None,
) -> dict:
    """Fine-tunes `model` on the file `data`, writing everything under `out` (see the module docstring).

    `model`: a Transformer, or the path of an mla-jax checkpoint (loaded in `tc.param_dtype`; its
    tokenizer files then tokenize text data and go along with the result). With a Transformer, text
    data needs `tokenizer` (a `tokenizers.Tokenizer`) or `tokenizer_from` (a directory with
    tokenizer.json). `resume`: True continues from the latest checkpoint in `out`, an int from that
    step; `overwrite` replaces a run already in `out` (nothing else is ever replaced). `stop_after`
    ends the process of training after that step with a checkpoint, as an interruption would (the
    schedule still runs to `tc.steps`). Returns {"out", "steps_done", "stopped", "records" (the
    metrics), and when the run reached `tc.steps`: "model" (its path), "plot" (the PNG or None)}.
    `mesh` (`mla_jax.parallel.make_mesh`) lays a checkpoint path's weights out on it; a model
    given as a Transformer trains where its weights already are.
    """
    out, data = _path(out), _path(data)
    if isinstance(model, (str, os.PathLike)):
        path = _path(model)
        base, tokenizer_from = base or path, tokenizer_from if tokenizer_from is not None else path
    else:
        path = None
    if tokenizer_from is not None:
        tokenizer_from = _path(tokenizer_from)
    check_out(out, resume=resume, overwrite=overwrite, sources={"base checkpoint": path or base or None,
                                                                 "tokenizer directory": tokenizer_from})
    if path is not None:
        model = model_io.load_base(path, tc.param_dtype, mesh)
    if tokenizer is None and tokenizer_from is not None:
        tokenizer = load_tokenizer(tokenizer_from)
    trainer = Trainer(model, tc)
    tc = trainer.tc
    c = model.config
    docs = read_documents(data, tokenizer=tokenizer, vocab_size=c.vocab_size, bos_token_id=c.bos_token_id,
                          eos_token_id=c.eos_token_id)
    packed = pack(docs, tc.seq_len)
    batches = Batches(packed, tc.batch_size, tc.grad_accum, seed=tc.seed, shuffle=tc.shuffle)
    run = {"train_config": tc.to_dict(), "data": os.path.abspath(os.fspath(data)),
           "data_fingerprint": packed.fingerprint(), "base": base, "model_config": c.to_hf()}
    lead = is_main_process()
    if jax.process_count() > 1:  # every process has checked OUT before any of them writes to it
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(f"mla_jax.finetune: {out} checked")
    if not lead:  # process 0 speaks for the job
        log, progress = (lambda *args, **kwargs: None), False
    # Only once the model and the data are known to be good.
    if overwrite and resume is False and is_run(out) and lead:
        _clear_run(out)
        log(f"replacing the run in {out}")
    os.makedirs(out, exist_ok=True)
    ckpts = RunCheckpoints(os.path.join(out, CKPT_DIR), tc.keep)
    metrics_path = os.path.join(out, METRICS_FILE)
    run_path = os.path.join(out, RUN_FILE)
    try:
        if resume is not False:
            step = ckpts.latest_step() if resume is True else int(resume)
            if step is None:
                raise RunError(f"{out}: nothing to resume, {CKPT_DIR}/ holds no checkpoint; start the run again "
                               "with overwrite (--overwrite)")
            with open(run_path) as f:
                _check_same_run(out, json.load(f), run)
            state, meta = ckpts.restore(step, trainer.abstract_state())
            if meta["data_position"] != step * batches.rows_per_step:
                raise RunError(f"{out}: checkpoint {step} is at data row {meta['data_position']}, "
                               f"expected {step * batches.rows_per_step}")
            ckpts.discard_after(step)
            records = read_metrics(metrics_path, up_to=step)
            if lead:
                _rewrite_metrics(metrics_path, records)
            log(f"resuming {out} from step {step}")
        else:
            state, records = trainer.init_state(), []
            if lead:
                write_json_atomic(run_path, run)
                _rewrite_metrics(metrics_path, records)
        start = int(jax.device_get(state["step"]))
        end = tc.steps if stop_after is None else min(tc.steps, stop_after)
        if start >= end and start < tc.steps:
            raise RunError(f"{out}: already at step {start}; --stop-after {stop_after} is not ahead of it")
        log(f"{packed.rows} rows of {tc.seq_len} tokens ({int(packed.loss_mask.sum())} targets); "
            f"{tc.batch_size}x{tc.grad_accum} rows per step; steps {start + 1}..{end} of {tc.steps}")
        try:
            state, done, stopped = _train(trainer, state, batches, records, metrics_path, ckpts, start, end,
                                          progress, log)
        except KeyboardInterrupt as e:  # a second Ctrl-C, or SIGTERM: say where the run can go on from
            last = ckpts.latest_step()
            where = (f"{out} resumes from step {last}, its last checkpoint, with --resume" if last else
                     f"{out} has no checkpoint yet; start it again with --overwrite")
            raise type(e)(where) from None
        summary = {"out": out, "steps_done": done, "stopped": stopped, "records": records}
        if done == tc.steps:
            if save_model:
                summary["model"] = model_io.save_result(trainer.model(state), os.path.join(out, MODEL_DIR), tokenizer_from)
                log(f"fine-tuned model: {summary['model']}")
            summary["plot"] = plot_metrics(records, os.path.join(out, PLOT_FILE)) if lead else None
            if summary["plot"]:
                log(f"loss curve: {summary['plot']}")
        return summary
    finally:
        ckpts.close()


def _meta(trainer: Trainer, batches: Batches, step: int, fingerprint: str) -> dict:
    return {"step": step, "data_position": step * batches.rows_per_step, "data_fingerprint": fingerprint,
            "seed": trainer.tc.seed, "train_config": trainer.tc.to_dict()}


class _StopRequest:
    """Ctrl-C during training asks to stop after the current step (which then saves); a second one,
    or SIGTERM, interrupts at once. Stopping between steps matters: a step in flight owns the donated
    state. A checkpoint being written is finished first, so an interruption never leaves half a save."""

    def __init__(self, log):
        self.log, self.requested, self._previous = log, False, {}
        self._saving, self._deferred = False, None

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and not self.requested:
            self.requested = True
            self.log("\nstopping after this step (Ctrl-C again to stop at once, from the last checkpoint)")
            return
        if self._saving:
            self._deferred = signum
            return
        raise_interrupt(signum, frame)

    @contextlib.contextmanager
    def saving(self):
        self._saving = True
        try:
            yield
        finally:
            self._saving = False
        if self._deferred is not None:
            raise Terminated() if self._deferred == signal.SIGTERM else KeyboardInterrupt()

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _train(trainer, state, batches, records, metrics_path, ckpts, start, end, progress, log):
    """Steps start+1..end; returns (state, last step done, whether the user stopped the run)."""
    tc = trainer.tc
    fingerprint = batches.packed.fingerprint()
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, unit="step", dynamic_ncols=True, file=sys.stderr)
    done = start
    # one writer of the metrics in a job of several processes: process 0
    with _StopRequest(log) as stop, open(metrics_path if is_main_process() else os.devnull, "a") as f:
        for s in range(start, end):
            t0 = time.perf_counter()
            state, m = trainer.train_step(state, batches.batch(s))
            dt = time.perf_counter() - t0
            done = s + 1
            if not math.isfinite(m["loss"]):
                raise _diverged(m, done, tc, ckpts)
            record = {"step": done, "loss": m["loss"], "aux_loss": m["aux_loss"], "lr": m["lr"],
                      "tokens_per_s": m["tokens"] / dt,
                      "expert_load_max_over_mean": _finite(m["expert_load_max_over_mean"]),
                      "grad_norm": m["grad_norm"], "tokens": m["tokens"]}
            f.write(json.dumps(record) + "\n")
            f.flush()
            records.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{record['tokens_per_s']:.0f}")
            if done % tc.log_every == 0 or done == start + 1 or done == end:
                (bar.write if progress else log)(_line(record))
            if done % tc.save_every == 0 or done == end or stop.requested:
                with stop.saving():
                    ckpts.save(done, state, _meta(trainer, batches, done, fingerprint))
            if stop.requested:
                break
    bar.close()
    if stop.requested:
        log(f"stopped at step {done} (saved); continue with --resume")
    return state, done, stop.requested


def _diverged(m: dict, step: int, tc: TrainConfig, ckpts: RunCheckpoints) -> RunError:
    """The error for a non-finite loss at `step`, after dropping the checkpoints it makes suspect.

    The loss of step s comes from the state saved at step s-1, so that state (and anything later)
    is what diverged; the last good checkpoint is at step s-2 or before.
    """
    good = [s for s in ckpts.steps() if s <= step - 2]
    ckpts.discard_after(good[-1] if good else 0)
    out = os.path.dirname(ckpts.directory)
    head = (f"{out}: the loss is {m['loss']} at step {step} (learning rate {m['lr']:.3g}): training diverged, "
            f"most likely because lr={tc.lr:g} is too high; ")
    restart = "start again with a lower lr and overwrite (--lr ... --overwrite)"
    if good:
        return RunError(head + f"resume (--resume) continues from step {good[-1]}, the last good checkpoint, "
                               f"or {restart}")
    return RunError(head + f"no checkpoint was saved before it: {restart}")


def _line(r: dict) -> str:
    imb = r["expert_load_max_over_mean"]
    imb = "" if imb is None else f"  expert load max/mean {imb:.3f}"
    return (f"step {r['step']:>5}  loss {r['loss']:.4f}  aux {r['aux_loss']:.2e}  lr {r['lr']:.2e}"
            f"{imb}  {r['tokens_per_s']:.0f} tok/s")
