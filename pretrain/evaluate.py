"""Held-out evaluation: MLM accuracy and perplexity, NSP/SOP accuracy, summed over all ranks (and, for a
mixture of corpora, over its sources, each also reported on its own)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from pretrain.engine import all_reduce_sum


@torch.no_grad()
def evaluate(model, loader, device: torch.device, max_batches: int = 0,
             counted_batches: Optional[int] = None) -> dict:
    """Run ``model`` (the training Engine or a plain module) in eval mode over ``loader``: the
    metrics of ``eval_sums`` (see there)."""
    return eval_metrics(eval_sums(model, loader, device, max_batches, counted_batches))


@torch.no_grad()
def eval_sums(model, loader, device: torch.device, max_batches: int = 0,
              counted_batches: Optional[int] = None) -> list[float]:
    """The sums over ``loader`` that ``eval_metrics`` turns into metrics (sums of several loaders
    add up: a mixture's held-out metrics over all its sources).

    Every rank must call this (the sums are all-reduced); losses are averaged per masked token
    and per sentence pair, so the result does not depend on the batch size.  With
    ``counted_batches``, only that many first batches count: the rest are padding that gives
    every rank the same number of forwards (see data._EvalPositions).
    """
    was_training = model.training
    model.eval()
    sums = torch.zeros(6, dtype=torch.float64, device=device)
    for i, batch in enumerate(loader):
        if max_batches and i >= max_batches:
            break
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        out = model(**batch)
        if counted_batches is not None and i >= counted_batches:
            continue
        sums += torch.stack([
            out.mlm_loss.double() * out.mlm_count, out.mlm_correct.double(), out.mlm_count.double(),
            (out.sentence_loss.double() * out.sentence_count) if out.sentence_loss is not None else sums[3] * 0,
            out.sentence_correct.double() if out.sentence_correct is not None else sums[4] * 0,
            out.sentence_count.double() if out.sentence_count is not None else sums[5] * 0,
        ])
    if was_training:
        model.train()
    return all_reduce_sum(sums).tolist()


def eval_metrics(sums: list[float], prefix: str = "eval/") -> dict:
    """MLM loss, accuracy and perplexity, sentence loss and accuracy from ``eval_sums``, named
    ``<prefix><metric>``; {} when nothing was masked."""
    mlm_loss_sum, mlm_correct, mlm_count, sent_loss_sum, sent_correct, sent_count = sums
    if mlm_count == 0:
        return {}
    mlm_loss = mlm_loss_sum / mlm_count
    out = {f"{prefix}mlm_loss": mlm_loss, f"{prefix}mlm_accuracy": mlm_correct / mlm_count,
           f"{prefix}perplexity": math.exp(min(mlm_loss, 50.0)), f"{prefix}masked_tokens": mlm_count}
    if sent_count:
        out[f"{prefix}sentence_loss"] = sent_loss_sum / sent_count
        out[f"{prefix}sentence_accuracy"] = sent_correct / sent_count
    return out
