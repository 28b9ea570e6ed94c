"""The training loop: build everything from the Config, train, evaluate, checkpoint, stop cleanly.

Exit codes (documented in docs/training.md and used by launch/slurm):
  0   finished: training.max_steps reached, final checkpoint saved
  75  checkpointed after SIGTERM/SIGUSR1/SIGINT (Ctrl-C), please requeue (EX_TEMPFAIL)
  1   error (e.g. too many consecutive non-finite losses)
"""
from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import Config
from pretrain.data import DataPosition, build_eval_loader, build_train_loader, open_split
from pretrain.distributed import DistEnv
from pretrain.engine import (SkippableStep, Stepper, all_reduce_sum, build_engine, init_distributed,
                             shutdown_distributed)
from pretrain.evaluate import evaluate
from pretrain.metrics import MetricsLogger, peak_tflops_for, plot_curves, throughput
from pretrain.signals import StopSignal

log = logging.getLogger(__name__)

EXIT_DONE, EXIT_ERROR, EXIT_REQUEUE = 0, 1, 75


class NonFiniteLossError(RuntimeError):
    pass


def seed_everything(seed: int, rank: int) -> None:
    random.seed(seed + rank)
    np.random.seed((seed + rank) % 2**32)
    torch.manual_seed(seed + rank)


def device_for(dist_env: DistEnv) -> torch.device:
    if torch.cuda.is_available():
        torch.cuda.set_device(dist_env.local_rank)
        return torch.device("cuda", dist_env.local_rank)
    return torch.device("cpu")


@dataclass
class Run:
    """Everything the loop needs, built once."""
    cfg: Config
    dist_env: DistEnv
    device: torch.device
    engine: object
    optimizer: torch.optim.Optimizer
    guard: SkippableStep
    scheduler: object
    model: torch.nn.Module
    accum: int


def join_job(cfg: Config, dist_env: DistEnv) -> torch.device:
    """This rank's device, and the process group joined."""
    device = device_for(dist_env)
    init_distributed("nccl" if device.type == "cuda" else "gloo", cfg.training.collective_timeout_s)
    return device


RUN_LOCK = "train.lock"


class RunDirError(RuntimeError):
    """The run directory is in use by another run, or cannot be locked."""


def hold_run_dir(run_dir: str, rank: int, device: torch.device) -> Optional[int]:
    """One run per run directory: rank 0 locks ``RUN_DIR/train.lock`` before anything is written
    in it, and every rank learns the outcome, so all ranks of a second run into a directory in use
    exit alike.  Returns rank 0's lock descriptor (None on the other ranks, or where the filesystem
    cannot lock)."""
    from data_prep.errors import DirInUse, PrepError
    from data_prep.fsutil import lock_dir

    fd, outcome, failure = None, 0, ""       # outcome: 0 locked, >0 holder's pid, -1 pid unknown, -2 error
    if rank == 0:
        try:
            fd = lock_dir(run_dir, RUN_LOCK)
            if fd is None:
                log.warning("%s: the filesystem cannot lock: nothing stops a second run from using %s at the "
                            "same time", os.path.join(run_dir, RUN_LOCK), run_dir)
        except DirInUse as err:
            outcome = err.pid or -1
        except PrepError as err:
            outcome, failure = -2, str(err)
    agreed = int(all_reduce_sum(torch.tensor([outcome], dtype=torch.int64, device=device)).item())
    if agreed == -2:
        raise RunDirError(failure or f"{run_dir}: rank 0 could not lock the run directory (its log says why)")
    if agreed:
        holder = f"pid {agreed}" if agreed > 0 else "another process"
        raise RunDirError(f"{run_dir} is in use by {holder}, which holds {os.path.join(run_dir, RUN_LOCK)}: "
                          f"wait for that run to end, or choose another logging.run_dir")
    return fd


