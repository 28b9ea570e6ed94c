"""The training engine: the only package that imports DeepSpeed.

:class:`Engine` owns what training asks of DeepSpeed: building it around our model and client
optimizer (``deepspeed.initialize``, with the ZeRO partition layout handed to LAMB as plain data:
``layout.py``), one optimizer step of micro-batches with its non-finite skip and the stop
agreement, gradient norm and loss scale, consolidated weights (gathered under ZeRO-3), and
checkpoint save/load through the safe loader (``files.py``, universal conversion included).
``config.py`` derives DeepSpeed's JSON from our Config (pretraining's, or any config with the sections
the engine reads: ``config.EngineSettings``, which fine-tuning's has).  Nothing outside this package reads
DeepSpeed's objects or private attributes; tests/pretrain/test_boundaries.py checks that no
other module imports deepspeed.
"""
from __future__ import annotations

import datetime
import logging
import signal
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist

from pretrain.engine.config import EngineSettings, deepspeed_config
from pretrain.engine.files import convert_to_universal, load_checkpoint, save_checkpoint
from pretrain.engine.layout import attach_layout
from pretrain.faults import NO_FAULTS, Faults
from pretrain.optim.hold import HoldableStep
from pretrain.signals import STOP_SIGNALS, StopSignal

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineSettings", "agree", "all_reduce_sum", "convert_to_universal", "deepspeed_config",
           "init_distributed", "initialize", "shutdown_distributed"]


def init_distributed(backend: str, timeout_s: int) -> None:
    """Join the process group (env:// variables already exported by the entry point)."""
    import deepspeed

    if dist.is_initialized():
        return
    if backend == "gloo":
        # CPU runs (CI) use plain gloo collectives.  DeepSpeed would otherwise JIT-compile its
        # shared-memory comm op on first use: slow on a fresh machine, and a process killed
        # mid-build leaves a lock in torch's extension cache that hangs every later start.
        import deepspeed.ops
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
                               verbose=False)


