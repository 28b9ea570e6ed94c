"""training.activation_checkpointing: each encoder layer recomputed in the backward pass.

The model with it off (plain autograd, every activation kept) is the reference: with it on, the losses
and every gradient are bitwise the same (fp32, CPU), dropout off and on (the RNG state is replayed),
on the dense, unpadded and packed (block mask and jagged) paths, pre-LN and ALBERT's shared layers;
that the layers really are recomputed, and keep less for the backward pass, is checked apart.  Real
2-rank runs through the engine at ZeRO 1 and ZeRO 3 log the same losses with it on and off.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch.autograd.graph import saved_tensors_hooks

from pretrain.config import Config, KernelsConfig, ModelConfig, TrainingConfig
from pretrain.model import build_model
from pretrain.packing import collate_packed
from tests.pretrain.test_model import batch, tiny
from tests.pretrain.test_packing import PREDICTIONS, SEQ, VOCAB, _examples
from tests.pretrain.training_helpers import TINY, build_shards, data_overrides, launch

PATHS = {   # name: (model overrides, kernels, batch kind)
    "dense": ({}, KernelsConfig(), "padded"),
    "pre-ln": ({"layer_norm_position": "pre"}, KernelsConfig(), "padded"),
    "unpad": ({}, KernelsConfig(unpad=True), "padded"),
    "albert-shared": ({"arch": "albert", "embedding_size": 16, "share_layers": True, "num_layers": 3},
                      KernelsConfig(), "padded"),
    "packed-block-mask": ({}, KernelsConfig(), "packed"),
    "packed-jagged": ({}, KernelsConfig(), "jagged"),
}


def _model_and_batch(path: str, dropout: float, checkpointing: bool):
    overrides, kernels, kind = PATHS[path]
    if kind == "padded":
        cfg, data = tiny(**overrides, hidden_dropout=dropout, attention_dropout=dropout), batch(seq=12)
    else:
        cfg = ModelConfig(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                          max_position_embeddings=SEQ, hidden_dropout=dropout, attention_dropout=dropout)
        data = collate_packed(_examples("nsp", 12, seed=3), 0, SEQ, PREDICTIONS, 8, 8)
    torch.manual_seed(0)
    model = build_model(cfg, kernels, activation_checkpointing=checkpointing).train()
    if kind != "padded":
        model.jagged = kind == "jagged"
    return model, data


def _loss_and_grads(model, data, seed: int = 5):
    torch.manual_seed(seed)           # the same dropout draws for both runs
    model.zero_grad()
    out = model(**data)
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("dropout", [0.0, 0.3], ids=["dropout-off", "dropout-on"])
@pytest.mark.parametrize("path", list(PATHS))
def test_checkpointing_gives_bitwise_the_same_losses_and_gradients(path, dropout):
    ref_loss, ref_grads = _loss_and_grads(*_model_and_batch(path, dropout, checkpointing=False))
    loss, grads = _loss_and_grads(*_model_and_batch(path, dropout, checkpointing=True))
    assert torch.equal(loss, ref_loss), (loss.item(), ref_loss.item())
    assert grads.keys() == ref_grads.keys() and len(grads) > 10
    differing = [n for n in grads if not torch.equal(grads[n], ref_grads[n])]
    assert not differing, f"{path}: gradients differ: {differing[:5]}"
    if dropout:   # the draws matter: another seed gives another loss, so matching the reference is not luck
        other, _ = _loss_and_grads(*_model_and_batch(path, dropout, checkpointing=True), seed=6)
        assert not torch.equal(other, ref_loss)


@pytest.mark.parametrize("path", ["dense", "albert-shared"])
def test_layers_are_recomputed_and_less_is_kept_for_backward(path):
    """Every layer application runs once more in the backward pass, and the tensors autograd keeps
    (counted through saved_tensors_hooks, which see what the checkpoints keep: their inputs) are fewer bytes."""
    counts = {}
    for checkpointing in (False, True):
        model, data = _model_and_batch(path, 0.1, checkpointing)
        calls = []
        for layer in model.encoder.layers:
            layer.register_forward_pre_hook(lambda *_: calls.append(1))   # a recomputation may stop early
        kept = []
        with saved_tensors_hooks(lambda t: kept.append(t.numel() * t.element_size()) or t, lambda t: t):
            loss = model(**data).loss
        forward_calls = len(calls)
        loss.backward()
        counts[checkpointing] = (forward_calls, len(calls) - forward_calls, sum(kept))
    applications = model.encoder.num_layers
    assert counts[False][:2] == (applications, 0)
    assert counts[True][:2] == (applications, applications)      # recomputed in the backward pass
    assert counts[True][2] < 0.6 * counts[False][2], counts


def test_evaluation_is_not_checkpointed():
    """Under no_grad (evaluation) the layers run once, with the same outputs as without the setting."""
    (plain, data), (ckpt, _) = (_model_and_batch("dense", 0.1, c) for c in (False, True))
    calls = []
    ckpt.encoder.layers[0].register_forward_pre_hook(lambda *_: calls.append(1))
    with torch.no_grad():
        assert torch.equal(ckpt.eval()(**data).loss, plain.eval()(**data).loss)
    assert len(calls) == 1


def test_the_setting_is_read_from_the_config_and_off_by_default():
    """(The training entry point's build_model call is checked by the engine test: its log line.)"""
    from pretrain.config import config_from_dict
    cfg = config_from_dict({"training": {"activation_checkpointing": True}})
    model = build_model(dataclasses.replace(cfg.model, num_layers=1, hidden_size=32, num_heads=2,
                                            intermediate_size=64, vocab_size=64),
                        cfg.kernels, cfg.training.activation_checkpointing)
    assert model.encoder.activation_checkpointing is True
    assert build_model(tiny()).encoder.activation_checkpointing is False


def test_switching_it_keeps_the_run_fingerprint():
    """A run may turn it on (or off) when it resumes: the losses are the same, so the checkpoint's
    config fingerprint does not change with it (it changes with a setting that does change them)."""
    from pretrain.checkpoint import config_fingerprint
    from pretrain.config import config_from_dict
    plain, on, other = (config_from_dict({"training": t}) for t in
                        ({}, {"activation_checkpointing": True}, {"seq_len": 512}))
    assert config_fingerprint(on) == config_fingerprint(plain) != config_fingerprint(other)


def test_finetuning_applies_the_setting_with_the_same_loss_and_gradients(tmp_path):
    """finetune's load_model hands training.activation_checkpointing to the encoder it shares with
    pretraining; a sequence-classification step, dropout on, is bitwise the one without it."""
    from types import SimpleNamespace

    from pretrain.finetune.config import FinetuneConfig
    from pretrain.finetune.train import load_model
    from pretrain.weights import save_weights
    m = tiny(hidden_dropout=0.3, attention_dropout=0.3)
    torch.manual_seed(0)
    run = Config(model=m, training=TrainingConfig(seq_len=m.max_position_embeddings))
    save_weights(str(tmp_path / "ckpt"), run, build_model(m).state_dict(), {})
    task = SimpleNamespace(head_task="sequence", num_labels=3, labels=None, problem_type=None)
    data = {k: batch()[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    results = {}
    for checkpointing in (False, True):
        cfg = FinetuneConfig()
        cfg.model.checkpoint, cfg.training.activation_checkpointing = str(tmp_path / "ckpt"), checkpointing
        model, _ = load_model(cfg, task, seed=1)
        assert model.encoder.activation_checkpointing is checkpointing
        results[checkpointing] = _loss_and_grads(model.train(), {**data, "labels": torch.tensor([0, 2, 1])})
    (ref_loss, ref_grads), (loss, grads) = results[False], results[True]
    assert torch.equal(loss, ref_loss) and grads.keys() == ref_grads.keys()
    assert all(torch.equal(grads[n], ref_grads[n]) for n in grads)


# ---------------------------------------------------------------------------------------------
# Through the engine: 2 ranks, ZeRO 1 and ZeRO 3 (its partitioned parameters gathered again for the
# recomputation)
# ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_training_logs_the_same_losses_with_checkpointing_on_and_off(tmp_path):
    """Dropout on (the debug config's 0.1), so the recomputed draws must be the first pass's.  One
    reference run without checkpointing, at ZeRO 1: on CPU in fp32 ZeRO 1 and ZeRO 3 log bitwise the
    same losses (seen when this test was written), so it serves both checkpointed runs."""
    shards = build_shards(tmp_path / "data", "dynamic", lines=600)
    base = TINY + data_overrides(shards) + ["training.max_steps=3", "schedule.warmup_steps=1"]
    off = launch(tmp_path / "off", base + ["zero.stage=1"])
    assert off.codes == [0, 0], off.explain()
    assert sorted(off.losses()) == [1, 2, 3] and "layer is recomputed" not in off.logs[0]
    for stage in (1, 3):
        on = launch(tmp_path / f"on-zero{stage}",
                    base + [f"zero.stage={stage}", "training.activation_checkpointing=true"])
        assert on.codes == [0, 0], on.explain()
        assert "layer is recomputed" in on.logs[0]
        assert on.losses() == off.losses(), f"ZeRO {stage}: {on.losses()} != {off.losses()} without checkpointing"
