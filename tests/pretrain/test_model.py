"""The model package: shapes, losses, masks, kernel paths, init, FLOPs.  Tiny CPU models."""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from pretrain.config import KernelsConfig, ModelConfig
from pretrain.model import (IGNORE_INDEX, build_attention_mask, build_model, flops_per_sequence,
                            padded_vocab_size, positions_from_segments)

VOCAB = 101  # not a multiple of 8, so the vocabulary is padded to 104 inside the model


def tiny(**overrides) -> ModelConfig:
    base = dict(vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                max_position_embeddings=64, hidden_dropout=0.1, attention_dropout=0.1)
    return ModelConfig(**{**base, **overrides})


def perturbed(model):
    """Move every parameter off its init (LayerNorm 1/0, zero biases) so mix-ups would show."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def batch(batch_size=3, seq=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch_size, seq), generator=g)
    attention_mask = torch.ones(batch_size, seq, dtype=torch.long)
    attention_mask[1, 9:] = 0
    attention_mask[2, 5:] = 0
    token_type_ids = torch.zeros_like(input_ids)
    token_type_ids[:, 4:] = 1
    positions = torch.tensor([[1, 4, 7, 10], [2, 3, 0, 0], [1, 0, 0, 0]])
    labels = torch.tensor([[11, 12, 13, 14], [15, 16, IGNORE_INDEX, IGNORE_INDEX], [17] + [IGNORE_INDEX] * 3])
    return dict(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                masked_lm_positions=positions, masked_lm_labels=labels, sentence_labels=torch.tensor([0, 1, 1]))


def require_ops(name):
    ops = pytest.importorskip("pretrain.ops", reason="pretrain.ops not available")
    if not hasattr(ops, name):
        pytest.skip(f"pretrain.ops not available (it has no {name} yet)")


# ---------------------------------------------------------------------------------------------
# Outputs and losses
# ---------------------------------------------------------------------------------------------
def test_forward_outputs_match_a_hand_computed_loss():
    model = perturbed(build_model(tiny()))
    b = batch()
    out = model(**b)
    labels = b["masked_lm_labels"].reshape(-1)
    real = labels != IGNORE_INDEX
    assert out.mlm_logits.shape == (12, VOCAB)  # every [B, P] entry, unpadded vocabulary
    assert out.sentence_logits.shape == (3, 2)
    mlm = F.cross_entropy(out.mlm_logits[real], labels[real])
    nsp = F.cross_entropy(out.sentence_logits, b["sentence_labels"])
    torch.testing.assert_close(out.mlm_loss, mlm)
    torch.testing.assert_close(out.sentence_loss, nsp)
    torch.testing.assert_close(out.loss, mlm + nsp)
    assert out.mlm_count.item() == 7 and out.sentence_count.item() == 3
    expected_correct = (out.mlm_logits[real].argmax(-1) == labels[real]).sum()
    assert out.mlm_correct.item() == expected_correct.item()
    assert out.sentence_correct.item() == (out.sentence_logits.argmax(-1) == b["sentence_labels"]).sum().item()
    for count in (out.mlm_correct, out.mlm_count, out.sentence_correct, out.sentence_count):
        assert count.ndim == 0 and not count.requires_grad


def test_mlm_logits_are_the_full_sequence_logits_at_the_masked_positions():
    model = perturbed(build_model(tiny()))
    b = batch()
    out = model(**b)
    everywhere = model(b["input_ids"], b["attention_mask"], b["token_type_ids"]).mlm_logits.view(3, 12, VOCAB)
    positions = b["masked_lm_positions"]
    gathered = everywhere[torch.arange(3)[:, None], positions].reshape(-1, VOCAB)
    torch.testing.assert_close(out.mlm_logits, gathered)


def test_padded_prediction_entries_do_not_change_the_loss():
    model = perturbed(build_model(tiny()))
    b = batch()
    moved = dict(b, masked_lm_positions=b["masked_lm_positions"].clone())
    moved["masked_lm_positions"][1, 2:] = 6  # entries whose label is -100
    out, out_moved = model(**b), model(**moved)
    torch.testing.assert_close(out.mlm_loss, out_moved.mlm_loss)
    assert out.mlm_correct == out_moved.mlm_correct


def test_no_masked_tokens_gives_zero_loss_not_nan():
    model = build_model(tiny())
    b = batch()
    b["masked_lm_labels"] = torch.full_like(b["masked_lm_labels"], IGNORE_INDEX)
    out = model(**b)
    assert out.mlm_loss.item() == 0.0 and out.mlm_count.item() == 0


def test_padded_vocabulary_columns_never_win():
    model = perturbed(build_model(tiny()))
    assert model.embeddings.word.weight.shape[0] == padded_vocab_size(model.config) == 104
    with torch.no_grad():
        model.mlm_head.decoder_bias[VOCAB:] = 1e4  # would win every argmax if not sliced off
    out = model(**batch())
    assert out.mlm_logits.shape[-1] == VOCAB
    assert out.mlm_logits.max() < 1e3


def test_forward_does_not_sync_with_the_host(monkeypatch):
    model = build_model(tiny())
    b = batch()

    def sync(*args, **kwargs):
        raise AssertionError("host sync inside forward")

    for name in ("item", "tolist", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    out = model(**b)
    monkeypatch.undo()
    assert torch.isfinite(out.loss).item()


def test_loss_decreases_when_training_on_one_batch():
    torch.manual_seed(0)
    model = build_model(tiny(hidden_dropout=0.0, attention_dropout=0.0)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    b = batch()
    first = None
    for _ in range(15):
        loss = model(**b).loss
        first = loss.item() if first is None else first
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.5 * first
    assert model.embeddings.word.weight.grad[VOCAB:].abs().max() == 0  # padded rows get no gradient


def test_sentence_labels_without_a_sentence_head_are_ignored():
    """NSP/SOP shards under a model without a sentence head (RoBERTa, DistilBERT): masked LM only (the trainer
    says so at start: test_config)."""
    model = build_model(tiny(sentence_head="none")).eval()
    assert model.pooler is None and model.sentence_head is None
    b = batch()
    assert "sentence_labels" in b
    without = model(**{k: v for k, v in b.items() if k != "sentence_labels"})
    out = model(**b)
    assert out.sentence_logits is None and out.sentence_loss is None
    assert torch.equal(out.loss, without.loss) and torch.equal(out.loss, out.mlm_loss)


def test_dropout_is_active_in_train_mode_only():
    model = build_model(tiny())
    b = batch()
    model.eval()
    torch.testing.assert_close(model(**b).loss, model(**b).loss)
    model.train()
    assert model(**b).loss.item() != model(**b).loss.item()


# ---------------------------------------------------------------------------------------------
# Masks: padding, packed documents
# ---------------------------------------------------------------------------------------------
def test_padding_tokens_do_not_affect_real_tokens():
    model = perturbed(build_model(tiny()))
    ids = torch.randint(5, VOCAB, (1, 7))
    alone = model.encode(ids)
    padded_ids = torch.cat([ids, torch.randint(5, VOCAB, (1, 5))], dim=1)
    mask = torch.tensor([[1] * 7 + [0] * 5])
    padded = model.encode(padded_ids, attention_mask=mask)
    torch.testing.assert_close(padded[:, :7], alone)


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_packed_documents_match_documents_encoded_alone(attention):
    model = perturbed(build_model(tiny(), KernelsConfig(attention=attention)))
    doc_a, doc_b = torch.randint(5, VOCAB, (1, 5)), torch.randint(5, VOCAB, (1, 4))
    types_a, types_b = torch.tensor([[0, 0, 0, 1, 1]]), torch.tensor([[0, 0, 1, 1]])
    packed = torch.cat([doc_a, doc_b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    segments = torch.tensor([[1] * 5 + [2] * 4 + [0] * 3])
    types = torch.cat([types_a, types_b, torch.zeros(1, 3, dtype=torch.long)], dim=1)
    hidden = model.encode(packed, token_type_ids=types, segment_ids=segments)
    torch.testing.assert_close(hidden[:, :5], model.encode(doc_a, token_type_ids=types_a))
    torch.testing.assert_close(hidden[:, 5:9], model.encode(doc_b, token_type_ids=types_b))
    assert torch.isfinite(hidden).all()


def test_positions_restart_at_every_document():
    segments = torch.tensor([[1, 1, 1, 2, 2, 0, 0], [1, 2, 2, 2, 3, 3, 3]])
    expected = torch.tensor([[0, 1, 2, 0, 1, 0, 1], [0, 0, 1, 2, 0, 1, 2]])
    assert torch.equal(positions_from_segments(segments), expected)


def test_attention_masks_never_leave_a_query_without_keys():
    key_mask = build_attention_mask(attention_mask=torch.tensor([[1, 1, 0], [0, 0, 0]]))
    assert key_mask.shape == (2, 1, 1, 3)
    assert key_mask[0, 0, 0].tolist() == [True, True, False]
    assert key_mask[1].all()  # an all-padding row attends everywhere instead of nowhere
    block = build_attention_mask(segment_ids=torch.tensor([[1, 1, 2, 0]]))
    assert block.shape == (1, 1, 4, 4)
    assert block[0, 0].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    assert build_attention_mask() is None


@pytest.mark.parametrize("attention", ["sdpa", "reference"])
def test_fully_padded_rows_stay_finite(attention):
    model = build_model(tiny(), KernelsConfig(attention=attention)).eval()
    ids = torch.randint(5, VOCAB, (2, 6))
    out = model(ids, attention_mask=torch.tensor([[1, 1, 1, 0, 0, 0], [0] * 6]))
    assert torch.isfinite(out.mlm_logits).all() and torch.isfinite(out.sentence_logits).all()
    packed = model(ids, segment_ids=torch.tensor([[1, 1, 2, 2, 0, 0], [0] * 6]))
    assert torch.isfinite(packed.mlm_logits).all()


# ---------------------------------------------------------------------------------------------
# Kernel paths
# ---------------------------------------------------------------------------------------------
def assert_same_outputs_and_grads(model, expected_model, b):
    got, expected = model(**b), expected_model(**b)
    torch.testing.assert_close(got.mlm_logits, expected.mlm_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got.sentence_logits, expected.sentence_logits, rtol=1e-5, atol=1e-5)
    got.loss.backward()
    expected.loss.backward()
    for (name, p), q in zip(expected_model.named_parameters(), model.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=lambda m, name=name: f"{name}: {m}")


def same_weights(reference, kernels: KernelsConfig, cfg: ModelConfig):
    model = build_model(cfg, kernels).eval()
    model.load_state_dict(reference.state_dict())
    return model


@pytest.mark.parametrize("position", ["post", "pre"])
def test_reference_attention_matches_sdpa(position):
    cfg = tiny(layer_norm_position=position)
    sdpa = perturbed(build_model(cfg))
    assert_same_outputs_and_grads(same_weights(sdpa, KernelsConfig(attention="reference"), cfg), sdpa, batch())


OPS_PATHS = {"fused_softmax": KernelsConfig(attention="fused_softmax"),
             "ln_fused": KernelsConfig(layer_norm="fused"),
             "ln_reference": KernelsConfig(layer_norm="reference")}


@pytest.mark.parametrize("kernels", list(OPS_PATHS.values()), ids=list(OPS_PATHS))
@pytest.mark.parametrize("position", ["post", "pre"])
def test_ops_kernel_paths_match_torch(kernels, position):
    require_ops("scaled_masked_softmax" if kernels.attention == "fused_softmax" else "layer_norm")
    cfg = tiny(layer_norm_position=position)
    torch_model = perturbed(build_model(cfg))
    model = same_weights(torch_model, kernels, cfg)
    b = batch()
    assert_same_outputs_and_grads(model, torch_model, b)
    segments = torch.tensor([[1] * 6 + [2] * 6, [1] * 9 + [0] * 3, [1] * 5 + [0] * 7])
    torch.testing.assert_close(model.encode(b["input_ids"], segment_ids=segments),
                               torch_model.encode(b["input_ids"], segment_ids=segments), rtol=1e-5, atol=1e-5)


def test_torch_paths_do_not_import_ops():
    import sys
    model = build_model(tiny())
    had_ops = "pretrain.ops" in sys.modules
    model(**batch())
    assert had_ops or "pretrain.ops" not in sys.modules


def test_unknown_kernel_names_are_rejected():
    with pytest.raises(ValueError, match="kernels.attention: got 'flash'"):
        build_model(tiny(), KernelsConfig(attention="flash"))
    with pytest.raises(ValueError, match="kernels.layer_norm: got 'apex'"):
        build_model(tiny(), KernelsConfig(layer_norm="apex"))


# ---------------------------------------------------------------------------------------------
# Architecture options, parameters, init
# ---------------------------------------------------------------------------------------------
def test_pre_ln_has_a_final_norm_and_no_embedding_norm():
    post, pre = build_model(tiny()), build_model(tiny(layer_norm_position="pre"))
    assert post.embeddings.norm is not None and post.encoder.final_norm is None
    assert pre.embeddings.norm is None and pre.encoder.final_norm is not None
    assert torch.isfinite(pre(**batch()).loss)


def test_albert_factorized_embeddings_and_shared_layers():
    cfg = tiny(arch="albert", embedding_size=16, share_layers=True, num_layers=3, sentence_head="sop")
    model = build_model(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["embeddings.word.weight"] == (104, 16)
    assert shapes["embeddings.projection.weight"] == (32, 16)
    assert shapes["mlm_head.dense.weight"] == (16, 32)  # transform H -> E, decoder tied to the E-sized table
    assert not any(k.startswith("encoder.layers.1.") for k in shapes)
    unshared = build_model(dataclasses.replace(cfg, share_layers=False))
    layer = sum(p.numel() for p in model.encoder.layers[0].parameters())
    total = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for p in unshared.parameters()) == total + 2 * layer
    assert model(**batch()).mlm_logits.shape == (12, VOCAB)


def test_shared_layer_is_applied_num_layers_times():
    cfg = tiny(arch="albert", share_layers=True, num_layers=3, sentence_head="sop", embedding_size=32)
    model = perturbed(build_model(cfg))
    calls = []
    model.encoder.layers[0].register_forward_hook(lambda *args: calls.append(1))
    model(**batch())
    assert len(calls) == 3


def test_bert_initialization():
    torch.manual_seed(0)
    model = build_model(tiny(hidden_size=64, intermediate_size=256, vocab_size=1000, initializer_range=0.02))
    state = model.state_dict()
    for name, tensor in state.items():
        if name.endswith("norm.weight"):
            assert torch.all(tensor == 1), name
        elif name.endswith("bias"):
            assert torch.all(tensor == 0), name
        else:
            rows = tensor[:1000] if name == "embeddings.word.weight" else tensor
            sigma = 0.02 / rows.numel() ** 0.5  # standard error of the sample mean; 6 sigma bounds
            assert abs(rows.mean().item()) < 6 * sigma, name
            assert abs(rows.std().item() - 0.02) < 6 * sigma / 2**0.5, name
    assert torch.all(state["embeddings.word.weight"][1000:] == 0)


def test_consolidated_state_dict_round_trip():
    model = perturbed(build_model(tiny()))
    consolidated = model.consolidated_state_dict()
    assert consolidated["embeddings.word.weight"].shape == (VOCAB, 32)
    assert consolidated["mlm_head.decoder_bias"].shape == (VOCAB,)
    fresh = build_model(tiny())
    fresh.load_consolidated_state_dict(consolidated)
    b = batch()
    torch.testing.assert_close(fresh.eval()(**b).mlm_logits, model(**b).mlm_logits)
    with pytest.raises(ValueError, match="embeddings.word.weight: has 99 rows, expected model.vocab_size=101"):
        fresh.load_consolidated_state_dict(dict(consolidated, **{"embeddings.word.weight": torch.zeros(99, 32)}))


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------
def test_flops_per_sequence_bert_base_and_large():
    base = ModelConfig()
    large = ModelConfig(hidden_size=1024, num_layers=24, num_heads=16, intermediate_size=4096)
    assert round(flops_per_sequence(base, 128) / 1e9, 1) == 69.8
    assert round(flops_per_sequence(large, 128) / 1e9, 1) == 240.5
    assert round(flops_per_sequence(large, 512) / 1e9) == 1020
    L, H, V, S = 12, 768, 30522, 128
    per_token = 72 * L * H**2 + 12 * L * H * S + 0.15 * 6 * (H**2 + H * V)
    assert flops_per_sequence(base, S) == pytest.approx(per_token * S)