def shutdown_distributed() -> None:
    """Leave the process group at the end of a run, all ranks together.  Left to the interpreter's
    shutdown, gloo's worker threads can still be running while it tears down, and the process
    aborts ("terminate called without an active exception", SIGABRT) after a clean run
    (pytorch/pytorch#190489 has the mechanism).  Destroying the group on a rank that finished
    early, while rank 0 was still writing the final checkpoint, aborted the same way (seen twice
    in 2-rank CPU test runs), so every rank first waits at a barrier for the others.

    The group is destroyed through deepspeed.comm, which also drops the process groups DeepSpeed
    cached (its clone of the world group): a later init_distributed in the same process (several
    fine-tuning runs in one test process) then starts clean instead of broadcasting over a dead group."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        from deepspeed.comm import comm as ds_comm
        if ds_comm.cdb is not None and ds_comm.cdb.is_initialized():
            ds_comm.destroy_process_group()
        else:                       # joined without DeepSpeed's backend
            dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def agree(error: Optional[Exception], device: torch.device, elsewhere: Exception) -> None:
    """Raise on every rank if any rank failed: ``error`` where it happened, ``elsewhere`` on the others
    (one rank's failure must not leave the others waiting in the next collective)."""
    failed = all_reduce_sum(torch.tensor([0.0 if error is None else 1.0], device=device))
    if error is not None:
        raise error
    if failed.item() > 0:
        raise elsewhere


def initialize(model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict):
    """``deepspeed.initialize`` around a holdable client optimizer, then its partition layout
    attached (see layout.attach_layout).  Returns (DeepSpeed engine, what was attached).  Steps
    DeepSpeed takes inside initialize (fp16 without ZeRO steps once on zero gradients to create
    state) are held: the optimizer creates its state at the first real step."""
    import deepspeed

    if not isinstance(optimizer, HoldableStep):
        raise TypeError(f"the engine steps a holdable optimizer (pretrain.optim.hold); got {type(optimizer).__name__}")
    with optimizer.held():
        ds_engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return ds_engine, attach_layout(ds_engine, optimizer)


class Engine:
    """Model + client optimizer + LR scheduler under DeepSpeed, built from the Config.

    ``accum`` micro-batches make one optimizer step.  ``stop``: the process's StopSignal, whose
    flag goes into the step's one collective (None: no stop requests).  ``faults``: what the
    tests inject (pretrain.faults).  ``stats``: the detached sums ``step`` adds up over a step's
    micro-batches, from the model's output and the loss (default: pretraining's, of a PretrainOutput);
    they must hold ``loss_sum``, the loss whose finiteness every rank agrees on."""

    def __init__(self, cfg: EngineSettings, model: torch.nn.Module, optimizer: HoldableStep, scheduler,
                 world_size: int, *, load_universal: bool = False, stop: Optional[StopSignal] = None,
                 faults: Faults = NO_FAULTS, stats: Optional[Callable[[Any, torch.Tensor], dict]] = None):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.stats = stats or output_stats
        self.zero_stage, self.precision = cfg.zero.stage, cfg.training.precision
        self.accum = cfg.grad_accum_steps(world_size)
        self.stop, self.faults = stop, faults
        self._ds, self.layout_kind = initialize(model, optimizer, deepspeed_config(cfg, world_size, load_universal))
        self.compiled = cfg.kernels.compile
        if self.compiled:
            self._ds.compile()  # torch.compile of the wrapped module; state-dict names unchanged

    @property
    def device(self) -> torch.device:
        return self._ds.device

    @property
    def training(self) -> bool:
        return self._ds.training

    def train(self, mode: bool = True) -> "Engine":
        self._ds.train(mode)
        return self

    def eval(self) -> "Engine":
        return self.train(False)

    def __call__(self, **batch):
        """The model's forward through DeepSpeed (evaluation calls this)."""
        return self._ds(**batch)

    def step(self, next_batch: Callable[[], dict], number: int) -> tuple[dict, bool, Optional[str]]:
        """Optimizer step ``number`` (counted from 1): ``accum`` micro-batches, then the update.

        Returns (summed detached metrics, whether the update was applied, the stop signals any rank
        has received, e.g. "SIGTERM" or "SIGTERM and SIGUSR1", or None).  The update is held on
        every rank when the loss was not finite on any; every rank gets the same answer, so all
        stop at the same step even when the signal reached one rank only, or the ranks a step apart.
        """
        totals: Optional[dict] = None
        stop_request: Optional[str] = None
        skip = False
        for micro in range(self.accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next_batch().items()}
            out = self._ds(**batch)
            loss = self.faults.loss(number, out.loss)
            stats = self.stats(out, loss)
            totals = stats if totals is None else {k: totals[k] + stats[k] for k in totals}
            if micro == self.accum - 1:
                # One host sync per optimizer step: every rank must agree whether to skip, and whether to stop.
                received = self.stop.received if self.stop is not None else None
                flags = torch.tensor([float(received == sig) for sig in STOP_SIGNALS], device=loss.device)
                local = torch.cat([(~torch.isfinite(totals["loss_sum"])).float().reshape(1), flags])
                counts = all_reduce_sum(local).tolist()
                skip = counts[0] > 0
                names = [signal.Signals(sig).name for sig, count in zip(STOP_SIGNALS, counts[1:]) if count]
                stop_request = " and ".join(names) or None
            self._ds.backward(loss)
            with self.optimizer.held(skip):
                self._ds.step()
        applied = not skip and not self._fp16_overflowed()
        if applied:
            self.scheduler.step()
        return totals, applied, stop_request

    def _fp16_overflowed(self) -> bool:
        return bool(getattr(self._ds, "skipped_steps", 0)) and bool(getattr(self._ds.optimizer, "overflow", False))

    def grad_norm(self) -> float:
        """The global gradient norm of the last update (before clipping); NaN when unknown."""
        norm = self._ds.get_global_grad_norm()
        if norm is None:
            return float("nan")
        return float(norm.item() if torch.is_tensor(norm) else norm)

    def loss_scale(self) -> Optional[float]:
        """fp16's current dynamic loss scale (None for fp32/bf16)."""
        return float(self._ds.optimizer.cur_scale) if self.precision == "fp16" else None

    def consolidated_state_dict(self, rank: int) -> Optional[dict]:
        """Full fp32 model weights on rank 0 (gathers the partitions under ZeRO-3), None elsewhere."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(self.model.parameters()), modifier_rank=None,
                                               enabled=self.zero_stage == 3):
            if rank != 0:
                return None
            return {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}

    def save(self, save_dir: str, tag: str, client_state: dict) -> None:
        """DeepSpeed's files of this step into ``save_dir/tag`` (see files.save_checkpoint)."""
        save_checkpoint(self._ds, save_dir, tag, client_state)

    def load(self, load_dir: str, tag: str, load_optimizer_states: bool) -> Optional[str]:
        """DeepSpeed's files of ``load_dir/tag`` through safe_torch_load; the loaded path, or None
        if DeepSpeed found none.  A refused or damaged file raises UnreadableFileError naming it."""
        return load_checkpoint(self._ds, load_dir, tag, load_optimizer_states)


def output_stats(out, loss: torch.Tensor) -> dict:
    """Pretraining's detached sums for metrics, of a PretrainOutput (no host sync here)."""
    zero = torch.zeros((), device=loss.device)
    return {
        "loss_sum": loss.detach().float(),
        "mlm_loss_sum": out.mlm_loss.detach().float(),
        "sentence_loss_sum": out.sentence_loss.detach().float() if out.sentence_loss is not None else zero,
        "mlm_correct": out.mlm_correct.float(), "mlm_count": out.mlm_count.float(),
        "sentence_correct": out.sentence_correct.float() if out.sentence_correct is not None else zero,
        "sentence_count": out.sentence_count.float() if out.sentence_count is not None else zero,
        "micro_batches": torch.ones((), device=loss.device),
    }