def build_run(cfg: Config, dist_env: DistEnv, device: torch.device, load_universal: bool = False) -> Run:
    from pretrain.model import build_model
    from pretrain.optim import attach_zero_layout, build_optimizer, build_scheduler
    from pretrain.weights import load_weights

    seed_everything(cfg.training.seed, 0)          # identical initial weights on every rank
    model = build_model(cfg.model, cfg.kernels)
    if cfg.checkpoint.init_from:
        try:
            _, state_dict, _ = load_weights(cfg.checkpoint.init_from)
        except (OSError, ValueError) as err:     # missing path, not a checkpoint, its config.yaml invalid
            raise ckpt.CheckpointError(f"checkpoint.init_from: {err}") from None
        model.load_consolidated_state_dict(state_dict)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.kernels.lamb)
    guard = SkippableStep(optimizer)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.max_steps)
    engine = build_engine(cfg, model, optimizer, dist_env.world_size, load_universal)
    attach_zero_layout(engine, optimizer)
    seed_everything(cfg.training.seed, dist_env.rank)  # per-rank dropout streams
    return Run(cfg, dist_env, device, engine, optimizer, guard, scheduler, model,
               cfg.grad_accum_steps(dist_env.world_size))


def consolidated_state_dict(run: Run) -> Optional[dict]:
    """Full fp32 model weights on rank 0 (gathers partitions under ZeRO-3), None elsewhere."""
    import deepspeed

    params = list(run.model.parameters())
    gather = deepspeed.zero.GatheredParameters(params, modifier_rank=None) if run.cfg.zero.stage == 3 \
        else _nullcontext()
    with gather:
        if run.dist_env.rank != 0:
            return None
        return {k: v.detach().float().cpu().clone() for k, v in run.model.state_dict().items()}


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def train(cfg: Config, dist_env: DistEnv, *, stop_after_step: Optional[int] = None,
          fault: Optional[str] = None, stop: Optional[StopSignal] = None) -> int:
    """Train to ``training.max_steps`` (or checkpoint and return 75 at ``stop_after_step``).

    ``fault`` names a fault to inject for tests: ``kill-during-save@STEP`` ends the process
    abruptly in the middle of the checkpoint save of that step; ``nan-loss@A-B`` makes the loss
    of steps A..B non-finite.  Raises RunDirError when another run holds ``logging.run_dir``.
    """
    device = join_job(cfg, dist_env)
    lock = hold_run_dir(cfg.logging.run_dir, dist_env.rank, device)
    try:
        code = _train(cfg, dist_env, device, stop_after_step, fault, stop or StopSignal())
    finally:
        if lock is not None:
            os.close(lock)
    shutdown_distributed()     # only after a clean end: after an error a peer may be stuck in a collective
    return code


def _train(cfg: Config, dist_env: DistEnv, device: torch.device, stop_after_step: Optional[int],
           fault: Optional[str], stop: StopSignal) -> int:
    run_dir = cfg.logging.run_dir
    ckpt_root = os.path.join(run_dir, cfg.checkpoint.dir)
    resuming = cfg.checkpoint.resume == "auto" and ckpt.latest_tag(ckpt_root) is not None
    new_world = resuming and ckpt.saved_world_size(ckpt_root) != dist_env.world_size
    run = build_run(cfg, dist_env, device, load_universal=new_world)
    rank = dist_env.rank
    train_split = open_split(cfg.data, "train", cfg.training, cfg.model.vocab_size)
    prints = ckpt.fingerprints(cfg, train_split.fingerprint, train_split.tokenizer_hash)
    extra = {"tokenizer_dir": train_split.tokenizer_dir, "fingerprints": prints}

    state = ckpt.TrainerState(step=0, samples_consumed=0, world_size=dist_env.world_size)
    logger_messages = []
    if resuming:
        loaded, diffs = ckpt.load(run.engine, ckpt_root, rank=rank, scheduler=run.scheduler,
                                  current_prints=prints, allow_mismatch=cfg.checkpoint.allow_fingerprint_mismatch,
                                  universal=new_world)
        if loaded is not None:
            logger_messages.append(f"resumed from {ckpt.latest_tag(ckpt_root)} at step {loaded.step}, "
                                   f"sample {loaded.samples_consumed}")
            if loaded.world_size != dist_env.world_size:
                logger_messages.append(
                    f"world size changed {loaded.world_size} -> {dist_env.world_size}: the global sample order "
                    f"does not depend on the world size, so training continues at global sample "
                    f"{loaded.samples_consumed} with the same batches; the optimizer state was re-partitioned "
                    f"through DeepSpeed's universal checkpoint format; ranks without a saved RNG state start "
                    f"fresh dropout streams")
            logger_messages += [f"fingerprint mismatch allowed: {d}" for d in diffs]
            state = loaded

    if state.step == 0 and cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
        if cfg.checkpoint.init_optimizer:
            source = ckpt.load_optimizer_from(run.engine, cfg.checkpoint.init_from)
        logger_messages.append(f"initialized from {source}: weights"
                               + (" and optimizer state" if cfg.checkpoint.init_optimizer else "")
                               + "; step, data position and schedule start afresh")
    if run.engine.is_compiled:
        logger_messages.append("kernels.compile: the model runs through torch.compile (the first steps compile)")
    logger = MetricsLogger(run_dir, rank=rank, max_steps=cfg.training.max_steps, start_step=state.step,
                           tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar)
    for message in logger_messages:
        logger.message(message)
    try:
        code = _loop(run, state, train_split, logger, stop, ckpt_root, prints, extra, stop_after_step, fault)
    finally:
        logger.close()
    if rank == 0 and code == EXIT_DONE:
        plot_curves(logger.jsonl_path, os.path.join(run_dir, "curves.png"))
    return code


