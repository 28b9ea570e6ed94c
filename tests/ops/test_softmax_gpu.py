"""Scaled masked softmax CUDA kernels against the float64 reference and PyTorch in the same dtype
(GPU only).  Error criterion: checks.assert_error_bounded, on the rows that have at least one
unmasked element (torch gives NaN or a uniform row for the others); fully masked rows must be
exactly zero, with zero gradient.
"""
import pytest
import torch

from pretrain.ops import scaled_masked_softmax, scaled_masked_softmax_reference

from .checks import assert_error_bounded, fresh

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU kernel tests")]

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
K_LENS = [1, 7, 97, 511, 512, 4096, 8192, 8193, 10007]  # > 8192: the looped two-pass kernel
MASKS = ["none", "pad_add_f32", "pad_add_same", "pad_bool", "rows_bool", "rows_add_finfo", "pad_minus_inf"]


def _keep(kind, b, q, k, gen):
    """Keep mask [b, 1, 1 or q, k]; some rows fully masked for the per-row kinds."""
    if kind.startswith("pad"):
        lengths = torch.randint(1, k + 1, (b,), generator=gen, device="cuda")
        lengths[0] = k  # one unpadded sequence
        return (torch.arange(k, device="cuda")[None, :] < lengths[:, None])[:, None, None, :]
    # packed rows: random block-diagonal-like pattern plus a fully masked query row
    keep = torch.rand(b, 1, q, k, generator=gen, device="cuda") < 0.6
    keep[0, 0, q // 2] = False
    return keep


def _mask(kind, keep, dtype):
    if kind == "none":
        return None
    if kind.endswith("bool"):
        return keep
    if kind == "pad_add_f32":
        return torch.where(keep, 0.0, -10000.0)
    if kind == "pad_add_same":
        return torch.where(keep, 0.0, -10000.0).to(dtype)  # -9984 in bfloat16: still masked
    if kind == "rows_add_finfo":
        return torch.zeros(keep.shape, device="cuda", dtype=dtype).masked_fill(~keep, torch.finfo(dtype).min)
    if kind == "pad_minus_inf":
        return torch.zeros(keep.shape, device="cuda").masked_fill(~keep, float("-inf"))
    raise AssertionError(kind)


def _torch_same(x, mask, keep, scale):
    """What PyTorch computes in the scores' dtype (masked with -inf; NaN rows excluded later)."""
    z = x * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            z = z.masked_fill(~mask, float("-inf"))
        else:
            z = z + mask.to(x.dtype)
    return torch.softmax(z, dim=-1)


def _check(b, h, q, k, dtype, kind, scale, seed, transpose_scores=False, expand_mask=False):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    torch.manual_seed(seed)
    if transpose_scores:  # a [b, q, h, k] buffer seen as [b, h, q, k]: non-contiguous
        x = fresh((b, q, h, k), dtype, "cuda", scale=3.0).transpose(1, 2)
    else:
        x = fresh((b, h, q, k), dtype, "cuda", scale=3.0)
    keep = _keep(kind, b, q, k, gen) if kind != "none" else torch.ones(b, 1, 1, k, dtype=torch.bool, device="cuda")
    mask = _mask(kind, keep, dtype)
    if expand_mask and mask is not None:
        mask = mask.expand(b, 1, q, k)  # stride 0 over q
    dy = fresh(x.shape, dtype, "cuda")

    xo = x.detach().requires_grad_()
    y = scaled_masked_softmax(xo, mask, scale, impl="cuda")
    assert y.dtype == dtype and y.shape == x.shape
    (gx,) = torch.autograd.grad(y, xo, dy)

    xt = x.detach().double().requires_grad_()
    yt = scaled_masked_softmax_reference(xt, mask.double() if mask is not None and mask.dtype != torch.bool
                                         else mask, scale)
    (gt,) = torch.autograd.grad(yt, xt, dy.double())

    xs = x.detach().requires_grad_()
    ys = _torch_same(xs, mask, keep, scale)
    (gs,) = torch.autograd.grad(ys, xs, dy)

    alive = keep.expand(b, h, q, k).any(dim=-1, keepdim=True)  # rows with an unmasked element
    assert_error_bounded("y", y, ys, yt, dtype, where=alive.expand_as(y))
    assert_error_bounded("dx", gx, gs, gt, dtype, where=alive.expand_as(y))
    dead = ~alive.expand_as(y)
    assert (y[dead] == 0).all() and (gx[dead] == 0).all(), "fully masked rows must be exactly zero"
    if kind != "none":
        masked = ~keep.expand(b, h, q, k)
        assert (y[masked] == 0).all(), "masked elements must get probability exactly 0"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("k", K_LENS)
@pytest.mark.parametrize("kind", MASKS)
def test_softmax_matches(cuda_ext, kind, k, dtype):
    q = 97 if k <= 4096 else 3
    _check(2, 3, q, k, dtype, kind, scale=0.125, seed=k)


@pytest.mark.parametrize("q", [1, 97, 511])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_square_packed_masks(cuda_ext, q, dtype):
    _check(2, 4, q, q, dtype, "rows_bool", scale=q ** -0.5, seed=q)


@pytest.mark.parametrize("k", [7, 512, 10007])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_non_contiguous_scores_and_broadcast_masks(cuda_ext, k, dtype):
    _check(2, 3, 5, k, dtype, "pad_add_same", scale=1.0, seed=k + 1, transpose_scores=True, expand_mask=True)
    _check(2, 3, 5, k, dtype, "rows_bool", scale=0.5, seed=k + 2, transpose_scores=True)


def test_transposed_mask_layout(cuda_ext):
    """A mask whose last dim is not contiguous (the binding copies it)."""
    x = fresh((2, 3, 9, 9), torch.float16, "cuda")
    keep = torch.rand(2, 1, 9, 9, device="cuda") < 0.7
    keep_t = keep.transpose(-1, -2).contiguous().transpose(-1, -2)
    assert keep_t.stride(-1) != 1
    torch.testing.assert_close(scaled_masked_softmax(x, keep_t, impl="cuda"),
                               scaled_masked_softmax(x, keep, impl="cuda"), rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 97, 512, 8192, 10007])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_every_output_element_is_written(cuda_ext, k, dtype):
    x = fresh((2, 3, 5, k), dtype, "cuda")
    keep = torch.rand(2, 1, 5, k, device="cuda") < 0.5
    keep[1, 0, 2] = False
    nan = float("nan")
    out = torch.full(x.shape, nan, dtype=dtype, device="cuda")
    y = cuda_ext.softmax_fwd(x, keep, 0.3, out=out)
    assert y.data_ptr() == out.data_ptr() and torch.isfinite(y).all()
    assert torch.equal(y, cuda_ext.softmax_fwd(x, keep, 0.3))
    dy = fresh(x.shape, dtype, "cuda")
    out = torch.full(x.shape, nan, dtype=dtype, device="cuda")
    dx = cuda_ext.softmax_bwd(y, dy, 0.3, out=out)
    assert dx.data_ptr() == out.data_ptr() and torch.isfinite(dx).all()
    assert torch.equal(dx, cuda_ext.softmax_bwd(y, dy, 0.3))


