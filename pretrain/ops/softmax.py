"""Scaled masked softmax for attention scores: CUDA kernel and PyTorch reference.

``scaled_masked_softmax(scores, mask=None, scale=1.0, impl="auto")`` with scores
``[batch, heads, q, k]`` returns ``softmax(scale * scores + mask, dim=-1)`` where

  * ``mask`` is optional and broadcastable to the scores with its last dim equal to k, e.g.
    ``[batch, 1, 1, k]`` (padding) or ``[batch, 1, q, k]`` (block-diagonal masks of packed rows);
    fewer than 4 dims are left-padded with 1s;
  * a **bool** mask keeps the elements where it is True;
  * a **float** mask is additive; a value ``<= MASKED_THRESHOLD`` (-1000) marks the element
    *masked*: BERT's -10000 (-9984 once rounded to bfloat16), ``torch.finfo(dtype).min`` and
    ``-inf`` all qualify, while ordinary additive biases stay far above it;
  * masked elements get probability exactly 0 (for any row with an unmasked element this equals
    ``torch.softmax`` of the additive form, since exp(-1000) already underflows to 0 in float32);
  * **a row whose elements are all masked (or all -inf) gives zeros, not NaN** (and zero
    gradient), where ``torch.softmax`` would give NaN (-inf masks) or a uniform row (finite ones);
  * the mask is a constant: it receives no gradient.

Computation is in float32 (float64 for float64 inputs) and the result has the scores' dtype.
The CUDA path (csrc/softmax*.{cpp,cu}) handles float32/float16/bfloat16 scores on CUDA, masks of
dtype bool, float32 or the scores' dtype (other float masks are converted to float32), and any k
(rows up to 8192 keys in registers, longer rows with a two-pass looped kernel).
"""
from typing import Optional

import torch
from torch import Tensor

from . import _ext

__all__ = ["scaled_masked_softmax", "scaled_masked_softmax_reference", "MASKED_THRESHOLD"]

MASKED_THRESHOLD = -1000.0  # == BF_SOFTMAX_MASKED_THRESHOLD in csrc/launchers.h
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_INT32_MAX = 2**31 - 1


def _as_4d_mask(mask: Tensor, scores: Tensor) -> Tensor:
    if mask.dim() > 4:
        raise ValueError(f"scaled_masked_softmax: mask must have at most 4 dims, got {tuple(mask.shape)}")
    if not (mask.dtype == torch.bool or mask.dtype.is_floating_point):
        raise ValueError(f"scaled_masked_softmax: mask must be bool (True = keep) or an additive "
                         f"float mask, got {mask.dtype}")
    while mask.dim() < 4:
        mask = mask.unsqueeze(0)
    ok = mask.shape[-1] == scores.shape[-1] and all(
        m in (1, s) for m, s in zip(mask.shape[:3], scores.shape[:3]))
    if not ok:
        raise ValueError(f"scaled_masked_softmax: mask {tuple(mask.shape)} does not broadcast to "
                         f"scores {tuple(scores.shape)} (last dim must equal k)")
    return mask


def scaled_masked_softmax_reference(scores: Tensor, mask: Optional[Tensor] = None,
                                    scale: float = 1.0) -> Tensor:
    """Pure-PyTorch scaled masked softmax with the semantics in the module docstring."""
    if scores.dim() != 4:
        raise ValueError(f"scaled_masked_softmax: scores must be [batch, heads, q, k], got {tuple(scores.shape)}")
    cdt = torch.promote_types(scores.dtype, torch.float32)
    z = scores.to(cdt) * scale
    if mask is not None:
        mask = _as_4d_mask(mask, scores).detach()
        if mask.dtype == torch.bool:
            keep = mask
        else:
            m = mask.to(cdt)
            keep = m > MASKED_THRESHOLD
            z = z + torch.where(keep, m, torch.zeros((), dtype=cdt, device=m.device))
        z = z.masked_fill(~keep, float("-inf"))
    row_ok = (z != float("-inf")).any(dim=-1, keepdim=True)
    z = z.masked_fill(~row_ok, 0.0)  # keeps softmax finite; those rows are zeroed below
    y = torch.softmax(z, dim=-1) * row_ok
    return y.to(scores.dtype)


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("bertforge::scaled_masked_softmax_fwd", mutates_args=(),
                         device_types="cuda")
def _softmax_fwd(scores: Tensor, mask: Optional[Tensor], scale: float) -> Tensor:
    return _ext.require_extension().softmax_fwd(scores, mask, scale)


@_softmax_fwd.register_fake
def _softmax_fwd_fake(scores, mask, scale):
    return scores.new_empty(scores.shape)


@torch.library.custom_op("bertforge::scaled_masked_softmax_bwd", mutates_args=(),
                         device_types="cuda")
def _softmax_bwd(y: Tensor, dy: Tensor, scale: float) -> Tensor:
    return _ext.require_extension().softmax_bwd(y, dy, scale)


@_softmax_bwd.register_fake
def _softmax_bwd_fake(y, dy, scale):
    return y.new_empty(y.shape)


class _SoftmaxFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, scores, mask, scale):
        y = torch.ops.bertforge.scaled_masked_softmax_fwd(scores, mask, scale)
        ctx.save_for_backward(y)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        (y,) = ctx.saved_tensors
        dx = torch.ops.bertforge.scaled_masked_softmax_bwd(y, dy.contiguous(), ctx.scale)
        return dx, None, None


def _kernel_unsupported(scores: Tensor, mask: Optional[Tensor]) -> Optional[str]:
    if scores.dtype not in _KERNEL_DTYPES:
        return f"scores dtype {scores.dtype} (kernel: float32, float16, bfloat16)"
    if any(d > _INT32_MAX for d in scores.shape[1:]):
        return "a heads/q/k dimension above int32"
    if mask is not None and mask.device != scores.device:
        return "mask on a different device"
    return None


def scaled_masked_softmax(scores: Tensor, mask: Optional[Tensor] = None, scale: float = 1.0,
                          impl: str = "auto") -> Tensor:
    """softmax(scale * scores + mask) over the last dim; fully masked rows give zeros.

    impl: "auto" (CUDA kernel when the extension is loaded and scores are on CUDA, else the
    reference), "cuda" (kernel or an error), "reference".
    """
    if scores.dim() != 4:
        raise ValueError(f"scaled_masked_softmax: scores must be [batch, heads, q, k], got {tuple(scores.shape)}")
    if mask is not None:
        mask = _as_4d_mask(mask, scores)
    if not _ext.use_kernel(impl, "scaled_masked_softmax", scores.is_cuda,
                           _kernel_unsupported(scores, mask)):
        return scaled_masked_softmax_reference(scores, mask, scale)
    if mask is not None:
        mask = mask.detach()
        if mask.dtype not in (torch.bool, torch.float32, scores.dtype):
            mask = mask.to(torch.float32)
    return _SoftmaxFunction.apply(scores, mask, float(scale))
