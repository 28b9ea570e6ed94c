"""Packed batches (data.packing): the rows first-fit decreasing makes, the layout the model reads, and the
same losses and gradients as the same instances unpacked (NSP, SOP, full-sentences), through the
block-diagonal mask and through jagged attention; a packed run trains and resumes bit for bit."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from data_prep.masking import IGNORE_INDEX
from pretrain.bench.batches import draw_instance
from pretrain.config import KernelsConfig, ModelConfig
from pretrain.data import collate
from pretrain.model import build_model
from pretrain.packing import collate_packed, fill, first_fit_decreasing

SEQ, VOCAB, PREDICTIONS = 64, 300, 10


def test_first_fit_decreasing_places_every_instance_once_within_capacity_and_the_row_limit():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 65, size=200).tolist()
    for limit in (1, 2, 8):
        rows = first_fit_decreasing(lengths, 64, limit)
        assert sorted(i for row in rows for i in row) == list(range(200))
        assert all(sum(lengths[i] for i in row) <= 64 and len(row) <= limit for row in rows)
        assert rows == first_fit_decreasing(lengths, 64, limit)          # a pure function
    assert len(first_fit_decreasing(lengths, 64, 1)) == 200
    bound = math.ceil(sum(lengths) / 64)
    assert len(first_fit_decreasing(lengths, 64, 8)) <= math.ceil(11 / 9 * bound) + 1   # FFD's guarantee
    with pytest.raises(ValueError, match="instance 1 has 65 tokens, more than a row's 64"):
        first_fit_decreasing([3, 65], 64, 8)


def _examples(kind: str, count: int, seed: int = 0) -> list[dict]:
    """Instances with NSP/SOP labels (two segments) or full-sentences ones (one segment, no label)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(8, SEQ + 1, size=count)
    out = []
    for _ in range(count):
        example = draw_instance(rng, SEQ, VOCAB, PREDICTIONS, lengths=lengths).example()
        if kind == "full-sentences":
            del example["sentence_label"]
            example["token_type_ids"] = np.zeros_like(example["token_type_ids"])
        out.append(example)
    return out


