"""DeepSpeed's checkpoint files: read only through safe_torch_load, written with one-line errors.

``safe_torch_load`` makes every ``torch.load`` (DeepSpeed's, which asks for weights_only=False,
included) unpickle only tensors, plain data and the few DeepSpeed classes those files hold;
``convert_to_universal`` runs DeepSpeed's ds_to_universal (re-partitioning for a new world size)
in a subprocess whose loads go through it too.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from typing import Callable, Iterator, Optional

import torch

from pretrain.weights import UnreadableFileError, load_torch_file, write_error

UNREADABLE_EXIT = 3   # _ds_to_universal_main: a file was refused or damaged (message: last stderr line)


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


def save_checkpoint(ds_engine, save_dir: str, tag: str, client_state: dict) -> None:
    """ds_engine.save_checkpoint (no `latest` of DeepSpeed's); a failed write of one of its files
    (disk full) raises write_error's CheckpointError naming that file."""
    def save(obj, f, *args, **kwargs):
        try:
            return original(obj, f, *args, **kwargs)
        except (OSError, RuntimeError) as err:   # torch.save reports write errors as RuntimeError
            raise write_error(str(f), err) from None

    with _torch_function_replaced("save", save) as original:
        ds_engine.save_checkpoint(save_dir, tag=tag, save_latest=False, client_state=client_state)


def load_checkpoint(ds_engine, load_dir: str, tag: str, load_optimizer_states: bool) -> Optional[str]:
    """ds_engine.load_checkpoint through safe_torch_load; the loaded path, or None if DeepSpeed found none."""
    with safe_torch_load():
        load_path, _ = ds_engine.load_checkpoint(load_dir, tag=tag, load_optimizer_states=load_optimizer_states,
                                                 load_lr_scheduler_states=False)
    return load_path


def convert_to_universal(ckpt_dir: str, out_dir: str) -> None:
    """DeepSpeed's ds_to_universal in a subprocess whose loads go through safe_torch_load.
    Raises UnreadableFileError for a refused or damaged file, RuntimeError for any other failure."""
    runner = ("import sys; from pretrain.engine.files import _ds_to_universal_main; "
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
