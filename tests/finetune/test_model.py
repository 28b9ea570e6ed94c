"""Fine-tuning task models: HF export parity (logits and losses), pipelines on the export, loading
from our checkpoints and from HF directories, round trips, head settings, refused files.

Tiny CPU fp32 models; transformers never touches the network (tests.pretrain.test_hf sets it offline).
"""
import dataclasses
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

from tests.pretrain.test_hf import (VOCAB, _Payload, assert_rel_close, hf_common, padded_inputs, perturb, save_ours,
                                    tiny, transformers, write_tokenizer)
from pretrain.config import KernelsConfig
from pretrain.finetune.model import (FinetuneModel, HeadConfig, from_pretrained, resolve_head, save_finetuned)
from pretrain.hf import export_finetuned
from pretrain.weights import UnreadableFileError

ARCHS = {
    "bert": (tiny(), "Bert"),
    "bert_pre_ln": (tiny(layer_norm_position="pre"), "MegatronBert"),
    "albert_factorized_shared": (tiny(arch="albert", embedding_size=16, share_layers=True, num_layers=3,
                                      sentence_head="sop", hidden_act="gelu_tanh"), "Albert"),
}
NLI = ["contradiction", "entailment", "neutral"]
TAGS = ["O", "B-X", "I-X", "B-Y", "I-Y"]
HEADS = {
    "classification": (HeadConfig("sequence", labels=NLI), "ForSequenceClassification"),
    "regression": (HeadConfig("sequence", 1), "ForSequenceClassification"),
    "token": (HeadConfig("token", labels=TAGS), "ForTokenClassification"),
    "qa": (HeadConfig("qa"), "ForQuestionAnswering"),
}
AUTO = {"sequence": "AutoModelForSequenceClassification", "token": "AutoModelForTokenClassification",
        "qa": "AutoModelForQuestionAnswering"}
CASES = [(a, h) for a in ARCHS for h in HEADS]


batch = padded_inputs


def targets(head: HeadConfig, inputs, seed=1):
    """Labels of the head's kind: class ids, floats, per-token tags (IGNORE_INDEX at padding and at some
    real tokens) or start/end positions (one beyond the sequence, ignored; one negative, clamped to 0)."""
    g = torch.Generator().manual_seed(seed)
    if head.task == "qa":
        return {"start_positions": torch.tensor([3, 20, -1]), "end_positions": torch.tensor([5, 7, 2])}
    if head.task == "token":
        labels = torch.randint(0, head.num_labels, (3, 12), generator=g)
        labels[inputs["attention_mask"] == 0] = -100
        labels[0, 0] = labels[1, 3] = -100
        return {"labels": labels}
    if head.problem_type == "regression":
        return {"labels": torch.rand(3, generator=g) * 5}
    return {"labels": torch.randint(0, head.num_labels, (3,), generator=g)}


def finetune_model(arch, head_case, **head_overrides):
    model_cfg, _ = ARCHS[arch]
    head = dataclasses.replace(HEADS[head_case][0], **head_overrides)
    torch.manual_seed(0)
    return perturb(FinetuneModel(model_cfg, head))


def export(model, out_dir, tokenizer_dir=None):
    if tokenizer_dir:
        return export_finetuned(model, str(out_dir), tokenizer_dir)
    with pytest.warns(UserWarning, match="no tokenizer known"):
        return export_finetuned(model, str(out_dir))


