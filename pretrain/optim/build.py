"""Build the client optimizer (LAMB or AdamW) with BERT's weight-decay parameter groups.

No weight decay on biases and normalisation weights.  A parameter is "no decay" when it is
1-D (biases, LayerNorm weight and bias) or its name contains "bias" or "norm"
(case-insensitive: ``LayerNorm``, ``layer_norm``, ``norm1``); everything else (matrices,
embedding tables) decays.  The rule is by parameter, not by module type, so it also catches
ALBERT's factorized projections' biases and any custom norm modules.

Gradient clipping: under the training engine (``clips_itself=False``, the default) the optimizer
never clips: the engine clips by ``optimizer.max_grad_norm`` across all ranks and groups.  With
``clips_itself=True`` (no engine), Lamb clips by global norm itself; AdamW does not, so call
``torch.nn.utils.clip_grad_norm_`` before ``step()``.  Both optimizers' steps can be held
(:mod:`pretrain.optim.hold`).
"""
from __future__ import annotations

from typing import Iterable

import torch

from pretrain.config import OptimizerConfig
from pretrain.optim.hold import AdamW
from pretrain.optim.lamb import Lamb


def is_no_decay(name: str, param: torch.Tensor) -> bool:
    """Biases and normalisation weights: 1-D tensors, or names containing 'bias' / 'norm'."""
    lowered = name.lower()
    return param.ndim <= 1 or "bias" in lowered or "norm" in lowered


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Two groups of the trainable parameters: decay (``weight_decay``) and no-decay (0, and
    excluded from LAMB's layer adaptation).  Empty groups are dropped; names are kept per group
    (key ``names``, ignored by the optimizers) for logging and tests."""
    decay, no_decay = {"params": [], "names": []}, {"params": [], "names": []}
    for name, param in named_params:
        if not param.requires_grad:
            continue
        group = no_decay if is_no_decay(name, param) else decay
        group["params"].append(param)
        group["names"].append(name)
    decay.update(weight_decay=weight_decay, exclude_from_adaptation=False)
    no_decay.update(weight_decay=0.0, exclude_from_adaptation=True)
    return [g for g in (decay, no_decay) if g["params"]]


def build_optimizer(model: torch.nn.Module, opt_cfg: OptimizerConfig, kernels_lamb: str = "reference", *,
                    clips_itself: bool = False) -> torch.optim.Optimizer:
    """The client optimizer for ``model`` from the ``optimizer`` config section.

    ``kernels_lamb``: ``kernels.lamb`` ("reference" | "fused").  ``clips_itself``: no engine wraps
    the optimizer, so a Lamb clips by ``opt_cfg.max_grad_norm`` itself (under the engine, the
    engine clips, and registers its partition layouts with a Lamb).
    """
    groups = param_groups(model.named_parameters(), opt_cfg.weight_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    betas = (float(opt_cfg.betas[0]), float(opt_cfg.betas[1]))
    if opt_cfg.name == "lamb":
        return Lamb(groups, lr=opt_cfg.lr, betas=betas, eps=opt_cfg.eps, bias_correction=opt_cfg.bias_correction,
                    min_trust_ratio=opt_cfg.min_trust_ratio, max_trust_ratio=opt_cfg.max_trust_ratio,
                    nvlamb=opt_cfg.nvlamb, max_grad_norm=opt_cfg.max_grad_norm if clips_itself else 0.0,
                    impl=kernels_lamb)
    if opt_cfg.name == "adamw":
        for group in groups:
            del group["exclude_from_adaptation"]  # a LAMB notion
        on_cuda = all(p.is_cuda for group in groups for p in group["params"])
        # fused is the fastest CUDA path; the engine hands the optimizer fp32 CUDA partitions.
        return AdamW(groups, lr=opt_cfg.lr, betas=betas, eps=opt_cfg.eps, fused=True if on_cuda else None)
    raise ValueError(f"unknown optimizer {opt_cfg.name!r}: expected 'lamb' or 'adamw'")
