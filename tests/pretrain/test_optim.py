"""LAMB reference and optimizer, parameter groups, the fused fallback, and ZeRO layout arithmetic."""
from __future__ import annotations

import logging
import math

import pytest
import torch
from torch import nn

from pretrain.config import OptimizerConfig
from pretrain.ops.lamb import lamb_step_reference, per_tensor_sq_norms
from pretrain.optim import (HoldableStep, Lamb, PartitionLayout, Segment, UnknownTensorError, build_optimizer,
                            is_no_decay, resolve_lamb_kernels)
from pretrain.optim import lamb as lamb_module
from pretrain.optim.partition import contiguous_partition_segments, sharded_tensor_segments


# --------------------------------------------------------------------------------------------
# LAMB written independently from the paper (You et al. 2019, Algorithm 2), float64
# --------------------------------------------------------------------------------------------
class PaperLamb:
    """Step-by-step LAMB on plain tensors: one dict of state per parameter, no shared code."""

    def __init__(self, params, lr, beta1, beta2, eps, weight_decays, adapt, bias_correction, lo, hi):
        self.params, self.lr, self.b1, self.b2, self.eps = params, lr, beta1, beta2, eps
        self.wd, self.adapt, self.bias_correction, self.lo, self.hi = weight_decays, adapt, bias_correction, lo, hi
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.t = 0

    def step(self, grads):
        self.t += 1
        for i, (x, g) in enumerate(zip(self.params, grads)):
            self.m[i] = self.b1 * self.m[i] + (1 - self.b1) * g
            self.v[i] = self.b2 * self.v[i] + (1 - self.b2) * g * g
            m_hat, v_hat = self.m[i], self.v[i]
            if self.bias_correction:
                m_hat = m_hat / (1 - self.b1 ** self.t)
                v_hat = v_hat / (1 - self.b2 ** self.t)
            r = m_hat / (v_hat.sqrt() + self.eps) + self.wd[i] * x
            x_norm, r_norm = math.sqrt(float((x * x).sum())), math.sqrt(float((r * r).sum()))
            ratio = 1.0
            if self.adapt[i]:
                ratio = x_norm / r_norm if x_norm > 0 and r_norm > 0 else 1.0
                ratio = min(max(ratio, self.lo), self.hi)
            x -= self.lr * ratio * r


def _tiny_model(dtype=torch.float64) -> nn.Module:
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5), nn.Tanh(), nn.Linear(5, 2)).to(dtype)
    with torch.no_grad():
        model[0].weight.mul_(4.0)  # trust ratios far from 1, and different per tensor
        model[3].weight.mul_(0.05)
        model[1].bias.normal_()
    return model


def _batches(steps: int, dtype=torch.float64):
    generator = torch.Generator().manual_seed(5)
    return [(torch.randn(7, 6, generator=generator, dtype=dtype), torch.randn(7, 2, generator=generator, dtype=dtype))
            for _ in range(steps)]


def _loss(model, x, y):
    return (model(x) - y).square().mean()


@pytest.mark.parametrize("bias_correction", [True, False])
@pytest.mark.parametrize("nvlamb", [False, True])
@pytest.mark.parametrize("max_trust_ratio", [10.0, 0.7])
def test_lamb_matches_paper_algorithm(bias_correction, nvlamb, max_trust_ratio):
    cfg = OptimizerConfig(lr=0.05, weight_decay=0.1, bias_correction=bias_correction, nvlamb=nvlamb,
                          max_trust_ratio=max_trust_ratio, min_trust_ratio=0.01, eps=1e-6, max_grad_norm=0.0)
    ours_model, paper_model = _tiny_model(), _tiny_model()
    ours = build_optimizer(ours_model, cfg, clips_itself=True)
    named = list(paper_model.named_parameters())
    excluded = [is_no_decay(n, p) for n, p in named]
    paper = PaperLamb([p.data for _, p in named], cfg.lr, 0.9, 0.999, cfg.eps,
                      [0.0 if e else cfg.weight_decay for e in excluded], [nvlamb or not e for e in excluded],
                      bias_correction, cfg.min_trust_ratio, cfg.max_trust_ratio)
    for x, y in _batches(6):
        ours.zero_grad()
        _loss(ours_model, x, y).backward()
        ours.step()
        paper.step([g for g in torch.autograd.grad(_loss(paper_model, x, y), [p for _, p in named])])
    for (name, p), (_, q) in zip(ours_model.named_parameters(), named):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14, msg=lambda m: f"{name}: {m}")
    moved = _tiny_model()[0].weight - ours_model[0].weight
    assert moved.abs().max() > 1e-3


