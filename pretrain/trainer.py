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
from typing import Any, Callable, Optional

import numpy as np
import torch

from pretrain import checkpoint as ckpt
from pretrain.config import Config, ConfigError, ignored_option_warnings
from pretrain.data import DataError, DataPosition, Mixture, build_eval_loader, build_train_loader, open_split
from pretrain.distributed import DistEnv
from pretrain.downstream import Downstream
from pretrain.engine import Engine, agree, all_reduce_sum, init_distributed, shutdown_distributed
from pretrain.evaluate import eval_metrics, eval_sums
from pretrain.faults import Faults
from pretrain.metrics import MetricsLogger, open_logger, peak_tflops_for, plot_curves, throughput
from pretrain.packing import fill
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
class Objective:
    """What a run trains where it is not pretraining's model and losses (distillation's: pretrain/distill.py)."""
    wrap: Callable[[torch.nn.Module, torch.device], torch.nn.Module]
    """``wrap(model, device)``: the module the engine trains, made from the freshly built model of the ``model``
    section (before checkpoint.init_from or a resume loads weights into it, through the module's
    ``load_consolidated_state_dict``)."""
    stats: Callable[[Any, torch.Tensor], dict]
    """The engine's metric sums of one micro-batch (pretrain.engine.Engine's ``stats``); each ``loss_<name>_sum``
    among them is logged as ``train/loss_<name>``."""
    fingerprints: dict
    """Added to the checkpoints' fingerprints (pretrain.checkpoint.check_fingerprints compares them)."""
    check_data: Callable[[Mixture], None]
    """Called with the training split before training: raises DataError for shards the objective cannot
    train on."""


@dataclass
class Run:
    """Everything the loop needs, built once."""
    cfg: Config
    dist_env: DistEnv
    device: torch.device
    engine: Engine


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


def build_run(cfg: Config, dist_env: DistEnv, device: torch.device, stop: StopSignal, faults: Faults,
              load_universal: bool = False, objective: Optional[Objective] = None) -> Run:
    from pretrain.model import build_model
    from pretrain.optim import build_optimizer, build_scheduler
    from pretrain.weights import load_weights

    seed_everything(cfg.training.seed, 0)          # identical initial weights on every rank
    model = build_model(cfg.model, cfg.kernels, cfg.training.activation_checkpointing)
    if objective is not None:
        model = objective.wrap(model, device)
    if cfg.checkpoint.init_from:
        try:
            _, state_dict, _ = load_weights(cfg.checkpoint.init_from)
        except (OSError, ValueError) as err:     # missing path, not a checkpoint, its config.yaml invalid
            raise ckpt.CheckpointError(f"checkpoint.init_from: {err}") from None
        model.load_consolidated_state_dict(state_dict)
    model.to(device)
    optimizer = build_optimizer(model, cfg.optimizer, cfg.kernels.lamb)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.max_steps)
    engine = Engine(cfg, model, optimizer, scheduler, dist_env.world_size, load_universal=load_universal,
                    stop=stop, faults=faults, stats=objective.stats if objective is not None else None)
    seed_everything(cfg.training.seed, dist_env.rank)  # per-rank dropout streams
    return Run(cfg, dist_env, device, engine)


def train(cfg: Config, dist_env: DistEnv, *, stop_after_step: Optional[int] = None,
          fault: Optional[str] = None, stop: Optional[StopSignal] = None,
          prepare: Optional[Callable[[Config, int], tuple[Config, Objective]]] = None) -> int:
    """Train to ``training.max_steps`` (or checkpoint and return 75 at ``stop_after_step``).

    ``fault``: a fault for the tests to inject (see pretrain.faults).  ``prepare(cfg, world_size) -> (cfg,
    Objective)``: what is trained, where it is not pretraining (distillation's); it runs on every rank once the
    job is joined, and its ConfigError or CheckpointError on any rank ends every rank.  Raises RunDirError when
    another run holds ``logging.run_dir``.
    """
    faults = Faults.parse(fault)
    device = join_job(cfg, dist_env)
    objective = None
    if prepare is not None:
        error = None
        try:
            cfg, objective = prepare(cfg, dist_env.world_size)
        except (ConfigError, ckpt.CheckpointError) as err:   # a teacher missing or unreadable on this node
            error = err
        agree(error, device, ckpt.CheckpointError("preparing the run failed on another rank (its error says why)"))
    lock = hold_run_dir(cfg.logging.run_dir, dist_env.rank, device)
    try:
        code = _train(cfg, dist_env, device, stop_after_step, faults, stop or StopSignal(), objective)
    finally:
        if lock is not None:
            os.close(lock)
    shutdown_distributed()     # only after a clean end: after an error a peer may be stuck in a collective
    return code