def _loop(run: Run, state: ckpt.TrainerState, train_split, logger: MetricsLogger, stop: StopSignal,
          ckpt_root: str, prints: dict, extra: dict, stop_after_step: Optional[int], fault: Optional[str]) -> int:
    cfg, dist_env = run.cfg, run.dist_env
    t = cfg.training
    global_batch = t.micro_batch_size * run.accum * dist_env.world_size
    loader = build_train_loader(train_split, cfg.data, t, position=DataPosition(state.samples_consumed),
                                rank=dist_env.rank, world_size=dist_env.world_size, accum=run.accum)
    batches = iter(loader)
    stepper = Stepper(run.engine, run.guard, run.scheduler, run.accum, run.device, stop)
    from pretrain.model import flops_per_sequence
    flops_per_seq = flops_per_sequence(cfg.model, t.seq_len)
    device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
    peak = peak_tflops_for(device_name, cfg.logging.peak_tflops)

    window = _Window()
    consecutive_nonfinite = 0

    def next_batch():
        began = time.perf_counter()
        batch = next(batches)
        window.loader_wait += time.perf_counter() - began
        window.tokens += int(batch["attention_mask"].sum())
        return batch

    def save():
        crash = fault == f"kill-during-save@{state.step}"
        ckpt.save(run.engine, ckpt_root, state, cfg=cfg, scheduler=run.scheduler, prints=prints,
                  consolidated_state_dict=consolidated_state_dict(run), rank=dist_env.rank,
                  keep_last=cfg.checkpoint.keep_last, extra=extra, crash_before_commit=crash)

    if state.step == 0 and cfg.eval.every_steps:
        logger.log(0, run_eval(run), kind="eval")   # the untrained baseline, for comparison
    nan_steps = fault_steps(fault, "nan-loss")
    while state.step < t.max_steps:
        stepper.poison_loss = state.step + 1 in nan_steps
        lr = run.scheduler.get_last_lr()[0]       # the rate of this update: the scheduler steps after it
        totals, applied, signals = stepper.step(next_batch)
        state.step += 1
        state.samples_consumed += global_batch
        window.add(totals if applied else None, lr)   # a skipped step's NaN stays out of the averages
        if applied:
            consecutive_nonfinite = 0
        else:
            state.skipped_steps += 1
            consecutive_nonfinite += 1
            logger.message(f"step {state.step}: non-finite loss, update skipped "
                           f"({consecutive_nonfinite} in a row, {state.skipped_steps} in all)")
            if consecutive_nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteLossError(
                    f"{consecutive_nonfinite} consecutive steps with a non-finite loss (training.max_nonfinite_steps="
                    f"{t.max_nonfinite_steps}) at step {state.step}: lower optimizer.lr, check the data, or use "
                    f"precision bf16/fp32")
        if state.step % cfg.logging.every_steps == 0 or state.step == t.max_steps:
            values = window.reduce(run, global_batch, flops_per_seq, peak)
            values["train/skipped_steps"] = float(state.skipped_steps)
            logger.log(state.step, values)
            window = _Window()
        if cfg.eval.every_steps and (state.step % cfg.eval.every_steps == 0 or state.step == t.max_steps):
            logger.log(state.step, run_eval(run), kind="eval")
        logger.advance(state.step)
        if signals or (stop_after_step is not None and state.step >= stop_after_step and state.step < t.max_steps):
            save()
            why = f"{signals} received" if signals else f"--stop-after-step {stop_after_step} reached"
            logger.message(f"{why}: checkpoint saved at step {state.step}; exiting with {EXIT_REQUEUE} "
                           f"(checkpointed, not finished: requeue or rerun to continue)")
            return EXIT_REQUEUE
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == t.max_steps:
            save()
    return EXIT_DONE