def test_excluded_tensors_take_plain_adam_steps():
    """adapt=False (excluded, plain LAMB): ratio 1; adapt=True: ||p|| / ||u||."""
    p = torch.full((4,), 10.0, dtype=torch.float64)  # ||p|| = 20
    g = torch.tensor([1.0, -2.0, 3.0, -4.0], dtype=torch.float64)  # first step: u = sign(g), ||u|| = 2
    for adapt, expected_ratio in [(False, 1.0), (True, 10.0)]:
        q = p.clone()
        lamb_step_reference([q], [g], [torch.zeros_like(q)], [torch.zeros_like(q)], lr=0.1, beta1=0.9, beta2=0.999,
                            eps=0.0, weight_decays=[0.0], adapt=[adapt], step=1, bias_correction=True,
                            min_trust_ratio=0.0, max_trust_ratio=100.0)
        torch.testing.assert_close(p - q, 0.1 * expected_ratio * g.sign())


def test_trust_ratio_is_one_when_a_norm_is_zero():
    zero = torch.zeros(3)
    q = zero.clone()
    lamb_step_reference([q], [torch.ones(3)], [torch.zeros(3)], [torch.zeros(3)], lr=0.5, beta1=0.0, beta2=0.0,
                        eps=0.0, weight_decays=[0.0], adapt=[True], step=1, bias_correction=False,
                        min_trust_ratio=0.0, max_trust_ratio=10.0)
    torch.testing.assert_close(q, torch.full((3,), -0.5))


def test_grad_scale_divides_gradients():
    a, b = torch.ones(3), torch.ones(3)
    g = torch.tensor([0.5, -1.0, 2.0])
    m1, v1, m2, v2 = (torch.zeros(3) for _ in range(4))
    common = dict(lr=0.1, beta1=0.9, beta2=0.99, eps=1e-3, weight_decays=[0.0], adapt=[True], step=1,
                  bias_correction=True, min_trust_ratio=0.0, max_trust_ratio=10.0)
    lamb_step_reference([a], [g * 4], [m1], [v1], grad_scale=4.0, **common)
    lamb_step_reference([b], [g], [m2], [v2], **common)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(m1, m2)


def test_lamb_clipping_matches_torch_clip_grad_norm():
    cfg = OptimizerConfig(lr=0.05, max_grad_norm=0.05)
    clipped_model, manual_model = _tiny_model(), _tiny_model()
    clipped = build_optimizer(clipped_model, cfg, clips_itself=True)
    manual = build_optimizer(manual_model, cfg)  # does not clip
    assert clipped.max_grad_norm == 0.05 and manual.max_grad_norm == 0.0
    for x, y in _batches(3):
        for model, opt in ((clipped_model, clipped), (manual_model, manual)):
            opt.zero_grad()
            _loss(model, x, y).backward()
            if opt is manual:
                norm = torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)
                assert norm > 0.05  # clipping is active
            opt.step()
    for p, q in zip(clipped_model.parameters(), manual_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)


def test_state_dict_resume_is_exact():
    batches = _batches(5)

    def train(model, opt, part):
        for x, y in part:
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()

    straight_model = _tiny_model()
    straight = build_optimizer(straight_model, OptimizerConfig(), clips_itself=True)
    train(straight_model, straight, batches)
    first_model = _tiny_model()
    first = build_optimizer(first_model, OptimizerConfig(), clips_itself=True)
    train(first_model, first, batches[:3])
    resumed_model = _tiny_model()
    resumed_model.load_state_dict(first_model.state_dict())
    resumed = build_optimizer(resumed_model, OptimizerConfig(), clips_itself=True)
    resumed.load_state_dict(first.state_dict())
    train(resumed_model, resumed, batches[3:])
    for p, q in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(p, q)