def test_the_packed_layout_holds_every_instance_where_its_positions_say():
    examples = _examples("nsp", 24)
    batch = collate_packed(examples, 0, SEQ, PREDICTIONS, max_instances_per_row=4, pad_to_multiple_of=8)
    rows, width = batch["input_ids"].shape
    assert rows < 24 and width % 8 == 0 and width <= SEQ
    flat_ids, flat_seg = batch["input_ids"].reshape(-1), batch["segment_ids"].reshape(-1)
    at = 0
    for i, e in enumerate(examples):
        start = int(batch["cls_positions"][i])
        n = len(e["input_ids"])
        assert flat_ids[start:start + n].tolist() == list(e["input_ids"])
        assert batch["token_type_ids"].reshape(-1)[start:start + n].tolist() == list(e["token_type_ids"])
        assert len(set(flat_seg[start:start + n].tolist())) == 1 and flat_seg[start] > 0
        m = len(e["masked_lm_positions"])
        assert batch["masked_lm_positions"][at:at + m].tolist() == [start + p for p in e["masked_lm_positions"]]
        assert batch["masked_lm_labels"][at:at + m].tolist() == list(e["masked_lm_labels"])
        at += m
    # the masked tokens one after another, padded to a multiple of 8 with ignored entries
    assert batch["masked_lm_labels"].shape == (-(-at // 8) * 8,) and (batch["masked_lm_labels"][at:] == IGNORE_INDEX).all()
    assert (batch["segment_ids"].max(dim=1).values <= 4).all()
    assert batch["sentence_labels"].tolist() == [e["sentence_label"] for e in examples]
    # cu_seqlens: the runs of one segment id, each row cut at its end
    bounds = batch["cu_seqlens"].tolist()
    assert bounds[0] == 0 and bounds[-1] == rows * width and bounds == sorted(set(bounds))
    cuts = [0] + [j for j in range(1, rows * width) if flat_seg[j] != flat_seg[j - 1] or j % width == 0] + [rows * width]
    assert bounds == cuts
    real, slots = fill(batch)
    assert real == sum(len(e["input_ids"]) for e in examples) and slots == rows * width


def _model(kind: str) -> torch.nn.Module:
    cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=SEQ, hidden_dropout=0.0, attention_dropout=0.0,
                      sentence_head="none" if kind == "full-sentences" else kind)
    torch.manual_seed(0)
    return build_model(cfg, KernelsConfig()).double()


def _losses_and_grads(model, batch):
    model.zero_grad()
    out = model(**batch)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


@pytest.mark.parametrize("jagged", [False, True], ids=["block-mask", "jagged"])
@pytest.mark.parametrize("kind", ["nsp", "sop", "full-sentences"])
def test_a_packed_batch_gives_the_losses_and_gradients_of_the_same_instances_unpacked(kind, jagged):
    """fp64, dropout off: the MLM loss over the masked tokens, the sentence loss and accuracy over the
    instances (every instance's [CLS]), and every gradient, as the padded batch of the same instances."""
    examples = _examples(kind, 16, seed=1)
    model = _model(kind)
    padded, packed = collate(examples, 0, 8, PREDICTIONS), collate_packed(examples, 0, SEQ, PREDICTIONS, 8, 8)
    assert packed["input_ids"].size(0) < 16
    ref, ref_grads = _losses_and_grads(model, padded)
    model.jagged = jagged
    got, got_grads = _losses_and_grads(model, packed)
    torch.testing.assert_close(got.mlm_loss, ref.mlm_loss, rtol=1e-10, atol=1e-12)
    assert (got.mlm_correct, got.mlm_count) == (ref.mlm_correct, ref.mlm_count)
    if kind == "full-sentences":
        assert got.sentence_loss is None and ref.sentence_loss is None
    else:
        torch.testing.assert_close(got.sentence_loss, ref.sentence_loss, rtol=1e-10, atol=1e-12)
        assert (got.sentence_correct, got.sentence_count) == (ref.sentence_correct, ref.sentence_count)
        assert int(got.sentence_count) == 16
    assert got_grads.keys() == ref_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(got_grads[name], ref_grads[name], rtol=1e-9, atol=1e-12, msg=name)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="jagged attention through flash/efficient kernels needs CUDA")
def test_on_cuda_packed_batches_take_jagged_attention_with_the_block_mask_outputs():
    examples = _examples("nsp", 64, seed=2)
    model = _model("nsp").float().cuda()
    batch = {k: v.cuda() for k, v in collate_packed(examples, 0, SEQ, PREDICTIONS, 8, 8).items()}
    assert model._jagged(batch["input_ids"].device)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = model(**batch)
        model.jagged = False
        ref = model(**batch)
    torch.testing.assert_close(got.mlm_logits.float(), ref.mlm_logits.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got.loss.float(), ref.loss.float(), rtol=1e-2, atol=1e-2)


@pytest.mark.slow
def test_a_packed_run_trains_on_fewer_rows_and_resumes_bit_for_bit(tmp_path):
    """Two ranks, dynamic masking: the sample counter and schedule of unpacked training, fewer rows a step
    (the fill logged), and stopped at step 3 and resumed, the losses of a straight packed run."""
    from tests.pretrain.training_helpers import TINY, build_shards, data_overrides, straight_and_resumed

    data = build_shards(tmp_path / "data", "dynamic", lines=400)
    overrides = TINY + data_overrides(data) + ["training.max_steps=6", "data.packing=true", "data.num_workers=1",
                                               "logging.every_steps=1"]
    straight, _, resumed = straight_and_resumed(tmp_path, overrides, 3)
    assert straight.losses() == resumed.losses() and sorted(straight.losses()) == list(range(1, 7))
    rows = straight.metrics()
    assert all(r["perf/rows_per_s"] < r["perf/seq_per_s"] and 0 < r["perf/fill"] <= 1 for r in rows), rows
    assert all(math.isfinite(r["train/sentence_accuracy"]) for r in rows)
