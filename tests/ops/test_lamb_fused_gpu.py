"""Fused multi-tensor LAMB on the GPU: 20 optimizer steps against the reference optimizer, and the
kernel-level extras (fp16/bf16 grads, unaligned views, sums of squares, model copies).

Error criterion per step: max |fused - truth| <= 2 * max |reference_fp32 - truth| + 1e-5 * max(1,
max |truth|), truth = the reference optimizer run on float64 copies of the same parameters with
the same gradients.
"""
import pytest
import torch

from pretrain.ops import lamb as ref
from pretrain.ops import lamb_fused as fused
from pretrain.optim.lamb import Lamb

from .checks import assert_error_bounded

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: GPU kernel tests")]

# Odd sizes: a scalar-like bias, non-multiples of 4 (tail path), a tensor over two chunks.
SHAPES_DECAY = [(767, 3), (7, 1), (2 * 65536 + 3,), (1023,), (64, 64)]
SHAPES_NO_DECAY = [(1,), (767,), (4097,)]


def _params(dtype, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    decay = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda", dtype=torch.float64).to(dtype) * 0.2)
             for s in SHAPES_DECAY]
    no_decay = [torch.nn.Parameter(torch.randn(s, generator=g, device="cuda", dtype=torch.float64).to(dtype) * 0.2)
                for s in SHAPES_NO_DECAY]
    return decay, no_decay


def _opt(decay, no_decay, impl, **kw):
    groups = [{"params": decay, "weight_decay": 0.01},
              {"params": no_decay, "weight_decay": 0.0, "exclude_from_adaptation": True}]
    return Lamb(groups, lr=kw.pop("lr", 2e-3), impl=impl, **kw)


@pytest.mark.parametrize("bias_correction, nvlamb, max_grad_norm, min_trust_ratio", [
    (True, False, 0.0, 0.0), (True, True, 1.0, 0.0), (False, False, 1.0, 0.05), (False, True, 0.0, 0.0)])
def test_twenty_steps_match_the_reference_optimizer(cuda_ext, bias_correction, nvlamb, max_grad_norm,
                                                    min_trust_ratio):
    kw = dict(bias_correction=bias_correction, nvlamb=nvlamb, max_grad_norm=max_grad_norm,
              min_trust_ratio=min_trust_ratio, max_trust_ratio=10.0, eps=1e-6, betas=(0.9, 0.999))
    truth = _params(torch.float64)
    ref32 = _params(torch.float32)
    ours = _params(torch.float32)
    opt_truth = _opt(*truth, "reference", **kw)
    opt_ref = _opt(*ref32, "reference", **kw)
    opt_ours = _opt(*ours, "fused", **kw)
    g = torch.Generator(device="cuda").manual_seed(123)
    flat = lambda ps: [p for group in ps for p in group]  # noqa: E731
    for step in range(1, 21):
        for pt, pr, po in zip(flat(truth), flat(ref32), flat(ours)):
            grad = torch.randn(pt.shape, generator=g, device="cuda", dtype=torch.float64) * (0.5 + step % 3)
            pt.grad = grad.clone()
            pr.grad = grad.float()
            po.grad = grad.float()
        opt_truth.step()
        opt_ref.step()
        opt_ours.step()
        assert opt_ours._kernels is not None and opt_ours._kernels.name == "fused", "fused kernels not in use"
        for i, (pt, pr, po) in enumerate(zip(flat(truth), flat(ref32), flat(ours))):
            assert_error_bounded(f"step {step} param {i}", po, pr, pt, torch.float32)
            for key in ("exp_avg", "exp_avg_sq"):
                assert_error_bounded(f"step {step} param {i} {key}", opt_ours.state[po][key],
                                     opt_ref.state[pr][key], opt_truth.state[pt][key], torch.float32)


