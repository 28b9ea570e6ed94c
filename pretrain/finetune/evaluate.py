"""Dev evaluation of a fine-tuning run: batched forward passes, the task's metrics, the predictions.

:func:`dev_outputs` runs the model (the engine, or a plain module) over the dev features in batches
of features sorted by length (little padding), the batches dealt round-robin to the ranks, every rank
running the same number of forward passes (ZeRO-3 gathers parameters collectively); the outputs are
gathered so that every rank holds all of them, in feature order, and computes the same metrics (so
all ranks agree on the best model and on early stopping without another collective).

:func:`dev_metrics` turns them into the task's scores and one prediction record per dev example:

    classification  accuracy, f1 (2 classes), matthews           argmax of the logits
    regression      pearson, spearman, pearson_spearman_mean      the single output
    token           entity f1, precision, recall, tag accuracy    each word's tag at its first sub-token
                    (conlleval's rules, token.tag_scheme)          in the window that owns it
    qa              SQuAD exact, f1 (+ HasAns/NoAns, best_f1 and   decode_squad (n-best spans, v2 null
                    best_exact with their thresholds on v2)        score difference)

and ``loss``: the mean of the batches' losses weighted by their features.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist

from pretrain.finetune.features import collate, decode_squad, word_predictions
from pretrain.finetune.metrics import classification_metrics, entity_scores, regression_metrics, squad_scores


def eval_batches(features: Sequence[Any], batch_size: int) -> list[list[int]]:
    """Feature indices in batches of similar length (sorted, longest first; ties in feature order)."""
    order = sorted(range(len(features)), key=lambda i: (-len(features[i].input_ids), i))
    return [order[s:s + batch_size] for s in range(0, len(order), batch_size)]


@torch.no_grad()
def dev_outputs(forward: Callable[..., Any], features: Sequence[Any], pad_id: int, batch_size: int,
                device: torch.device, rank: int = 0, world_size: int = 1) -> tuple[list, float]:
    """(per feature, in order: its output as numpy, see _per_feature; the mean dev loss)."""
    batches = eval_batches(features, batch_size)
    mine = batches[rank::world_size]
    rounds = math.ceil(len(batches) / world_size)
    results: list[tuple[int, Any]] = []
    loss_sum = 0.0
    for k in range(rounds):
        part = mine[k] if k < len(mine) else batches[0]        # an extra pass keeps ZeRO-3's collectives paired
        batch = {name: v.to(device) for name, v in collate([features[i] for i in part], pad_id).items()}
        out = forward(**batch)
        if k >= len(mine):
            continue
        loss_sum += float(out.loss.float()) * len(part) if out.loss is not None else 0.0
        results += list(zip(part, _per_feature(out, [features[i] for i in part])))
    if world_size > 1:
        gathered: list = [None] * world_size
        dist.all_gather_object(gathered, (results, loss_sum))
        results = [r for rank_results, _ in gathered for r in rank_results]
        loss_sum = sum(s for _, s in gathered)
    outputs: list = [None] * len(features)
    for i, value in results:
        outputs[i] = value
    return outputs, loss_sum / max(len(features), 1)


def _per_feature(out, features: Sequence[Any]) -> list:
    """Each row's output as numpy: logits [C] (sequence), predicted tag ids [tokens] (token), or
    (start logits, end logits) [tokens] (qa); padding cut off."""
    if out.start_logits is not None:
        starts, ends = out.start_logits.float().cpu().numpy(), out.end_logits.float().cpu().numpy()
        return [(starts[r, :len(f.input_ids)], ends[r, :len(f.input_ids)]) for r, f in enumerate(features)]
    logits = out.logits.float().cpu()
    if logits.dim() == 3:
        ids = logits.argmax(-1).numpy()
        return [ids[r, :len(f.input_ids)] for r, f in enumerate(features)]
    return list(logits.numpy())


def dev_metrics(data, outputs: list, loss: float, cfg) -> tuple[dict, list[dict]]:
    """(the task's dev metrics, one prediction record per dev example) for ``data`` (a prepare.TaskData) and
    the outputs of :func:`dev_outputs`; ``cfg``: the run's FinetuneConfig (token and qa settings)."""
    task = data.task_type
    if task == "qa":
        metrics, records = _qa(data, outputs, cfg.qa)
    elif task == "token":
        metrics, records = _token(data, outputs, cfg.token.tag_scheme)
    elif task == "regression":
        pred = [float(o[0]) for o in outputs]
        gold = [f.label for f in data.dev_features]
        metrics = regression_metrics(pred, gold)
        metrics["pearson_spearman_mean"] = (metrics["pearson"] + metrics["spearman"]) / 2
        records = [{"index": i, "prediction": p, "gold": g} for i, (p, g) in enumerate(zip(pred, gold))]
    else:
        pred = [int(np.argmax(o)) for o in outputs]
        gold = [f.label for f in data.dev_features]
        metrics = classification_metrics(pred, gold, len(data.labels), with_matthews=True)
        records = [{"index": i, "prediction": data.labels[p], "gold": data.labels[g]}
                   for i, (p, g) in enumerate(zip(pred, gold))]
    return {**{k: float(v) for k, v in metrics.items()}, "loss": float(loss)}, records


def _token(data, outputs: list, scheme: str) -> tuple[dict, list[dict]]:
    words = word_predictions(data.dev_features, outputs)
    pred = [[data.labels[i] for i in sentence] for sentence in words]
    gold = [list(s.tags) for s in data.dev_examples]
    scores = entity_scores(pred, gold, scheme)
    metrics = {k: scores[k] for k in ("f1", "precision", "recall", "accuracy")}
    records = [{"index": i, "tokens": list(s.tokens), "prediction": p, "gold": g}
               for i, (s, p, g) in enumerate(zip(data.dev_examples, pred, gold))]
    return metrics, records


def _qa(data, outputs: list, q) -> tuple[dict, list[dict]]:
    starts, ends = [o[0] for o in outputs], [o[1] for o in outputs]
    settings = dict(n_best=q.n_best, max_answer_length=q.max_answer_length, version_2=data.version_2)
    predicted = decode_squad(data.dev_examples, data.dev_features, starts, ends,
                             null_score_diff_threshold=q.null_score_diff_threshold, **settings)
    gold = [{"id": ex.id, "answers": [a.text for a in ex.answers]} for ex in data.dev_examples]
    metrics = squad_scores(predicted.answers, gold)
    if data.version_2:   # the threshold search reads the best non-null span and the null score difference
        spans = decode_squad(data.dev_examples, data.dev_features, starts, ends, null_score_diff_threshold=math.inf,
                             **settings)
        best = squad_scores(spans.answers, gold, na_probs=predicted.null_score_diff)
        metrics.update({k: v for k, v in best.items() if k.startswith("best_")})
    else:
        metrics.update(best_f1=metrics["f1"], best_exact=metrics["exact"])
    records = []
    for i, ex in enumerate(data.dev_examples):
        record = {"index": i, "id": ex.id, "prediction": predicted.answers[ex.id], "gold": [a.text for a in ex.answers]}
        if data.version_2:
            diff = predicted.null_score_diff[ex.id]
            record["null_score_diff"] = diff if math.isfinite(diff) else None    # inf: no valid span
        records.append(record)
    return metrics, records


def better(value: float, best: Optional[float], metric: str) -> bool:
    """Whether ``value`` of ``metric`` beats ``best`` (None: nothing yet); NaN never does, but is better than nothing."""
    if best is None:
        return True
    if math.isnan(value):
        return False
    if math.isnan(best):
        return True
    return value < best if metric == "loss" else value > best
