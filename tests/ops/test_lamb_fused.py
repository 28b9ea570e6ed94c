"""Fused LAMB front on CPU: drop-in signatures, the reference fallback, and the list handling of
the kernel path through CPU stand-ins of the CUDA ops.  The kernels: test_lamb_fused_gpu.py."""
import inspect
import logging

import pytest
import torch

from pretrain.ops import lamb as ref
from pretrain.ops import lamb_fused as fused

SIZES = [(1,), (7,), (3, 5), (0,), (70001,), (33, 31)]


def _state(seed=0, sizes=SIZES, grad_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g) for s in sizes]
    grads = [torch.randn(s, generator=g).to(grad_dtype) for s in sizes]
    m = [torch.randn(s, generator=g) * 0.1 for s in sizes]
    v = [torch.rand(s, generator=g) * 0.01 for s in sizes]
    return params, grads, m, v


def _clone(ts):
    return [t.clone() for t in ts]


HYPER = dict(beta1=0.9, beta2=0.999, eps=1e-6, step=3, bias_correction=True)


@pytest.mark.parametrize("name", ["lamb_update", "lamb_apply", "lamb_step"])
def test_signatures_are_drop_ins_for_the_reference(name):
    ours = inspect.signature(getattr(fused, name)).parameters
    theirs = inspect.signature(getattr(ref, f"{name}_reference")).parameters
    for pname, p in theirs.items():
        assert pname in ours, f"{name} lacks {pname}"
        assert ours[pname].kind == p.kind and ours[pname].default == p.default, pname
    for pname in set(ours) - set(theirs):  # extensions: optional keywords only
        assert ours[pname].kind == inspect.Parameter.KEYWORD_ONLY and ours[pname].default is None, pname


def test_cpu_falls_back_to_the_reference_exactly(caplog):
    params, grads, m, v = _state()
    wds = [0.01, 0.0, 0.01, 0.01, 0.0, 0.01]
    p2, m2, v2 = _clone(params), _clone(m), _clone(v)
    with caplog.at_level(logging.WARNING, logger="pretrain.ops"):
        fused._fallbacks_logged.clear()
        sq = torch.full((2, len(params)), float("nan"))
        u = fused.lamb_update(params, grads, m, v, weight_decays=wds, grad_scale=2.0, sq_norms_out=sq, **HYPER)
        u2 = ref.lamb_update_reference(p2, grads, m2, v2, weight_decays=wds, grad_scale=2.0, **HYPER)
        for a, b in zip(u + m + v, u2 + m2 + v2):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(sq, torch.stack([ref.per_tensor_sq_norms(params), ref.per_tensor_sq_norms(u)]))
        norms = sq.sqrt()
        models = [torch.empty(p.shape, dtype=torch.bfloat16) for p in params]
        kw = dict(lr=0.01, param_norms=norms[0], update_norms=norms[1], adapt=[True, False] * 3,
                  min_trust_ratio=0.01, max_trust_ratio=5.0)
        fused.lamb_apply(params, u, model_params=models, **kw)
        ref.lamb_apply_reference(p2, u2, **kw)
    for a, b, mp in zip(params, p2, models):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
        torch.testing.assert_close(mp, a.to(torch.bfloat16), rtol=0, atol=0)
    fallbacks = [r for r in caplog.records if "using the PyTorch reference" in r.getMessage()]
    assert len(fallbacks) == 1, [r.getMessage() for r in caplog.records]


