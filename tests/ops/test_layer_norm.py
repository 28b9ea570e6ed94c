"""LayerNorm on CPU: the reference against torch's F.layer_norm (float64, forward and gradients),
the API contract, and the autograd wiring of the kernel path through CPU stand-ins of the CUDA
ops (tests/ops/emulation.py).  The CUDA kernels themselves: test_layer_norm_gpu.py."""
import logging

import pytest
import torch
import torch.nn.functional as F

from pretrain import ops
from pretrain.ops import _ext, layer_norm, layer_norm_reference

HIDDEN_SIZES = [1, 7, 64, 767, 1023]


def _inputs(rows_shape, hidden, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows_shape, hidden, generator=g, dtype=dtype)
    w = torch.randn(hidden, generator=g, dtype=dtype)
    b = torch.randn(hidden, generator=g, dtype=dtype)
    r = torch.randn(*rows_shape, hidden, generator=g, dtype=dtype)
    ba = torch.randn(hidden, generator=g, dtype=dtype)
    return x, w, b, r, ba


@pytest.mark.parametrize("hidden", HIDDEN_SIZES)
@pytest.mark.parametrize("eps", [1e-12, 1e-5])
def test_reference_matches_torch_layer_norm_float64(hidden, eps):
    x, w, b, _, _ = _inputs((3, 5), hidden)
    ours = [t.clone().requires_grad_() for t in (x, w, b)]
    theirs = [t.clone().requires_grad_() for t in (x, w, b)]
    y = layer_norm_reference(*ours, eps=eps)
    dy = torch.randn_like(y)
    gy = torch.autograd.grad(y, ours, dy, retain_graph=True)
    if hidden == 1:
        # Exact answer: s - mean(s) == 0, so y == bias, dx == 0, dweight == 0, dbias == sum(dy).
        # (torch's float64 kernel leaves ~1e-16 * |x| of x - mean, times rstd = 1e6 at eps=1e-12.)
        y_t = b.expand_as(x)
        gt = (torch.zeros_like(x), torch.zeros_like(w), dy.sum(dim=(0, 1)))
    else:
        y_t = F.layer_norm(theirs[0], (hidden,), theirs[1], theirs[2], eps)
        gt = torch.autograd.grad(y_t, theirs, dy)
    torch.testing.assert_close(y, y_t, rtol=1e-12, atol=1e-12)
    for name, a, e in zip(("dx", "dweight", "dbias"), gy, gt):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.parametrize("hidden", [2, 7, 767])  # hidden 1: torch's own error dominates (see above)
