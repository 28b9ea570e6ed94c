"""Checkpoints: DeepSpeed state + our training state, crash-safe, last K kept, fingerprinted.

Layout under ``<run_dir>/<checkpoint.dir>``::

    step-000100/            DeepSpeed files (model, optimizer partitions, loss scaler) +
                            rank*_trainer_state.pt  (step, data position, RNG states, scheduler,
                                                     counters: tensors and plain data only)
                            model.pt + config.yaml   (consolidated fp32 weights: export/eval/phase 2;
                                                      pretraining's, not fine-tuning's)
                            tokenizer/        a copy of the run's tokenizer (what export ships; pretraining's)
                            fingerprints.json
    latest                  text file naming the newest complete step directory

A save writes into ``.tmp-step-000100``; after every rank has finished, rank 0 renames it to
``step-000100`` and then replaces ``latest`` atomically (write temp, os.replace).  A crash at any
point leaves ``latest`` naming the previous complete checkpoint; stale ``.tmp-*`` dirs are removed
by the next save.  This module receives the Engine (pretrain.engine), which reads and writes
DeepSpeed's files.

Every .pt file is read with weights-only unpickling (pretrain.weights.load_torch_file, and
pretrain.engine.files.safe_torch_load for DeepSpeed's files): a received checkpoint cannot run code.  A
file that is refused, damaged or missing is a CheckpointError naming it and the previous checkpoint.
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
import yaml

from pretrain.engine import agree, convert_to_universal
from pretrain.config import Config, flatten
from pretrain.weights import (TOKENIZER_DIR, CheckpointError, UnreadableFileError, atomic_write, atomic_write_text,
                              copy_tokenizer,
                              load_torch_file, read_json_object, save_weights)

LATEST = "latest"
TRAINER_STATE = "trainer_state.pt"
FINGERPRINTS = "fingerprints.json"


def step_tag(step: int) -> str:
    return f"step-{step:06d}"


def _pointer(root: str) -> str:
    """What ``root/latest`` names, stripped ('' when there is no such file)."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return ""
    with open(pointer, encoding="utf-8") as f:
        return f.read().strip()


def latest_tag(root: str) -> Optional[str]:
    """The tag named by ``root/latest`` if it points at an existing directory, else None."""
    pointer = os.path.join(root, LATEST)
    if not os.path.isfile(pointer):
        return None
    tag = _pointer(root)
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
    """Hash of the settings that define the training trajectory (fingerprinted_settings)."""
    return _sha(fingerprinted_settings(cfg.to_dict()))


def fingerprinted_settings(d: dict) -> dict:
    """The part of a config (as Config.to_dict() gives it) that defines the training trajectory.  Excluded
    on purpose: micro batch, accumulation and world size (resume with another layout is allowed), logging,
    checkpoint, eval, loader workers, kernel choices and activation checkpointing (numerics-equivalent
    implementations: a run may switch them when it resumes).  A distillation run (distill.teacher set) adds its
    distill section but the teacher's path (the teacher is a fingerprint of its own, by its weights)."""
    training = {k: v for k, v in d["training"].items()
                if k not in ("micro_batch_size", "grad_accum_steps", "collective_timeout_s", "max_nonfinite_steps",
                             "activation_checkpointing")}
    settings = {"model": d["model"], "optimizer": d["optimizer"], "schedule": d["schedule"],
                "training": training, "zero_stage_irrelevant": True, "mlm_probability": d["data"]["mlm_probability"]}
    distill = d.get("distill") or {}
    if distill.get("teacher"):   # a distillation run's losses; its teacher is fingerprinted by its weights' hash
        settings["distill"] = {k: v for k, v in distill.items() if k != "teacher"}
    return settings


def config_changes(ckpt_dir: str, cfg: Config) -> dict:
    """{section.key: (checkpoint's value, cfg's)} for each fingerprinted setting in which ``cfg`` differs
    from the config.yaml of checkpoint ``ckpt_dir``; {} when that file is missing or unreadable."""
    from pretrain.weights import CONFIG_FILE
    try:
        with open(os.path.join(ckpt_dir, CONFIG_FILE), encoding="utf-8") as f:
            then = flatten(fingerprinted_settings(yaml.safe_load(f)))
    except (OSError, yaml.YAMLError, KeyError, TypeError, AttributeError):
        return {}
    now = flatten(fingerprinted_settings(cfg.to_dict()))
    names = {"mlm_probability": "data.mlm_probability"}
    return {names.get(k, k): (then.get(k), now.get(k)) for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)}


