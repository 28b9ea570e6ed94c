"""LayerNorm with an optional fused bias + residual add: CUDA kernel and PyTorch reference.

``layer_norm(x, weight, bias, eps, residual=None, bias_add=None, return_sum=False, impl="auto")``
computes ``s = x + bias_add + residual`` (each addition optional) and ``y = LN(s)`` over the last
dim; ``return_sum=True`` also returns ``s`` (the residual stream of a pre-LN block).

Semantics shared by the kernel and the reference (the reference *is* the specification):
  * computation in float32 (float64 for float64 inputs); statistics are float32 in the kernel;
  * when an addition is present, s is accumulated in float32 and rounded to x's dtype, and y is
    the norm of that rounded s (so ``y == LN(s)`` for the s returned and used by the backward);
  * biased variance, ``y = (s - mean) * rsqrt(var + eps) * weight + bias``, cast to x's dtype.
  * shapes: x [..., H]; weight, bias, bias_add [H]; residual like x (shape and dtype).

The CUDA path (csrc/layer_norm*.{cpp,cu}) handles float32/float16/bfloat16 x with weights in x's
dtype or float32, 1 <= H <= 8192, on CUDA tensors of any layout (copied to contiguous).  Other
calls use the reference under ``impl="auto"`` and raise under ``impl="cuda"``.
"""
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

from . import _ext

__all__ = ["layer_norm", "layer_norm_reference", "LN_MAX_HIDDEN"]