def _lists(sizes, grad_dtype, offset, seed):
    """Views into flat buffers (as ZeRO partitions are); offset 1 makes them unaligned (scalar path)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    total = sum(sizes) + offset
    def flat(scale, dtype=torch.float32, positive=False):  # noqa: E306
        t = torch.randn(total, generator=g, device="cuda") * scale
        return (t.abs() if positive else t).to(dtype)
    bufs = [flat(0.3), flat(1.0, grad_dtype), flat(0.1), flat(0.01, positive=True)]
    out = [[] for _ in bufs]
    off = offset
    for n in sizes:
        for lst, buf in zip(out, bufs):
            lst.append(buf.narrow(0, off, n))
        off += n
    return out


@pytest.mark.parametrize("grad_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16], ids=str)
def test_kernel_extras_against_reference(cuda_ext, grad_dtype, offset, model_dtype):
    sizes = [1, 3, 4, 65536, 65537, 200003, 0, 17]
    params, grads, m, v = _lists(sizes, grad_dtype, offset, seed=offset + 7)
    p_ref, m_ref, v_ref = [[t.clone() for t in lst] for lst in (params, m, v)]
    p_tru, m_tru, v_tru = [[t.double() for t in lst] for lst in (params, m, v)]
    g_tru = [t.double() for t in grads]
    wds = [0.01 * (i % 3) for i in range(len(sizes))]
    hyper = dict(beta1=0.9, beta2=0.999, eps=1e-6, weight_decays=wds, step=5, bias_correction=True)
    gs = torch.tensor(1.3, device="cuda")
    sq = torch.full((2, len(sizes)), float("nan"), device="cuda")
    u = fused.lamb_update(params, grads, m, v, grad_scale=gs, sq_norms_out=sq, **hyper)
    assert len({t.untyped_storage().data_ptr() for t in u}) == 1, "fused path not taken"
    u_ref = ref.lamb_update_reference(p_ref, [t.float() for t in grads], m_ref, v_ref, grad_scale=gs, **hyper)
    u_tru = ref.lamb_update_reference(p_tru, g_tru, m_tru, v_tru, grad_scale=gs.double(), **hyper)
    for name, ours, theirs, true in (("update", u, u_ref, u_tru), ("exp_avg", m, m_ref, m_tru),
                                     ("exp_avg_sq", v, v_ref, v_tru)):
        for i in range(len(sizes)):
            assert_error_bounded(f"{name}[{i}]", ours[i], theirs[i], true[i], torch.float32)
    sq_true = torch.stack([torch.stack([t.square().sum() for t in p_tru]), torch.stack([t.square().sum() for t in u_tru])])
    sq_ref = torch.stack([ref.per_tensor_sq_norms(p_ref), ref.per_tensor_sq_norms(u_ref)])
    assert_error_bounded("sq_norms_out", sq, sq_ref, sq_true, torch.float32)

    norms = sq_true.sqrt()
    adapt = [i % 2 == 0 for i in range(len(sizes))]
    kw = dict(param_norms=norms[0], update_norms=norms[1], adapt=adapt, min_trust_ratio=0.0, max_trust_ratio=3.0)
    models = None
    if model_dtype is not None:
        models = [torch.full((n,), float("nan"), device="cuda", dtype=model_dtype) for n in sizes]
    fused.lamb_apply(params, u, lr=torch.tensor(0.01, device="cuda"), model_params=models,
                     **{**kw, "param_norms": kw["param_norms"].float(), "update_norms": kw["update_norms"].float()})
    ref.lamb_apply_reference(p_ref, u_ref, lr=0.01, **{**kw, "param_norms": kw["param_norms"].float(),
                                                        "update_norms": kw["update_norms"].float()})
    ref.lamb_apply_reference(p_tru, u_tru, lr=0.01, **kw)
    for i in range(len(sizes)):
        assert_error_bounded(f"param[{i}]", params[i], p_ref[i], p_tru[i], torch.float32)
        if models is not None:
            assert torch.equal(models[i], params[i].to(model_dtype)), f"model copy {i}"


def test_updates_every_element_written(cuda_ext):
    """Phase 1 into NaN-preallocated updates through the custom op; phase 2 leaves no NaN."""
    sizes = [5, 65536 + 7, 3, 130000]
    params, grads, m, v = _lists(sizes, torch.float16, 0, seed=11)
    updates = [torch.full((n,), float("nan"), device="cuda") for n in sizes]
    torch.ops.bertforge.lamb_update_(params, grads, m, v, updates, [0.01] * 4, 0.9, 0.999, 1e-6, 0.1, 0.001,
                                     None, 1.0, None)
    for i, u in enumerate(updates):
        assert torch.isfinite(u).all(), f"update {i}: unwritten (NaN) elements"


def test_lamb_step_matches_reference_step(cuda_ext):
    sizes = [7, 4096, 65539]
    params, grads, m, v = _lists(sizes, torch.float32, 0, seed=13)
    p_ref, m_ref, v_ref = [[t.clone() for t in lst] for lst in (params, m, v)]
    p_tru, m_tru, v_tru = [[t.double() for t in lst] for lst in (params, m, v)]
    kw = dict(lr=0.01, beta1=0.9, beta2=0.999, eps=1e-6, weight_decays=[0.01, 0.0, 0.01], adapt=[True, False, True],
              step=2, bias_correction=True, min_trust_ratio=0.0, max_trust_ratio=10.0)
    fused.lamb_step(params, grads, m, v, **kw)
    ref.lamb_step_reference(p_ref, grads, m_ref, v_ref, **kw)
    ref.lamb_step_reference(p_tru, [g.double() for g in grads], m_tru, v_tru, **kw)
    for i in range(len(sizes)):
        assert_error_bounded(f"param[{i}]", params[i], p_ref[i], p_tru[i], torch.float32)


def test_available_and_non_fp32_params_fall_back(cuda_ext):
    assert fused.available()
    p = [torch.randn(10, device="cuda", dtype=torch.float16)]
    g = [torch.randn(10, device="cuda", dtype=torch.float16)]
    m, v = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
    u = fused.lamb_update(p, g, m, v, beta1=0.9, beta2=0.999, eps=1e-6, weight_decays=[0.0], step=1,
                          bias_correction=True)
    m2, v2 = [torch.zeros_like(p[0])], [torch.zeros_like(p[0])]
    u2 = ref.lamb_update_reference(p, g, m2, v2, beta1=0.9, beta2=0.999, eps=1e-6, weight_decays=[0.0], step=1,
                                   bias_correction=True)
    torch.testing.assert_close(u[0], u2[0], rtol=0, atol=0)  # fp16 params: the reference ran