@pytest.mark.parametrize("use_residual, use_bias", [(True, False), (False, True), (True, True)])
def test_reference_with_additions_matches_torch_float64(hidden, use_residual, use_bias):
    x, w, b, r, ba = _inputs((2, 9), hidden, seed=1)
    r = r if use_residual else None
    ba = ba if use_bias else None
    leaves = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r, ba)]
    y, s = layer_norm_reference(leaves[0], leaves[1], leaves[2], 1e-12, residual=leaves[3],
                                bias_add=leaves[4], return_sum=True)
    theirs = [t.clone().requires_grad_() if t is not None else None for t in (x, w, b, r, ba)]
    s_t = theirs[0] + (theirs[4] if use_bias else 0) + (theirs[3] if use_residual else 0)
    y_t = F.layer_norm(s_t, (hidden,), theirs[1], theirs[2], 1e-12)
    torch.testing.assert_close(s, s_t, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(y, y_t, rtol=1e-12, atol=1e-12)
    # Gradients through both outputs (the pre-LN residual stream uses the sum).
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    wanted = [t for t in leaves if t is not None]
    got = torch.autograd.grad((y, s), wanted, (dy, ds))
    exp = torch.autograd.grad((y_t, s_t), [t for t in theirs if t is not None], (dy, ds))
    for a, e in zip(got, exp):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def test_reference_gradcheck_float64():
    x, w, b, r, ba = _inputs((2, 3), 6, seed=2)
    args = [t.requires_grad_() for t in (x, w, b, r, ba)]

    def fn(x, w, b, r, ba):
        return layer_norm_reference(x, w, b, 1e-5, residual=r, bias_add=ba, return_sum=True)

    assert torch.autograd.gradcheck(fn, args)
    assert torch.autograd.gradgradcheck(fn, args)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_normalises_the_rounded_sum(dtype):
    """With additions, y is LN of the returned sum s (rounded to x's dtype), computed in float32."""
    x, w, b, r, ba = (t.to(dtype) for t in _inputs((4, 3), 96, dtype=torch.float32, seed=3))
    y, s = layer_norm_reference(x, w, b, 1e-5, residual=r, bias_add=ba, return_sum=True)
    assert y.dtype == dtype and s.dtype == dtype
    exact_sum = x.float() + ba.float() + r.float()
    torch.testing.assert_close(s, exact_sum.to(dtype), rtol=0, atol=0)
    torch.testing.assert_close(y, layer_norm_reference(s, w, b, 1e-5), rtol=0, atol=0)
    y32 = F.layer_norm(s.float(), (96,), w.float(), b.float(), 1e-5)
    torch.testing.assert_close(y, y32.to(dtype))  # same up to float32 rounding (<= 1 ulp of dtype)
    # ... and not LN of the unrounded sum where rounding the sum matters:
    y_unrounded = F.layer_norm(exact_sum, (96,), w.float(), b.float(), 1e-5).to(dtype)
    assert not torch.equal(y, y_unrounded) or torch.equal(s.float(), exact_sum)


def test_public_api_on_cpu_uses_the_reference():
    x, w, b, r, ba = _inputs((2, 4), 33, dtype=torch.float32, seed=4)
    for impl in ("auto", "reference"):
        torch.testing.assert_close(layer_norm(x, w, b, 1e-5, residual=r, impl=impl),
                                   layer_norm_reference(x, w, b, 1e-5, residual=r), rtol=0, atol=0)
    y, s = layer_norm(x, w, b, return_sum=True)
    assert s is x  # no additions: the pre-norm sum is x itself
    torch.testing.assert_close(y, layer_norm_reference(x, w, b), rtol=0, atol=0)


def test_impl_cuda_on_cpu_tensors_raises():
    x, w, b, _, _ = _inputs((2,), 8, dtype=torch.float32)
    with pytest.raises((ValueError, RuntimeError)):
        layer_norm(x, w, b, impl="cuda")
    with pytest.raises(ValueError, match="impl must be one of"):
        layer_norm(x, w, b, impl="fast")


@pytest.mark.parametrize("bad", ["weight", "residual_shape", "residual_dtype", "bias_add", "bias_dtype"])
def test_argument_validation(bad):
    x, w, b, r, ba = _inputs((2, 3), 8, dtype=torch.float32)
    kwargs = {}
    if bad == "weight":
        w = torch.randn(7)
    elif bad == "residual_shape":
        kwargs["residual"] = torch.randn(2, 8)
    elif bad == "residual_dtype":
        kwargs["residual"] = r.double()
    elif bad == "bias_add":
        kwargs["bias_add"] = torch.randn(2, 3, 8)
    elif bad == "bias_dtype":
        b = b.double()
    with pytest.raises(ValueError):
        layer_norm(x, w, b, **kwargs)


# --------------------------------------------------------------------------- kernel path wiring
@pytest.mark.parametrize("use_residual, use_bias, return_sum", [
    (False, False, False), (False, False, True), (True, False, False), (True, False, True),
    (False, True, False), (True, True, True)])
def test_kernel_path_gradcheck_with_emulated_ops(emulated, use_residual, use_bias, return_sum):
    """The autograd.Function + custom ops, with the backward formula the CUDA kernel implements
    (dx, dgamma, dbeta, dbias_add, plus the pre-norm-sum gradient), against numerical gradients."""
    x, w, b, r, ba = _inputs((2, 3), 5, seed=5)
    args = [x, w, b] + ([r] if use_residual else []) + ([ba] if use_bias else [])
    args = [t.requires_grad_() for t in args]

    def fn(*a):
        it = iter(a[3:])
        res = next(it) if use_residual else None
        bad = next(it) if use_bias else None
        return layer_norm(a[0], a[1], a[2], 1e-5, residual=res, bias_add=bad,
                          return_sum=return_sum, impl="cuda")

    out = fn(*args)
    expected = layer_norm_reference(*args[:3], 1e-5, residual=args[3] if use_residual else None,
                                    bias_add=args[-1] if use_bias else None, return_sum=return_sum)
    for o, e in zip(out if return_sum else (out,), expected if return_sum else (expected,)):
        torch.testing.assert_close(o, e, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(fn, args)


def test_kernel_path_no_grad_skips_the_sum(emulated, monkeypatch):
    calls = []
    real = torch.ops.bertforge.layer_norm_fwd

    def spy(*a):
        calls.append(a[-1])
        return real(*a)

    monkeypatch.setattr(torch.ops.bertforge, "layer_norm_fwd", spy)
    x, w, b, r, _ = _inputs((2, 3), 8, dtype=torch.float32)
    with torch.no_grad():
        layer_norm(x, w, b, residual=r, impl="cuda")
    layer_norm(x, w.requires_grad_(), b, residual=r, impl="cuda")
    assert calls == [False, True]  # store_sum only when a backward (or return_sum) needs it


@pytest.mark.parametrize("dtype, wdtype", [(torch.float16, torch.float16), (torch.bfloat16, torch.float32)])
def test_kernel_path_low_precision_dtypes_with_emulated_ops(emulated, dtype, wdtype):
    x, w, b, r, ba = _inputs((3, 4), 40, dtype=torch.float32, seed=6)
    x, r = x.to(dtype), r.to(dtype)
    w, b, ba = w.to(wdtype), b.to(wdtype), ba.to(wdtype)
    y, s = layer_norm(x, w, b, 1e-5, residual=r, bias_add=ba, return_sum=True, impl="cuda")
    ye, se = layer_norm_reference(x, w, b, 1e-5, residual=r, bias_add=ba, return_sum=True)
    assert y.dtype == dtype and s.dtype == dtype
    torch.testing.assert_close(s, se, rtol=0, atol=0)
    torch.testing.assert_close(y, ye, rtol=0, atol=0)


@pytest.mark.parametrize("args", [
    dict(x=(3, 5, 7), dtype=torch.float16, wdtype=torch.float32, residual=True, bias_add=True, store=True),
    dict(x=(4, 9), dtype=torch.bfloat16, wdtype=torch.bfloat16, residual=False, bias_add=False, store=True),
    dict(x=(2, 6), dtype=torch.float32, wdtype=torch.float32, residual=True, bias_add=False, store=False),
])
def test_custom_ops_pass_opcheck(emulated, args):
    """Schemas, fake (meta) implementations and dispatch of the custom ops (torch.library.opcheck),
    with the CPU stand-ins as the real implementation."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(args["x"], generator=g).to(args["dtype"])
    h = args["x"][-1]
    w = torch.randn(h, generator=g).to(args["wdtype"])
    b = torch.randn(h, generator=g).to(args["wdtype"])
    r = torch.randn(args["x"], generator=g).to(args["dtype"]) if args["residual"] else None
    ba = torch.randn(h, generator=g).to(args["wdtype"]) if args["bias_add"] else None
    fwd = (x, w, b, r, ba, 1e-5, args["store"])
    torch.library.opcheck(torch.ops.bertforge.layer_norm_fwd.default, fwd)
    y, mean, rstd, s = torch.ops.bertforge.layer_norm_fwd(*fwd)
    saved = s if s.numel() else x
    dsum = torch.randn_like(x) if args["residual"] else None
    torch.library.opcheck(torch.ops.bertforge.layer_norm_bwd.default,
                          (torch.randn_like(y), saved, mean, rstd, w, dsum, args["bias_add"]))


def test_fallback_is_logged_once(fresh_ext_state, caplog, monkeypatch):
    monkeypatch.delenv("BERTFORGE_CUDA_EXT", raising=False)
    x, w, b, r, _ = _inputs((2,), 8, dtype=torch.float32)
    with caplog.at_level(logging.INFO, logger="pretrain.ops"):
        for _ in range(3):
            layer_norm(x, w, b, residual=r)
            ops.scaled_masked_softmax(torch.randn(1, 1, 2, 3))
    if _ext.load_extension() is None:
        messages = [rec for rec in caplog.records if "reference implementations" in rec.getMessage()]
        assert len(messages) == 1, [rec.getMessage() for rec in caplog.records]
        assert _ext.extension_status() in messages[0].getMessage()
    else:  # a machine with the extension installed: nothing to fall back from
        assert not [rec for rec in caplog.records if "reference implementations" in rec.getMessage()]