def load_hf(hf_dir, architecture):
    model, info = getattr(transformers, architecture).from_pretrained(
        str(hf_dir), output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def outputs(out):
    """The logits of an output (ours or HF's) as one tensor: logits, or start and end stacked."""
    if getattr(out, "start_logits", None) is not None:
        return torch.stack([out.start_logits, out.end_logits], dim=-1)
    return out.logits


# ---------------------------------------------------------------------------------------------
# Export parity: our logits and losses == those of the exported HF model
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch,head_case", CASES, ids=[f"{a}-{h}" for a, h in CASES])
def test_export_matches_transformers(tmp_path, arch, head_case):
    model = finetune_model(arch, head_case)
    architecture = ARCHS[arch][1] + HEADS[head_case][1]
    assert export(model, tmp_path / "hf")["architecture"] == architecture
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["architectures"] == [architecture]
    saved = transformers.AutoConfig.from_pretrained(str(tmp_path / "hf"))   # defaults are left out of the file
    assert saved.num_labels == model.head.num_labels and saved.id2label == dict(enumerate(model.head.labels))
    assert saved.label2id == {name: i for i, name in enumerate(model.head.labels)}
    assert saved.problem_type == model.head.problem_type
    assert (tmp_path / "hf" / "model.safetensors").is_file()
    inputs = batch()
    labels = targets(model.head, inputs)
    with torch.no_grad():
        ours = model(**inputs, **labels)
    for hf_model in (load_hf(tmp_path / "hf", architecture),
                     getattr(transformers, AUTO[model.head.task]).from_pretrained(str(tmp_path / "hf")).eval()):
        assert type(hf_model).__name__ == architecture
        assert hf_model.config.vocab_size == VOCAB
        with torch.no_grad():
            theirs = hf_model(**inputs, **labels)
        assert_rel_close(outputs(ours), outputs(theirs))   # every position, the padding's included
        torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)


def test_losses_match_a_direct_computation():
    """Each loss by hand: log-softmax picked at the label, squared error, the two span terms."""
    inputs = batch()
    for head_case in HEADS:
        model = finetune_model("bert", head_case)
        labels = targets(model.head, inputs)
        with torch.no_grad():
            out = model(**inputs, **labels)
        if head_case == "qa":
            terms = []
            for logits, positions in ((out.start_logits, labels["start_positions"]),
                                      (out.end_logits, labels["end_positions"])):
                positions = positions.clamp(min=0)
                kept = positions < logits.size(1)             # position 20 is beyond S = 12: ignored
                log_p = logits[kept].log_softmax(-1)
                terms.append(-log_p[torch.arange(int(kept.sum())), positions[kept]].mean())
            expected = (terms[0] + terms[1]) / 2
        elif head_case == "regression":
            expected = ((out.logits[:, 0] - labels["labels"]) ** 2).mean()
        else:
            logits, y = out.logits.reshape(-1, model.head.num_labels), labels["labels"].reshape(-1)
            kept = y != -100
            expected = -logits[kept].log_softmax(-1)[torch.arange(int(kept.sum())), y[kept]].mean()
        torch.testing.assert_close(out.loss, expected, rtol=1e-6, atol=1e-6)
    model = finetune_model("bert", "token")
    all_ignored = torch.full((3, 12), -100)
    assert model(**inputs, labels=all_ignored).loss.item() == 0.0    # torch's mean would be NaN
    reference = F.cross_entropy(model(**inputs).logits.reshape(-1, 5), targets(model.head, inputs)["labels"].reshape(-1))
    torch.testing.assert_close(model(**inputs, **targets(model.head, inputs)).loss, reference)


@pytest.mark.parametrize("head_case", list(HEADS))
def test_backward_reaches_the_encoder_and_the_head(head_case):
    model = finetune_model("albert_factorized_shared", head_case).train()
    inputs = batch()
    model(**inputs, **targets(model.head, inputs)).loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert not any(n.startswith(("mlm_head", "sentence_head")) for n, _ in model.named_parameters())


