"""Downstream scores during pretraining (``eval.downstream``): a fine-tuning suite on the weights of the
run's checkpoints, in the background, its scores logged beside the MLM curves.

On rank 0, once the checkpoint of a due step N (every ``eval.downstream_every_steps``; 0: every
checkpoint; and the last step) is committed, its weights (model.pt, config.yaml, extra.json, tokenizer/)
are hard-linked into RUN_DIR/downstream/step-N/weights (a link: ``checkpoint.keep_last`` removing the
checkpoint leaves them whole; a copy where links fail) and the step is queued.  One suite runs at a time,
as a job of its own:

    python -m pretrain finetune --suite SUITE --checkpoint .../step-N/weights --out .../step-N
                                [training.max_steps=eval.downstream_max_steps] logging.progress_bar=false

a single process (the launcher's rank variables removed; CUDA_VISIBLE_DEVICES: rank 0's device) that
gets SIGTERM if rank 0 dies, its output in RUN_DIR/downstream/step-N/log.txt.  Training does not wait
for it: rank 0 polls it after each step, and when it ends logs ``downstream/TASK`` (each task's main
metric, mean over its seeds) and ``downstream/average`` at step N to metrics.jsonl (kind ``downstream``)
and TensorBoard.  A suite that fails, or a snapshot that cannot be written, is a message naming its log
or the error, and training goes on.  After the last step (once every rank has left the job) rank 0
waits for the queue.  A stop (SIGTERM, SIGUSR1, Ctrl-C) starts no more suites and ends the running one,
which checkpoints (exit 75); the resumed run queues again every snapshot up to its checkpoint's step
whose scores metrics.jsonl lacks.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Optional

from pretrain.checkpoint import list_checkpoints, step_tag
from pretrain.config import Config
from pretrain.metrics import MetricsLogger, read_jsonl
from pretrain.weights import CONFIG_FILE, EXTRA_FILE, MODEL_FILE, TOKENIZER_DIR

DOWNSTREAM_DIR, WEIGHTS_DIR, LOG_FILE, KIND = "downstream", "weights", "log.txt", "downstream"
# What identifies this process's place in a launched job: the suite's job is a single process of its own.
LAUNCHER_PREFIXES = ("OMPI_", "PMI_", "PMIX_", "MV2_", "SLURM_", "PALS_")
LAUNCHER_KEYS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "MPI_LOCALRANKID")


def due(cfg: Config, step: int) -> bool:
    """Whether the checkpoint of ``step`` gets a downstream evaluation."""
    every = cfg.eval.downstream_every_steps
    return bool(cfg.eval.downstream) and (step == cfg.training.max_steps or not every or step % every == 0)


def link_weights(ckpt_dir: str, dest: str) -> None:
    """The weights of checkpoint ``ckpt_dir`` at ``dest`` (made whole under a temporary name, then renamed),
    each file hard-linked, or copied where the filesystem cannot link."""
    tmp = dest + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    names = [MODEL_FILE, CONFIG_FILE, EXTRA_FILE]
    tokenizer = os.path.join(ckpt_dir, TOKENIZER_DIR)
    if os.path.isdir(tokenizer):
        os.makedirs(os.path.join(tmp, TOKENIZER_DIR))
        names += [os.path.join(TOKENIZER_DIR, n) for n in sorted(os.listdir(tokenizer))]
    for name in names:
        src = os.path.join(ckpt_dir, name)
        if not os.path.isfile(src):
            continue
        try:
            os.link(src, os.path.join(tmp, name))
        except OSError:
            shutil.copy2(src, os.path.join(tmp, name))
    os.replace(tmp, dest)


def job_environment(environ: Optional[dict] = None, device: Optional[str] = None) -> dict:
    """``environ`` (default: ours) without the launcher's rank variables (the job then finds itself a
    single process, with a free loopback port), on ``device`` (``cuda:K``: the K-th visible GPU alone), and
    told to die with this process (data_prep.procs.PARENT_PID_ENV)."""
    from data_prep.procs import PARENT_PID_ENV
    env = {k: v for k, v in (os.environ if environ is None else environ).items()
           if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_KEYS}
    if device is not None and device.startswith("cuda:"):
        index = int(device.split(":")[1])
        visible = [d for d in env.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
        env["CUDA_VISIBLE_DEVICES"] = visible[index] if index < len(visible) else str(index)
    return {**env, PARENT_PID_ENV: str(os.getpid())}


def read_scores(out_dir: str) -> dict:
    """{downstream/TASK: main-metric mean, downstream/average: ...} of a finished suite's suite.json."""
    from pretrain.finetune.suite import SUITE_JSON
    with open(os.path.join(out_dir, SUITE_JSON), encoding="utf-8") as f:
        table = json.load(f)
    scores = {f"{KIND}/{name}": task["mean"] for name, task in table["tasks"].items()}
    return {**scores, f"{KIND}/average": table["average"]}


def logged_steps(jsonl_path: str) -> set[int]:
    """The steps whose downstream scores ``jsonl_path`` (a run's metrics.jsonl, which MetricsLogger has
    cleared of cut-short lines by now) holds."""
    if not os.path.exists(jsonl_path):
        return set()
    return {int(r["step"]) for r in read_jsonl(jsonl_path) if r.get("kind") == KIND}


