"""Attention masks and the three attention cores selected by ``kernels.attention``.

Masks are boolean *keep* masks (True: query q may attend to key k), built once per forward
and shared by every layer.  Two inputs are understood:

* ``attention_mask`` [B, S] (1 = token, 0 = pad): keys that are padding are hidden from every
  query -> mask [B, 1, 1, S].
* ``segment_ids`` [B, S] (0 = pad, k >= 1 = k-th document packed into the row): a query sees
  only keys of its own document -> block-diagonal mask [B, 1, S, S].

No query row is ever left with nothing to attend to, so the softmax never sees a row of only
-inf (which would give NaN): with ``segment_ids`` padding forms its own block (pad queries attend
to pad keys); with ``attention_mask`` a row that is entirely padding attends everywhere.  Outputs
at padded query positions are finite and meaningless; no loss is ever taken there.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def build_attention_mask(attention_mask: torch.Tensor | None = None,
                         segment_ids: torch.Tensor | None = None) -> torch.Tensor | None:
    """Boolean keep-mask [B,1,1,S] or [B,1,S,S], or None for full attention (flash-eligible).

    ``segment_ids`` wins when both are given: its zeros already mark the padding.
    """
    if segment_ids is not None:
        return segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    keep = keep | ~keep.any(dim=-1, keepdim=True)  # an all-padding row attends everywhere (no NaN)
    return keep[:, None, None, :]


def positions_from_segments(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids restarting at 0 at the start of every packed document (no host sync)."""
    index = torch.arange(segment_ids.size(1), device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    first_index = torch.where(starts, index, torch.zeros_like(index)).cummax(dim=1).values
    return index - first_index


def sdpa_attention(q, k, v, keep, dropout_p: float) -> torch.Tensor:
    """torch SDPA: flash kernels when there is no mask, memory-efficient kernels with one."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=keep, dropout_p=dropout_p)


def reference_attention(q, k, v, keep, dropout_p: float) -> torch.Tensor:
    """Plain torch softmax(QK^T / sqrt(d)) V; the readable definition the others must match."""
    scores = (q @ k.transpose(-2, -1)) * q.size(-1) ** -0.5
    if keep is not None:
        scores = scores.masked_fill(~keep, torch.finfo(scores.dtype).min)
    probs = F.dropout(scores.softmax(dim=-1), p=dropout_p, training=dropout_p > 0)
    return probs @ v


def fused_softmax_attention(q, k, v, keep, dropout_p: float) -> torch.Tensor:
    """Our fused scale + mask + softmax kernel (pretrain.ops) between two plain matmuls."""
    from pretrain import ops  # imported only when this path is selected
    probs = ops.scaled_masked_softmax(q @ k.transpose(-2, -1), mask=keep, scale=q.size(-1) ** -0.5)
    probs = F.dropout(probs, p=dropout_p, training=dropout_p > 0)
    return probs @ v


ATTENTION_IMPLS = {
    "sdpa": sdpa_attention,
    "reference": reference_attention,
    "fused_softmax": fused_softmax_attention,
}
