"""CPU stand-ins for the ``bertforge::*`` CUDA custom ops, written in torch from the kernels'
algorithms (the contract in csrc/launchers.h), so the Python fronts can be tested without a GPU:
the autograd.Function wiring (which gradient goes where, the pre-norm-sum gradient, dbias_add),
the backward formulas the kernels implement, the custom-op schemas and fake implementations, and
the LAMB list handling.  They say nothing about the CUDA code itself; the GPU tests do that.
"""
import contextlib
from typing import Iterator

import torch

from pretrain.ops import _ext
from pretrain.ops.softmax import scaled_masked_softmax_reference


def _cdt(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def ln_fwd(x, weight, bias, residual, bias_add, eps, store_sum):
    cdt = _cdt(x.dtype)
    hidden = x.shape[-1]
    has_add = residual is not None or bias_add is not None
    s = x
    if has_add:
        acc = x.to(cdt)
        if bias_add is not None:
            acc = acc + bias_add.to(cdt)
        if residual is not None:
            acc = acc + residual.to(cdt)
        s = acc.to(x.dtype)
    sc = s.reshape(-1, hidden).to(cdt)
    mean = sc.mean(-1)
    rstd = torch.rsqrt((sc - mean[:, None]).square().mean(-1) + eps)
    y = ((sc - mean[:, None]) * rstd[:, None] * weight.to(cdt) + bias.to(cdt)).to(x.dtype)
    s_out = s.clone() if (store_sum and has_add) else x.new_empty((0,))
    return y.reshape(x.shape), mean.float() if cdt != torch.float64 else mean, \
        rstd.float() if cdt != torch.float64 else rstd, s_out


def ln_bwd(dy, s, mean, rstd, weight, dsum, want_dbias_add):
    """dx = rstd * (g - mean(g) - xhat * mean(g * xhat)) + dsum with g = dy * gamma (per row);
    dgamma = sum_rows dy * xhat, dbeta = sum_rows dy, dbias_add = sum_rows dx."""
    cdt = _cdt(s.dtype)
    hidden = s.shape[-1]
    s2 = s.reshape(-1, hidden).to(cdt)
    dy2 = dy.reshape(-1, hidden).to(cdt)
    mean, rstd = mean.to(cdt)[:, None], rstd.to(cdt)[:, None]
    xhat = (s2 - mean) * rstd
    g = dy2 * weight.to(cdt)
    dx = rstd * (g - g.mean(-1, keepdim=True) - xhat * (g * xhat).mean(-1, keepdim=True))
    if dsum is not None:
        dx = dx + dsum.reshape(-1, hidden).to(cdt)
    dw = (dy2 * xhat).sum(0).to(weight.dtype)
    db = dy2.sum(0).to(weight.dtype)
    dba = dx.sum(0).to(weight.dtype) if want_dbias_add else weight.new_empty((0,))
    return dx.to(s.dtype).reshape(s.shape), dw, db, dba


def softmax_fwd(scores, mask, scale):
    return scaled_masked_softmax_reference(scores, mask, scale).clone()


def softmax_bwd(y, dy, scale):
    """dx = scale * y * (dy - sum(dy * y))."""
    cdt = _cdt(y.dtype)
    yc, dc = y.to(cdt), dy.to(cdt)
    return (scale * yc * (dc - (dc * yc).sum(-1, keepdim=True))).to(y.dtype)


def lamb_update(params, grads, exp_avgs, exp_avg_sqs, updates, weight_decays, beta1, beta2, eps,
                bc1, bc2, grad_scale, grad_scale_value, sq_norms_out):
    scale = grad_scale.reshape(()) if grad_scale is not None else grad_scale_value
    if sq_norms_out is not None:
        sq_norms_out.zero_()
    for i, (p, g, m, v, u) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs, updates)):
        g = g.float() / scale
        m.mul_(beta1).add_(g, alpha=1.0 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        u.copy_((m / bc1) / ((v / bc2).sqrt() + eps) + weight_decays[i] * p)
        if sq_norms_out is not None:
            sq_norms_out[0, i] = p.square().sum()
            sq_norms_out[1, i] = u.square().sum()


def lamb_apply(params, updates, model_params, param_norms, update_norms, adapt, lr, lr_value,
               min_trust_ratio, max_trust_ratio):
    lr = lr.reshape(()) if lr is not None else lr_value
    for i, (p, u) in enumerate(zip(params, updates)):
        pn, un = param_norms[i], update_norms[i]
        ratio = pn / un if (pn > 0 and un > 0) else torch.ones((), dtype=torch.float32)
        ratio = ratio.clamp(min_trust_ratio, max_trust_ratio) if adapt[i] else torch.ones(())
        p.sub_(u * (ratio * lr))
        if model_params:
            model_params[i].copy_(p)


_IMPLS = {
    "layer_norm_fwd": ln_fwd,
    "layer_norm_bwd": ln_bwd,
    "scaled_masked_softmax_fwd": softmax_fwd,
    "scaled_masked_softmax_bwd": softmax_bwd,
    "lamb_update_": lamb_update,
    "lamb_apply_": lamb_apply,
}


def _use_kernel_everywhere(impl, op, on_cuda, unsupported):
    """Kernel path for impl "auto"/"cuda" whatever the device and dtype: the stand-ins also take
    float64, which gradcheck needs (the real kernels take float32/float16/bfloat16 only)."""
    if impl not in _ext.IMPLS:
        raise ValueError(f"{op}: impl must be one of {_ext.IMPLS}, got {impl!r}")
    return impl != "reference"


@contextlib.contextmanager
def emulated_kernels(monkeypatch) -> Iterator[None]:
    """Register the CPU stand-ins for the bertforge ops and route impl="auto"/"cuda" to them."""
    import pretrain.ops.lamb_fused  # noqa: F401 - defines the lamb ops before we add CPU kernels

    lib = torch.library.Library("bertforge", "IMPL")
    try:
        for name, fn in _IMPLS.items():
            lib.impl(name, fn, "CPU")
        monkeypatch.setattr(_ext, "use_kernel", _use_kernel_everywhere)
        yield
    finally:
        lib._destroy()
