"""The fine-tuning loop: one run per seed through the training engine, dev evaluation, the best model kept.

Per seed (SEED_DIR = ``logging.run_dir``/seed-N): the starting checkpoint with a fresh head
(pretrain.finetune.model.from_pretrained, head initialised from the seed), AdamW (or LAMB) with
pretraining's decay groups split by layer for layer-wise LR decay, the warmup-then-decay schedule,
all under the DeepSpeed engine (data parallel across ranks, precision and ZeRO from the config).
Training feeds the dynamically padded micro-batches of pretrain.finetune.prepare; the dev file is
evaluated at each epoch end, every ``eval.every_steps`` and at the last step; the best evaluation by
``eval.metric`` is kept (SEED_DIR/best, our checkpoint; its predictions in SEED_DIR/predictions.jsonl;
SEED_DIR/hf, its transformers export), and early stopping ends a seed after
``eval.early_stopping_patience`` evaluations without a better one.  SEED_DIR/metrics.jsonl and
SEED_DIR/tensorboard log the training loss, the learning rate and the dev metrics.

``RUN_DIR/metrics.json`` holds each seed's dev metrics (those of its best evaluation) and their mean and
standard deviation (sample std, ddof=1; 0 with one seed).  All input is read and checked before anything
is written (pretrain.finetune.prepare).

Resuming (the same command again, after a stop signal, a requeue or a crash): RUN_DIR/fingerprints.json
records the config that defines the seeds' training (run_fingerprints), and a run of another config into
the directory is refused.  A seed done has SEED_DIR/result.json (what train_seed returned, written after its
predictions and export) and is read back, not trained again.  A seed in training saves resumable
checkpoints in SEED_DIR/checkpoints (pretrain.checkpoint: written to a temporary directory, committed with
``latest``) every ``checkpoint.every_steps`` and at a stop signal (SIGTERM, SIGUSR1, Ctrl-C: pretrain.signals),
after which the run ends (the command exits 75, as pretraining does); the rerun continues from it exactly:
the engine's model and optimizer state, the schedule, every rank's RNG state, the data position (the step),
the evaluations so far (_Best) and the loss of the open log window (_Window).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Optional

import torch

from pretrain import checkpoint as ckpt
from pretrain.config import ScheduleConfig, max_seq_len
from pretrain.distributed import DistEnv
from pretrain.engine import Engine, all_reduce_sum, shutdown_distributed
from pretrain.finetune.config import FinetuneConfig, dump_config, warmup_ratio_or_default
from pretrain.finetune.evaluate import better, dev_metrics, dev_outputs
from pretrain.finetune.prepare import (FinetuneInputError, TaskData, encode_task, micro_batch_stream, read_task,
                                       steps_per_epoch)
from pretrain.metrics import open_logger
from pretrain.signals import StopSignal
from pretrain.trainer import EXIT_REQUEUE, NonFiniteLossError, hold_run_dir, join_job, seed_everything
from pretrain.weights import EXTRA_FILE, read_json_object

log = logging.getLogger(__name__)

METRICS_FILE, PREDICTIONS_FILE, BEST_DIR, HF_DIR = "metrics.json", "predictions.jsonl", "best", "hf"
RESULT_FILE, CHECKPOINT_DIR = "result.json", "checkpoints"


def seed_dir(run_dir: str, seed: int) -> str:
    return os.path.join(run_dir, f"seed-{seed}")


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------
@dataclass
class Plan:
    """Batch and step counts of the run, derived once."""
    accum: int
    global_batch: int
    steps_per_epoch: int
    max_steps: int
    schedule: ScheduleConfig


def make_plan(cfg: FinetuneConfig, num_features: int, world_size: int) -> Plan:
    from pretrain.optim import resolve_warmup_steps
    t = cfg.training
    accum = cfg.grad_accum_steps(world_size)
    global_batch = t.micro_batch_size * accum * world_size
    per_epoch = steps_per_epoch(num_features, global_batch)
    max_steps = t.max_steps or t.epochs * per_epoch
    schedule = warmup_ratio_or_default(cfg.schedule)
    try:
        resolve_warmup_steps(schedule, max_steps)
    except ValueError:
        key, value = (("warmup_steps", schedule.warmup_steps) if schedule.warmup_steps is not None
                      else ("warmup_ratio", schedule.warmup_ratio))
        raise FinetuneInputError(f"schedule.{key}: {value} gives no decay: the warmup must be shorter than the "
                                 f"run's {max_steps} optimizer steps") from None
    return Plan(accum, global_batch, per_epoch, max_steps, schedule)


def load_model(cfg: FinetuneConfig, data: TaskData, seed: int):
    """(FinetuneModel, LoadReport) of model.checkpoint with the task's head, initialised from ``seed``."""
    from pretrain.finetune.model import from_pretrained
    seed_everything(seed, 0)          # the same fresh head on every rank
    try:
        model, report = from_pretrained(cfg.model.checkpoint, data.head_task, data.num_labels, labels=data.labels,
                                        problem_type=data.problem_type, head_dropout=cfg.model.head_dropout,
                                        new_head=cfg.model.new_head, random_init=cfg.model.init == "random",
                                        kernels=cfg.kernels)
    except (OSError, ValueError) as err:      # missing, not a checkpoint, bad head settings, damaged files
        raise FinetuneInputError(f"model.checkpoint: {err}") from None
    model.encoder.activation_checkpointing = cfg.training.activation_checkpointing
    return model, report