# ---------------------------------------------------------------------------------------------
# transformers.pipeline on the export
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS))
def test_pipelines_load_the_export_with_its_tokenizer(tmp_path, arch):
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    text = "the quick brown fox jumped over the lazy dogs"
    for head_case in HEADS:
        model = finetune_model(arch, head_case)
        out_dir = tmp_path / head_case
        assert export(model, out_dir, tokenizer_dir)["tokenizer"] == tokenizer_dir
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(out_dir))
        encoded = tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            ours = model(**encoded)
        if head_case in ("classification", "regression"):
            [result] = transformers.pipeline("text-classification", model=str(out_dir))(text)
            logits = ours.logits[0]
            if head_case == "regression":   # problem_type regression: the raw output, no sigmoid
                assert result["label"] == "LABEL_0"
                assert result["score"] == pytest.approx(logits.item(), rel=1e-5)
            else:
                assert result["label"] == NLI[int(logits.argmax())]
                assert result["score"] == pytest.approx(logits.softmax(-1).max().item(), rel=1e-5)
        elif head_case == "token":
            entities = transformers.pipeline("token-classification", model=str(out_dir))(text)
            predicted = [TAGS[i] for i in ours.logits[0].argmax(-1).tolist()]
            expected = {i: tag for i, tag in enumerate(predicted) if tag != "O" and 0 < i < len(predicted) - 1}
            assert {e["index"]: e["entity"] for e in entities} == expected
        elif "question-answering" in transformers.pipelines.get_supported_tasks():
            context = "the lazy dog jumped over the brown fox"
            result = transformers.pipeline("question-answering", model=str(out_dir))(
                question="who jumped", context=context)
            assert result["answer"] == context[result["start"]:result["end"]] and result["answer"]
        else:   # transformers 5 removed the QA pipeline: what it loaded, the Auto classes on the directory
            pair = tokenizer("who jumped", "the lazy dog jumped over the brown fox", return_tensors="pt")
            hf_model = transformers.AutoModelForQuestionAnswering.from_pretrained(str(out_dir)).eval()
            with torch.no_grad():
                assert_rel_close(outputs(model(**pair)), outputs(hf_model(**pair)))


# ---------------------------------------------------------------------------------------------
# Loading: our pretraining checkpoint, HF directories, fine-tuned models back
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", list(ARCHS) + ["bert_no_sentence_head"])
def test_encoder_from_our_checkpoint_is_the_pretraining_models(tmp_path, arch):
    model_cfg = tiny(sentence_head="none") if arch == "bert_no_sentence_head" else ARCHS[arch][0]
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    pretrained, ckpt = save_ours(tmp_path, model_cfg, extra={"tokenizer_dir": tokenizer_dir})
    inputs = batch()
    with torch.no_grad():
        hidden = pretrained.encode(**inputs)
    for task, num_labels in (("sequence", 3), ("token", 4), ("qa", None)):
        model, report = from_pretrained(ckpt, task, num_labels)
        assert report.source == "checkpoint" and report.tokenizer_dir == tokenizer_dir
        assert not model.training
        with torch.no_grad():
            assert torch.equal(model.encode(**inputs), hidden)
        layer = "qa_outputs" if task == "qa" else "classifier"
        has_pooler = task == "sequence" and model_cfg.sentence_head != "none"
        new = [f"{layer}.weight", f"{layer}.bias"] + (["pooler.weight", "pooler.bias"]
                                                      if task == "sequence" and not has_pooler else [])
        assert sorted(report.new) == sorted(new)
        assert any(k.startswith("mlm_head.") for k in report.unused)
        if has_pooler:
            with torch.no_grad():
                pooled = torch.tanh(pretrained.pooler(hidden[:, 0]))
                assert torch.equal(torch.tanh(model.pooler(model.encode(**inputs)[:, 0])), pooled)
        std = model_cfg.initializer_range   # the new layer as HF initializes it: N(0, initializer_range), bias 0
        weight = getattr(model, layer).weight
        assert getattr(model, layer).bias.abs().max() == 0 and 0.5 * std < weight.std() < 1.5 * std