# --------------------------------------------------------------------------------------------
# Guard against unknown flat tensors, and layouts
# --------------------------------------------------------------------------------------------
def test_lamb_refuses_a_flat_tensor_without_layout():
    model = _tiny_model(torch.float32)
    opt = build_optimizer(model, OptimizerConfig())
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()]).requires_grad_()
    flat.grad = torch.ones_like(flat)
    opt.param_groups[0]["params"] = [flat]  # what ZeRO does to the client optimizer's groups
    with pytest.raises(UnknownTensorError, match="attach_layout"):
        opt.step()


@pytest.mark.parametrize("name", ["lamb", "adamw"])
def test_a_held_step_changes_nothing_and_the_next_one_is_the_first(name):
    """What the engine holds (a non-finite loss's update, DeepSpeed's zero-gradient step inside
    initialize) leaves weights and state untouched; released, the optimizer steps as if it never was."""
    held_model, plain_model = _tiny_model(torch.float32), _tiny_model(torch.float32)
    held, plain = (build_optimizer(m, OptimizerConfig(name=name, weight_decay=0.1)) for m in (held_model, plain_model))
    assert isinstance(held, HoldableStep)
    before = [p.detach().clone() for p in held_model.parameters()]
    for p in held_model.parameters():
        p.grad = torch.zeros_like(p)   # weight decay alone would move the weights
    with held.held():
        assert held.step() is None
    assert all(torch.equal(p, b) for p, b in zip(held_model.parameters(), before)) and not held.state
    with held.held(False):             # held(False) holds nothing
        for model, opt in ((held_model, held), (plain_model, plain)):
            for p in model.parameters():
                p.grad = torch.full_like(p, 0.5)
            opt.step()
    for a, b in zip(held_model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)


def test_layout_gives_whole_tensor_norms_and_matches_per_tensor_lamb():
    """A flat buffer with a padding gap, stepped through a layout, equals per-tensor LAMB."""
    torch.manual_seed(0)
    tensors = [torch.randn(3, 4) * 5, torch.randn(7) * 0.1]
    grads = [torch.randn(3, 4), torch.randn(7)]
    flat = torch.zeros(12 + 2 + 7 + 3)  # tensor 0, 2 padding, tensor 1, 3 padding
    flat[:12], flat[14:21] = tensors[0].reshape(-1), tensors[1]
    flat.grad = torch.zeros_like(flat)
    flat.grad[:12], flat.grad[14:21] = grads[0].reshape(-1), grads[1]
    layout = PartitionLayout(flat, tuple(contiguous_partition_segments([12, 7], [0, 14], 0, flat.numel())),
                             ("a", "b"))
    flat_opt = Lamb([flat], lr=0.1, weight_decay=0.01)
    flat_opt.register_partition_layout(layout)
    whole = [t.clone() for t in tensors]
    for t, g in zip(whole, grads):
        t.grad = g
    whole_opt = Lamb(whole, lr=0.1, weight_decay=0.01)
    for _ in range(3):
        flat_opt.step()
        whole_opt.step()
    torch.testing.assert_close(flat[:12].reshape(3, 4), whole[0], rtol=1e-6, atol=0)
    torch.testing.assert_close(flat[14:21], whole[1], rtol=1e-6, atol=0)
    assert flat[12:14].eq(0).all() and flat[21:].eq(0).all()  # padding untouched
    segment_sq = per_tensor_sq_norms(layout.views(flat))
    param_norms, _ = layout.whole_tensor_norms(torch.stack([segment_sq, segment_sq]))
    torch.testing.assert_close(param_norms, torch.stack([whole[0].norm(), whole[1].norm()]), rtol=1e-6, atol=0)