def finetune(cfg: FinetuneConfig, dist_env: DistEnv, stop: Optional[StopSignal] = None) -> Optional[dict]:
    """Fine-tune one run per seed, or continue an earlier run of the same config in the run dir (see the module
    doc); returns the summary written to RUN_DIR/metrics.json, or None when a stop signal ended the run after a
    checkpoint (``stop``: the process's StopSignal; None: no stop requests).  Raises FinetuneInputError (nothing
    written) for bad input, RunDirError when another run holds the run dir, CheckpointError when the run dir
    holds a run of another config or a checkpoint that cannot be resumed."""
    data = read_task(cfg)
    model, report = load_model(cfg, data, cfg.training.seeds[0])
    encode_task(data, cfg, report.tokenizer_dir, max_seq_len(model.config), model.config.vocab_size)
    plan = make_plan(cfg, len(data.train_features), dist_env.world_size)
    device = join_job(cfg, dist_env)
    run_dir, rank = cfg.logging.run_dir, dist_env.rank
    lock = hold_run_dir(run_dir, rank, device)
    try:
        prints = run_fingerprints(cfg)
        check_run_dir(run_dir, prints)
        if rank == 0:
            _write_text(os.path.join(run_dir, "config.yaml"), dump_config(cfg))
            _write_text(os.path.join(run_dir, ckpt.FINGERPRINTS), json.dumps(prints, indent=2) + "\n")
            for note in data.notes + _load_notes(report):
                print(note, flush=True)
        results = {}
        for i, seed in enumerate(cfg.training.seeds):
            result = finished_seed(run_dir, seed, rank)
            if result is None:
                if i:
                    model, _ = load_model(cfg, data, seed)
                result = train_seed(cfg, data, plan, model, seed, dist_env, device, prints, stop)
            model = None
            if result is None:          # stopped by a signal, checkpointed: the rerun continues here
                break
            results[seed] = result
        summary = summarize(data, results) if len(results) == len(cfg.training.seeds) else None
        if rank == 0 and summary is not None:
            _write_text(os.path.join(run_dir, METRICS_FILE), json.dumps(_finite(summary), indent=2) + "\n")
    finally:
        if lock is not None:
            os.close(lock)
    shutdown_distributed()
    return summary


def _load_notes(report) -> list[str]:
    notes = [f"model.checkpoint: {report.path} ({report.source})"]
    if report.new:
        more = f" ... ({len(report.new)} in all)" if len(report.new) > 6 else ""
        notes.append(f"  initialised fresh: {', '.join(report.new[:6])}{more}")
    return notes


# --------------------------------------------------------------------------------------------
# Resuming: the run's fingerprints, the seeds done
# --------------------------------------------------------------------------------------------
FINGERPRINTED = ("task", "token", "qa", "model", "training", "optimizer", "schedule", "eval")
# Not part of a seed's trajectory: the layout (the same global batches for any micro batch, accumulation and
# world size), the collective timeout and the non-finite limit (as pretraining's config_fingerprint), the dev
# batch size, activation checkpointing (the same losses); and the seed list: each seed's run is its own, so a
# rerun with more seeds adds them.
NOT_FINGERPRINTED = ("training.micro_batch_size", "training.grad_accum_steps", "training.collective_timeout_s",
                     "training.max_nonfinite_steps", "training.seeds", "eval.micro_batch_size",
                     "training.activation_checkpointing")
TASK_FILES = ("task.train", "task.dev")