def test_random_init_keeps_the_architecture_and_tokenizer_but_no_weight(tmp_path):
    """model.init: random, the baseline of the benefit figure: the checkpoint's shape, BERT's fresh init."""
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    pretrained, ckpt = save_ours(tmp_path, ARCHS["bert"][0], extra={"tokenizer_dir": tokenizer_dir})
    torch.manual_seed(3)
    model, report = from_pretrained(ckpt, "sequence", 3, random_init=True)
    torch.manual_seed(3)
    again, _ = from_pretrained(ckpt, "sequence", 3, random_init=True)
    assert model.config == pretrained.config and report.tokenizer_dir == tokenizer_dir
    own, source = model.state_dict(), pretrained.state_dict()
    assert sorted(report.new) == sorted(own)
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in own.items())      # from the seed
    shared = [k for k in own if k in source and own[k].shape == source[k].shape and own[k].dim() == 2]
    assert shared and not any(torch.equal(own[k], source[k]) for k in shared)
    std = pretrained.config.initializer_range
    word = own["embeddings.word.weight"]
    assert 0.9 * std < word.std() < 1.1 * std
    assert "embeddings.word.weight" in report.unused and any(k.startswith("mlm_head.") for k in report.unused)


HF_SOURCES = {
    "BertForPreTraining": lambda: transformers.BertConfig(**hf_common()),
    "MegatronBertForPreTraining": lambda: transformers.MegatronBertConfig(**hf_common()),
    "AlbertForPreTraining": lambda: transformers.AlbertConfig(**hf_common(embedding_size=16, num_hidden_layers=3)),
    "BertForMaskedLM": lambda: transformers.BertConfig(**hf_common()),
    "BertModel": lambda: transformers.BertConfig(**hf_common()),
    "AlbertModel": lambda: transformers.AlbertConfig(**hf_common(embedding_size=16)),
}


@pytest.mark.parametrize("architecture", list(HF_SOURCES))
def test_encoder_from_an_hf_directory_matches_transformers(tmp_path, architecture):
    torch.manual_seed(0)
    hf_model = perturb(getattr(transformers, architecture)(HF_SOURCES[architecture]()))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    write_tokenizer(tmp_path / "hf")
    inputs = batch()
    with torch.no_grad():
        theirs = hf_model.base_model(**inputs)
    model, report = from_pretrained(str(tmp_path / "hf"), "sequence", 2)
    assert report.source == "huggingface" and report.tokenizer_dir == str(tmp_path / "hf")
    with torch.no_grad():
        hidden = model.encode(**inputs)
        assert_rel_close(hidden, theirs.last_hidden_state)
    if theirs.pooler_output is not None:    # the pretrained pooler, loaded
        assert sorted(report.new) == ["classifier.bias", "classifier.weight"]
        with torch.no_grad():
            assert_rel_close(torch.tanh(model.pooler(hidden[:, 0])), theirs.pooler_output)
    else:                                   # a masked-LM model has none: a fresh one
        assert sorted(report.new) == ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]
    if "ForPreTraining" in architecture or "ForMaskedLM" in architecture:
        assert report.unused and all(not k.startswith(("bert.encoder", "albert.encoder")) for k in report.unused)


def test_hf_directory_without_a_pooler_gets_a_fresh_one(tmp_path):
    """A BertForPreTraining file lacking the pooler: transformers would initialize it at random and
    call it loaded; we report it new and initialize it ourselves."""
    from safetensors.torch import load_file, save_file
    transformers.BertForPreTraining(transformers.BertConfig(**hf_common())).save_pretrained(str(tmp_path / "hf"))
    path = tmp_path / "hf" / "model.safetensors"
    save_file({k: v for k, v in load_file(str(path)).items() if "pooler" not in k}, str(path), {"format": "pt"})
    _, report = from_pretrained(str(tmp_path / "hf"), "sequence", 2)
    assert sorted(report.new) == ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]


@pytest.mark.parametrize("arch,head_case", [("bert", "classification"), ("bert_pre_ln", "token"),
                                            ("albert_factorized_shared", "regression"),
                                            ("albert_factorized_shared", "qa")])
