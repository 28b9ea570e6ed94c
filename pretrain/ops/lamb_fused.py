"""Multi-tensor fused LAMB: a drop-in for the two phases of :mod:`pretrain.ops.lamb`.

* :func:`lamb_update` = ``lamb_update_reference`` (same signature and semantics): one CUDA launch
  updates the moments of every tensor and writes the raw updates.  Extra, optional:
  ``sq_norms_out`` (float32 ``[2, n]``) receives per-tensor sums of squares of the params (row 0)
  and of the updates (row 1), computed in the same pass, which a caller can use instead of
  ``per_tensor_sq_norms(params)`` / ``per_tensor_sq_norms(updates)`` (a second read of both).
* :func:`lamb_apply` = ``lamb_apply_reference``: one launch computes each tensor's trust ratio
  on the device from the given whole-tensor norms (so it works for ZeRO shards) and updates the
  params.  Extra, optional: ``model_params`` (fp16/bf16/fp32 tensors, one per param) receive the
  new fp32 master values cast to their dtype in the same pass.
* :func:`lamb_step` = ``lamb_step_reference`` for whole tensors, with the norms from the fused
  ``sq_norms_out``.
* :func:`available`: whether the kernels can run here; :func:`unavailable_reason` says why not on a
  device (the optimizer's ``impl="fused"`` asks it once), :func:`log_fallback_once` logs it once.

Kernel requirements: CUDA tensors on one device, params / exp_avgs / exp_avg_sqs float32 (the
master weights and their state), grads float32, float16 or bfloat16 (one dtype per call), all
contiguous (views of a flat buffer are fine).  Calls that do not meet them run the reference
(:mod:`pretrain.ops.lamb`) instead, with one log message per reason.  ``grad_scale`` and ``lr``
may be Python floats or one-element tensors (read on the device: no host synchronisation).

Numerics: float32 arithmetic in the reference's operation order.  Differences to the reference
are rounding-level (fused multiply-adds, ``--use_fast_math`` division/sqrt in the extension
build); the GPU tests bound them against a float64 run of the reference.
"""
import logging
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from . import _ext
from . import lamb as _ref

__all__ = ["available", "lamb_update", "lamb_apply", "lamb_step", "log_fallback_once", "unavailable_reason"]

Scalar = Union[float, Tensor]
log = logging.getLogger("pretrain.ops")

_ALIGN_ELEMS = 4  # update buffers start at 16-byte multiples so the vector path applies
_GRAD_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_fallbacks_logged: set = set()


def available() -> bool:
    """True when the fused LAMB kernels can run (extension loaded and a CUDA device present)."""
    return _ext.cuda_available()


def unavailable_reason(device: torch.device) -> Optional[str]:
    """Why the kernels cannot run for tensors on ``device`` (None: they can)."""
    return _common_unsupported([], device)


def log_fallback_once(reason: str) -> None:
    """One warning per distinct reason for running the PyTorch reference instead of the kernels."""
    if reason not in _fallbacks_logged:
        _fallbacks_logged.add(reason)
        log.warning("pretrain.ops.lamb_fused: using the PyTorch reference (%s)", reason)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("bertforge::lamb_update_",
                         mutates_args=("exp_avgs", "exp_avg_sqs", "updates", "sq_norms_out"),
                         device_types="cuda")
def _lamb_update_op(params: List[Tensor], grads: List[Tensor], exp_avgs: List[Tensor],
                    exp_avg_sqs: List[Tensor], updates: List[Tensor], weight_decays: List[float],
                    beta1: float, beta2: float, eps: float, bc1: float, bc2: float,
                    grad_scale: Optional[Tensor], grad_scale_value: float,
                    sq_norms_out: Optional[Tensor]) -> None:
    _ext.require_extension().lamb_update(params, grads, exp_avgs, exp_avg_sqs, updates,
                                         weight_decays, beta1, beta2, eps, bc1, bc2, grad_scale,
                                         grad_scale_value, sq_norms_out)


@_lamb_update_op.register_fake
def _lamb_update_fake(params, grads, exp_avgs, exp_avg_sqs, updates, weight_decays, beta1, beta2,
                      eps, bc1, bc2, grad_scale, grad_scale_value, sq_norms_out):
    return None


@torch.library.custom_op("bertforge::lamb_apply_", mutates_args=("params", "model_params"),
                         device_types="cuda")
def _lamb_apply_op(params: List[Tensor], updates: List[Tensor], model_params: List[Tensor],
                   param_norms: Tensor, update_norms: Tensor, adapt: List[bool],
                   lr: Optional[Tensor], lr_value: float, min_trust_ratio: float,
                   max_trust_ratio: float) -> None:
    _ext.require_extension().lamb_apply(params, updates, model_params, param_norms, update_norms,
                                        adapt, lr, lr_value, min_trust_ratio, max_trust_ratio)