def run_fingerprints(cfg: FinetuneConfig) -> dict:
    """{dotted key: value} of the keys that define each seed's training and result (FINGERPRINTED sections,
    less NOT_FINGERPRINTED; logging, checkpoint, zero and kernels are not among them); the task files by their
    contents' sha256, model.checkpoint as the directory it resolves to (a run's root: the ``latest`` of now)."""
    from data_prep.fsutil import sha256_file
    from pretrain.hf import is_hf_dir
    from pretrain.weights import resolve_checkpoint_dir
    d = cfg.to_dict()
    prints = {f"{section}.{key}": value for section in FINGERPRINTED for key, value in d[section].items()
              if f"{section}.{key}" not in NOT_FINGERPRINTED}
    source = cfg.model.checkpoint
    prints["model.checkpoint"] = os.path.abspath(source if is_hf_dir(source) else resolve_checkpoint_dir(source))
    for key in TASK_FILES:
        prints[key] = "sha256:" + sha256_file(prints[key])
    return json.loads(json.dumps(prints))           # as read back: tuples are lists


def check_run_dir(run_dir: str, prints: dict) -> None:
    """A CheckpointError, one line naming the keys that differ, when ``run_dir`` holds a run whose fingerprints
    (RUN_DIR/fingerprints.json) are not ``prints``: its seeds' results and checkpoints belong to another config."""
    path = os.path.join(run_dir, ckpt.FINGERPRINTS)
    if not os.path.isfile(path):
        return
    saved = read_json_object(path)
    diffs = [f"{key}: another file's contents" if key in TASK_FILES else
             f"{key}: {saved.get(key)!r} there, {prints.get(key)!r} now"
             for key in sorted(set(saved) | set(prints)) if saved.get(key) != prints.get(key)]
    if diffs:
        raise ckpt.CheckpointError(f"{run_dir} holds a run of another config ({'; '.join(diffs)}): rerun it with "
                                   f"its config ({os.path.join(run_dir, 'config.yaml')}), or choose another "
                                   f"logging.run_dir")


def finished_seed(run_dir: str, seed: int, rank: int) -> Optional[dict]:
    """What train_seed returned for ``seed`` in an earlier run into ``run_dir`` (SEED_DIR/result.json), or None."""
    out_dir = seed_dir(run_dir, seed)
    path = os.path.join(out_dir, RESULT_FILE)
    if not os.path.isfile(path):
        return None
    result = read_json_object(path)
    if rank == 0:
        shutil.rmtree(os.path.join(out_dir, CHECKPOINT_DIR), ignore_errors=True)   # a run ended before removing them
        print(f"seed {seed}: done in an earlier run ({path}): not trained again", flush=True)
    return result


def summarize(data: TaskData, results: dict[int, dict]) -> dict:
    """Per-seed results and the mean and standard deviation (ddof=1) of each dev metric over the seeds."""
    names = [k for k in results[next(iter(results))]["dev"]]
    mean, std = {}, {}
    for name in names:
        values = [r["dev"][name] for r in results.values()]
        mean[name] = statistics.fmean(values)
        std[name] = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"task": data.task_type, "metric": data.metric, "labels": data.labels,
            "seeds": {str(seed): {**r["dev"], **{k: v for k, v in r.items() if k != "dev"}}
                      for seed, r in results.items()},
            "mean": mean, "std": std}


def _finite(obj):
    """JSON-safe: non-finite floats (a correlation of constant predictions) as null."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_finite(v) for v in obj]
    return obj


# --------------------------------------------------------------------------------------------
# One seed
# --------------------------------------------------------------------------------------------
def finetune_stats(out, loss: torch.Tensor) -> dict:
    """The engine's per-micro-batch sums for a FinetuneOutput."""
    return {"loss_sum": loss.detach().float(), "micro_batches": torch.ones((), device=loss.device)}


@dataclass
class SeedState:
    """A seed's own state in its checkpoints, beside the engine's, the schedule's and the RNG states that
    pretrain.checkpoint saves (plain data, so that it loads weights-only)."""
    step: int                  # optimizer steps done; also the data position (a step is one global batch)
    world_size: int            # of the run that saved it
    zero_stage: int            # of the run that saved it: DeepSpeed's files differ by stage
    nonfinite: int = 0         # consecutive steps with a non-finite loss
    window: list = field(default_factory=list)   # this rank's _Window sums
    best: str = ""             # _Best.state()