def test_fine_tuned_models_load_back_exactly(tmp_path, arch, head_case):
    """Our checkpoint (save_finetuned) and the HF export both restore the head and its weights."""
    dropout = {"qa": 0.0, "token": 0.1}.get(head_case, 0.25)   # MegatronBert's token head: its hidden dropout
    model = finetune_model(arch, head_case, dropout=dropout)
    tokenizer_dir = write_tokenizer(tmp_path / "tok")
    save_finetuned(model, str(tmp_path / "ours"), extra={"tokenizer_dir": tokenizer_dir})
    export(model, tmp_path / "hf", tokenizer_dir)
    inputs = batch()
    with torch.no_grad():
        expected = outputs(model(**inputs))
    for source, path in (("checkpoint", tmp_path / "ours"), ("huggingface", tmp_path / "hf")):
        loaded, report = from_pretrained(str(path))      # the task comes from the source
        assert report.source == source and report.new == [] and report.unused == []
        assert loaded.head == model.head and loaded.config.hidden_dropout == model.config.hidden_dropout
        with torch.no_grad():
            assert torch.equal(outputs(loaded(**inputs)), expected), source
    assert from_pretrained(str(tmp_path / "ours"))[1].tokenizer_dir == tokenizer_dir


def test_a_fine_tuned_source_for_another_head(tmp_path):
    model = finetune_model("bert", "classification")
    save_finetuned(model, str(tmp_path / "ours"))
    export(model, tmp_path / "hf")
    for path in (str(tmp_path / "ours"), str(tmp_path / "hf")):
        other, report = from_pretrained(path, "token", 5)      # another task: its output layer is new
        assert sorted(report.new) == ["classifier.bias", "classifier.weight"]
        assert {"classifier.weight", "classifier.bias", "pooler.weight", "pooler.bias"} <= set(report.unused)
        with pytest.raises(ValueError, match="num_labels=3, not 2 .new_head=True for a fresh head"):
            from_pretrained(path, num_labels=2)
        fresh, report = from_pretrained(path, new_head=True, labels=["no", "yes"])   # the source's task
        assert sorted(report.new) == ["classifier.bias", "classifier.weight"]   # the pooler is kept
        assert torch.equal(fresh.pooler.weight, model.pooler.weight) and fresh.head.labels == ["no", "yes"]


def test_head_dropout_is_configurable_and_exported(tmp_path):
    for arch in ARCHS:
        model_cfg = dataclasses.replace(ARCHS[arch][0], hidden_dropout=0.0, attention_dropout=0.0)
        inputs = batch()
        for head_case in ("classification", "token"):
            head = HEADS[head_case][0]
            assert FinetuneModel(model_cfg, head).head.dropout == 0.0       # default: the hidden dropout
            model = FinetuneModel(model_cfg, dataclasses.replace(head, dropout=0.5))
            with torch.no_grad():
                assert not torch.equal(model.train()(**inputs).logits, model.eval()(**inputs).logits)
            if arch == "bert_pre_ln":   # MegatronBert's classes drop out by hidden_dropout_prob
                with pytest.warns(UserWarning) as caught:
                    export_finetuned(model, str(tmp_path / arch / head_case))
                assert any("drops out by hidden_dropout_prob=0.0, not by the head" in str(w.message) for w in caught)
            else:
                export(model, tmp_path / arch / head_case)
                hf_model = load_hf(tmp_path / arch / head_case, ARCHS[arch][1] + HEADS[head_case][1])
                assert hf_model.dropout.p == 0.5
            assert from_pretrained(str(tmp_path / arch / head_case))[0].head.dropout == 0.5


def test_unpad_gives_the_same_outputs():
    inputs = batch()
    real = inputs["attention_mask"].bool()
    for head_case in ("classification", "token"):
        model = finetune_model("bert", head_case)
        unpadded = FinetuneModel(model.config, model.head, KernelsConfig(unpad=True)).eval()
        unpadded.load_state_dict(model.state_dict())
        assert unpadded.unpad
        with torch.no_grad():
            ours, theirs = model(**inputs).logits, unpadded(**inputs).logits
        if head_case == "token":
            ours, theirs = ours[real], theirs[real]
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