def extends_the_run(changes: dict) -> bool:
    """Whether ``changes`` (config_changes) only raise training.max_steps: the run goes on, longer."""
    if set(changes) != {"training.max_steps"}:
        return False
    then, now = changes["training.max_steps"]
    return isinstance(then, int) and isinstance(now, int) and now > then


CONVERTED_FROM = "data_converted_from"   # fingerprints' key: the data fingerprint of the directory converted


def fingerprints(cfg: Config, data_fingerprint: str, tokenizer_hash: Optional[str],
                 data_converted_from: Optional[str] = None) -> dict:
    """What a checkpoint records of its run; ``data_converted_from``: the fingerprint of the format-1
    directory that ``data_prep convert`` made the run's (one) shard directory from (the manifest's
    ``converted_from``), recorded when there is one."""
    prints = {"config": config_fingerprint(cfg), "data": data_fingerprint, "tokenizer": tokenizer_hash}
    return {**prints, CONVERTED_FROM: data_converted_from} if data_converted_from else prints


def check_fingerprints(saved: dict, current: dict, where: str, allow_mismatch: bool,
                       cfg: Optional[Config] = None) -> list[str]:
    """Compare; raise unless allowed.  Returns the list of mismatches (for the log).  The data agree too
    when the checkpoint was taken on the format-1 directory this run's was converted from (the same
    samples in the same order): its data fingerprint is this run's ``data_converted_from``.  With ``cfg``
    (pretraining's), a config mismatch lists the settings that differ from the checkpoint's config.yaml,
    and one that only raises training.max_steps is allowed: it extends the run (the note says so)."""
    def agree(key: str) -> bool:
        return _identity(saved.get(key)) == _identity(current.get(key)) or \
            key == "data" and current.get(CONVERTED_FROM) is not None and saved.get(key) == current[CONVERTED_FROM]

    diffs = []
    for k in sorted(current):
        if k == CONVERTED_FROM or agree(k):
            continue
        changes = config_changes(where, cfg) if k == "config" and cfg is not None else {}
        if extends_the_run(changes):
            continue
        diffs += [f"config: {key}: {then!r} there, {now!r} now" for key, (then, now) in changes.items()] or \
            [f"{k}: checkpoint {_described(saved.get(k))} != this run {_described(current.get(k))}"]
    if diffs and not allow_mismatch:
        raise CheckpointError(
            f"cannot resume from {where}: it was made by a different run\n  " + "\n  ".join(diffs) +
            "\nstart a new run_dir, or set checkpoint.allow_fingerprint_mismatch=true to resume anyway")
    return diffs


def _identity(value):
    """What a fingerprint is compared by: a described one, ``{"sha256": ..., "path": ...}`` (a distillation
    teacher's), by its hash alone, so that the same weights moved elsewhere are the same teacher."""
    return value["sha256"] if isinstance(value, dict) and "sha256" in value else value


def _described(value) -> str:
    if isinstance(value, dict) and "sha256" in value:
        return f"{value.get('path')} (sha256 {value['sha256'][:16]})"
    return repr(value)