def train_seed(cfg: FinetuneConfig, data: TaskData, plan: Plan, model, seed: int, dist_env: DistEnv,
               device: torch.device, prints: dict, stop: Optional[StopSignal] = None) -> Optional[dict]:
    """Train one seed, from the start or from its last checkpoint; returns {"dev": the best evaluation's
    metrics, "best_step", ...}, also written to SEED_DIR/result.json, or None when a stop signal ended it
    after a checkpoint.  ``prints``: the run's fingerprints (run_fingerprints), recorded in each checkpoint."""
    from pretrain.optim import build_scheduler
    rank, world = dist_env.rank, dist_env.world_size
    out_dir = seed_dir(cfg.logging.run_dir, seed)
    ckpt_root = os.path.join(out_dir, CHECKPOINT_DIR)
    resume_from, saved = ckpt.latest_tag(ckpt_root), ckpt.saved_trainer_state(ckpt_root)
    for what, then, now in (("rank(s)", (saved or {}).get("world_size"), world),
                            ("ZeRO stage", (saved or {}).get("zero_stage"), cfg.zero.stage)):
        if saved is not None and then != now:
            raise ckpt.CheckpointError(f"{os.path.join(ckpt_root, resume_from)} was saved with {what} {then} and this "
                                       f"run has {now}: a fine-tuning seed resumes with the world size and "
                                       f"zero.stage it stopped with (or remove {ckpt_root} to train seed {seed} again)")
    model.to(device).train()
    optimizer = build_finetune_optimizer(model, cfg.optimizer, cfg.kernels.lamb)
    scheduler = build_scheduler(optimizer, plan.schedule, plan.max_steps)
    engine = Engine(cfg, model, optimizer, scheduler, world, stop=stop, stats=finetune_stats)
    seed_everything(seed, rank)       # per-rank dropout streams
    keeper, window = _Best(cfg, data, engine, out_dir, rank, seed), _Window(device)
    state = SeedState(0, world, cfg.zero.stage)
    if resume_from is not None:
        state, _ = ckpt.load(engine, ckpt_root, rank=rank, current_prints=prints, allow_mismatch=False,
                             state_type=SeedState)
        keeper.restore(state.best)
        window.restore(state.window)
    t = cfg.training
    batches = micro_batch_stream(data.train_features, data.pad_id, plan.global_batch, t.micro_batch_size, plan.accum,
                                 rank, seed, t.length_grouped, t.length_group_batches, first_batch=state.step)
    logger = open_logger(out_dir, device, rank=rank, max_steps=plan.max_steps, start_step=state.step,
                         tensorboard=cfg.logging.tensorboard, progress_bar=cfg.logging.progress_bar,
                         trackers=cfg.logging)
    logger.log_run(state.step, cfg.to_dict(), world)
    if resume_from is not None:
        logger.message(f"seed {seed}: resumed from {os.path.join(ckpt_root, resume_from)} at step {state.step}")
    nonfinite, step, stopped_early = state.nonfinite, state.step, False
    try:
        for step in range(state.step + 1, plan.max_steps + 1):
            log_now = step % cfg.logging.every_steps == 0 or step == plan.max_steps
            # the head's rate (layer_lr_decay lowers the others), read before the update steps the scheduler
            lr = max(engine.scheduler.get_last_lr()) if log_now else None
            totals, applied, signals = engine.step(lambda: next(batches)[1], step)
            nonfinite = 0 if applied else nonfinite + 1
            if nonfinite >= t.max_nonfinite_steps:
                raise NonFiniteLossError(f"{nonfinite} consecutive steps with a non-finite loss "
                                         f"(training.max_nonfinite_steps) at step {step}: lower optimizer.lr")
            if applied:
                window.add(totals)
            if log_now:
                logger.log(step, {**window.reduce(), "train/lr": lr, "train/epoch": step / plan.steps_per_epoch})
            logger.advance(step)
            every = cfg.eval.every_steps
            if step % plan.steps_per_epoch == 0 or (every and step % every == 0) or step == plan.max_steps:
                metrics = keeper.evaluate(step, step / plan.steps_per_epoch)
                logger.log(step, {f"dev/{k}": v for k, v in metrics.items()}, kind="eval")
                if keeper.exhausted():
                    logger.message(f"seed {seed}: early stopping at step {step}: no better dev {data.metric} in "
                                   f"{cfg.eval.early_stopping_patience} evaluations (best {keeper.value:.4f} at "
                                   f"step {keeper.step})")
                    stopped_early = step < plan.max_steps
                    break
            if signals or (cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0
                           and step < plan.max_steps):
                ckpt.save(engine, ckpt_root, SeedState(step, world, cfg.zero.stage, nonfinite, window.state(), keeper.state()),
                          cfg=None, prints=prints, rank=rank, keep_last=cfg.checkpoint.keep_last, extra={})
            if signals:
                logger.message(f"seed {seed}: {signals} received: checkpoint saved at step {step}; exiting with "
                               f"{EXIT_REQUEUE} (checkpointed, not finished: requeue or rerun to continue)")
                return None
    finally:
        logger.close()
    keeper.finish()
    result = {"dev": keeper.metrics, "best_step": keeper.step, "best_epoch": keeper.epoch, "steps": step,
              "early_stopped": stopped_early}
    if rank == 0:       # JSON's NaN included: read back, the seed's metrics are the same floats
        _write_text(os.path.join(out_dir, RESULT_FILE), json.dumps(result, indent=2) + "\n")
        shutil.rmtree(ckpt_root, ignore_errors=True)
    return result


