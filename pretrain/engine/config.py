"""DeepSpeed's JSON config, derived from ours (the single source of truth) in one place."""
from __future__ import annotations

from typing import Any, Protocol

from pretrain.config import KernelsConfig, OptimizerConfig, ZeroConfig


class EngineSettings(Protocol):
    """What the engine reads of a run's config: pretraining's Config has it, and so does fine-tuning's
    (pretrain.finetune.config), whose zero/kernels/optimizer sections are pretraining's and whose training
    section has the same batch and precision keys."""
    training: Any
    """With ``micro_batch_size``, ``precision`` and ``initial_loss_scale_power``."""
    zero: ZeroConfig
    optimizer: OptimizerConfig
    kernels: KernelsConfig

    def grad_accum_steps(self, data_parallel_size: int) -> int: ...


def deepspeed_config(cfg: EngineSettings, world_size: int, load_universal: bool = False) -> dict:
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
            "allgather_bucket_size": z.allgather_bucket_size,
        },
    }
    ds.update(optimizer_entries(cfg.optimizer))
    if z.offload_optimizer == "cpu":
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if z.offload_params == "cpu":
        ds["zero_optimization"]["offload_param"] = {"device": "cpu", "pin_memory": True}
    if z.stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = False
    if load_universal:
        ds["checkpoint"] = {"load_universal": True}
    return ds


def optimizer_entries(opt_cfg: OptimizerConfig) -> dict:
    """The keys our client optimizers need: global-norm clipping is DeepSpeed's job (it sees every
    rank's gradients); ZeRO refuses client optimizers it does not know (Lamb, our holdable AdamW)
    without ``zero_allow_untested_optimizer``, and with optimizer offload any but its own
    JIT-compiled CPU Adam without ``zero_force_ds_cpu_optimizer: false``."""
    return {"gradient_clipping": float(opt_cfg.max_grad_norm), "zero_allow_untested_optimizer": True,
            "zero_force_ds_cpu_optimizer": False}