def test_lamb_with_a_layout_refuses_to_clip():
    flat = torch.zeros(4, requires_grad=True)
    opt = Lamb([flat], max_grad_norm=1.0)
    with pytest.raises(ValueError, match="the engine clips"):
        opt.register_partition_layout(PartitionLayout(flat, (Segment(0, 0, 4, 0),), ("a",)))


def test_contiguous_partition_segments_split_tensors_at_partition_boundaries():
    # tensors of 6 and 6 elements, partitions of 4: rank 1 holds the end of tensor 0 and the start of 1
    assert contiguous_partition_segments([6, 6], [0, 6], 0, 4) == [Segment(0, 0, 4, 0)]
    assert contiguous_partition_segments([6, 6], [0, 6], 4, 4) == [Segment(0, 0, 2, 4), Segment(1, 2, 2, 0)]
    assert contiguous_partition_segments([6, 6], [0, 6], 8, 4) == [Segment(1, 0, 4, 2)]
    # per-parameter alignment padding (tensor 1 at offset 8) and end padding belong to no segment
    assert contiguous_partition_segments([6, 3], [0, 8], 4, 4) == [Segment(0, 0, 2, 4)]
    assert contiguous_partition_segments([6, 3], [0, 8], 8, 4) == [Segment(1, 0, 3, 0)]


def test_sharded_tensor_segments_skip_the_padding_of_last_shards():
    # ZeRO-3, 2 ranks: tensor 0 has 5 elements (shards of 3), tensor 1 has 2 (shards of 1)
    assert sharded_tensor_segments([5, 2], [3, 1], 0) == [Segment(0, 0, 3, 0), Segment(1, 3, 1, 0)]
    assert sharded_tensor_segments([5, 2], [3, 1], 1) == [Segment(0, 0, 2, 3), Segment(1, 3, 1, 1)]
    # 3 ranks, tensor of 2 elements (shards of 1): rank 2 holds only padding
    assert sharded_tensor_segments([2], [1], 2) == []


# --------------------------------------------------------------------------------------------
# Parameter groups and builders
# --------------------------------------------------------------------------------------------
class _Named(nn.Module):
    def __init__(self):
        super().__init__()
        self.embeddings = nn.Embedding(10, 4)
        self.LayerNorm = nn.LayerNorm(4)
        self.dense = nn.Linear(4, 4)
        self.rms_norm_scale = nn.Parameter(torch.ones(2, 2))  # 2-D, but a norm weight by name
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)


def test_param_groups_exclude_biases_and_norms():
    opt = build_optimizer(_Named(), OptimizerConfig(weight_decay=0.02))
    decay, no_decay = opt.param_groups
    assert decay["names"] == ["embeddings.weight", "dense.weight"]
    assert decay["weight_decay"] == 0.02 and decay["exclude_from_adaptation"] is False
    assert no_decay["names"] == ["rms_norm_scale", "LayerNorm.weight", "LayerNorm.bias", "dense.bias"]
    assert no_decay["weight_decay"] == 0.0 and no_decay["exclude_from_adaptation"] is True
    assert [opt.adapts(g) for g in opt.param_groups] == [True, False]


def test_lamb_adapts_decay_group_even_with_zero_weight_decay():
    opt = build_optimizer(_Named(), OptimizerConfig(weight_decay=0.0))
    assert [opt.adapts(g) for g in opt.param_groups] == [True, False]
    nv = build_optimizer(_Named(), OptimizerConfig(nvlamb=True))
    assert [nv.adapts(g) for g in nv.param_groups] == [True, True]
    # without an explicit flag a group follows apex: excluded iff its weight decay is 0
    bare = Lamb([{"params": [torch.zeros(1)], "weight_decay": 0.0}, {"params": [torch.zeros(1)]}])
    assert [bare.adapts(g) for g in bare.param_groups] == [False, True]