class _Window:
    """The training loss between two log lines (summed on device, reduced over ranks when logged)."""

    def __init__(self, device: torch.device):
        self.device, self.sums = device, None

    def add(self, totals: dict) -> None:
        pair = (totals["loss_sum"], totals["micro_batches"])
        self.sums = pair if self.sums is None else (self.sums[0] + pair[0], self.sums[1] + pair[1])

    def state(self) -> list[float]:
        """The sums so far, for a checkpoint ([] when none)."""
        return [] if self.sums is None else [s.item() for s in self.sums]

    def restore(self, state: list[float]) -> None:
        self.sums = tuple(torch.tensor(v, device=self.device) for v in state) or None   # float32, as added up

    def reduce(self) -> dict:
        local = (torch.stack(self.sums).double() if self.sums is not None
                 else torch.zeros(2, dtype=torch.float64, device=self.device))
        loss_sum, micro = all_reduce_sum(local).tolist()
        self.sums = None
        return {"train/loss": loss_sum / micro} if micro else {}


class _Best:
    """Evaluations of one seed and the best of them: its metrics, predictions and checkpoint."""

    def __init__(self, cfg: FinetuneConfig, data: TaskData, engine: Engine, out_dir: str, rank: int, seed: int):
        self.cfg, self.data, self.engine, self.out_dir, self.rank, self.seed = cfg, data, engine, out_dir, rank, seed
        self.value: Optional[float] = None
        self.metrics: dict = {}
        self.records: list = []
        self.step = self.epoch = 0
        self.stale = 0
        self._cpu_model = None

    def evaluate(self, step: int, epoch: float) -> dict:
        cfg, data, engine = self.cfg, self.data, self.engine
        engine.eval()
        batch_size = cfg.eval.micro_batch_size or 2 * cfg.training.micro_batch_size
        world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        outputs, loss = dev_outputs(engine, data.dev_features, data.pad_id, batch_size, engine.device, self.rank, world)
        engine.train()
        metrics, records = dev_metrics(data, outputs, loss, cfg)
        value = metrics[data.metric]
        if better(value, self.value, data.metric):
            self.value, self.metrics, self.records, self.step, self.epoch = value, metrics, records, step, epoch
            self.stale = 0
            if cfg.checkpoint.best:
                self._save(step, epoch)
        else:
            self.stale += 1
        return metrics

    def state(self) -> str:
        """The evaluations so far, for a checkpoint: JSON (NaN and numpy floats come back as the same floats)."""
        return json.dumps({"value": self.value, "metrics": self.metrics, "records": self.records, "step": self.step,
                           "epoch": self.epoch, "stale": self.stale})

    def restore(self, state: str) -> None:
        for key, value in json.loads(state).items():
            setattr(self, key, value)

    def exhausted(self) -> bool:
        patience = self.cfg.eval.early_stopping_patience
        return bool(patience) and self.stale >= patience

    def _save(self, step: int, epoch: float) -> None:
        from pretrain.finetune.model import FinetuneModel, save_finetuned
        from pretrain.weights import TOKENIZER_DIR, copy_tokenizer
        state = self.engine.consolidated_state_dict(self.rank)     # every rank: ZeRO-3 gathers
        if self.rank != 0:
            return
        model = self.engine.model
        if self._cpu_model is None:
            with torch.random.fork_rng(devices=[]):   # its initialisation must not move the dropout stream on
                self._cpu_model = FinetuneModel(model.config, model.head)
        self._cpu_model.load_state_dict(state)
        best = os.path.join(self.out_dir, BEST_DIR)
        tmp, old = os.path.join(self.out_dir, ".best.tmp"), os.path.join(self.out_dir, ".best.old")
        shutil.rmtree(tmp, ignore_errors=True)
        extra = {"tokenizer_dir": os.path.abspath(self.data.tokenizer_dir),
                 "finetune": {"seed": self.seed, "step": step, "epoch": epoch, "metric": self.data.metric,
                              "value": self.value, "task": self.data.task_type}}
        save_finetuned(self._cpu_model, tmp, extra=extra)
        copy_tokenizer(self.data.tokenizer_dir, os.path.join(tmp, TOKENIZER_DIR))
        if os.path.isdir(best):
            os.replace(best, old)
        os.replace(tmp, best)
        shutil.rmtree(old, ignore_errors=True)

    def finish(self) -> None:
        """Rank 0: the best evaluation's predictions, and the transformers export of the best model."""
        if self.rank != 0:
            return
        lines = "".join(json.dumps(_finite(r)) + "\n" for r in self.records)
        _write_text(os.path.join(self.out_dir, PREDICTIONS_FILE), lines)
        if self.cfg.checkpoint.best and self.cfg.checkpoint.export_hf and self.step:
            from pretrain.hf import export_finetuned
            export_finetuned(self._best_model(), os.path.join(self.out_dir, HF_DIR), self.data.tokenizer_dir)

    def _best_model(self):
        """The best model's weights: still in memory when this run saved them (what _save wrote to BEST_DIR),
        else (a resumed run that found no better model since its checkpoint) read back from BEST_DIR."""
        if self._cpu_model is not None:
            return self._cpu_model
        from pretrain.finetune.model import from_pretrained
        best = os.path.join(self.out_dir, BEST_DIR)
        saved_step = read_json_object(os.path.join(best, EXTRA_FILE))["finetune"]["step"]
        if saved_step != self.step:   # the stopped run found a better model after its checkpoint, this one did not
            log.warning("%s holds the model of step %s, not of the best evaluation's step %s: the resumed run "
                        "evaluated differently from the stopped one (not deterministic)", best, saved_step, self.step)
        return from_pretrained(best)[0]