def test_head_settings_are_checked_together():
    m = tiny()
    with pytest.raises(ValueError) as err:
        resolve_head(HeadConfig("sequence", 3, labels=["a", "a"], problem_type="regression"), m)
    message = str(err.value)
    assert "regression has exactly one output" in message and "names must be distinct" in message
    with pytest.raises(ValueError, match="a qa head has 2 outputs.*a qa head has no dropout"):
        resolve_head(HeadConfig("qa", 3, dropout=0.1), m)
    with pytest.raises(ValueError, match="num_labels: required for task token"):
        resolve_head(HeadConfig("token"), m)
    with pytest.raises(ValueError, match="task: got 'ner'"):
        resolve_head(HeadConfig("ner", 2), m)
    assert resolve_head(HeadConfig("sequence", 1), m).problem_type == "regression"
    assert resolve_head(HeadConfig("sequence", labels=["x", "y"]), m) == HeadConfig(
        "sequence", 2, ["x", "y"], "single_label_classification", 0.1)


def test_task_is_required_for_a_pretrained_source(tmp_path):
    _, ckpt = save_ours(tmp_path, tiny())
    with pytest.raises(ValueError, match="not a fine-tuned model, so the task must be given"):
        from_pretrained(ckpt)


def test_pre_ln_albert_cannot_be_exported(tmp_path):
    model = FinetuneModel(tiny(arch="albert", layer_norm_position="pre"), HeadConfig("sequence", 2))
    with pytest.raises(ValueError, match="layer_norm_position=pre with model.arch=albert has no HuggingFace"):
        export_finetuned(model, str(tmp_path / "hf"))


def test_an_hf_directory_whose_weights_are_a_pickle_payload_is_refused(tmp_path):
    marker = tmp_path / "marker"
    export(finetune_model("bert", "classification"), tmp_path / "hf")
    hf_model = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "hf"))
    (tmp_path / "hf" / "model.safetensors").unlink()
    torch.save(dict(hf_model.state_dict(), payload=_Payload(marker)), tmp_path / "hf" / "pytorch_model.bin")
    with warnings.catch_warnings(), pytest.raises(UnreadableFileError, match="refused: it would unpickle exec"):
        from_pretrained(str(tmp_path / "hf"))
    assert not marker.exists()


def test_training_follows_transformers_step_by_step(tmp_path):
    """Fine-tuning our model and the transformers model of its export the same way (AdamW, decay off
    biases and LayerNorm, clipping at 1.0, dropout on, the same seed before each step) gives the same
    losses step by step: the model and its dropout draws are transformers', so a difference of dev scores
    beside transformers' Trainer is of data order and head initialisation (docs/benchmarks.md)."""
    model = finetune_model("bert", "classification").train()
    architecture = ARCHS["bert"][1] + HEADS["classification"][1]
    export(model, tmp_path / "hf")
    hf_model = load_hf(tmp_path / "hf", architecture).train()
    inputs = batch()
    labels = targets(model.head, inputs)

    def adamw(named):
        named = list(named)
        decay = [p for n, p in named if not (n.endswith("bias") or "norm" in n.lower())]
        rest = [p for n, p in named if n.endswith("bias") or "norm" in n.lower()]
        assert decay and rest
        return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}],
                                 lr=1e-3, eps=1e-8)
    runs = [eight_steps(m, {**inputs, **labels}, adamw(m.named_parameters())) for m in (model, hf_model)]
    assert runs[0][-1] < runs[0][0]                        # it trains
    assert runs[0] == pytest.approx(runs[1], rel=1e-5, abs=1e-6)


def eight_steps(model, batch: dict, opt) -> list[float]:
    """The losses of eight ``opt`` steps on ``batch`` with clipping at 1.0, the global seed set before each."""
    losses = []
    for step in range(8):
        torch.manual_seed(100 + step)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


# ---------------------------------------------------------------------------------------------
# RoBERTa: its position ids and its sequence head (RobertaClassificationHead)
# ---------------------------------------------------------------------------------------------
ROBERTA = tiny(arch="roberta", sentence_head="none")