def _train(cfg: Config, dist_env: DistEnv, device: torch.device, stop_after_step: Optional[int],
           faults: Faults, stop: StopSignal, objective: Optional[Objective] = None) -> int:
    run_dir = cfg.logging.run_dir
    ckpt_root = os.path.join(run_dir, cfg.checkpoint.dir)
    resuming = cfg.checkpoint.resume == "auto" and ckpt.latest_tag(ckpt_root) is not None
    new_world = resuming and ckpt.saved_world_size(ckpt_root) != dist_env.world_size
    run = build_run(cfg, dist_env, device, stop, faults, load_universal=new_world, objective=objective)
    train_split = open_split(cfg.data, "train", cfg.training, cfg.model.vocab_size)
    val_split = open_split(cfg.data, "val", cfg.training, cfg.model.vocab_size, required=False)
    _check_padding(cfg, train_split)
    if objective is not None:
        objective.check_data(train_split)
    prints = ckpt.fingerprints(cfg, train_split.fingerprint, train_split.tokenizer_hash, train_split.converted_from)
    prints.update(objective.fingerprints if objective is not None else {})
    saver = _Saver(run, ckpt_root, prints, {"tokenizer_dir": train_split.tokenizer_dir, "fingerprints": prints})
    state, messages = _starting_state(run, ckpt_root, prints, resuming, new_world)
    static = not train_split.info["dynamic"]
    messages += [f"warning: {w}" for w in ignored_option_warnings(cfg, static_masking=static,
                                                                  objective=train_split.info["objective"])]
    logger = open_logger(run_dir, device, rank=dist_env.rank, max_steps=cfg.training.max_steps,
                         start_step=state.step, tensorboard=cfg.logging.tensorboard,
                         progress_bar=cfg.logging.progress_bar, trackers=cfg.logging)
    for message in messages:
        logger.message(message)
    logger.log_run(state.step, cfg.to_dict(), dist_env.world_size)
    downstream = Downstream(cfg, run_dir, dist_env.rank, logger, start_step=state.step, stop=stop,
                            device=str(device))
    try:
        code = _loop(run, state, train_split, val_split, logger, saver, stop_after_step, downstream)
        if code == EXIT_DONE and cfg.eval.downstream:
            shutdown_distributed()      # every rank leaves the job before rank 0 waits for the suites
            if not downstream.finish():
                logger.message(f"stopped while waiting for the downstream evaluations; exiting with {EXIT_REQUEUE} "
                               f"(rerun to evaluate the rest)")
                code = EXIT_REQUEUE
    finally:
        downstream.close()
        logger.close()
    if dist_env.rank == 0 and code == EXIT_DONE:
        plot_curves(logger.jsonl_path, os.path.join(run_dir, "curves.png"))
    return code


def _check_padding(cfg: Config, split: Mixture) -> None:
    """What export would refuse after the whole run, refused before it: RoBERTa pads with id 1."""
    from pretrain.hf import ROBERTA_PAD_ID

    pad = split.info["special_ids"]["pad"]
    if cfg.model.arch == "roberta" and pad != ROBERTA_PAD_ID:
        raise DataError(f"{split.splits[0].dir}: the shards' tokenizer pads with id {pad}, but model.arch=roberta "
                        f"needs RoBERTa's <pad> at id {ROBERTA_PAD_ID} (a vocabulary from `python -m data_prep vocab "
                        f"--model bpe`); or train model.arch=bert on these shards")