# --------------------------------------------------------------------------------------------
# RNG states
# --------------------------------------------------------------------------------------------
def rng_state() -> dict:
    """Tensors and plain data only (numpy's key array as a list), so that it loads weights-only."""
    name, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    numpy_state = {"bit_generator": name, "keys": keys.tolist(), "pos": pos, "has_gauss": has_gauss,
                   "cached_gaussian": cached_gaussian}
    state = {"python": random.getstate(), "numpy": numpy_state, "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    n = state["numpy"]
    np.random.set_state((n["bit_generator"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
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


def save(engine, root: str, state, *, cfg: Optional[Config], prints: dict, rank: int, keep_last: int,
         extra: dict) -> str:
    """Save a checkpoint for ``state.step`` on every rank; return its directory.  ``state``: a
    TrainerState, or another dataclass of plain data with ``step`` and ``world_size`` (fine-tuning's).

    Rank 0 also writes the engine's consolidated fp32 weights (gathered from every rank) with ``cfg``
    and ``extra`` (None: the engine's files only).  A failed write on any rank (disk full) is a
    CheckpointError on every rank naming the file; the partial directory is removed and ``latest``
    still names the previous checkpoint.
    """
    consolidated = engine.consolidated_state_dict(rank) if cfg is not None else None   # a ZeRO-3 collective: first
    tag = step_tag(state.step)
    tmp_tag = f".tmp-{tag}"
    final_dir, tmp_dir = os.path.join(root, tag), os.path.join(root, tmp_tag)
    if rank == 0:
        os.makedirs(root, exist_ok=True)
        for stale in os.listdir(root):
            if stale.startswith(".tmp-"):
                shutil.rmtree(os.path.join(root, stale), ignore_errors=True)
    _barrier()
    error = None
    try:
        # universal_checkpoint_info lets DeepSpeed's ds_to_universal re-partition the optimizer state
        # when a run resumes with another world size (see load()).
        engine.save(root, tmp_tag, {"universal_checkpoint_info": {"universal_checkpoint_version": 0.2}})
        # Every rank writes its own RNG state: dropout masks differ per rank.
        trainer_state = {"trainer": state.__dict__, "rng": rng_state(), "scheduler": engine.scheduler.state_dict()}
        atomic_write(os.path.join(tmp_dir, f"rank{rank:05d}_{TRAINER_STATE}"), lambda f: torch.save(trainer_state, f))
        if rank == 0:
            if cfg is not None:
                save_weights(tmp_dir, cfg, consolidated, extra=extra)
                if extra.get("tokenizer_dir"):
                    copy_tokenizer(extra["tokenizer_dir"], os.path.join(tmp_dir, TOKENIZER_DIR))
            atomic_write_text(os.path.join(tmp_dir, FINGERPRINTS), json.dumps(prints, indent=2))
    except (CheckpointError, OSError) as err:
        error = _not_saved(root, tag, err)
    engine.faults.during_save(state.step)
    try:
        _agree(error, engine.device, f"checkpoint {tag} was not saved: a write failed on another rank")
        if rank == 0:
            try:
                _commit(root, tag, tmp_dir, final_dir, keep_last)
            except CheckpointError as err:
                error = err
        _agree(error, engine.device, f"checkpoint {tag} was not saved: rank 0 could not commit it")
    except CheckpointError:
        if rank == 0:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return final_dir


def _commit(root: str, tag: str, tmp_dir: str, final_dir: str, keep_last: int) -> None:
    """Rank 0, once every rank has written its files: move the checkpoint into place, then name it in latest."""
    try:
        if os.path.isdir(final_dir):          # re-saving the same step (e.g. signal at the end)
            shutil.rmtree(final_dir)
        os.replace(tmp_dir, final_dir)
        atomic_write_text(os.path.join(root, LATEST), tag + "\n")
    except (CheckpointError, OSError) as err:
        raise _not_saved(root, tag, err) from None
    for old in list_checkpoints(root)[:-keep_last]:
        shutil.rmtree(os.path.join(root, old), ignore_errors=True)


def _not_saved(root: str, tag: str, err: Exception) -> CheckpointError:
    pointer = os.path.join(root, LATEST)
    previous = _pointer(root)
    kept = f"{pointer} still names {previous}" if previous else "there is no earlier checkpoint"
    return CheckpointError(f"checkpoint {tag} was not saved ({err}); {kept}")


def damaged(root: str, tag: str, why: str) -> CheckpointError:
    """The error for the unusable checkpoint ``root/tag``; it offers the previous one."""
    earlier = [t for t in list_checkpoints(root) if t < tag]
    if earlier:
        hint = (f"the previous checkpoint is {earlier[-1]}: point {LATEST} at it "
                f"(echo {earlier[-1]} > {os.path.join(root, LATEST)})")
    else:
        hint = f"there is no earlier checkpoint: move {root} away to start afresh"
    return CheckpointError(f"{os.path.join(root, tag)} is damaged ({why}); {hint}")


def _read_trainer_state(root: str, tag: str, rank: int) -> tuple[dict, bool]:
    """(our state of ``rank``, or rank 0's if this rank has none; whether it was this rank's own)."""
    own = os.path.join(root, tag, f"rank{rank:05d}_{TRAINER_STATE}")
    path = own if os.path.exists(own) else os.path.join(root, tag, f"rank{0:05d}_{TRAINER_STATE}")
    try:
        saved = load_torch_file(path)
    except UnreadableFileError as err:
        raise damaged(root, tag, str(err)) from None
    if not isinstance(saved, dict) or sorted(saved) != ["rng", "scheduler", "trainer"]:
        raise damaged(root, tag, f"{path}: expected the keys rng, scheduler, trainer")
    return saved, path == own


def _read_fingerprints(root: str, tag: str) -> dict:
    path = os.path.join(root, tag, FINGERPRINTS)
    try:
        return read_json_object(path)
    except FileNotFoundError:
        raise damaged(root, tag, f"{path}: missing") from None
    except ValueError as err:                  # names the file: not valid JSON, or not an object
        raise damaged(root, tag, str(err)) from None
    except OSError as err:
        raise damaged(root, tag, f"{path}: not valid JSON ({err})") from None


def _agree(error: Optional[Exception], device: torch.device,
           elsewhere: str = "loading the checkpoint failed on another rank (its error names the file)") -> None:
    """Raise on every rank if any rank failed (``elsewhere`` on the ranks that did not): one rank's
    bad file must not leave the others waiting in the next collective."""
    agree(error, device, CheckpointError(elsewhere))


def saved_trainer_state(root: str) -> Optional[dict]:
    """Rank 0's trainer state (TrainerState's fields, or the state_type's) of ``root/latest``; None when
    there is no checkpoint."""
    tag = latest_tag(root)
    return None if tag is None else _read_trainer_state(root, tag, 0)[0]["trainer"]


def saved_world_size(root: str) -> Optional[int]:
    """World size of the run that wrote ``root/latest`` (None when there is no checkpoint)."""
    saved = saved_trainer_state(root)
    return None if saved is None else int(saved["world_size"])


def _to_universal(root: str, tag: str, rank: int, device: torch.device) -> str:
    """Convert a checkpoint to DeepSpeed's universal format (re-partitionable for any world size)
    on rank 0; return the tag to load it by.  The engine must be built with load_universal."""
    universal_tag = f".universal-{tag}"
    target = os.path.join(root, universal_tag)
    error = None
    if rank == 0 and not os.path.isdir(target):
        tmp = target + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            convert_to_universal(os.path.join(root, tag), tmp)
            os.replace(tmp, target)
        except UnreadableFileError as err:
            error = damaged(root, tag, str(err))
        except (RuntimeError, OSError) as err:   # OSError: os.replace (or the subprocess start) failed
            error = CheckpointError(f"converting {os.path.join(root, tag)} to DeepSpeed's universal format for a "
                                    f"new world size failed:\n{err}")
        if error is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    _agree(error, device)
    return universal_tag


def load(engine, root: str, *, rank: int, current_prints: dict, allow_mismatch: bool,
         load_optimizer: bool = True, universal: bool = False,
         state_type: type = TrainerState, cfg: Optional[Config] = None) -> tuple[Optional[Any], list[str]]:
    """Resume from ``root/latest`` if there is one.  Returns (state or None, fingerprint diffs).

    ``universal``: the checkpoint was written with another world size; it is converted to
    DeepSpeed's universal format first (the engine was built with ``load_universal``).
    ``state_type``: the dataclass that save() was given (fine-tuning's own).  ``cfg``: pretraining's
    config, to name the settings behind a config fingerprint mismatch.
    """
    tag = latest_tag(root)
    if tag is None:
        return None, []
    ckpt_dir = os.path.join(root, tag)
    diffs = check_fingerprints(_read_fingerprints(root, tag), current_prints, ckpt_dir, allow_mismatch, cfg)
    load_tag = _to_universal(root, tag, rank, engine.device) if universal else tag
    error = None
    try:
        if engine.load(root, load_tag, load_optimizer) is None:
            raise damaged(root, tag, "DeepSpeed found no model states file in it")
        saved, own = _read_trainer_state(root, tag, rank)
    except UnreadableFileError as err:
        error = damaged(root, tag, str(err))
    except CheckpointError as err:
        error = err
    try:
        _agree(error, engine.device)
    finally:
        if universal and rank == 0:
            shutil.rmtree(os.path.join(root, load_tag), ignore_errors=True)
    engine.scheduler.load_state_dict(saved["scheduler"])
    if own:
        set_rng_state(saved["rng"])
    return state_type(**saved["trainer"]), diffs


def load_optimizer_from(engine, init_from: str) -> str:
    """Phase 2: load another run's optimizer state (not its step, data position or schedule)."""
    from pretrain.weights import resolve_checkpoint_dir

    ckpt_dir = os.path.abspath(resolve_checkpoint_dir(init_from))
    error = None
    try:
        if engine.load(os.path.dirname(ckpt_dir), os.path.basename(ckpt_dir), True) is None:
            error = CheckpointError(f"DeepSpeed could not load the optimizer state of {ckpt_dir}")
    except UnreadableFileError as err:
        error = CheckpointError(f"checkpoint.init_from: {err}")
    _agree(error, engine.device)
    return ckpt_dir