def roberta_batch():
    from tests.pretrain.test_hf import roberta_inputs
    return roberta_inputs(batch())


@pytest.mark.parametrize("head_case", list(HEADS))
def test_roberta_export_matches_transformers_in_eval_and_train_mode(tmp_path, head_case):
    """Eval mode: every position's logits.  Train mode with dropout on: the same losses from the same seed,
    so RoBERTa's extra dropout before the sequence head's dense is where transformers has it."""
    torch.manual_seed(0)
    model = perturb(FinetuneModel(ROBERTA, HEADS[head_case][0]))
    architecture = "Roberta" + HEADS[head_case][1]
    assert export(model, tmp_path / "hf")["architecture"] == architecture
    hf_model = load_hf(tmp_path / "hf", architecture)
    inputs = roberta_batch()
    same_outputs_and_losses(model, hf_model, inputs, inputs)


def same_outputs_and_losses(model, hf_model, inputs: dict, hf_inputs: dict) -> torch.Tensor:
    """Ours on ``inputs`` and transformers' on ``hf_inputs`` (the same batch as each model takes it): the
    same outputs and loss in eval mode (1e-5), the same loss in train mode from one seed (dropout drawn
    alike); returns our train-mode loss."""
    labels = targets(model.head, inputs)
    with torch.no_grad():
        ours, theirs = model(**inputs, **labels), hf_model(**hf_inputs, **labels)
    assert_rel_close(outputs(ours), outputs(theirs))
    torch.testing.assert_close(ours.loss, theirs.loss, rtol=1e-5, atol=1e-6)
    model.train(), hf_model.train()
    torch.manual_seed(5)
    ours = model(**inputs, **labels).loss
    torch.manual_seed(5)
    theirs = hf_model(**hf_inputs, **labels).loss
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    return ours
    torch.manual_seed(6)
    assert model(**inputs, **labels).loss != ours          # dropout was on


@pytest.mark.parametrize("architecture", ["RobertaModel", "RobertaForMaskedLM", "RobertaForSequenceClassification"])
def test_roberta_directories_load_as_transformers_reads_them(tmp_path, architecture):
    config = transformers.RobertaConfig(**hf_common(pad_token_id=1, type_vocab_size=1, num_labels=3))
    torch.manual_seed(0)
    hf_model = perturb(getattr(transformers, architecture)(config))
    hf_model.save_pretrained(str(tmp_path / "hf"))
    inputs = roberta_batch()
    model, report = from_pretrained(str(tmp_path / "hf"), "sequence", 3)
    assert model.config.arch == "roberta"
    with torch.no_grad():
        assert_rel_close(model.encode(**inputs), hf_model.base_model(**inputs).last_hidden_state)
    if architecture == "RobertaForSequenceClassification":     # its head comes along
        assert report.new == []
        with torch.no_grad():
            assert_rel_close(model(**inputs).logits, hf_model(**inputs).logits)
    else:   # the head's dense (our pooler) starts fresh, as in transformers: a RobertaModel's pooler goes unused
        assert sorted(report.new) == ["classifier.bias", "classifier.weight", "pooler.bias", "pooler.weight"]
        assert any(k.startswith("roberta.pooler.") for k in report.unused) == (architecture == "RobertaModel")


def test_roberta_export_refuses_a_tokenizer_without_its_padding_id(tmp_path):
    """transformers' RoBERTa counts positions from the padding id 1: a WordPiece vocabulary ([PAD] at 0,
    [UNK] at 1) would give it wrong positions, silently."""
    torch.manual_seed(0)
    model = perturb(FinetuneModel(ROBERTA, HEADS["classification"][0]))
    with pytest.raises(ValueError, match=r"model.arch=roberta needs RoBERTa's vocabulary, '<pad>' at id 1 .*no <pad>"):
        export_finetuned(model, str(tmp_path / "hf"), write_tokenizer(tmp_path / "tok"))
    assert not (tmp_path / "hf").exists()