def _starting_state(run: Run, ckpt_root: str, prints: dict, resuming: bool,
                    new_world: bool) -> tuple[ckpt.TrainerState, list[str]]:
    """Where training starts (a fresh state, the resumed one, or phase 2's init_from), and what
    to tell the user about it."""
    cfg, world_size = run.cfg, run.dist_env.world_size
    state = ckpt.TrainerState(step=0, samples_consumed=0, world_size=world_size)
    messages = []
    if resuming:
        loaded, diffs = ckpt.load(run.engine, ckpt_root, rank=run.dist_env.rank, current_prints=prints,
                                  allow_mismatch=cfg.checkpoint.allow_fingerprint_mismatch, universal=new_world,
                                  cfg=cfg)
        if loaded is not None:
            if loaded.step >= cfg.training.max_steps:
                messages.append(f"already finished at step {loaded.step} ({ckpt.latest_tag(ckpt_root)}, "
                                f"training.max_steps={cfg.training.max_steps}): nothing to train")
            else:
                messages.append(f"resumed from {ckpt.latest_tag(ckpt_root)} at step {loaded.step}, "
                                f"sample {loaded.samples_consumed}")
            changes = ckpt.config_changes(os.path.join(ckpt_root, ckpt.latest_tag(ckpt_root)), cfg)
            if ckpt.extends_the_run(changes):
                from pretrain.optim import extend_schedule
                then, now = changes["training.max_steps"]
                rates = extend_schedule(run.engine.scheduler, cfg.schedule, now)
                messages.append(f"training.max_steps raised from {then} to {now}: the run goes on from step "
                                f"{loaded.step}; warmup and decay are recomputed for {now} steps, so the rate "
                                f"follows the longer schedule from here ({rates[0]:.3e} -> {rates[1]:.3e})")
            if loaded.world_size != world_size:
                messages.append(
                    f"world size changed {loaded.world_size} -> {world_size}: the global sample order "
                    f"does not depend on the world size, so training continues at global sample "
                    f"{loaded.samples_consumed} with the same batches; the optimizer state was re-partitioned "
                    f"through DeepSpeed's universal checkpoint format; ranks without a saved RNG state start "
                    f"fresh dropout streams")
            messages += [f"fingerprint mismatch allowed: {d}" for d in diffs]
            state = loaded
    if state.step == 0 and cfg.checkpoint.init_from:
        source = cfg.checkpoint.init_from
        if cfg.checkpoint.init_optimizer:
            source = ckpt.load_optimizer_from(run.engine, cfg.checkpoint.init_from)
        messages.append(f"initialized from {source}: weights"
                        + (" and optimizer state" if cfg.checkpoint.init_optimizer else "")
                        + "; step, data position and schedule start afresh")
    if run.engine.compiled:
        messages.append("kernels.compile: the model runs through torch.compile (the first steps compile)")
    # Read off the built model (a distillation run trains a wrapper around it), not the config.
    if any(getattr(m, "activation_checkpointing", False) for m in run.engine.model.modules()):
        messages.append("training.activation_checkpointing: each encoder layer is recomputed in the backward pass")
    return state, messages


class _Saver:
    """Saves the run's checkpoint of a state (every rank calls it)."""

    def __init__(self, run: Run, root: str, prints: dict, extra: dict):
        self.run, self.root, self.prints, self.extra = run, root, prints, extra

    def __call__(self, state: ckpt.TrainerState) -> str:
        run, rank = self.run, self.run.dist_env.rank
        return ckpt.save(run.engine, self.root, state, cfg=run.cfg, prints=self.prints, rank=rank,
                  keep_last=run.cfg.checkpoint.keep_last, extra=self.extra)


