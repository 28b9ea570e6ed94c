"""Whole-tensor norms for LAMB when DeepSpeed hands the optimizer flat partitions.

LAMB's trust ratio is ``||p|| / ||update||`` of a whole parameter tensor.  ZeRO stage 1/2 (and
DeepSpeed's BF16_Optimizer) flatten every parameter group into one buffer, cut it into one
contiguous partition per data-parallel rank, and give the client optimizer only the local fp32
partition; stage 3 gives it, per sub-group, the concatenation of this rank's shard of every
tensor.  A partition boundary can fall inside a tensor, so a naive optimizer would compute
trust ratios of partition pieces (or of a whole flat partition) instead of tensors.

:func:`attach_zero_layout` reads, once after ``deepspeed.initialize``, where each original tensor
lies inside each flat partition (a :class:`PartitionLayout`: a list of :class:`Segment`) and
registers the layouts with the :class:`~pretrain.optim.lamb.Lamb` optimizer.  In each step the
optimizer computes per-segment sums of squares of the parameter and of the update, adds them
into one vector per original tensor, all-reduces (SUM) that vector over the partition's process
group, and takes the square root: the norms of the whole tensors, identical on every rank.

The layouts are derived from DeepSpeed's own bookkeeping, then checked element by element
against the model's parameters, so a DeepSpeed version that lays memory out differently fails
loudly at attach time instead of training with wrong trust ratios.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Segment:
    """A run of one original tensor's elements inside a flat partition."""
    tensor_index: int
    """Index of the original tensor within its layout (the same numbering on every rank)."""
    start: int
    """Offset of the run in the flat partition."""
    length: int
    """Number of elements of the run."""
    tensor_offset: int
    """Offset of the run in the flattened original tensor."""


@dataclass
class PartitionLayout:
    """Where the original tensors of one parameter group lie in one rank's flat partition."""
    flat: Tensor
    """The flat fp32 partition the client optimizer steps (kept to pin its identity)."""
    segments: tuple[Segment, ...]
    """Runs of original tensors in the partition, by increasing ``start``; padding is in none."""
    tensor_names: tuple[str, ...]
    """Names of all original tensors of the group, indexed by ``Segment.tensor_index``."""
    process_group: Any = None
    """Group whose ranks hold the other partitions (None: the default group)."""
    world_size: int = 1
    """Number of partitions; 1 means nothing to reduce."""
    _index: Optional[Tensor] = field(default=None, repr=False, compare=False)

    @property
    def num_tensors(self) -> int:
        return len(self.tensor_names)

    def views(self, flat_like: Tensor) -> list[Tensor]:
        """The segments of a tensor shaped like ``flat`` (the partition, its grad or a moment)."""
        return [flat_like.narrow(0, s.start, s.length) for s in self.segments]

    def _segment_tensor_index(self) -> Tensor:
        """``tensor_index`` of every segment, as a device tensor built once (not every step)."""
        if self._index is None or self._index.device != self.flat.device:
            self._index = torch.tensor([s.tensor_index for s in self.segments], dtype=torch.long,
                                       device=self.flat.device)
        return self._index

    def whole_tensor_norms(self, segment_sq_norms: Tensor) -> tuple[Tensor, Tensor]:
        """Norms of the whole tensors each segment belongs to: (param norms, update norms) per segment.

        ``segment_sq_norms``: ``[2, len(segments)]`` sums of squares of the parameter and update
        segments on this rank.  A collective over ``process_group``: every rank of it must call
        this for the same layout (a rank holding no segment passes a ``[2, 0]`` tensor).
        """
        device = self.flat.device
        index = self._segment_tensor_index()
        # The same dtype on every rank (a rank may hold no segment): fp64 masters only with fp64.
        dtype = torch.float64 if self.flat.dtype == torch.float64 else torch.float32
        totals = torch.zeros(2, self.num_tensors, dtype=dtype, device=device)
        totals.index_add_(1, index, segment_sq_norms.to(device, dtype))
        if self.world_size > 1:
            _all_reduce_sum(totals, self.process_group)
        norms = totals.sqrt_()[:, index]
        return norms[0], norms[1]