def test_unsupported_calls_fall_back_or_raise(cuda_ext):
    x64 = torch.randn(1, 2, 3, 4, device="cuda", dtype=torch.float64)
    torch.testing.assert_close(scaled_masked_softmax(x64), scaled_masked_softmax_reference(x64))
    with pytest.raises(ValueError, match="scores dtype"):
        scaled_masked_softmax(x64, impl="cuda")
    x = torch.randn(1, 2, 3, 4, device="cuda", dtype=torch.float16)
    m64 = torch.zeros(1, 1, 1, 4, device="cuda", dtype=torch.float64)  # converted to float32
    torch.testing.assert_close(scaled_masked_softmax(x, m64, impl="cuda"), scaled_masked_softmax_reference(x, m64))


@pytest.mark.parametrize("mask_dtype", [None, torch.bool, torch.float32, torch.bfloat16])
def test_custom_ops_pass_opcheck_on_cuda(cuda_ext, mask_dtype):
    x = fresh((2, 3, 4, 40), torch.bfloat16, "cuda")
    mask = None if mask_dtype is None else (torch.rand(2, 1, 4, 40, device="cuda") < 0.8).to(mask_dtype)
    torch.library.opcheck(torch.ops.bertforge.scaled_masked_softmax_fwd.default, (x, mask, 0.5))
    y = torch.ops.bertforge.scaled_masked_softmax_fwd(x, mask, 0.5)
    torch.library.opcheck(torch.ops.bertforge.scaled_masked_softmax_bwd.default,
                          (y, fresh(y.shape, torch.bfloat16, "cuda"), 0.5))
