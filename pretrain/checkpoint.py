"""Checkpoints: DeepSpeed state + our training state, crash-safe, last K kept, fingerprinted.

Layout under ``<run_dir>/<checkpoint.dir>``::

    step-000100/            DeepSpeed files (model, optimizer partitions, loss scaler) +
                            trainer_state.pt  (step, data position, RNG states, scheduler, counters)
                            model.pt + config.yaml   (consolidated fp32 weights: export/eval/phase 2)
                            fingerprints.json
    latest                  text file naming the newest complete step directory

A save writes into ``.tmp-step-000100``; after every rank has finished, rank 0 renames it to
``step-000100`` and then replaces ``latest`` atomically (write temp, os.replace).  A crash at any
point leaves ``latest`` naming the previous complete checkpoint; stale ``.tmp-*`` dirs are removed
by the next save.  Only the engine module talks to DeepSpeed: this module receives the engine.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
import torch.distributed as dist

from pretrain.config import Config
from pretrain.weights import save_weights

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
FINGERPRINTS = "fingerprints.json"


class CheckpointError(RuntimeError):
    pass


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def latest_tag(root: str) -> Optional[str]:
    """The tag named by ``root/latest`` if it points at an existing directory, else None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    tag = open(pointer, encoding="utf-8").read().strip()
    if not tag or not os.path.isdir(os.path.join(root, tag)):
        raise CheckpointError(f"{pointer} names {tag!r}, which is not a directory in {root}")
    return tag


def list_checkpoints(root: str) -> list[str]:
    if not os.path.isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith("step-") and os.path.isdir(os.path.join(root, d)))


