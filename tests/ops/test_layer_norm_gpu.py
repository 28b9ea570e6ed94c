"""LayerNorm CUDA kernels against the float64 reference and PyTorch in the same dtype (GPU only).

Error criterion (checks.assert_error_bounded): max |kernel - truth| <= 2 * max |torch - truth| +
ATOL[dtype] * max(1, max |truth|), truth = the reference evaluated in float64 on the same inputs,
torch = F.layer_norm of (x + bias_add + residual) computed in the input dtype.
"""
import pytest
import torch
import torch.nn.functional as F

from pretrain.ops import layer_norm, layer_norm_reference

from .checks import assert_error_bounded, fresh, noncontiguous

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU kernel tests")]

HIDDEN = [1, 7, 767, 768, 1023, 1024, 4097, 8192]
DTYPES = [(torch.float32, torch.float32), (torch.float16, torch.float16), (torch.float16, torch.float32),
          (torch.bfloat16, torch.bfloat16), (torch.bfloat16, torch.float32)]
EPS = 1e-5


def _make(rows, hidden, dtype, wdtype, residual, bias_add, seed):
    torch.manual_seed(seed)
    dev = "cuda"
    x = fresh((*rows, hidden), dtype, dev, scale=2.0, offset=0.5)  # non-zero mean: centring matters
    w = fresh((hidden,), wdtype, dev, scale=0.5, offset=1.0)
    b = fresh((hidden,), wdtype, dev, scale=0.5)
    r = fresh((*rows, hidden), dtype, dev) if residual else None
    ba = fresh((hidden,), wdtype, dev, scale=0.3) if bias_add else None
    return x, w, b, r, ba


def _grads(outputs, leaves, cotangents):
    present = [t for t in leaves if t is not None]
    got = torch.autograd.grad(outputs, present, cotangents)
    it = iter(got)
    return [next(it) if t is not None else None for t in leaves]


def _check(rows, hidden, dtype, wdtype, residual, bias_add, return_sum, noncontig=False, seed=0):
    x, w, b, r, ba = _make(rows, hidden, dtype, wdtype, residual, bias_add, seed)
    if noncontig:
        x = noncontiguous(x)
        r = noncontiguous(r) if r is not None else None
    names = ("x", "weight", "bias", "residual", "bias_add")

    def leaves(cast=None):
        out = []
        for t in (x, w, b, r, ba):
            if t is None:
                out.append(None)
            else:
                t = t.detach() if cast is None else t.detach().to(cast)
                out.append(t.requires_grad_())
        return out

    dy = fresh(x.shape, dtype, "cuda")
    ds = fresh(x.shape, dtype, "cuda") if return_sum else None

    ours = leaves()
    out = layer_norm(ours[0], ours[1], ours[2], EPS, residual=ours[3], bias_add=ours[4],
                     return_sum=return_sum, impl="cuda")
    y, s = (out if return_sum else (out, None))
    assert y.dtype == dtype and y.shape == x.shape
    outs, cots = ([y, s], [dy, ds]) if return_sum and (residual or bias_add) else ([y], [dy])
    g_ours = _grads(outs, ours, cots)

    truth = leaves(torch.float64)
    yt, st = layer_norm_reference(truth[0], truth[1], truth[2], EPS, residual=truth[3], bias_add=truth[4],
                                  return_sum=True)
    outs_t = [yt, st] if len(outs) == 2 else [yt]
    g_truth = _grads(outs_t, truth, [c.double() for c in cots])

    same = leaves()
    s_same = same[0]
    if bias_add:
        s_same = s_same + same[4].to(dtype)
    if residual:
        s_same = s_same + same[3]
    # Everything in x's dtype (float32 weights are cast: no reliance on mixed-dtype support).
    y_same = F.layer_norm(s_same, (hidden,), same[1].to(dtype), same[2].to(dtype), EPS)
    g_same = _grads([y_same, s_same] if len(outs) == 2 else [y_same], same, cots)

    assert_error_bounded("y", y, y_same, yt, dtype)
    if return_sum and (residual or bias_add):
        assert s.dtype == dtype
        assert_error_bounded("pre-norm sum", s, s_same, st, dtype)
    for name, go, gs, gt, leaf in zip(names, g_ours, g_same, g_truth, ours):
        if leaf is None:
            continue
        assert go.dtype == leaf.dtype, name
        assert_error_bounded(f"d{name}", go, gs, gt, leaf.dtype)


