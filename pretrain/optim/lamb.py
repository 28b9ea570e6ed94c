"""The LAMB optimizer: per-tensor trust ratios that stay correct under DeepSpeed ZeRO.

Semantics (NVIDIA apex ``FusedLAMB`` / NVLAMB, with DeepSpeed-style trust-ratio clamps):

* moments and update as Adam with decoupled weight decay:
  ``u = m_hat / (sqrt(v_hat) + eps) + weight_decay * p`` (``bias_correction`` optional);
* trust ratio per whole tensor: ``||p|| / ||u||`` when both are > 0, else 1, clamped to
  ``[min_trust_ratio, max_trust_ratio]``; ``p -= lr * trust_ratio * u``;
* layer adaptation: plain LAMB (apex ``use_nvlamb=False``) applies the trust ratio only to tensors
  of groups that are *not excluded* -- by default a group is excluded when its weight decay is 0,
  the apex rule; a group may say so explicitly with ``exclude_from_adaptation`` (``build_optimizer``
  marks its no-decay group, biases and LayerNorm weights, as excluded).  Excluded tensors take
  plain AdamW steps (ratio 1).  ``nvlamb=True`` applies the trust ratio to every tensor.
* gradient clipping by global norm (``max_grad_norm``) is for use WITHOUT the training engine.
  Under it, the engine clips (it sees the gradients of all ranks and all groups before calling
  this optimizer once per group); a Lamb with a partition layout registered refuses to clip.
* the step can be held (:mod:`pretrain.optim.hold`).

Under ZeRO the optimizer steps flat partitions; their layouts (:mod:`pretrain.optim.partition`)
must be registered first (the engine does, right after building itself), and stepping any tensor
that is neither one the optimizer was built with nor registered raises :class:`UnknownTensorError`
instead of silently computing trust ratios of partition pieces.

The arithmetic is ``pretrain.ops.lamb`` (``impl="reference"``) or the multi-tensor CUDA kernel
``pretrain.ops.lamb_fused`` (``impl="fused"``), which falls back to the reference, with one log
message, where it says the kernels cannot run (no extension, no CUDA, tensors not on CUDA).
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import Tensor

from pretrain.ops import lamb as lamb_reference
from pretrain.optim.hold import HoldableStep
from pretrain.optim.partition import PartitionLayout


class UnknownTensorError(RuntimeError):
    """Lamb was asked to step a tensor whose layout it does not know (e.g. a ZeRO flat partition)."""


@dataclass(frozen=True)
class LambKernels:
    """The two phases of a LAMB implementation (see ``pretrain.ops.lamb``)."""
    name: str
    update: Callable[..., list[Tensor]]
    apply: Callable[..., None]
    fuses_norms: bool = False
    """``update`` accepts ``sq_norms_out`` (float32 ``[2, n]``: sums of squares of params, updates)."""


REFERENCE = LambKernels("reference", lamb_reference.lamb_update_reference, lamb_reference.lamb_apply_reference)


def resolve_lamb_kernels(impl: str, device: torch.device) -> LambKernels:
    """The kernels for ``impl`` ("reference" or "fused") on ``device``; "fused" falls back to the
    reference, with one warning, where ``pretrain.ops.lamb_fused`` says the kernels cannot run."""
    if impl == "reference":
        return REFERENCE
    if impl != "fused":
        raise ValueError(f"unknown LAMB implementation {impl!r}: expected 'reference' or 'fused'")
    from pretrain.ops import lamb_fused

    reason = lamb_fused.unavailable_reason(device)
    if reason is not None:
        lamb_fused.log_fallback_once(reason)
        return REFERENCE
    return LambKernels("fused", lamb_fused.lamb_update, lamb_fused.lamb_apply, fuses_norms=True)


class Lamb(HoldableStep, torch.optim.Optimizer):
    """LAMB with optional ZeRO partition layouts; see the module docstring for the semantics.

    Group options: ``lr``, ``betas``, ``eps``, ``weight_decay``, ``bias_correction``,
    ``exclude_from_adaptation`` (None: excluded iff ``weight_decay == 0``).
    Optimizer-wide: ``min_trust_ratio``, ``max_trust_ratio``, ``nvlamb``, ``max_grad_norm``, ``impl``.
    State per stepped tensor: ``step`` (int), ``exp_avg``, ``exp_avg_sq``.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-6, weight_decay: float = 0.01, *, bias_correction: bool = True,
                 exclude_from_adaptation: Optional[bool] = None, min_trust_ratio: float = 0.0,
                 max_trust_ratio: float = 10.0, nvlamb: bool = False, max_grad_norm: float = 0.0,
                 impl: str = "reference"):
        if not 0.0 <= min_trust_ratio <= max_trust_ratio:
            raise ValueError(f"need 0 <= min_trust_ratio ({min_trust_ratio}) <= max_trust_ratio ({max_trust_ratio})")
        if max_grad_norm < 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {max_grad_norm}")
        if impl not in ("reference", "fused"):
            raise ValueError(f"unknown LAMB implementation {impl!r}: expected 'reference' or 'fused'")
        self.min_trust_ratio, self.max_trust_ratio = float(min_trust_ratio), float(max_trust_ratio)
        self.nvlamb, self.max_grad_norm, self.impl = bool(nvlamb), float(max_grad_norm), impl
        self._whole_tensors: dict[int, Tensor] = {}   # id -> tensor known to be a whole parameter
        self._layouts: dict[int, PartitionLayout] = {}  # id(flat partition) -> its layout
        self._kernels: Optional[LambKernels] = None
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        bias_correction=bias_correction, exclude_from_adaptation=exclude_from_adaptation)
        super().__init__(params, defaults)

    # -- registration of what may be stepped ------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        self.register_whole_tensors(self.param_groups[-1]["params"])

    def register_whole_tensors(self, tensors: Iterable[Tensor]) -> None:
        """Declare tensors that are whole parameters (e.g. DeepSpeed's per-tensor fp32 masters)."""
        for t in tensors:
            self._whole_tensors[id(t)] = t

    def register_partition_layout(self, layout: PartitionLayout) -> None:
        """Declare a flat partition and where the original tensors lie in it (see optim.partition)."""
        if self.max_grad_norm > 0:
            raise ValueError("Lamb(max_grad_norm > 0) cannot clip partitioned gradients: the engine clips (by "
                             "optimizer.max_grad_norm); build the optimizer with clips_itself=False")
        self._layouts[id(layout.flat)] = layout

    @property
    def partitioned(self) -> bool:
        return bool(self._layouts)

    # -- the step ---------------------------------------------------------------------------
    def adapts(self, group: dict) -> bool:
        """Whether the trust ratio applies to the tensors of ``group``."""
        excluded = group["exclude_from_adaptation"]
        if excluded is None:
            excluded = group["weight_decay"] == 0.0
        return self.nvlamb or not excluded

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale = self._clip_divisor()
        for group in self.param_groups:
            params = group["params"]
            if len(params) == 1 and id(params[0]) in self._layouts:
                self._step_partition(group, self._layouts[id(params[0])], grad_scale)
            else:
                self._step_whole_tensors(group, grad_scale)
        return loss

    def _clip_divisor(self) -> Tensor | float:
        """``max(1, (global_grad_norm + 1e-6) / max_grad_norm)`` over every group (1.0 when not
        clipping): the factor of ``torch.nn.utils.clip_grad_norm_`` and DeepSpeed's clipping, so a
        run without DeepSpeed clips exactly as one with it."""
        if self.max_grad_norm <= 0:
            return 1.0
        if self._layouts:
            raise ValueError("Lamb cannot clip partitioned gradients; the engine clips (optimizer.max_grad_norm)")
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            return 1.0
        total = lamb_reference.per_tensor_sq_norms(grads).sum().sqrt().to(grads[0].device)
        return ((total + 1e-6) / self.max_grad_norm).clamp(min=1.0)

    def _kernels_for(self, device: torch.device) -> LambKernels:
        if self._kernels is None:
            self._kernels = resolve_lamb_kernels(self.impl, device)
        return self._kernels

    def _state_of(self, p: Tensor) -> dict:
        state = self.state[p]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return state

    def _step_whole_tensors(self, group: dict, grad_scale: Tensor | float) -> None:
        # Tensors whose step counts differ (a parameter that missed a step) go to separate calls.
        by_step: dict[int, list[Tensor]] = defaultdict(list)
        for p in group["params"]:
            if id(p) not in self._whole_tensors:
                raise UnknownTensorError(
                    f"Lamb was asked to step a tensor of shape {tuple(p.shape)} it was not built with: a ZeRO "
                    f"flat partition of many parameters or an fp32 master copy, whose layout was not registered "
                    f"(pretrain.engine.layout.attach_layout does, after deepspeed.initialize); otherwise the "
                    f"trust ratios could be computed per partition instead of per parameter tensor.")
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("Lamb does not support sparse gradients")
            state = self._state_of(p)
            state["step"] += 1
            by_step[state["step"]].append(p)
        adapt = self.adapts(group)
        for step, params in by_step.items():
            self._lamb(group, params, [p.grad for p in params], step, adapt, grad_scale, layout=None)

    def _step_partition(self, group: dict, layout: PartitionLayout, grad_scale: Tensor | float) -> None:
        flat = layout.flat
        if flat.grad is None:
            raise RuntimeError("a ZeRO flat partition has no gradient; the engine sets one on every rank")
        state = self._state_of(flat)
        state["step"] += 1
        self._lamb(group, [flat], [flat.grad], state["step"], self.adapts(group), grad_scale, layout=layout)

    def _lamb(self, group: dict, params: list[Tensor], grads: list[Tensor], step: int, adapt: bool,
              grad_scale: Tensor | float, layout: Optional[PartitionLayout]) -> None:
        """Both LAMB phases for tensors of one group at one step count.  With a layout, ``params``
        is the flat partition and the tensor lists are its segments, normed across ranks."""
        device = params[0].device
        kernels = self._kernels_for(device)
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        if layout is not None:
            params, grads, exp_avgs, exp_avg_sqs = (layout.views(t[0]) for t in (params, grads, exp_avgs, exp_avg_sqs))
        beta1, beta2 = group["betas"]
        options = dict(beta1=beta1, beta2=beta2, eps=group["eps"], weight_decays=[group["weight_decay"]] * len(params),
                       step=step, bias_correction=group["bias_correction"], grad_scale=grad_scale)
        if kernels.fuses_norms:
            sq_norms = torch.empty(2, len(params), dtype=torch.float32, device=device)
            updates = kernels.update(params, grads, exp_avgs, exp_avg_sqs, sq_norms_out=sq_norms, **options)
        else:
            updates = kernels.update(params, grads, exp_avgs, exp_avg_sqs, **options)
            sq_norms = torch.stack([lamb_reference.per_tensor_sq_norms(params),
                                    lamb_reference.per_tensor_sq_norms(updates)])
        if layout is not None:
            param_norms, update_norms = layout.whole_tensor_norms(sq_norms)  # a collective
        elif params:
            param_norms, update_norms = sq_norms.to(device).sqrt().unbind(0)
        else:
            return
        kernels.apply(params, updates, lr=group["lr"], param_norms=param_norms, update_norms=update_norms,
                      adapt=[adapt] * len(params), min_trust_ratio=self.min_trust_ratio,
                      max_trust_ratio=self.max_trust_ratio)