def _loop(run: Run, state: ckpt.TrainerState, train_split: Mixture, val_split: Optional[Mixture],
          logger: MetricsLogger, save: _Saver, stop_after_step: Optional[int], downstream: Downstream) -> int:
    cfg, t = run.cfg, run.cfg.training
    global_batch = t.micro_batch_size * run.engine.accum * run.dist_env.world_size
    loader = build_train_loader(train_split, cfg.data, t, position=DataPosition(state.samples_consumed),
                                rank=run.dist_env.rank, world_size=run.dist_env.world_size, accum=run.engine.accum)
    feed, rates, skips = _Feed(iter(loader)), _Rates(run), _Skips(logger, t.max_nonfinite_steps)
    if state.step == 0 and cfg.eval.every_steps:
        logger.log(0, run_eval(run, val_split), kind="eval")   # the untrained baseline, for comparison
    while state.step < t.max_steps:
        lr = run.engine.scheduler.get_last_lr()[0]   # the rate of this update: the scheduler steps after it
        totals, applied, signals = run.engine.step(feed.next_batch, state.step + 1)
        state.step += 1
        state.samples_consumed += global_batch
        feed.window.add(totals if applied else None, lr)   # a skipped step's NaN stays out of the averages
        skips.count(state, applied)
        if state.step % cfg.logging.every_steps == 0 or state.step == t.max_steps:
            values = feed.new_window().reduce(run, global_batch, rates)
            values["train/skipped_steps"] = float(state.skipped_steps)
            values.update(train_split.progress(state.samples_consumed))
            logger.log(state.step, values)
        if cfg.eval.every_steps and (state.step % cfg.eval.every_steps == 0 or state.step == t.max_steps):
            logger.log(state.step, run_eval(run, val_split), kind="eval")
        logger.advance(state.step)
        downstream.poll()
        if signals or (stop_after_step is not None and stop_after_step <= state.step < t.max_steps):
            downstream.checkpoint_saved(state.step, save(state), start=False)
            why = f"{signals} received" if signals else f"--stop-after-step {stop_after_step} reached"
            logger.message(f"{why}: checkpoint saved at step {state.step}; exiting with {EXIT_REQUEUE} "
                           f"(checkpointed, not finished: requeue or rerun to continue)")
            return EXIT_REQUEUE
        if state.step % cfg.checkpoint.every_steps == 0 or state.step == t.max_steps:
            downstream.checkpoint_saved(state.step, save(state))
    return EXIT_DONE


class _Skips:
    """Counts the steps whose update was skipped for a non-finite loss; too many in a row is an error."""

    def __init__(self, logger: MetricsLogger, limit: int):
        self.logger, self.limit, self.in_a_row = logger, limit, 0

    def count(self, state: ckpt.TrainerState, applied: bool) -> None:
        if applied:
            self.in_a_row = 0
            return
        state.skipped_steps += 1
        self.in_a_row += 1
        self.logger.message(f"step {state.step}: non-finite loss, update skipped "
                            f"({self.in_a_row} in a row, {state.skipped_steps} in all)")
        if self.in_a_row >= self.limit:
            raise NonFiniteLossError(
                f"{self.in_a_row} consecutive steps with a non-finite loss (training.max_nonfinite_steps="
                f"{self.limit}) at step {state.step}: lower optimizer.lr, check the data, or use precision "
                f"bf16/fp32")


def run_eval(run: Run, val_split: Optional[Mixture]) -> dict:
    """Held-out metrics (``eval/...``) over every source's val split; with several sources also each
    source's own (``eval/<name>/...``), ``eval.max_batches`` applying to each."""
    if val_split is None:
        return {}
    cfg, out, total = run.cfg, {}, [0.0] * 6
    for i, split in enumerate(val_split.splits):
        loader = build_eval_loader(val_split.part(i), cfg.data, cfg.training, cfg.eval, rank=run.dist_env.rank,
                                   world_size=run.dist_env.world_size)
        sums = eval_sums(run.engine, loader, run.device, max_batches=cfg.eval.max_batches,
                         counted_batches=loader.sampler.counted_batches)
        total = [a + b for a, b in zip(total, sums)]
        if len(cfg.data.sources) > 1:
            out.update(eval_metrics(sums, prefix=f"eval/{split.name}/"))
    return {**eval_metrics(total), **out}


