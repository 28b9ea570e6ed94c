"""Optimizers (LAMB, AdamW) with holdable steps, their parameter groups, LR schedules, and the
partition layouts that keep LAMB's trust ratios whole-tensor under ZeRO.  Plain PyTorch: the
training engine (pretrain.engine) wraps them in DeepSpeed::

    optimizer = build_optimizer(model, cfg.optimizer, cfg.kernels.lamb)
    scheduler = build_scheduler(optimizer, cfg.schedule, cfg.training.max_steps)
    engine = Engine(cfg, model, optimizer, scheduler, world_size)   # registers a Lamb's layouts
"""
from pretrain.optim.build import build_optimizer, is_no_decay, param_groups
from pretrain.optim.hold import AdamW, HoldableStep
from pretrain.optim.lamb import Lamb, UnknownTensorError, resolve_lamb_kernels
from pretrain.optim.partition import PartitionLayout, Segment
from pretrain.optim.schedule import build_scheduler, extend_schedule, lr_multiplier, resolve_warmup_steps

__all__ = [
    "AdamW", "HoldableStep", "Lamb", "PartitionLayout", "Segment", "UnknownTensorError", "build_optimizer",
    "build_scheduler", "extend_schedule", "is_no_decay", "lr_multiplier", "param_groups", "resolve_lamb_kernels",
    "resolve_warmup_steps",
]
