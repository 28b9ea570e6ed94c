"""The only module that talks to DeepSpeed.

``deepspeed_config`` derives DeepSpeed's JSON from our Config in one place (micro batch x
accumulation x data-parallel size computed once); ``build_engine`` wraps model + client optimizer;
``Stepper`` runs one optimizer step of micro-batches, skipping steps whose loss is not finite; the
same per-step collective tells every rank which stop signals any rank has received.
``load_checkpoint`` and ``convert_to_universal`` read DeepSpeed's checkpoint files through
``safe_torch_load``: tensors, plain data and the few DeepSpeed classes those files hold, nothing else.
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import signal
import subprocess
import sys
import types
from typing import Callable, Iterator, Optional

import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.optim import deepspeed_config_entries
from pretrain.signals import STOP_SIGNALS, StopSignal
from pretrain.weights import UnreadableFileError, load_torch_file, write_error

log = logging.getLogger(__name__)

UNREADABLE_EXIT = 3   # _ds_to_universal_main: a file was refused or damaged (message: last stderr line)


def deepspeed_config(cfg: Config, world_size: int, load_universal: bool = False) -> dict:
    """DeepSpeed's config, derived from ours (the single source of truth).

    ``load_universal``: the checkpoint to resume from was written with another world size and is
    loaded through DeepSpeed's universal (re-partitionable) format."""
    t, z = cfg.training, cfg.zero
    accum = cfg.grad_accum_steps(world_size)
    ds = {
        "train_batch_size": t.micro_batch_size * accum * world_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accum,
        "steps_per_print": 10**9,           # we log ourselves
        "wall_clock_breakdown": False,
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,
                 "initial_scale_power": t.initial_loss_scale_power,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "zero_optimization": {
            "stage": z.stage,
            "overlap_comm": z.overlap_comm,
            "contiguous_gradients": True,
            "reduce_bucket_size": z.reduce_bucket_size,
            "allgather_bucket_size": z.reduce_bucket_size,
        },
    }
    ds.update(deepspeed_config_entries(cfg.optimizer))   # gradient clipping, client-optimizer permission
    if z.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params == "cpu":
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if z.stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


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
    in 2-rank CPU test runs), so every rank first waits at a barrier for the others."""
    if dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def build_engine(cfg: Config, model: torch.nn.Module, optimizer: torch.optim.Optimizer, world_size: int,
                 load_universal: bool = False):
    """deepspeed.initialize with our client optimizer; returns the engine."""
    import deepspeed

    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                           config=deepspeed_config(cfg, world_size, load_universal))
    if cfg.kernels.compile:
        engine.compile()  # torch.compile of the wrapped module; state-dict names unchanged
    return engine


def _checkpoint_classes() -> list:
    """The classes DeepSpeed pickles into its model/optimizer state files besides tensors and
    plain containers (loss scaler, ZeRO stage enum, fragment addresses of the bf16/ZeRO-1/2 state)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


@contextlib.contextmanager
def _torch_function_replaced(name: str, replacement: Callable) -> Iterator[Callable]:
    """Within: ``torch.<name>`` is ``replacement``; yields the original.  DeepSpeed calls
    torch.load / torch.save directly in places its checkpoint-engine hook does not reach."""
    original = getattr(torch, name)
    setattr(torch, name, replacement)
    try:
        yield original
    finally:
        setattr(torch, name, original)


def safe_torch_load() -> contextlib.AbstractContextManager:
    """Within: every ``torch.load`` (DeepSpeed's, which asks for weights_only=False, included)
    unpickles only tensors, plain data and _checkpoint_classes(); any other file is refused with an
    UnreadableFileError naming it."""
    allowed = _checkpoint_classes()

    def load(f, map_location=None, *_args, **_kwargs):
        return load_torch_file(f, allowed, map_location)

    return _torch_function_replaced("load", load)


def save_checkpoint(engine, save_dir: str, tag: str, client_state: dict) -> None:
    """engine.save_checkpoint (no `latest` of DeepSpeed's); a failed write of one of its files
    (disk full) raises write_error's CheckpointError naming that file."""
    def save(obj, f, *args, **kwargs):
        try:
            return original(obj, f, *args, **kwargs)
        except (OSError, RuntimeError) as err:   # torch.save reports write errors as RuntimeError
            raise write_error(str(f), err) from None

    with _torch_function_replaced("save", save) as original:
        engine.save_checkpoint(save_dir, tag=tag, save_latest=False, client_state=client_state)


def load_checkpoint(engine, load_dir: str, tag: str, load_optimizer_states: bool) -> Optional[str]:
    """engine.load_checkpoint through safe_torch_load; the loaded path, or None if DeepSpeed found none."""
    with safe_torch_load():
        load_path, _ = engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                              load_lr_scheduler_states=False)
    return load_path