class _Feed:
    """The loader's batches for the engine, with the time waited for them and their real tokens
    counted in the current metrics window."""

    def __init__(self, batches):
        self.batches, self.window = batches, _Window()

    def next_batch(self) -> dict:
        began = time.perf_counter()
        batch = next(self.batches)
        self.window.loader_wait += time.perf_counter() - began
        real, slots = fill(batch)
        self.window.tokens += real
        self.window.slots += slots
        self.window.rows += batch["input_ids"].size(0)
        return batch

    def new_window(self) -> "_Window":
        """The window so far (to reduce and log); a new one starts."""
        window, self.window = self.window, _Window()
        return window


class _Rates:
    """What throughput is measured against: model FLOPs per sequence and the device's peak."""

    def __init__(self, run: Run):
        from pretrain.model import flops_per_sequence

        self.flops_per_seq = flops_per_sequence(run.cfg.model, run.cfg.training.seq_len)
        device_name = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else "cpu"
        self.peak = peak_tflops_for(device_name, run.cfg.logging.peak_tflops)


class _Window:
    """Metrics accumulated between two log lines (tensors stay on device until ``reduce``)."""

    def __init__(self):
        self.totals: Optional[dict] = None
        self.steps = 0
        self.tokens = 0               # real tokens (not padding) of this rank's batches
        self.slots = 0                # their rows' slots, padding included
        self.rows = 0
        self.loader_wait = 0.0
        self.lr = float("nan")       # the rate of the window's last update
        self.began = time.perf_counter()

    def add(self, totals: Optional[dict], lr: float) -> None:
        if totals is not None:
            self.totals = totals if self.totals is None else {k: self.totals[k] + totals[k] for k in totals}
        self.steps += 1
        self.lr = lr

    def reduce(self, run: Run, global_batch: int, rates: _Rates) -> dict:
        if self.totals is None:          # every step of the window was skipped (same on all ranks)
            return {"perf/step_time_s": (time.perf_counter() - self.began) / max(self.steps, 1)}
        keys = sorted(self.totals)
        counts = [float(self.tokens), float(self.slots), float(self.rows), self.loader_wait]
        local = torch.cat([torch.stack([self.totals[k].double() for k in keys]),
                           torch.tensor(counts, dtype=torch.float64, device=run.device)])
        summed = all_reduce_sum(local).tolist()
        tot = dict(zip(keys + ["tokens", "slots", "rows", "loader_wait"], summed))
        micro = max(tot["micro_batches"], 1.0)
        seconds = time.perf_counter() - self.began
        values = {
            "train/loss": tot["loss_sum"] / micro,
            "train/mlm_loss": tot["mlm_loss_sum"] / micro,
            "train/mlm_accuracy": tot["mlm_correct"] / max(tot["mlm_count"], 1.0),
            "train/lr": self.lr,
            "train/grad_norm": run.engine.grad_norm(),
            "perf/step_time_s": seconds / max(self.steps, 1),
            "perf/loader_wait_s": tot["loader_wait"] / run.dist_env.world_size / max(self.steps, 1),
        }
        if tot["sentence_count"] > 0:
            values["train/sentence_loss"] = tot["sentence_loss_sum"] / micro
            values["train/sentence_accuracy"] = tot["sentence_correct"] / tot["sentence_count"]
        values.update({f"train/{k[:-len('_sum')]}": tot[k] / micro for k in keys
                       if k.startswith("loss_") and k != "loss_sum"})    # an Objective's loss components
        if (scale := run.engine.loss_scale()) is not None:
            values["train/loss_scale"] = scale
        values.update(throughput(self.steps * global_batch, int(tot["tokens"]), seconds, rates.flops_per_seq,
                                 rates.peak, rows=int(tot["rows"]), slots=int(tot["slots"])))
        if run.device.type == "cuda":
            values["perf/peak_memory_gb"] = torch.cuda.max_memory_allocated(run.device) / 2**30
        return values