def _write_text(path: str, text: str) -> None:
    from pretrain.weights import atomic_write_text
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, text)


# --------------------------------------------------------------------------------------------
# The optimizer: pretraining's decay groups, split by layer for layer-wise LR decay
# --------------------------------------------------------------------------------------------
def layer_depth(name: str, m) -> int:
    """Depth of a FinetuneModel parameter for LLRD: 0 the embeddings, i + 1 encoder layer i (ALBERT's one
    shared layer, and pre-LN's final norm: the top layer, L), L + 1 the head (pooler, output layer)."""
    if name.startswith("embeddings."):
        return 0
    if name.startswith("encoder.layers."):
        return m.num_layers if m.share_layers else int(name.split(".")[2]) + 1
    if name.startswith("encoder."):
        return m.num_layers
    return m.num_layers + 1


def build_finetune_optimizer(model, opt_cfg, kernels_lamb: str = "reference") -> torch.optim.Optimizer:
    """pretrain.optim.build_optimizer's optimizer; with ``opt_cfg.layer_lr_decay`` f < 1 its groups are
    (depth, decay / no decay), depth d at lr x f^(L + 1 - d) (see layer_depth), the top first; each group
    records its ``layer`` (depth) and parameter ``names``."""
    from pretrain.optim import Lamb, build_optimizer, param_groups
    optimizer = build_optimizer(model, opt_cfg, kernels_lamb)
    decay = opt_cfg.layer_lr_decay
    if decay == 1.0:
        return optimizer
    m = model.config
    by_depth = defaultdict(list)
    for name, param in model.named_parameters():
        by_depth[layer_depth(name, m)].append((name, param))
    groups = []
    for depth in sorted(by_depth, reverse=True):
        for group in param_groups(by_depth[depth], opt_cfg.weight_decay):
            group.update(lr=opt_cfg.lr * decay ** (m.num_layers + 1 - depth), layer=depth)
            if not isinstance(optimizer, Lamb):
                del group["exclude_from_adaptation"]    # a LAMB notion, as build_optimizer drops it
            groups.append(group)
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.add_param_group(group)
    return optimizer