def convert_to_universal(ckpt_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal in a subprocess whose loads go through safe_torch_load.
    Raises UnreadableFileError for a refused or damaged file, RuntimeError for any other failure."""
    runner = ("import sys; from pretrain.engine import _ds_to_universal_main; "
              "sys.exit(_ds_to_universal_main(sys.argv[1:]))")
    # Forced weights-only loads are the backstop should a worker start without our patch (spawn).
    env = {**os.environ, "TORCH_FORCE_WEIGHTS_ONLY_LOAD": "1"}
    env.pop("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", None)
    proc = subprocess.run([sys.executable, "-c", runner, "--input_folder", ckpt_dir, "--output_folder", out_dir,
                           "--num_extract_workers", "1", "--num_merge_workers", "1"],
                          capture_output=True, text=True, env=env)
    lines = proc.stderr.strip().splitlines()
    if proc.returncode == UNREADABLE_EXIT and lines:
        raise UnreadableFileError(lines[-1])
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])


def _ds_to_universal_main(argv: list[str]) -> int:
    import runpy
    sys.argv = ["ds_to_universal", *argv]
    try:
        with safe_torch_load():
            runpy.run_module("deepspeed.checkpoint.ds_to_universal", run_name="__main__", alter_sys=True)
    except UnreadableFileError as err:
        print(err, file=sys.stderr)
        return UNREADABLE_EXIT
    return 0


class SkippableStep:
    """Wrap a client optimizer's ``step`` so the trainer can veto one update (install it before
    the LR scheduler is built, which wraps ``step`` in turn).

    DeepSpeed's ZeRO wrapper calls the client optimizer's ``step``; for fp32/bf16 DeepSpeed has
    no overflow check of its own, so a non-finite loss would poison the weights.  The trainer
    sets ``skip`` before the boundary micro-step; the update is dropped, DeepSpeed's bookkeeping
    (micro-step counters, gradient buffers) still advances.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.skip = False
        guarded = optimizer.step
        guard = self

        def step(_optimizer, *args, **kwargs):
            if guard.skip:
                return None
            return guarded(*args, **kwargs)

        # A bound method, as torch's LR schedulers expect to wrap one.
        optimizer.step = types.MethodType(step, optimizer)


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


class Stepper:
    """One optimizer step = ``accum`` micro-batches through the DeepSpeed engine.

    ``stop``: the process's StopSignal, whose flag goes into the step's one collective (none: no
    stop requests)."""

    def __init__(self, engine, guard: SkippableStep, scheduler, accum: int, device: torch.device,
                 stop: Optional[StopSignal] = None):
        self.engine, self.guard, self.scheduler, self.accum, self.device = engine, guard, scheduler, accum, device
        self.stop = stop
        self.poison_loss = False   # fault injection for tests: make this step's loss NaN

    def step(self, next_batch: Callable[[], dict]) -> tuple[dict, bool, Optional[str]]:
        """Run the micro-batches; return (summed detached metrics, whether the update was applied,
        the stop signals any rank has received, e.g. "SIGTERM" or "SIGTERM and SIGUSR1", or None).
        Every rank gets the same answer, so all stop at the same step even when the signal reached
        one rank only, or the ranks a step apart."""
        totals: Optional[dict] = None
        stop_request: Optional[str] = None
        for micro in range(self.accum):
            batch = {k: v.to(self.device, non_blocking=True) for k, v in next_batch().items()}
            out = self.engine(**batch)
            loss = out.loss * float("nan") if self.poison_loss else out.loss
            stats = _output_stats(out, loss)
            totals = stats if totals is None else {k: totals[k] + stats[k] for k in totals}
            if micro == self.accum - 1:
                # One host sync per optimizer step: every rank must agree whether to skip, and whether to stop.
                received = self.stop.received if self.stop is not None else None
                flags = torch.tensor([float(received == sig) for sig in STOP_SIGNALS], device=loss.device)
                local = torch.cat([(~torch.isfinite(totals["loss_sum"])).float().reshape(1), flags])
                counts = all_reduce_sum(local).tolist()
                self.guard.skip = counts[0] > 0
                names = [signal.Signals(sig).name for sig, count in zip(STOP_SIGNALS, counts[1:]) if count]
                stop_request = " and ".join(names) or None
            self.engine.backward(loss)
            self.engine.step()
        applied = not self.guard.skip and not _fp16_overflowed(self.engine)
        self.guard.skip = False
        if applied:
            self.scheduler.step()
        return totals, applied, stop_request


def _fp16_overflowed(engine) -> bool:
    return bool(getattr(engine, "skipped_steps", 0)) and bool(getattr(engine.optimizer, "overflow", False))


def _output_stats(out, loss: torch.Tensor) -> dict:
    """Detached sums for metrics (no host sync here)."""
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
