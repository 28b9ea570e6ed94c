"""Optimizers (LAMB, AdamW), their parameter groups, LR schedules, and LAMB under ZeRO.

Typical use by the training engine::

    optimizer = build_optimizer(model, cfg.optimizer, cfg.kernels.lamb)        # deepspeed=True
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.max_steps)
    ds_config.update(deepspeed_config_entries(cfg.optimizer))                  # gradient_clipping, ...
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config, ...)
    attach_zero_layout(engine)      # every rank, once, before the first step (no-op for AdamW)
"""
from pretrain.optim.build import build_optimizer, deepspeed_config_entries, is_no_decay, param_groups
from pretrain.optim.lamb import Lamb, UnknownTensorError, resolve_lamb_kernels
from pretrain.optim.schedule import build_scheduler, lr_at, lr_multiplier, resolve_warmup_steps
from pretrain.optim.zero_norms import PartitionLayout, Segment, attach_zero_layout

__all__ = [
    "Lamb", "PartitionLayout", "Segment", "UnknownTensorError", "attach_zero_layout", "build_optimizer",
    "build_scheduler", "deepspeed_config_entries", "is_no_decay", "lr_at", "lr_multiplier", "param_groups",
    "resolve_lamb_kernels", "resolve_warmup_steps",
]