@pytest.mark.parametrize("dtype, wdtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
@pytest.mark.parametrize("hidden", HIDDEN)
def test_fused_residual_bias_layer_norm(cuda_ext, hidden, dtype, wdtype):
    _check((2, 97), hidden, dtype, wdtype, residual=True, bias_add=True, return_sum=True, seed=hidden)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("hidden", HIDDEN)
@pytest.mark.parametrize("rows", [(1,), (2, 511)], ids=["seq1", "seq511"])
def test_plain_layer_norm(cuda_ext, rows, hidden, dtype):
    _check(rows, hidden, dtype, dtype, residual=False, bias_add=False, return_sum=False, seed=hidden + 1)


@pytest.mark.parametrize("residual, bias_add, return_sum", [(True, False, False), (False, True, True),
                                                             (True, True, False), (False, False, True)])
@pytest.mark.parametrize("hidden", [7, 768, 4097])
def test_addition_variants(cuda_ext, hidden, residual, bias_add, return_sum):
    _check((3, 33), hidden, torch.float16, torch.float32, residual, bias_add, return_sum, seed=hidden + 2)


@pytest.mark.parametrize("hidden", [1, 767, 1024, 8192])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_non_contiguous_inputs(cuda_ext, hidden, dtype):
    _check((4, 19), hidden, dtype, dtype, residual=True, bias_add=False, return_sum=True, noncontig=True,
           seed=hidden + 3)


@pytest.mark.parametrize("hidden", [1, 7, 767, 1023, 4097, 8192])
@pytest.mark.parametrize("dtype, wdtype", DTYPES, ids=lambda d: str(d).replace("torch.", ""))
def test_every_output_element_is_written(cuda_ext, hidden, dtype, wdtype):
    """Outputs preallocated as NaN (the bindings' out=); every element must come back finite and
    equal to what freshly allocated outputs get."""
    rows = 3 * 97
    x, w, b, r, ba = _make((rows,), hidden, dtype, wdtype, True, True, seed=5)
    nan = float("nan")
    out = [torch.full((rows, hidden), nan, dtype=dtype, device="cuda"),
           torch.full((rows,), nan, device="cuda"), torch.full((rows,), nan, device="cuda"),
           torch.full((rows, hidden), nan, dtype=dtype, device="cuda")]
    got = cuda_ext.layer_norm_fwd(x, w, b, r, ba, EPS, True, out=out)
    expected = cuda_ext.layer_norm_fwd(x, w, b, r, ba, EPS, True)
    for name, g, o, e in zip(("y", "mean", "rstd", "sum"), got, out, expected):
        assert g.data_ptr() == o.data_ptr(), f"{name}: preallocated output not used"
        assert torch.isfinite(g).all(), f"{name}: unwritten (NaN) elements"
        assert torch.equal(g, e), name
    y, mean, rstd, s = expected
    dy = fresh(x.shape, dtype, "cuda")
    dsum = fresh(x.shape, dtype, "cuda")
    out = [torch.full((rows, hidden), nan, dtype=dtype, device="cuda")] + \
        [torch.full((hidden,), nan, dtype=wdtype, device="cuda") for _ in range(3)]
    got = cuda_ext.layer_norm_bwd(dy, s, mean, rstd, w, dsum, True, out=out)
    expected = cuda_ext.layer_norm_bwd(dy, s, mean, rstd, w, dsum, True)
    for name, g, o, e in zip(("dx", "dweight", "dbias", "dbias_add"), got, out, expected):
        assert g.data_ptr() == o.data_ptr(), f"{name}: preallocated output not used"
        assert torch.isfinite(g).all(), f"{name}: unwritten (NaN) elements"
        assert torch.equal(g, e), name


def test_backward_is_deterministic(cuda_ext):
    x, w, b, r, ba = _make((8, 512), 1024, torch.float16, torch.float32, True, True, seed=6)
    dy = fresh(x.shape, torch.float16, "cuda")
    y, mean, rstd, s = cuda_ext.layer_norm_fwd(x, w, b, r, ba, EPS, True)
    first = cuda_ext.layer_norm_bwd(dy, s, mean, rstd, w, None, True)
    for _ in range(3):
        again = cuda_ext.layer_norm_bwd(dy, s, mean, rstd, w, None, True)
        for a, e in zip(again, first):
            assert torch.equal(a, e)


def test_empty_input(cuda_ext):
    x, w, b, r, _ = _make((0,), 64, torch.float16, torch.float16, True, False, seed=7)
    x.requires_grad_(), w.requires_grad_()
    y = layer_norm(x, w, b, residual=r, impl="cuda")
    assert y.shape == (0, 64)
    y.sum().backward()
    assert x.grad.shape == (0, 64) and torch.equal(w.grad, torch.zeros_like(w))


def test_unsupported_calls(cuda_ext):
    x, w, b, _, _ = _make((4,), 8193, torch.float16, torch.float16, False, False, seed=8)
    torch.testing.assert_close(layer_norm(x, w, b, impl="auto"), layer_norm_reference(x, w, b))
    with pytest.raises(ValueError, match="hidden size"):
        layer_norm(x, w, b, impl="cuda")
    x64 = torch.randn(4, 16, device="cuda", dtype=torch.float64)
    w64 = torch.randn(16, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(layer_norm(x64, w64, w64), layer_norm_reference(x64, w64, w64))


@pytest.mark.parametrize("dtype, wdtype", [(torch.float16, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_custom_ops_pass_opcheck_on_cuda(cuda_ext, dtype, wdtype):
    x, w, b, r, ba = _make((3, 5), 96, dtype, wdtype, True, True, seed=9)
    torch.library.opcheck(torch.ops.bertforge.layer_norm_fwd.default, (x, w, b, r, ba, EPS, True))
    y, mean, rstd, s = torch.ops.bertforge.layer_norm_fwd(x, w, b, r, ba, EPS, True)
    torch.library.opcheck(torch.ops.bertforge.layer_norm_bwd.default,
                          (fresh(x.shape, dtype, "cuda"), s, mean, rstd, w, None, True))