class Downstream:
    """Rank 0's queue of downstream suites (see the module docstring); a no-op elsewhere and when off."""

    def __init__(self, cfg: Config, run_dir: str, rank: int, logger: MetricsLogger, *, start_step: int = 0,
                 stop=None, device: Optional[str] = None):
        self.cfg, self.logger, self.stop, self.device = cfg, logger, stop, device
        self.enabled = rank == 0 and bool(cfg.eval.downstream)
        self.root = os.path.join(run_dir, DOWNSTREAM_DIR)
        self.queue: list[int] = []
        self.running: Optional[tuple[int, subprocess.Popen, float]] = None
        if self.enabled:
            self._requeue(logged_steps(logger.jsonl_path), start_step)

    def _requeue(self, logged: set[int], start_step: int) -> None:
        """A resumed run: the snapshots up to its checkpoint's step whose scores were not logged, oldest first
        (one past it belongs to a run that did not reach its next checkpoint: it is taken again)."""
        for tag in list_checkpoints(self.root):
            step = int(tag[len("step-"):])
            if step <= start_step and step not in logged and os.path.isdir(os.path.join(self.root, tag, WEIGHTS_DIR)):
                self.queue.append(step)

    def stopping(self) -> bool:
        return self.stop is not None and self.stop.received is not None

    def out_dir(self, step: int) -> str:
        return os.path.join(self.root, step_tag(step))

    def checkpoint_saved(self, step: int, ckpt_dir: str, start: bool = True) -> None:
        """After the checkpoint of ``step`` is committed: snapshot its weights and queue the suite if due;
        ``start``: start it now if nothing runs (the stop path queues it for the resumed run only)."""
        if not self.enabled or not due(self.cfg, step) or step in self.queue:
            return
        out = self.out_dir(step)
        try:
            shutil.rmtree(out, ignore_errors=True)      # a stale attempt at this step (a run that stopped before it)
            os.makedirs(out)
            link_weights(ckpt_dir, os.path.join(out, WEIGHTS_DIR))
        except OSError as err:
            self.logger.message(f"downstream evaluation of step {step} skipped: its snapshot {out} could not be "
                                f"written ({err.strerror or err}); training goes on")
            return
        self.queue.append(step)
        if start:
            self.poll()

    def command(self, step: int) -> list[str]:
        out = self.out_dir(step)
        budget = self.cfg.eval.downstream_max_steps
        return [sys.executable, "-m", "pretrain", "finetune", "--suite", os.path.abspath(self.cfg.eval.downstream),
                "--checkpoint", os.path.join(out, WEIGHTS_DIR), "--out", out, "logging.progress_bar=false",
                *([f"training.max_steps={budget}"] if budget else [])]

    def poll(self) -> None:
        """Log the running suite's scores if it has ended, then start the next queued one.  No waiting."""
        if not self.enabled:
            return
        if self.running is not None:
            step, proc, began = self.running
            code = proc.poll()
            if code is None:
                return
            self.running = None
            self._ended(step, code, time.time() - began)
        if self.queue and not self.stopping():
            step = self.queue.pop(0)
            log = os.path.join(self.out_dir(step), LOG_FILE)
            try:
                with open(log, "ab") as f:
                    proc = subprocess.Popen(self.command(step), stdout=f, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, env=job_environment(device=self.device))
            except OSError as err:
                self.logger.message(f"downstream evaluation of step {step} could not start ({err.strerror or err}; "
                                    f"{log}); training goes on")
                return
            self.running = (step, proc, time.time())

    def _ended(self, step: int, code: int, seconds: float) -> None:
        from pretrain.trainer import EXIT_REQUEUE
        log = os.path.join(self.out_dir(step), LOG_FILE)
        if code == EXIT_REQUEUE:
            self.logger.message(f"downstream evaluation of step {step} stopped by a signal after {seconds:.0f} s "
                                f"(checkpointed): it continues when the run resumes")
            return
        if code != 0:
            self.logger.message(f"downstream evaluation of step {step} failed (exit status {code}) after "
                                f"{seconds:.0f} s; training goes on: see {log}")
            return
        try:
            scores = read_scores(self.out_dir(step))
        except (OSError, ValueError, KeyError) as err:
            self.logger.message(f"downstream evaluation of step {step}: unreadable result ({err}); see {log}")
            return
        self.logger.log(step, scores, kind=KIND)
        shown = "  ".join(f"{k[len(KIND) + 1:]} {v:.4f}" for k, v in scores.items())
        self.logger.message(f"downstream step {step} ({seconds:.0f} s): {shown}")

    def finish(self) -> bool:
        """After the last step: wait for the queued and running suites, logging each.  False when a stop
        came first: the running suite is ended (it checkpoints), the queued ones wait for a rerun."""
        if not self.enabled or (self.running is None and not self.queue):
            return True
        steps = ([self.running[0]] if self.running else []) + self.queue
        self.logger.message(f"training done; waiting for the downstream evaluation of step(s) "
                            f"{', '.join(map(str, steps))} (eval.downstream)")
        while self.running is not None or self.queue:
            if self.stopping():
                self.close()
                return False
            self.poll()
            if self.running is not None:
                time.sleep(0.5)
        return True

    def close(self) -> None:
        """End the running suite (a stop or an error ended training); its step is queued again on resume."""
        if not self.enabled or self.running is None:
            return
        _, proc, _ = self.running
        self.running = None
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