def _all_reduce_sum(tensor: Tensor, group: Any) -> None:
    """In-place SUM all-reduce; NCCL needs a CUDA tensor even when the partition is offloaded."""
    backend = dist.get_backend(group)
    if backend == "nccl" and tensor.device.type != "cuda":
        on_device = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
        tensor.copy_(on_device)
    else:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)


# --------------------------------------------------------------------------------------------
# Pure layout arithmetic
# --------------------------------------------------------------------------------------------
def contiguous_partition_segments(numels: Sequence[int], offsets: Sequence[int], partition_start: int,
                                  partition_size: int) -> list[Segment]:
    """Segments of one partition ``[partition_start, partition_start + partition_size)`` of a flat
    buffer holding tensor ``i`` (``numels[i]`` elements) at ``offsets[i]`` (ZeRO 1/2, BF16_Optimizer).
    Gaps (alignment padding) belong to no segment."""
    end = partition_start + partition_size
    segments = []
    for index, (numel, offset) in enumerate(zip(numels, offsets)):
        lo, hi = max(offset, partition_start), min(offset + numel, end)
        if lo < hi:
            segments.append(Segment(index, lo - partition_start, hi - lo, lo - offset))
    return sorted(segments, key=lambda s: s.start)


def sharded_tensor_segments(numels: Sequence[int], shard_numels: Sequence[int], rank: int) -> list[Segment]:
    """Segments of a ZeRO-3 sub-group partition: tensor ``i`` is cut into shards of
    ``shard_numels[i]`` elements (the last one padded); this rank's shards are concatenated."""
    segments, start = [], 0
    for index, (numel, shard) in enumerate(zip(numels, shard_numels)):
        tensor_offset = rank * shard
        length = max(0, min(shard, numel - tensor_offset))
        if length:
            segments.append(Segment(index, start, length, tensor_offset))
        start += shard
    return segments


# --------------------------------------------------------------------------------------------
# Reading DeepSpeed's optimizer wrappers
# --------------------------------------------------------------------------------------------
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


def _unwrap(ds_engine_or_optimizer: Any) -> Any:
    """The optimizer DeepSpeed built (ZeRO / mixed-precision wrapper or the client optimizer itself)."""
    wrapped = getattr(ds_engine_or_optimizer, "optimizer", None)
    if hasattr(ds_engine_or_optimizer, "module") and wrapped is not None:
        return wrapped  # a DeepSpeedEngine
    return ds_engine_or_optimizer


def _param_names(ds_engine_or_optimizer: Any) -> dict[int, str]:
    module = getattr(ds_engine_or_optimizer, "module", None)
    if module is None:
        return {}
    return {id(p): name for name, p in module.named_parameters()}


def attach_zero_layout(ds_engine_or_optimizer: Any, client_optimizer: Optional[torch.optim.Optimizer] = None) -> str:
    """Tell a :class:`~pretrain.optim.lamb.Lamb` client optimizer how DeepSpeed partitioned its tensors.

    Call once on every rank right after ``deepspeed.initialize`` (and before the first step), with
    the engine (preferred: parameter names then appear in messages) or with ``engine.optimizer``.
    ``client_optimizer`` defaults to the optimizer the wrapper steps.  Safe to call for any
    optimizer and any ZeRO stage: optimizers other than Lamb are left alone.

    Returns what was attached: ``"none"`` (not a Lamb), ``"unpartitioned"`` (ZeRO 0 fp32: Lamb
    steps the model's own tensors), ``"whole-tensor copies"`` (ZeRO 0 fp16/bf16: per-tensor fp32
    masters), ``"zero-1/2"``, ``"bf16-optimizer"`` or ``"zero-3"``.
    """
    from pretrain.optim.lamb import Lamb  # circular at module level

    wrapper = _unwrap(ds_engine_or_optimizer)
    client = client_optimizer if client_optimizer is not None else getattr(wrapper, "optimizer", wrapper)
    if not isinstance(client, Lamb):
        return "none"
    names = _param_names(ds_engine_or_optimizer)
    if wrapper is client:
        return "unpartitioned"
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