def fault_steps(fault: Optional[str], name: str) -> set[int]:
    """Steps named by a fault spec ``name@N`` or ``name@A-B`` (empty for another fault or none)."""
    if not fault or not fault.startswith(name + "@"):
        return set()
    first, _, last = fault.split("@", 1)[1].partition("-")
    return set(range(int(first), int(last or first) + 1))


def run_eval(run: Run) -> dict:
    cfg = run.cfg
    val_split = open_split(cfg.data, "val", cfg.training, cfg.model.vocab_size, required=False)
    if val_split is None:
        return {}
    loader = build_eval_loader(val_split, cfg.data, cfg.training, cfg.eval, rank=run.dist_env.rank,
                               world_size=run.dist_env.world_size)
    return evaluate(run.engine, loader, run.device, max_batches=cfg.eval.max_batches,
                    counted_batches=loader.sampler.counted_batches)


class _Window:
    """Metrics accumulated between two log lines (tensors stay on device until ``reduce``)."""

    def __init__(self):
        self.totals: Optional[dict] = None
        self.steps = 0
        self.tokens = 0
        self.loader_wait = 0.0
        self.lr = float("nan")       # the rate of the window's last update
        self.began = time.perf_counter()

    def add(self, totals: Optional[dict], lr: float) -> None:
        if totals is not None:
            self.totals = totals if self.totals is None else {k: self.totals[k] + totals[k] for k in totals}
        self.steps += 1
        self.lr = lr

    def reduce(self, run: Run, global_batch: int, flops_per_seq: float, peak: Optional[float]) -> dict:
        if self.totals is None:          # every step of the window was skipped (same on all ranks)
            return {"perf/step_time_s": (time.perf_counter() - self.began) / max(self.steps, 1)}
        keys = sorted(self.totals)
        local = torch.stack([self.totals[k] for k in keys] + [torch.tensor(float(self.tokens), device=run.device),
                                                               torch.tensor(self.loader_wait, device=run.device)])
        summed = all_reduce_sum(local.float()).tolist()
        tot = dict(zip(keys + ["tokens", "loader_wait"], summed))
        micro = max(tot["micro_batches"], 1.0)
        seconds = time.perf_counter() - self.began
        values = {
            "train/loss": tot["loss_sum"] / micro,
            "train/mlm_loss": tot["mlm_loss_sum"] / micro,
            "train/mlm_accuracy": tot["mlm_correct"] / max(tot["mlm_count"], 1.0),
            "train/lr": self.lr,
            "train/grad_norm": _grad_norm(run.engine),
            "perf/step_time_s": seconds / max(self.steps, 1),
            "perf/loader_wait_s": tot["loader_wait"] / run.dist_env.world_size / max(self.steps, 1),
        }
        if tot["sentence_count"] > 0:
            values["train/sentence_loss"] = tot["sentence_loss_sum"] / micro
            values["train/sentence_accuracy"] = tot["sentence_correct"] / tot["sentence_count"]
        if run.cfg.training.precision == "fp16":
            values["train/loss_scale"] = float(run.engine.optimizer.cur_scale)
        values.update(throughput(self.steps * global_batch, int(tot["tokens"]), seconds, flops_per_seq, peak))
        if run.device.type == "cuda":
            values["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        return values


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm.item() if torch.is_tensor(norm) else norm)