LN_MAX_HIDDEN = 8192
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm_reference(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-12,
    residual: Optional[Tensor] = None,
    bias_add: Optional[Tensor] = None,
    return_sum: bool = False,
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """Pure-PyTorch LayerNorm(x + bias_add + residual); differentiable by autograd."""
    cdt = torch.promote_types(x.dtype, torch.float32)
    s = x
    if residual is not None or bias_add is not None:
        acc = x.to(cdt)
        if bias_add is not None:
            acc = acc + bias_add.to(cdt)
        if residual is not None:
            acc = acc + residual.to(cdt)
        s = acc.to(x.dtype)
    sc = s.to(cdt)
    mean = sc.mean(dim=-1, keepdim=True)
    centered = sc - mean
    var = centered.square().mean(dim=-1, keepdim=True)
    y = (centered * torch.rsqrt(var + eps) * weight.to(cdt) + bias.to(cdt)).to(x.dtype)
    return (y, s) if return_sum else y


# ----------------------------------------------------------------------------- custom ops
@torch.library.custom_op("bertforge::layer_norm_fwd", mutates_args=(), device_types="cuda")
def _layer_norm_fwd(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    residual: Optional[Tensor],
    bias_add: Optional[Tensor],
    eps: float,
    store_sum: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (y, mean, rstd, s); s is empty unless store_sum and an addition is present."""
    y, mean, rstd, s = _ext.require_extension().layer_norm_fwd(
        x, weight, bias, residual, bias_add, eps, store_sum)
    return y, mean, rstd, s


@_layer_norm_fwd.register_fake
def _layer_norm_fwd_fake(x, weight, bias, residual, bias_add, eps, store_sum):
    rows = x.numel() // x.shape[-1]
    y = x.new_empty(x.shape)
    mean = x.new_empty((rows,), dtype=torch.float32)
    rstd = x.new_empty((rows,), dtype=torch.float32)
    has_add = residual is not None or bias_add is not None
    s = x.new_empty(x.shape) if (store_sum and has_add) else x.new_empty((0,))
    return y, mean, rstd, s


@torch.library.custom_op("bertforge::layer_norm_bwd", mutates_args=(), device_types="cuda")
def _layer_norm_bwd(
    dy: Tensor,
    s: Tensor,
    mean: Tensor,
    rstd: Tensor,
    weight: Tensor,
    dsum: Optional[Tensor],
    want_dbias_add: bool,
) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """Returns (dx, dweight, dbias, dbias_add); dbias_add is empty unless want_dbias_add."""
    dx, dw, db, dba = _ext.require_extension().layer_norm_bwd(
        dy, s, mean, rstd, weight, dsum, want_dbias_add)
    return dx, dw, db, dba


@_layer_norm_bwd.register_fake
def _layer_norm_bwd_fake(dy, s, mean, rstd, weight, dsum, want_dbias_add):
    dba = weight.new_empty(weight.shape) if want_dbias_add else weight.new_empty((0,))
    return s.new_empty(s.shape), weight.new_empty(weight.shape), weight.new_empty(weight.shape), dba


class _LayerNormFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, residual, bias_add, eps, return_sum, grad_needed):
        has_add = residual is not None or bias_add is not None
        store_sum = has_add and (return_sum or grad_needed)
        y, mean, rstd, s = torch.ops.bertforge.layer_norm_fwd(
            x, weight, bias, residual, bias_add, eps, store_sum)
        ctx.save_for_backward(s if has_add else x, weight, mean, rstd)
        ctx.has_residual = residual is not None
        ctx.has_bias_add = bias_add is not None
        ctx.return_sum = return_sum
        if return_sum:  # only called with return_sum when has_add (see layer_norm)
            return y, s
        return y

    @staticmethod
    def backward(ctx, dy, dsum=None):
        s, weight, mean, rstd = ctx.saved_tensors
        dx, dw, db, dba = torch.ops.bertforge.layer_norm_bwd(
            dy.contiguous(), s, mean, rstd, weight,
            dsum.contiguous() if ctx.return_sum else None, ctx.has_bias_add)
        return (dx, dw, db, dx if ctx.has_residual else None, dba if ctx.has_bias_add else None,
                None, None, None)


def _check_args(x, weight, bias, residual, bias_add) -> int:
    if x.dim() < 1:
        raise ValueError("layer_norm: x must have at least one dimension")
    hidden = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias), ("bias_add", bias_add)):
        if t is not None and tuple(t.shape) != (hidden,):
            raise ValueError(f"layer_norm: {name} must have shape ({hidden},), got {tuple(t.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"layer_norm: residual must match x (shape {tuple(x.shape)}, {x.dtype}); "
                         f"got {tuple(residual.shape)}, {residual.dtype}")
    if weight.dtype != bias.dtype:
        raise ValueError(f"layer_norm: weight ({weight.dtype}) and bias ({bias.dtype}) dtypes differ")
    return hidden


def _kernel_unsupported(x: Tensor, weight: Tensor, hidden: int, tensors) -> Optional[str]:
    if x.dtype not in _KERNEL_DTYPES:
        return f"x dtype {x.dtype} (kernel: float32, float16, bfloat16)"
    if weight.dtype not in (x.dtype, torch.float32):
        return f"weight dtype {weight.dtype} with x {x.dtype} (kernel: x's dtype or float32)"
    if not 1 <= hidden <= LN_MAX_HIDDEN:
        return f"hidden size {hidden} (kernel: 1..{LN_MAX_HIDDEN})"
    if any(t.device != x.device for t in tensors):
        return "tensors on different devices"
    return None


def layer_norm(
    x: Tensor,
    weight: Tensor,
    bias: Tensor,
    eps: float = 1e-12,
    residual: Optional[Tensor] = None,
    bias_add: Optional[Tensor] = None,
    return_sum: bool = False,
    impl: str = "auto",
) -> Union[Tensor, Tuple[Tensor, Tensor]]:
    """y = LayerNorm(x + bias_add + residual); with return_sum=True returns (y, pre_norm_sum).

    impl: "auto" (CUDA kernel when the extension is loaded and x is on CUDA with a supported
    dtype/size, else the reference), "cuda" (kernel or an error), "reference".
    """
    hidden = _check_args(x, weight, bias, residual, bias_add)
    tensors = [t for t in (weight, bias, residual, bias_add) if t is not None]
    if not _ext.use_kernel(impl, "layer_norm", x.is_cuda,
                           _kernel_unsupported(x, weight, hidden, tensors)):
        return layer_norm_reference(x, weight, bias, eps, residual, bias_add, return_sum)
    if bias_add is not None and bias_add.dtype != weight.dtype:
        bias_add = bias_add.to(weight.dtype)
    has_add = residual is not None or bias_add is not None
    grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *tensors))
    if return_sum and not has_add:  # the pre-norm sum is x itself
        return _LayerNormFunction.apply(x, weight, bias, None, None, float(eps), False,
                                        grad_needed), x
    return _LayerNormFunction.apply(x, weight, bias, residual, bias_add, float(eps), return_sum,
                                    grad_needed)
