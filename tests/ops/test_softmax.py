"""Scaled masked softmax on CPU: the reference against torch.softmax with masks (float64, forward
and gradients), fully masked rows, the API contract, and the autograd wiring of the kernel path
through CPU stand-ins of the CUDA ops.  The CUDA kernels themselves: test_softmax_gpu.py."""
import pytest
import torch

from pretrain.ops import MASKED_THRESHOLD, scaled_masked_softmax, scaled_masked_softmax_reference


def _scores(shape, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype) * 3


def _padding_keep(batch, k, seed=1):
    """[batch, k] keep mask with a random number (>= 1) of leading valid keys per row."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, k + 1, (batch,), generator=g)
    return torch.arange(k)[None, :] < lengths[:, None]


def _block_diagonal_keep(batch, q, seed=2):
    """[batch, q, q] keep mask of packed rows: token i sees token j iff same document."""
    g = torch.Generator().manual_seed(seed)
    docs = torch.cumsum(torch.rand(batch, q, generator=g) < 0.2, dim=1)
    return docs[:, :, None] == docs[:, None, :]


@pytest.mark.parametrize("k", [1, 7, 97])
@pytest.mark.parametrize("scale", [1.0, 0.125])
def test_reference_matches_torch_softmax_with_padding_mask(k, scale):
    b, h, q = 3, 2, 5
    x = _scores((b, h, q, k))
    keep = _padding_keep(b, k)
    additive = torch.where(keep, 0.0, -10000.0).to(torch.float64)[:, None, None, :]
    xs = [x.clone().requires_grad_() for _ in range(3)]
    y_add = scaled_masked_softmax_reference(xs[0], additive, scale)
    y_bool = scaled_masked_softmax_reference(xs[1], keep[:, None, None, :], scale)
    y_t = torch.softmax(xs[2] * scale + additive, dim=-1)
    torch.testing.assert_close(y_add, y_t, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(y_bool, y_t, rtol=1e-12, atol=1e-14)
    assert (y_bool[~keep[:, None, None, :].expand_as(y_bool)] == 0).all()  # exactly zero, not ~1e-4343
    dy = torch.randn_like(y_t)
    g_t = torch.autograd.grad(y_t, xs[2], dy)[0]
    for y, xx in ((y_add, xs[0]), (y_bool, xs[1])):
        torch.testing.assert_close(torch.autograd.grad(y, xx, dy)[0], g_t, rtol=1e-10, atol=1e-12)


def test_reference_matches_torch_softmax_with_block_diagonal_mask():
    b, h, q = 2, 3, 33
    x = _scores((b, h, q, q), seed=3)
    keep = _block_diagonal_keep(b, q)[:, None]  # [b, 1, q, q]
    minus_inf = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, float("-inf"))
    xs = [x.clone().requires_grad_() for _ in range(2)]
    y = scaled_masked_softmax_reference(xs[0], keep, 0.5)
    y_t = torch.softmax(xs[1] * 0.5 + minus_inf, dim=-1)
    torch.testing.assert_close(y, y_t, rtol=1e-12, atol=1e-14)
    dy = torch.randn_like(y)
    torch.testing.assert_close(torch.autograd.grad(y, xs[0], dy)[0], torch.autograd.grad(y_t, xs[1], dy)[0],
                               rtol=1e-10, atol=1e-12)


def test_additive_mask_is_added_to_unmasked_logits():
    x = _scores((2, 2, 3, 6), seed=4)
    bias = torch.randn(2, 1, 3, 6, dtype=torch.float64)  # e.g. a relative-position bias, all > threshold
    torch.testing.assert_close(scaled_masked_softmax_reference(x, bias, 0.7), torch.softmax(0.7 * x + bias, -1),
                               rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("masked_value", [float("-inf"), torch.finfo(torch.float32).min, -10000.0, "bf16", "bool"])
def test_fully_masked_rows_give_zeros_and_zero_gradient(masked_value):
    b, h, q, k = 2, 2, 4, 5
    x = _scores((b, h, q, k), seed=5).requires_grad_()
    keep = torch.ones(b, 1, q, k, dtype=torch.bool)
    keep[0, :, 1] = False          # query row 1 of batch 0: nothing to attend to
    keep[1, :, :, 3:] = False      # padding keys of batch 1
    if masked_value == "bool":
        mask = keep
    elif masked_value == "bf16":  # BERT's -10000 in bfloat16 is -9984: still masked
        mask = torch.zeros(keep.shape, dtype=torch.bfloat16).masked_fill(~keep, -10000.0)
        assert mask.min().item() == -9984.0
    else:
        mask = torch.zeros(keep.shape, dtype=torch.float64).masked_fill(~keep, masked_value)
    y = scaled_masked_softmax_reference(x, mask, 1.0)
    assert torch.isfinite(y).all()
    assert (y[0, :, 1] == 0).all()
    torch.testing.assert_close(y[1].sum(-1), torch.ones(h, q, dtype=torch.float64))
    assert (y[1, ..., 3:] == 0).all()
    (gx,) = torch.autograd.grad(y, x, torch.randn_like(y))
    assert torch.isfinite(gx).all()
    assert (gx[0, :, 1] == 0).all() and (gx[1, ..., 3:] == 0).all()


def test_rows_of_minus_inf_scores_without_mask_give_zeros():
    x = _scores((1, 1, 3, 4), seed=6)
    x[0, 0, 2] = float("-inf")
    y = scaled_masked_softmax_reference(x)
    assert (y[0, 0, 2] == 0).all()
    torch.testing.assert_close(y[0, 0, :2], torch.softmax(x[0, 0, :2], -1))


def test_threshold_value():
    """A value <= MASKED_THRESHOLD masks its element; anything above is an ordinary additive term."""
    x = torch.zeros(1, 1, 2, 1, dtype=torch.float64)
    mask = torch.tensor([[MASKED_THRESHOLD], [MASKED_THRESHOLD + 1e-3]], dtype=torch.float64)[None, None]
    y = scaled_masked_softmax_reference(x, mask)
    assert y[0, 0, 0, 0] == 0  # masked: a fully masked row
    assert y[0, 0, 1, 0] == 1  # not masked: the only element of its row


def test_reference_gradcheck_float64():
    x = _scores((2, 2, 3, 5), seed=7).requires_grad_()
    keep = torch.ones(2, 1, 3, 5, dtype=torch.bool)
    keep[0, 0, 0] = False
    keep[1, 0, :, 4] = False
    assert torch.autograd.gradcheck(lambda t: scaled_masked_softmax_reference(t, keep, 0.3), (x,))
    additive = torch.where(keep, torch.randn(keep.shape, dtype=torch.float64), float("-inf"))
    assert torch.autograd.gradcheck(lambda t: scaled_masked_softmax_reference(t, additive, 0.3), (x,))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reference_low_precision_computes_in_float32(dtype):
    x = _scores((2, 2, 3, 50), dtype=torch.float32, seed=8).to(dtype)
    keep = _padding_keep(2, 50)[:, None, None, :]
    y = scaled_masked_softmax_reference(x, keep, 0.125)
    assert y.dtype == dtype
    expected = torch.softmax((x.float() * 0.125).masked_fill(~keep, float("-inf")), -1).to(dtype)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)


def test_mask_shapes_and_validation():
    x = _scores((2, 3, 4, 5), dtype=torch.float32)
    keep = _padding_keep(2, 5)
    y4 = scaled_masked_softmax(x, keep[:, None, None, :])
    torch.testing.assert_close(scaled_masked_softmax(x, keep[0]), scaled_masked_softmax(x, keep[0][None, None, None]))
    assert y4.shape == x.shape
    with pytest.raises(ValueError, match="broadcast"):
        scaled_masked_softmax(x, torch.ones(2, 1, 1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="broadcast"):
        scaled_masked_softmax(x, torch.ones(3, 1, 1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="bool"):
        scaled_masked_softmax(x, torch.ones(2, 1, 1, 5, dtype=torch.int64))
    with pytest.raises(ValueError, match="batch, heads, q, k"):
        scaled_masked_softmax(x[0])
    with pytest.raises(ValueError, match="impl must be one of"):
        scaled_masked_softmax(x, impl="triton")
    with pytest.raises((ValueError, RuntimeError)):
        scaled_masked_softmax(x, impl="cuda")


def test_mask_gets_no_gradient():
    x = _scores((1, 2, 3, 4), dtype=torch.float64).requires_grad_()
    mask = torch.zeros(1, 1, 1, 4, dtype=torch.float64, requires_grad=True)
    y = scaled_masked_softmax(x, mask)
    assert not torch.autograd.grad(y.sum(), [x, mask], allow_unused=True)[1]


# --------------------------------------------------------------------------- kernel path wiring
@pytest.mark.parametrize("mask_kind", ["none", "bool", "additive"])
def test_kernel_path_gradcheck_with_emulated_ops(emulated, mask_kind):
    """The autograd.Function + custom ops with the kernel's backward formula
    dx = scale * y * (dy - sum(dy * y)), incl. fully masked rows, against numerical gradients."""
    x = _scores((2, 2, 3, 6), seed=9).requires_grad_()
    keep = torch.ones(2, 1, 3, 6, dtype=torch.bool)
    keep[0, 0, 2] = False
    keep[1, 0, :, :2] = False
    mask = {"none": None, "bool": keep,
            "additive": torch.where(keep, 0.5, float("-inf")).to(torch.float64)}[mask_kind]
    out = scaled_masked_softmax(x, mask, 0.25, impl="cuda")
    torch.testing.assert_close(out, scaled_masked_softmax_reference(x, mask, 0.25), rtol=0, atol=0)
    assert torch.autograd.gradcheck(lambda t: scaled_masked_softmax(t, mask, 0.25, impl="cuda"), (x,))


@pytest.mark.parametrize("mask", [None, "bool", "same", "float32"])
def test_custom_ops_pass_opcheck(emulated, mask):
    x = _scores((2, 3, 4, 9), dtype=torch.float16, seed=10)
    m = {None: None, "bool": _padding_keep(2, 9)[:, None, None, :],
         "same": torch.zeros(2, 1, 4, 9, dtype=torch.float16),
         "float32": torch.zeros(1, 1, 1, 9)}[mask]
    torch.library.opcheck(torch.ops.bertforge.scaled_masked_softmax_fwd.default, (x, m, 0.5))
    y = torch.ops.bertforge.scaled_masked_softmax_fwd(x, m, 0.5)
    torch.library.opcheck(torch.ops.bertforge.scaled_masked_softmax_bwd.default, (y, torch.randn_like(y), 0.5))