@_lamb_apply_op.register_fake
def _lamb_apply_fake(params, updates, model_params, param_norms, update_norms, adapt, lr,
                     lr_value, min_trust_ratio, max_trust_ratio):
    return None


# ----------------------------------------------------------------------------- helpers
def _scalar_arg(x: Scalar, device: torch.device) -> Tuple[Optional[Tensor], float]:
    """(device float32 one-element tensor, 0.0) for a tensor, (None, value) for a number."""
    if isinstance(x, Tensor):
        if x.numel() != 1:
            raise ValueError(f"expected a scalar or one-element tensor, got shape {tuple(x.shape)}")
        return x.detach().to(device=device, dtype=torch.float32).reshape(1), 0.0
    return None, float(x)


def _common_unsupported(tensors: Sequence[Tensor], device: torch.device) -> Optional[str]:
    if not _ext.use_kernel("auto", "lamb", device.type == "cuda", None):
        if device.type != "cuda":
            return f"tensors on {device.type}, the kernel needs CUDA"
        return f"CUDA kernels unavailable: {_ext.extension_status()}"
    for t in tensors:
        if t.device != device:
            return "tensors on more than one device"
        if t.is_sparse:
            return "sparse tensors"
        if not t.is_contiguous():
            return "non-contiguous tensors"
    return None


def _update_unsupported(params, grads, exp_avgs, exp_avg_sqs) -> Optional[str]:
    device = params[0].device
    reason = _common_unsupported([*params, *grads, *exp_avgs, *exp_avg_sqs], device)
    if reason is not None:
        return reason
    if any(t.dtype != torch.float32 for t in (*params, *exp_avgs, *exp_avg_sqs)):
        return "params/exp_avgs/exp_avg_sqs not all float32 (the kernel steps fp32 master weights)"
    gdt = grads[0].dtype
    if gdt not in _GRAD_DTYPES or any(g.dtype != gdt for g in grads):
        return "grads not of one dtype among float32, float16, bfloat16"
    if any(p.numel() != t.numel() for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs)
           for t in (g, m, v)):
        return "tensor sizes differ within a parameter's (param, grad, moments) tuple"
    return None


def _alloc_updates(params: Sequence[Tensor]) -> List[Tensor]:
    """Float32 tensors shaped like params, carved from one buffer at 16-byte-aligned offsets."""
    offsets, total = [], 0
    for p in params:
        offsets.append(total)
        total += -(-p.numel() // _ALIGN_ELEMS) * _ALIGN_ELEMS
    flat = torch.empty(total, dtype=torch.float32, device=params[0].device)
    return [flat.narrow(0, off, p.numel()).view(p.shape) for off, p in zip(offsets, params)]


# ----------------------------------------------------------------------------- public API
@torch.no_grad()
def lamb_update(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
                exp_avg_sqs: Sequence[Tensor], *, beta1: float, beta2: float, eps: float,
                weight_decays: Sequence[float], step: int, bias_correction: bool,
                grad_scale: Scalar = 1.0, sq_norms_out: Optional[Tensor] = None) -> List[Tensor]:
    """Phase 1, fused; see :func:`pretrain.ops.lamb.lamb_update_reference` for the semantics.

    sq_norms_out: optional float32 ``[2, len(params)]`` tensor on the params' device, overwritten
    with the per-tensor sums of squares of params (row 0) and of the returned updates (row 1).
    """
    n = _ref.check_lengths(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       weight_decays=weight_decays)
    if step < 1:
        raise ValueError(f"step counts from 1, got {step}")
    if sq_norms_out is not None and tuple(sq_norms_out.shape) != (2, n):
        raise ValueError(f"sq_norms_out must have shape (2, {n}), got {tuple(sq_norms_out.shape)}")
    if n == 0:
        return []
    reason = _update_unsupported(params, grads, exp_avgs, exp_avg_sqs)
    if reason is None and sq_norms_out is not None and (
            sq_norms_out.dtype != torch.float32 or sq_norms_out.device != params[0].device
            or not sq_norms_out.is_contiguous()):
        reason = "sq_norms_out is not a contiguous float32 tensor on the params' device"
    if reason is not None:
        log_fallback_once(reason)
        updates = _ref.lamb_update_reference(
            params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps,
            weight_decays=weight_decays, step=step, bias_correction=bias_correction,
            grad_scale=grad_scale)
        if sq_norms_out is not None:
            sq = torch.stack([_ref.per_tensor_sq_norms(params), _ref.per_tensor_sq_norms(updates)])
            sq_norms_out.copy_(sq)
        return updates
    bc1 = 1.0 - beta1 ** step if bias_correction else 1.0
    bc2 = 1.0 - beta2 ** step if bias_correction else 1.0
    device = params[0].device
    updates = _alloc_updates(params)
    gs_tensor, gs_value = _scalar_arg(grad_scale, device)
    torch.ops.bertforge.lamb_update_(
        list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), updates,
        [float(w) for w in weight_decays], float(beta1), float(beta2), float(eps), float(bc1),
        float(bc2), gs_tensor, gs_value, sq_norms_out)
    return updates