# --------------------------------------------------------------------------------------------
# Fingerprints: what must match for a resume to be the same run
# --------------------------------------------------------------------------------------------
def _sha(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def config_fingerprint(cfg: Config) -> str:
    """Hash of the settings that define the training trajectory.  Excluded on purpose: micro
    batch, accumulation and world size (resume with another layout is allowed), logging,
    checkpoint, eval, loader workers and kernel choices (numerics-equivalent implementations)."""
    d = cfg.to_dict()
    training = {k: v for k, v in d["training"].items()
                if k not in ("micro_batch_size", "grad_accum_steps", "collective_timeout_s", "max_nonfinite_steps")}
    return _sha({"model": d["model"], "optimizer": d["optimizer"], "schedule": d["schedule"],
                 "training": training, "zero_stage_irrelevant": True,
                 "mlm_probability": d["data"]["mlm_probability"]})


def fingerprints(cfg: Config, data_fingerprint: str, tokenizer_hash: Optional[str]) -> dict:
    return {"config": config_fingerprint(cfg), "data": data_fingerprint, "tokenizer": tokenizer_hash}


def check_fingerprints(saved: dict, current: dict, where: str, allow_mismatch: bool) -> list[str]:
    """Compare; raise unless allowed.  Returns the list of mismatches (for the log)."""
    diffs = [f"{k}: checkpoint {saved.get(k)!r} != this run {current.get(k)!r}"
             for k in sorted(current) if saved.get(k) != current.get(k)]
    if diffs and not allow_mismatch:
        raise CheckpointError(
            f"cannot resume from {where}: it was made by a different run\n  " + "\n  ".join(diffs) +
            "\nstart a new run_dir, or set checkpoint.allow_fingerprint_mismatch=true to resume anyway")
    return diffs


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# --------------------------------------------------------------------------------------------
# Save / load
# --------------------------------------------------------------------------------------------
@dataclass
class TrainerState:
    step: int                 # optimizer steps done
    samples_consumed: int     # position in the global sample order (independent of world size)
    skipped_steps: int = 0    # steps skipped for a non-finite loss
    world_size: int = 1       # of the run that saved it


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def save(engine, root: str, state: TrainerState, *, cfg: Config, scheduler, prints: dict,
         consolidated_state_dict: Optional[dict], rank: int, keep_last: int, extra: dict,
         crash_before_commit: bool = False) -> str:
    """Save a checkpoint for ``state.step`` on every rank; return its directory.

    ``consolidated_state_dict`` is the full fp32 model state on rank 0 (None elsewhere).
    """
    tag = step_tag(state.step)
    tmp_tag = f".tmp-{tag}"
    final_dir, tmp_dir = os.path.join(root, tag), os.path.join(root, tmp_tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    _barrier()
    # universal_checkpoint_info lets DeepSpeed's ds_to_universal re-partition the optimizer state
    # when a run resumes with another world size (see load()).
    engine.save_checkpoint(root, tag=tmp_tag, save_latest=False,
                           client_state={"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
    # Every rank writes its own RNG state: dropout masks differ per rank.
    torch.save({"trainer": state.__dict__, "rng": rng_state(), "scheduler": scheduler.state_dict()},
               os.path.join(tmp_dir, f"rank{rank:05d}_{TRAINER_STATE}"))
    if rank == 0:
        save_weights(tmp_dir, cfg, consolidated_state_dict, extra=extra)
        atomic_write_text(os.path.join(tmp_dir, FINGERPRINTS), json.dumps(prints, indent=2))
    if crash_before_commit:   # fault injection for tests: die with the save half done
        os._exit(137)
    _barrier()
    if rank == 0:
        if os.path.isdir(final_dir):          # re-saving the same step (e.g. signal at the end)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write_text(os.path.join(root, LATEST), tag + "\n")
        for old in list_checkpoints(root)[:-keep_last]:
            shutil.rmtree(os.path.join(root, old), ignore_errors=True)
    _barrier()
    return final_dir


def saved_world_size(root: str) -> Optional[int]:
    """World size of the run that wrote ``root/latest`` (None when there is no checkpoint)."""
    tag = latest_tag(root)
    if tag is None:
        return None
    saved = torch.load(os.path.join(root, tag, f"rank{0:05d}_{TRAINER_STATE}"), weights_only=False)
    return int(saved["trainer"]["world_size"])


def _to_universal(root: str, tag: str, rank: int) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (re-partitionable for any world size)
    on rank 0; return the tag to load it by.  The engine must be built with load_universal."""
    import subprocess
    import sys

    universal_tag = f".universal-{tag}"
    target = os.path.join(root, universal_tag)
    if rank == 0 and not os.path.isdir(target):
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                               os.path.join(root, tag), "--output_folder", tmp, "--num_extract_workers", "1",
                               "--num_merge_workers", "1"], capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"converting {os.path.join(root, tag)} to DeepSpeed's universal format for a "
                                  f"new world size failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp, target)
    _barrier()
    return universal_tag


def load(engine, root: str, *, rank: int, scheduler, current_prints: dict, allow_mismatch: bool,
         load_optimizer: bool = True, universal: bool = False) -> tuple[Optional[TrainerState], list[str]]:
    """Resume from ``root/latest`` if there is one.  Returns (state or None, fingerprint diffs).

    ``universal``: the checkpoint was written with another world size; it is converted to
    DeepSpeed's universal format first (the engine was built with ``load_universal``).
    """
    tag = latest_tag(root)
    if tag is None:
        return None, []
    ckpt_dir = os.path.join(root, tag)
    with open(os.path.join(ckpt_dir, FINGERPRINTS), encoding="utf-8") as f:
        diffs = check_fingerprints(json.load(f), current_prints, ckpt_dir, allow_mismatch)
    load_tag = _to_universal(root, tag, rank) if universal else tag
    load_path, _ = engine.load_checkpoint(root, tag=load_tag, load_optimizer_states=load_optimizer,
                                          load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load {ckpt_dir}")
    if universal:
        _barrier()
        if rank == 0:
            shutil.rmtree(os.path.join(root, load_tag), ignore_errors=True)
    own = os.path.join(ckpt_dir, f"rank{rank:05d}_{TRAINER_STATE}")
    fallback = os.path.join(ckpt_dir, f"rank{0:05d}_{TRAINER_STATE}")
    saved = torch.load(own if os.path.exists(own) else fallback, weights_only=False)
    scheduler.load_state_dict(saved["scheduler"])
    if os.path.exists(own):
        set_rng_state(saved["rng"])
    return TrainerState(**saved["trainer"]), diffs


def load_optimizer_from(engine, init_from: str) -> str:
    """Phase 2: load another run's optimizer state (not its step, data position or schedule)."""
    from pretrain.weights import resolve_checkpoint_dir

    ckpt_dir = os.path.abspath(resolve_checkpoint_dir(init_from))
    load_path, _ = engine.load_checkpoint(os.path.dirname(ckpt_dir), tag=os.path.basename(ckpt_dir),
                                          load_optimizer_states=True, load_lr_scheduler_states=False)
    if load_path is None:
        raise CheckpointError(f"DeepSpeed could not load the optimizer state of {ckpt_dir}")
    return ckpt_dir