def test_lamb_step_matches_reference_step_on_cpu():
    params, grads, m, v = _state(seed=1)
    p2, m2, v2 = _clone(params), _clone(m), _clone(v)
    kw = dict(lr=0.02, beta1=0.9, beta2=0.99, eps=1e-6, weight_decays=[0.1] * 6, adapt=[True] * 6, step=1,
              bias_correction=False, min_trust_ratio=0.0, max_trust_ratio=10.0, grad_scale=torch.tensor(1.5))
    fused.lamb_step(params, grads, m, v, **kw)
    ref.lamb_step_reference(p2, grads, m2, v2, **kw)
    for a, b in zip(params + m + v, p2 + m2 + v2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_argument_errors_match_the_reference():
    params, grads, m, v = _state(sizes=[(3,)])
    with pytest.raises(ValueError, match="step counts from 1"):
        fused.lamb_update(params, grads, m, v, weight_decays=[0.0], **{**HYPER, "step": 0})
    with pytest.raises(ValueError, match="differ in length"):
        fused.lamb_update(params, grads, m, v, weight_decays=[0.0, 0.1], **HYPER)
    with pytest.raises(ValueError, match="expected 1 param and update norms"):
        fused.lamb_apply(params, params, lr=0.1, param_norms=torch.ones(2), update_norms=torch.ones(2),
                         adapt=[True], min_trust_ratio=0.0, max_trust_ratio=1.0)
    assert fused.lamb_update([], [], [], [], weight_decays=[], **HYPER) == []


def test_update_buffers_are_16_byte_aligned_views():
    params = [torch.empty(s) for s in [(3,), (5, 2), (0,), (1,), (9,)]]
    updates = fused._alloc_updates(params)
    base = updates[0].data_ptr()
    for u, p in zip(updates, params):
        assert u.shape == p.shape and u.dtype == torch.float32 and u.is_contiguous()
        assert (u.data_ptr() - base) % 16 == 0


# --------------------------------------------------------------------------- kernel path wiring
@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.bfloat16])
def test_kernel_path_matches_reference_with_emulated_ops(emulated, grad_dtype):
    """Views of one flat buffer (as ZeRO hands them), an empty tensor, tensor-valued grad_scale and
    lr, sums of squares from phase 1, fp16 model copies: the front passes all of it correctly."""
    sizes = [(5,), (0,), (4, 3), (9,)]
    numels = [int(torch.Size(s).numel()) for s in sizes]
    flat_p, flat_m, flat_v = torch.randn(sum(numels)), torch.randn(sum(numels)) * 0.1, torch.rand(sum(numels))
    flat_g = torch.randn(sum(numels)).to(grad_dtype)

    def views(flat):
        out, off = [], 0
        for s, n in zip(sizes, numels):
            out.append(flat.narrow(0, off, n).view(s))
            off += n
        return out

    params, grads, m, v = views(flat_p), views(flat_g), views(flat_m), views(flat_v)
    p2, m2, v2 = _clone(params), _clone(m), _clone(v)
    wds = [0.01, 0.01, 0.0, 0.02]
    sq = torch.empty(2, 4)
    gs = torch.tensor([1.7])
    u = fused.lamb_update(params, grads, m, v, weight_decays=wds, grad_scale=gs, sq_norms_out=sq, **HYPER)
    u2 = ref.lamb_update_reference(p2, grads, m2, v2, weight_decays=wds, grad_scale=gs, **HYPER)
    # The kernel path ran (its updates share one aligned buffer; the reference's do not).
    assert len({t.untyped_storage().data_ptr() for t in u}) == 1
    for a, b in zip(u + m + v, u2 + m2 + v2):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sq, torch.stack([ref.per_tensor_sq_norms(p2), ref.per_tensor_sq_norms(u2)]),
                               rtol=1e-5, atol=1e-7)
    norms = sq.sqrt()
    models = [torch.empty(s, dtype=torch.float16) for s in sizes]
    kw = dict(param_norms=norms[0], update_norms=norms[1], adapt=[True, True, False, True],
              min_trust_ratio=0.1, max_trust_ratio=2.0)
    fused.lamb_apply(params, u, lr=torch.tensor(0.05), model_params=models, **kw)
    ref.lamb_apply_reference(p2, u2, lr=0.05, **kw)
    for a, b, mp in zip(params, p2, models):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(mp, a.half(), rtol=0, atol=0)


def test_custom_ops_pass_opcheck(emulated):
    params, grads, m, v = _state(seed=2, sizes=[(3,), (2, 2)])
    updates = [torch.empty_like(p) for p in params]
    torch.library.opcheck(torch.ops.bertforge.lamb_update_.default,
                          (params, grads, m, v, updates, [0.1, 0.0], 0.9, 0.999, 1e-6, 0.1, 0.001, None, 1.0,
                           torch.zeros(2, 2)))
    torch.library.opcheck(torch.ops.bertforge.lamb_apply_.default,
                          (params, updates, [], torch.ones(2), torch.ones(2), [True, False], torch.ones(1), 0.0,
                           0.0, 10.0))