@torch.no_grad()
def lamb_apply(params: Sequence[Tensor], updates: Sequence[Tensor], *, lr: Scalar,
               param_norms: Tensor, update_norms: Tensor, adapt: Sequence[bool],
               min_trust_ratio: float, max_trust_ratio: float,
               model_params: Optional[Sequence[Tensor]] = None) -> None:
    """Phase 2, fused; see :func:`pretrain.ops.lamb.lamb_apply_reference` for the semantics.

    model_params: optional tensors (one per param, any of float32/float16/bfloat16, one dtype)
    that receive the updated params cast to their dtype (fp16/bf16 model weights of fp32
    masters).
    """
    n = _ref.check_lengths(params=params, updates=updates, adapt=adapt)
    if param_norms.numel() != n or update_norms.numel() != n:
        raise ValueError(f"expected {n} param and update norms, got {param_norms.numel()} and "
                         f"{update_norms.numel()}")
    if model_params is not None and len(model_params) != n:
        raise ValueError(f"expected {n} model_params, got {len(model_params)}")
    if n == 0:
        return
    device = params[0].device
    models = list(model_params) if model_params is not None else []
    reason = _common_unsupported([*params, *updates, *models], device)
    if reason is None and any(t.dtype != torch.float32 for t in (*params, *updates)):
        reason = "params/updates not all float32"
    if reason is None and models and (models[0].dtype not in _GRAD_DTYPES
                                      or any(m.dtype != models[0].dtype for m in models)):
        reason = "model_params not of one dtype among float32, float16, bfloat16"
    if reason is None and any(
            u.numel() != p.numel() or (models and models[i].numel() != p.numel())
            for i, (p, u) in enumerate(zip(params, updates))):
        reason = "tensor sizes differ between params, updates and model_params"
    if reason is not None:
        log_fallback_once(reason)
        _ref.lamb_apply_reference(params, updates, lr=lr, param_norms=param_norms,
                                  update_norms=update_norms, adapt=adapt,
                                  min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio)
        for m, p in zip(models, params):
            m.copy_(p)
        return
    pn = param_norms.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    un = update_norms.detach().to(device=device, dtype=torch.float32).reshape(-1).contiguous()
    lr_tensor, lr_value = _scalar_arg(lr, device)
    torch.ops.bertforge.lamb_apply_(
        list(params), list(updates), models, pn, un, [bool(a) for a in adapt], lr_tensor,
        lr_value, float(min_trust_ratio), float(max_trust_ratio))


@torch.no_grad()
def lamb_step(params: Sequence[Tensor], grads: Sequence[Tensor], exp_avgs: Sequence[Tensor],
              exp_avg_sqs: Sequence[Tensor], *, lr: Scalar, beta1: float, beta2: float,
              eps: float, weight_decays: Sequence[float], adapt: Sequence[bool], step: int,
              bias_correction: bool, min_trust_ratio: float, max_trust_ratio: float,
              grad_scale: Scalar = 1.0,
              model_params: Optional[Sequence[Tensor]] = None) -> None:
    """One LAMB step on whole tensors (see ``lamb_step_reference``): 2 fused launches + 1 sqrt."""
    n = len(params)
    if n == 0:
        _ref.check_lengths(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                       weight_decays=weight_decays, adapt=adapt)
        return
    sq = torch.empty((2, n), dtype=torch.float32, device=params[0].device)
    updates = lamb_update(params, grads, exp_avgs, exp_avg_sqs, beta1=beta1, beta2=beta2, eps=eps,
                          weight_decays=weight_decays, step=step, bias_correction=bias_correction,
                          grad_scale=grad_scale, sq_norms_out=sq)
    norms = sq.sqrt_()
    lamb_apply(params, updates, lr=lr, param_norms=norms[0], update_norms=norms[1], adapt=adapt,
               min_trust_ratio=min_trust_ratio, max_trust_ratio=max_trust_ratio,
               model_params=model_params)
