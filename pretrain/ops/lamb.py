"""LAMB, the pure-PyTorch reference (functional, multi-tensor).

LAMB (You et al., 2019, "Large Batch Optimization for Deep Learning") is Adam whose per-tensor
step is rescaled by a trust ratio ``||p|| / ||update||``.  The trust ratio needs norms of whole
parameter tensors, which a ZeRO rank does not hold, so the step is split in two phases with the
norms supplied in between:

1. :func:`lamb_update_reference` -- moments and the raw Adam(W) update, per tensor, elementwise;
2. the caller computes the norms of each tensor (:func:`per_tensor_sq_norms` gives the local sums
   of squares; a partitioned caller adds its shards' sums across ranks before the square root);
3. :func:`lamb_apply_reference` -- trust ratio per tensor and the parameter update.

:func:`lamb_step_reference` runs the three for tensors that are whole (no partitioning).

Every function takes lists of same-length-paired tensors ("tensor lists", as a multi-tensor CUDA
kernel does); a "tensor" may be a view of part of a flat buffer.  Per-tensor scalars (weight
decays, adapt flags) are Python sequences; norms are 1-D tensors on the tensors' device, so no
host synchronisation is needed between the phases.  The fused kernel (``pretrain.ops.lamb_fused``)
implements ``lamb_update`` / ``lamb_apply`` with exactly these signatures and semantics.

The functions operate on whatever tensors they are given (fp32 master weights under DeepSpeed);
the arithmetic runs in the tensors' dtype.
"""
from __future__ import annotations

from typing import Sequence, Union

import torch
from torch import Tensor

Scalar = Union[float, Tensor]


def check_lengths(**lists: Sequence) -> int:
    """The common length of same-length-paired tensor lists (ValueError naming each length otherwise)."""
    lengths = {name: len(values) for name, values in lists.items()}
    if len(set(lengths.values())) > 1:
        raise ValueError(f"tensor lists differ in length: {lengths}")
    return next(iter(lengths.values()), 0)


@torch.no_grad()
def lamb_update_reference(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                          exp_avg_sqs: Sequence[Tensor], *, beta1: float, beta2: float, eps: float,
                          weight_decays: Sequence[float], step: int, bias_correction: bool,
                          grad_scale: Scalar = 1.0) -> list[Tensor]:
    """Phase 1: update the moments in place and return the raw per-tensor updates.

    With ``g = grad / grad_scale`` (``grad_scale`` folds a loss scale and a clipping factor into
    one divisor; it may be a 0-dim tensor to avoid a host sync):
    ``m = beta1*m + (1-beta1)*g``, ``v = beta2*v + (1-beta2)*g*g``, and
    ``update = m_hat / (sqrt(v_hat) + eps) + weight_decay * p`` where ``m_hat = m / (1-beta1**step)``
    and ``v_hat = v / (1-beta2**step)`` when ``bias_correction`` is on, else ``m`` and ``v``.
    ``step`` counts from 1 (the step being taken).  ``params`` are only read.
    """
    n = check_lengths(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       weight_decays=weight_decays)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    updates = []
    for i in range(n):
        p, m, v = params[i], exp_avgs[i], exp_avg_sqs[i]
        g = grads[i] / grad_scale
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        update = (m / bc1) / ((v / bc2).sqrt_().add_(eps))
        if weight_decays[i] != 0.0:
            update.add_(p, alpha=weight_decays[i])
        updates.append(update)
    return updates


@torch.no_grad()
def per_tensor_sq_norms(tensors: Sequence[Tensor]) -> Tensor:
    """Sums of squares of each tensor as one 1-D tensor, in fp32 (fp64 when any tensor is fp64);
    an empty list gives an empty tensor.

    Sums of squares (not norms) are what partial shards of one tensor add up across ranks.
    """
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    if len(tensors) == 0:
        return torch.zeros(0, dtype=dtype)
    norms = torch._foreach_norm([t.to(dtype) for t in tensors], 2)
    return torch.stack(norms).square_()


def trust_ratios(param_norms: Tensor, update_norms: Tensor, adapt: Sequence[bool], *,
                 min_trust_ratio: float, max_trust_ratio: float) -> Tensor:
    """Per-tensor trust ratio: ``||p|| / ||u||`` when both are > 0, else 1; clamped to
    ``[min_trust_ratio, max_trust_ratio]``; exactly 1 for tensors with ``adapt`` false."""
    both_positive = (param_norms > 0) & (update_norms > 0)
    ratio = torch.where(both_positive, param_norms / torch.where(both_positive, update_norms, 1.0), 1.0)
    ratio = ratio.clamp(min_trust_ratio, max_trust_ratio)
    return torch.where(_adapt_mask(tuple(adapt), ratio.device), ratio, 1.0)


_ADAPT_MASKS: dict[tuple[tuple[bool, ...], torch.device], Tensor] = {}


def _adapt_mask(adapt: tuple[bool, ...], device: torch.device) -> Tensor:
    """The ``adapt`` flags as a bool tensor on ``device``, made once per (flags, device): a tensor
    built from a Python list every step would be a host-to-device copy per parameter group."""
    key = (adapt, device)
    mask = _ADAPT_MASKS.get(key)
    if mask is None:
        mask = torch.tensor(adapt, dtype=torch.bool, device=device)
        if len(_ADAPT_MASKS) < 256:
            _ADAPT_MASKS[key] = mask
    return mask


@torch.no_grad()
def lamb_apply_reference(params: Sequence[Tensor], updates: Sequence[Tensor], *, lr: Scalar,
                         param_norms: Tensor, update_norms: Tensor, adapt: Sequence[bool],
                         min_trust_ratio: float, max_trust_ratio: float) -> None:
    """Phase 2: ``p -= lr * trust_ratio * update`` per tensor, in place.

    ``param_norms`` / ``update_norms`` are 1-D tensors with one entry per tensor in ``params``:
    the L2 norms of the WHOLE parameter tensor and of its WHOLE update (a shard carries the
    norms of the tensor it belongs to).  See :func:`trust_ratios` for the ratio.
    """
    n = check_lengths(params=params, updates=updates, adapt=adapt)
    if param_norms.numel() != n or update_norms.numel() != n:
        raise ValueError(f"expected {n} param and update norms, got {param_norms.numel()} and "
                         f"{update_norms.numel()}")
    if n == 0:
        return
    ratios = trust_ratios(param_norms, update_norms, adapt,
                          min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio)
    step_sizes = (ratios * lr).to(params[0].dtype)
    for i in range(n):
        params[i].sub_(updates[i] * step_sizes[i])


@torch.no_grad()
def lamb_step_reference(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                        exp_avg_sqs: Sequence[Tensor], *, lr: Scalar, beta1: float, beta2: float, eps: float,
                        weight_decays: Sequence[float], adapt: Sequence[bool], step: int,
                        bias_correction: bool, min_trust_ratio: float, max_trust_ratio: float,
                        grad_scale: Scalar = 1.0) -> None:
    """One LAMB step on whole (unpartitioned) tensors: both phases with locally computed norms."""
    updates = lamb_update_reference(params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps,
                                    weight_decays=weight_decays, step=step, bias_correction=bias_correction,
                                    grad_scale=grad_scale)
    if not updates:
        return
    device = params[0].device
    param_norms = per_tensor_sq_norms(params).to(device).sqrt_()
    update_norms = per_tensor_sq_norms(updates).to(device).sqrt_()
    lamb_apply_reference(params, updates, lr=lr, param_norms=param_norms, update_norms=update_norms,
                         adapt=adapt, min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio)