def test_build_optimizer_maps_the_config():
    cfg = OptimizerConfig(lr=3e-3, betas=[0.8, 0.95], eps=1e-8, bias_correction=False, max_trust_ratio=5.0,
                          min_trust_ratio=0.1, nvlamb=True, max_grad_norm=2.0)
    lamb = build_optimizer(_Named(), cfg, "fused", clips_itself=True)
    assert isinstance(lamb, Lamb) and lamb.impl == "fused" and lamb.nvlamb
    assert (lamb.min_trust_ratio, lamb.max_trust_ratio, lamb.max_grad_norm) == (0.1, 5.0, 2.0)
    group = lamb.param_groups[0]
    assert (group["lr"], group["betas"], group["eps"], group["bias_correction"]) == (3e-3, (0.8, 0.95), 1e-8, False)
    adamw = build_optimizer(_Named(), OptimizerConfig(name="adamw", weight_decay=0.05))
    assert isinstance(adamw, torch.optim.AdamW) and isinstance(adamw, HoldableStep)
    assert [g["weight_decay"] for g in adamw.param_groups] == [0.05, 0.0]


# --------------------------------------------------------------------------------------------
# Kernel selection
# --------------------------------------------------------------------------------------------
def test_fused_kernels_selected_where_they_can_run(monkeypatch):
    from pretrain.ops import lamb_fused

    monkeypatch.setattr(lamb_fused, "unavailable_reason", lambda device: None)
    kernels = resolve_lamb_kernels("fused", torch.device("cuda"))
    assert kernels.name == "fused" and kernels.update is lamb_fused.lamb_update and kernels.fuses_norms


@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_fused_falls_back_to_reference_with_one_message(monkeypatch, caplog, device):
    """The fused module decides (here: no CUDA, or no extension in a CPU build) and logs once."""
    from pretrain.ops import lamb_fused

    if lamb_fused.available():
        pytest.skip("the fused kernels can run here")
    monkeypatch.setattr(lamb_fused, "_fallbacks_logged", set())
    with caplog.at_level(logging.WARNING, logger="pretrain.ops"):
        for _ in range(3):
            assert resolve_lamb_kernels("fused", torch.device(device)).name == "reference"
    assert len([r for r in caplog.records if "using the PyTorch reference" in r.message]) == 1


def test_kernels_that_fuse_the_norms_are_used_for_them():
    """A kernel filling ``sq_norms_out`` (as pretrain.ops.lamb_fused does) replaces the norm pass."""
    from pretrain.ops.lamb import lamb_apply_reference, lamb_update_reference
    calls = []

    def update_with_norms(params, grads, exp_avgs, exp_avg_sqs, *, sq_norms_out, **options):
        updates = lamb_update_reference(params, grads, exp_avgs, exp_avg_sqs, **options)
        sq_norms_out.copy_(torch.stack([per_tensor_sq_norms(params), per_tensor_sq_norms(updates)]))
        calls.append(len(params))
        return updates

    models = [_tiny_model(torch.float32) for _ in range(2)]
    opts = [build_optimizer(m, OptimizerConfig(), clips_itself=True) for m in models]
    opts[1]._kernels = lamb_module.LambKernels("fake-fused", update_with_norms, lamb_apply_reference,
                                               fuses_norms=True)
    for x, y in _batches(2, torch.float32):
        for model, opt in zip(models, opts):
            opt.zero_grad()
            _loss(model, x, y).backward()
            opt.step()
    assert calls == [2, 4, 2, 4]  # decay group (2 matrices), no-decay group (4 vectors), twice
    for p, q in zip(*(m.parameters() for m in models)):
        assert torch.equal(p, q)


def test_per_tensor_sq_norms():
    norms = per_tensor_sq_norms([torch.tensor([3.0, 4.0]), torch.ones(2, 2, dtype=torch.float64)])
    assert norms.dtype == torch.float64 and norms.tolist() == [25.0, 4.0]
    assert per_tensor_sq_norms([torch.ones(3, dtype=torch.bfloat16)]).dtype == torch.float32
    assert per_tensor_sq_norms([]).numel() == 0
