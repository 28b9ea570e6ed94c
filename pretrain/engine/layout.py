"""Reading DeepSpeed's optimizer wrappers: where each parameter tensor lies in each flat partition.

ZeRO stage 1/2 (and DeepSpeed's BF16_Optimizer) flatten every parameter group into one buffer and
give the client optimizer one contiguous partition per data-parallel rank; stage 3 gives it, per
sub-group, the concatenation of this rank's shard of every tensor.  :func:`attach_layout` derives,
once after ``deepspeed.initialize``, a :class:`~pretrain.optim.partition.PartitionLayout` per flat
partition from DeepSpeed's own bookkeeping and registers it with a
:class:`~pretrain.optim.lamb.Lamb` client optimizer, which then computes whole-tensor trust ratios.

Each layout is checked element by element against the model's parameters, so a DeepSpeed version
that lays memory out differently fails loudly at attach time instead of training with wrong trust
ratios.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from pretrain.optim.lamb import Lamb
from pretrain.optim.partition import PartitionLayout, contiguous_partition_segments, sharded_tensor_segments

logger = logging.getLogger(__name__)


def _names_of(params: Sequence[Tensor], names: dict[int, str]) -> tuple[str, ...]:
    return tuple(names.get(id(p), f"<param {i}: {tuple(p.shape)}>") for i, p in enumerate(params))


def _layouts_stage_1_2(zero_opt: Any, names: dict[int, str]) -> list[PartitionLayout]:
    """DeepSpeedZeroOptimizer (stage 1/2): group i is flattened in ``round_robin_bit16_groups[i]``
    order at ``round_robin_bit16_offsets[i]`` (these include per-parameter alignment padding) and
    padded at the end; rank r owns ``[r * partition_size[i], (r + 1) * partition_size[i])``."""
    layouts = []
    for i, tensors in enumerate(zero_opt.round_robin_bit16_groups):
        group = zero_opt.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        size = int(zero_opt.partition_size[i])
        flat = zero_opt.single_partition_of_fp32_groups[i]
        if flat.numel() != size or zero_opt.bit16_groups_flat[i].numel() != size * world:
            raise RuntimeError(f"ZeRO group {i}: partition of {flat.numel()} elements, expected {size} of a "
                               f"{zero_opt.bit16_groups_flat[i].numel()}-element flat buffer over {world} ranks")
        metas = getattr(zero_opt, "round_robin_bit16_meta", [tensors] * (i + 1))[i]
        numels = [m.numel() for m in metas]
        # Offsets include per-parameter alignment padding (parameter_alignment); older DeepSpeed had none.
        offsets = getattr(zero_opt, "round_robin_bit16_offsets", None)
        offsets = offsets[i] if offsets is not None else [sum(numels[:k]) for k in range(len(numels))]
        segments = contiguous_partition_segments(numels, offsets, rank * size, size)
        layouts.append(PartitionLayout(flat, tuple(segments), _names_of(tensors, names), group, world))
        _check_against_params(layouts[-1], [t.data.reshape(-1) for t in tensors], sharded=False)
    return layouts


def _layouts_bf16_optimizer(bf16_opt: Any, names: dict[int, str]) -> list[PartitionLayout]:
    """BF16_Optimizer (bf16 weights with fp32 gradient accumulation, stage 1 layout): group i is
    ``bf16_groups[i]`` flattened back to back, padded at the end, cut into equal partitions."""
    layouts = []
    for i, tensors in enumerate(bf16_opt.bf16_groups):
        group = bf16_opt.real_dp_process_group[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        size = bf16_opt.bf16_groups_flat[i].numel() // world
        flat = bf16_opt.fp32_groups_flat_partition[i]
        numels = [t.numel() for t in tensors]
        offsets = [sum(numels[:k]) for k in range(len(numels))]
        segments = contiguous_partition_segments(numels, offsets, rank * size, size)
        layouts.append(PartitionLayout(flat, tuple(segments), _names_of(tensors, names), group, world))
        _check_against_params(layouts[-1], [t.data.reshape(-1) for t in tensors], sharded=False)
    return layouts


def _layouts_stage_3(zero_opt: Any, names: dict[int, str]) -> list[PartitionLayout]:
    """DeepSpeedZeroOptimizer_Stage3: sub-group i holds, back to back, this rank's shard
    (``ds_tensor``, ``ceil(numel / world)`` elements, the last shard zero-padded) of each tensor."""
    layouts = []
    for i, tensors in enumerate(zero_opt.fp16_groups):
        group = zero_opt.sub_group_process_groups[i]
        world, rank = dist.get_world_size(group=group), dist.get_rank(group=group)
        flat = zero_opt.fp32_partitioned_groups_flat[i]
        shard_numels = [int(t.ds_tensor.ds_numel) for t in tensors]
        if flat.numel() != sum(shard_numels):
            raise RuntimeError(f"ZeRO-3 sub-group {i}: flat partition of {flat.numel()} elements, expected "
                               f"{sum(shard_numels)} (sum of the shards)")
        segments = sharded_tensor_segments([int(t.ds_numel) for t in tensors], shard_numels, rank)
        layouts.append(PartitionLayout(flat, tuple(segments), _names_of(tensors, names), group, world))
        _check_against_params(layouts[-1], [t.ds_tensor.data.reshape(-1) for t in tensors], sharded=True)
    return layouts


def _check_against_params(layout: PartitionLayout, sources: Sequence[Tensor], sharded: bool) -> None:
    """Each segment of the fp32 partition must equal the model parameter elements it claims to hold
    (``sources[i]``: the whole flattened tensor i, or for ZeRO-3 this rank's shard of it)."""
    for s in layout.segments:
        source = sources[s.tensor_index]
        expected = source.narrow(0, 0 if sharded else s.tensor_offset, s.length)
        held = layout.flat.detach().narrow(0, s.start, s.length).to(expected.device, expected.dtype)
        if not torch.equal(held, expected):
            raise RuntimeError(
                f"derived ZeRO layout does not match DeepSpeed's memory: partition elements "
                f"[{s.start}, {s.start + s.length}) should hold {layout.tensor_names[s.tensor_index]} elements "
                f"[{s.tensor_offset}, {s.tensor_offset + s.length}). This DeepSpeed version lays out partitions "
                f"differently; LAMB cannot compute whole-tensor trust ratios.")


def attach_layout(ds_engine: Any, client: torch.optim.Optimizer) -> str:
    """Tell a Lamb ``client`` optimizer how ``ds_engine`` (a DeepSpeedEngine) partitioned its tensors.

    Call once on every rank right after ``deepspeed.initialize``, before the first step.  Any other
    optimizer is left alone.  Returns what was attached: ``"none"`` (not a Lamb),
    ``"unpartitioned"`` (ZeRO 0 fp32: Lamb steps the model's own tensors), ``"whole-tensor copies"``
    (ZeRO 0 fp16/bf16: per-tensor fp32 masters), ``"zero-1/2"``, ``"bf16-optimizer"`` or ``"zero-3"``.
    """
    if not isinstance(client, Lamb):
        return "none"
    wrapper = ds_engine.optimizer
    if wrapper is client:
        return "unpartitioned"
    names = {id(p): name for name, p in ds_engine.module.named_parameters()}
    if hasattr(wrapper, "round_robin_bit16_groups") and hasattr(wrapper, "single_partition_of_fp32_groups"):
        kind, layouts = "zero-1/2", _layouts_stage_1_2(wrapper, names)
    elif hasattr(wrapper, "fp32_partitioned_groups_flat") and hasattr(wrapper, "sub_group_process_groups"):
        kind, layouts = "zero-3", _layouts_stage_3(wrapper, names)
    elif hasattr(wrapper, "fp32_groups_flat_partition") and hasattr(wrapper, "bf16_groups"):
        kind, layouts = "bf16-optimizer", _layouts_bf16_optimizer(wrapper, names)
    elif hasattr(wrapper, "fp32_groups") and not hasattr(wrapper, "fp32_groups_flat"):
        # FP16_UnfusedOptimizer: one fp32 master copy per tensor, nothing flattened.
        client.register_whole_tensors([p for group in wrapper.fp32_groups for p in group])
        return "whole-tensor copies"
    else:
        raise RuntimeError(f"LAMB does not know how {type(wrapper).__name__} lays out its parameters, so it "
                           f"cannot compute per-tensor trust ratios; use ZeRO stage 0-3 without a fused fp16 "
                           f"optimizer, or AdamW")
    for layout in layouts:
        client.register_partition_layout(layout)
    logger.info("LAMB: attached %s layouts for %d parameter groups (%d tensors)", kind, len(layouts),
                sum(layout.num_tensors for layout in layouts))
    return kind
