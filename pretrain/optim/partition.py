"""Where the tensors of a parameter group lie in a flat partition: plain data for LAMB.

LAMB's trust ratio is ``||p|| / ||update||`` of a whole parameter tensor.  A sharded engine (ZeRO
stage 1/2 and DeepSpeed's BF16_Optimizer flatten every parameter group into one buffer cut into
one contiguous partition per data-parallel rank; stage 3 gives, per sub-group, the concatenation
of this rank's shard of every tensor) hands the optimizer only the local fp32 partition, and a
partition boundary can fall inside a tensor.  A :class:`PartitionLayout` says which runs of the
partition belong to which original tensor (its :class:`Segment` list); the optimizer adds the
per-segment sums of squares into one vector per tensor, all-reduces (SUM) it over the layout's
process group and takes the square root: the norms of the whole tensors, identical on every rank.

The training engine derives the layouts from its sharding (``pretrain.engine.layout``) and
registers them with the optimizer; this module knows nothing of how they were derived.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import torch
import torch.distributed as dist
from torch import Tensor


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
