"""Shared checks for the GPU kernel tests."""
from typing import Dict, Optional, Tuple

import torch

# The "small absolute term" of the error bound, relative to the largest magnitude of the true
# result (at least 1): about 0.1 ulp at that magnitude for float16/bfloat16, ~100 ulp for float32
# (whose --use_fast_math exp/div/sqrt and different summation orders differ from torch's at that
# level while torch's own float32 error can be near zero).
ATOL = {torch.float32: 1e-5, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def assert_error_bounded(name: str, ours: torch.Tensor, torch_same: torch.Tensor, truth: torch.Tensor,
                         dtype: torch.dtype, where: Optional[torch.Tensor] = None) -> Tuple[float, float]:
    """|ours - truth| <= 2 * |torch_same - truth| + ATOL[dtype] * max(1, |truth|), as max-norms.

    truth: the reference in float64; torch_same: PyTorch's own op in the kernel's dtype;
    where: optional bool mask of the elements to compare (e.g. rows torch gets wrong by design).
    """
    assert ours.shape == truth.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(truth.shape)}"
    o, t, r = ours.detach().double(), torch_same.detach().double(), truth.detach().double()
    if where is not None:
        where = where.expand_as(r)
        o, t, r = o[where], t[where], r[where]
    assert torch.isfinite(o).all(), f"{name}: non-finite values in the kernel's result"
    if r.numel() == 0:
        return 0.0, 0.0
    scale = max(1.0, r.abs().max().item())
    e_ours = (o - r).abs().max().item()
    e_torch = (t - r).abs().nan_to_num(nan=0.0).max().item()
    bound = 2.0 * e_torch + ATOL[dtype] * scale
    assert e_ours <= bound, (f"{name} ({dtype}): kernel error {e_ours:.3e} > 2 x torch error {e_torch:.3e} "
                             f"+ {ATOL[dtype]:g} x {scale:.3g}")
    return e_ours, e_torch


def fresh(shape, dtype, device, scale: float = 1.0, offset: float = 0.0, generator=None) -> torch.Tensor:
    """Random normal values (never zeros) made in float32 and rounded to dtype."""
    t = torch.randn(tuple(shape), dtype=torch.float32, device=device, generator=generator) * scale + offset
    return t.to(dtype)


def noncontiguous(t: torch.Tensor) -> torch.Tensor:
    """The same values as t in a non-contiguous layout: every other slice of a buffer twice as
    long in t's first dim of size > 1 (t itself when it has none)."""
    dims = [d for d, n in enumerate(t.shape) if n > 1]
    if not dims:
        return t
    d = dims[0]
    shape = list(t.shape)
    shape[d] *= 2
    wide = torch.randn(shape, dtype=torch.float32, device=t.device).to(t.dtype)
    view = wide[(slice(None),) * d + (slice(None, None, 2),)]
    view.copy_(t)
    assert not view.is_contiguous()
    return view


def stats(results: Dict[str, Tuple[float, float]]) -> str:
    return ", ".join(f"{k}: {a:.2e} (torch {b:.2e})" for k, (a, b) in results.items())
