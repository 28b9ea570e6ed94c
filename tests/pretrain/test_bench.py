"""The training-throughput benchmark: batches, packing correctness, the two systems, timing
helpers, the CLI end to end on a tiny model, the report.  Checks that the harness works, not
timings (those are in docs/benchmarks.md)."""
import json

import numpy as np
import pytest
import torch

from pretrain.bench import batches as B
from pretrain.bench import report, systems
from pretrain.bench.timing import find_max_batch, summarize, time_steps
from pretrain.cli import main
from pretrain.config import KernelsConfig, ModelConfig
from pretrain.model import build_model

TINY = systems.model_config("tiny")


# ---------------------------------------------------------------------------------------------
# Synthetic batches
# ---------------------------------------------------------------------------------------------
def test_padded_batches_look_like_nsp_pretraining_data():
    bs = B.make_batches(128, 64, 8192, count=2, seed=3)
    for batch, peer in zip(bs.padded, bs.peer):
        ids, mask, pos, labels = (batch[k] for k in ("input_ids", "attention_mask", "masked_lm_positions",
                                                     "masked_lm_labels"))
        assert ids.shape == (64, 128) and pos.shape == labels.shape == (64, 20)
        lengths = mask.sum(1)
        assert (lengths == 128).float().mean() > 0.6          # most rows full, some short
        assert (lengths < 128).any() and (lengths >= 5).all()
        assert (ids[:, 0] == B.CLS).all() and (ids[mask == 0] == B.PAD).all()
        real = labels != B.IGNORE_INDEX
        counts = real.sum(1)
        assert (counts == torch.clamp(torch.round(0.15 * (lengths - 3)), 1, 20)).all()
        # masked positions are content tokens inside the row, never [CLS]/[SEP]/padding
        rows = torch.arange(64)[:, None].expand_as(pos)
        assert (pos[real] >= 1).all() and (pos[real] < lengths[rows[real]] - 1).all()
        assert (labels[real] >= B.FIRST_REGULAR_ID).all()
        assert ((ids[rows[real], pos[real]] == B.MASK).float().mean() - 0.8).abs() < 0.1
        # the peer's dense labels hold exactly the same targets
        dense = peer["labels"]
        assert (dense != B.IGNORE_INDEX).sum() == real.sum()
        assert torch.equal(dense[rows[real], pos[real]], labels[real])
        assert torch.equal(peer["next_sentence_label"], batch["sentence_labels"])
    assert bs.mean_real_tokens() / (64 * 128) > 0.85


@pytest.fixture(scope="module")
def demo_shards(tmp_path_factory):
    """A real shard directory (data_prep's CLI on the bundled corpus, seq 128: short documents)."""
    from tests.pretrain.training_helpers import build_shards
    return build_shards(tmp_path_factory.mktemp("bench-lengths"), "dynamic", lines=300) / "shards"


def test_lengths_come_from_real_shards_clipped_to_seq_len(demo_shards):
    from data_prep.shards import iter_split_samples, read_manifest
    manifest = read_manifest(demo_shards)
    stored = np.array([len(s["input_ids"]) for *_, s in iter_split_samples(demo_shards, manifest, "train")])
    assert len(manifest["shards"]) > 2 and stored.max() == 128 and (stored < 64).any()
    assert B.read_shard_lengths(str(demo_shards), 128).tolist() == stored.tolist()
    lengths = B.read_shard_lengths(str(demo_shards), 64, limit=len(stored) - 7)   # the limit cuts a shard
    assert lengths.tolist() == np.minimum(stored[:len(stored) - 7], 64).tolist()
    bs = B.make_batches(64, 16, 512, count=2, lengths=lengths, packed=True)
    drawn = torch.cat([b["attention_mask"].sum(1) for b in bs.padded])
    assert set(drawn.tolist()) <= set(lengths.tolist())
    assert bs.mean_rows(packed=True) < 16                                # short ones share rows
    with pytest.raises(ValueError, match="no manifest.json"):
        B.read_shard_lengths(str(demo_shards.parent), 64)
    with pytest.raises(ValueError, match="no usable samples"):
        B.read_shard_lengths(str(demo_shards), 4)


class _Split:
    """What pretrain.data._Collate reads of a split."""

    def __init__(self, seq_len, max_predictions):
        self.info = {"special_ids": {"pad": B.PAD}, "seq_len": seq_len, "max_predictions": max_predictions}


def _examples_of(padded: dict) -> list[dict]:
    """The instances of a padded batch, as the loader's examples."""
    out = []
    for i, n in enumerate(padded["attention_mask"].sum(1).tolist()):
        keep = padded["masked_lm_labels"][i] != B.IGNORE_INDEX
        out.append({"input_ids": padded["input_ids"][i, :n].numpy(),
                    "token_type_ids": padded["token_type_ids"][i, :n].numpy(),
                    "masked_lm_positions": padded["masked_lm_positions"][i][keep].numpy(),
                    "masked_lm_labels": padded["masked_lm_labels"][i][keep].numpy(),
                    "sentence_label": int(padded["sentence_labels"][i])})
    return out


def _short_lengths(seq_len: int) -> np.ndarray:
    return np.random.default_rng(4).integers(8, seq_len + 1, size=500)


@pytest.mark.parametrize("seq_len,lengths", [(64, _short_lengths(64)),
                                             (128, np.random.default_rng(4).integers(5, 12, size=500))],
                         ids=["short-documents", "tiny-instances"])
def test_packed_batches_hold_the_padded_batches_instances_as_the_training_loader_packs_them(seq_len, lengths):
    """packed[i] is what the train loader (data.packing, default settings) makes of padded[i]'s instances."""
    from pretrain.config import DataConfig
    from pretrain.data import _Collate
    from pretrain.packing import fill

    bs = B.make_batches(seq_len, 24, 512, count=3, seed=2, packed=True, lengths=lengths)
    data = DataConfig()
    train_collate = _Collate(_Split(seq_len, bs.max_predictions), data.pad_to_multiple_of,
                             data.max_instances_per_row)
    assert len(bs.packed) == len(bs.padded) == 3
    for i, (padded, packed) in enumerate(zip(bs.padded, bs.packed)):
        expected = train_collate(_examples_of(padded))
        assert packed.keys() == expected.keys()
        for key in expected:
            assert torch.equal(packed[key], expected[key]), key
        # the same instances, in fewer rows: labels, sentence labels and real tokens unchanged
        real_labels = padded["masked_lm_labels"][padded["masked_lm_labels"] != B.IGNORE_INDEX]
        assert torch.equal(packed["masked_lm_labels"][:len(real_labels)], real_labels)
        assert (packed["masked_lm_labels"][len(real_labels):] == B.IGNORE_INDEX).all()
        assert torch.equal(packed["sentence_labels"], padded["sentence_labels"])
        assert len(packed["cls_positions"]) == 24 and packed["input_ids"].size(0) < 24
        real, slots = fill(packed)
        assert real == bs.real_tokens[i] == int(padded["attention_mask"].sum())
        assert (bs.packed_rows[i], bs.packed_slots[i]) == (packed["input_ids"].size(0), slots)
    if seq_len == 128:   # the settings bind here: the instance cap, and the width rounded up
        assert all(int(b["segment_ids"].max()) == data.max_instances_per_row for b in bs.packed)
        assert any((b["segment_ids"] > 0).sum(1).max() % data.pad_to_multiple_of for b in bs.packed)
    assert bs.mean_rows(packed=True) == np.mean(bs.packed_rows) and bs.mean_rows() == 24
    assert bs.mean_slots() == 24 * seq_len and bs.mean_slots(packed=True) < 24 * seq_len
    # the padded batches do not depend on whether packed ones are built
    plain = B.make_batches(seq_len, 24, 512, count=3, seed=2, lengths=lengths)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(plain.padded, bs.padded))
    assert plain.packed == [] and plain.packed_rows == []


def test_packed_and_padded_batches_give_the_same_logits_for_every_instance():
    """The packing variant computes the same function: per-instance MLM and sentence logits (fp32, CPU)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=64)
    model = build_model(cfg).eval()
    bs = B.make_batches(64, 16, 512, count=2, seed=1, packed=True, lengths=_short_lengths(64))
    for padded, packed in zip(bs.padded, bs.packed):
        assert packed["input_ids"].size(0) < 16 and packed["segment_ids"].max() > 1
        with torch.no_grad():
            out_packed, out_padded = model(**packed), model(**padded)
        keep = padded["masked_lm_labels"].reshape(-1) != B.IGNORE_INDEX   # packed: these, one after another
        real = out_padded.mlm_logits[keep]
        torch.testing.assert_close(out_packed.mlm_logits[:len(real)], real, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_packed.sentence_logits, out_padded.sentence_logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out_packed.loss, out_padded.loss, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Model fast path: kernels.unpad (token-wise work on real tokens only) computes the same function
# ---------------------------------------------------------------------------------------------
UNPAD_CASES = {
    "bert_post_ln": {},
    "bert_pre_ln": dict(layer_norm_position="pre"),
    "albert_factorized_shared": dict(arch="albert", embedding_size=16, share_layers=True, sentence_head="sop"),
}


def padded_and_unpadded(overrides, kernels=None):
    import copy
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=101, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=64, hidden_dropout=0.0, attention_dropout=0.0, **overrides)
    model = build_model(cfg, kernels)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))   # off the init, so mix-ups would show
    fast = copy.deepcopy(model)
    fast.unpad = True
    return model, fast


def unpad_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(5, 101, (4, 16), generator=g)
    mask = torch.ones(4, 16, dtype=torch.long)
    mask[1, 11:] = 0
    mask[2, 5:] = 0
    mask[3, 1:] = 0                     # only [CLS] left
    types = torch.zeros_like(ids)
    types[:, 6:] = 1
    pos = torch.tensor([[1, 4, 7, 14], [2, 3, 9, 0], [1, 3, 0, 0], [0, 0, 0, 0]])
    labels = torch.tensor([[11, 12, 13, 14], [15, 16, 17, -100], [18, 19, -100, -100], [-100] * 4])
    return dict(input_ids=ids, attention_mask=mask, token_type_ids=types, masked_lm_positions=pos,
                masked_lm_labels=labels, sentence_labels=torch.tensor([0, 1, 1, 0]))


@pytest.mark.parametrize("case", list(UNPAD_CASES))
def test_unpad_gives_the_padded_outputs_and_gradients(case):
    model, fast = padded_and_unpadded(UNPAD_CASES[case])
    b = unpad_batch()
    ref, out = model(**b), fast(**b)
    ref.loss.backward()
    out.loss.backward()
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mlm_logits, ref.mlm_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.sentence_logits, ref.sentence_logits, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), fast.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-6, msg=name)
    # real tokens of encode() agree too; padding comes back as zeros
    kwargs = {k: b[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    h_ref, h = model.encode(**kwargs), fast.encode(**kwargs)
    real = b["attention_mask"].bool()
    torch.testing.assert_close(h[real], h_ref[real], rtol=1e-5, atol=1e-5)
    assert (h[~real] == 0).all()


def test_unpad_with_packed_rows_and_the_ops_kernel_paths():
    from pretrain.config import KernelsConfig
    model, fast = padded_and_unpadded({}, KernelsConfig(attention="reference", layer_norm="reference"))
    b = unpad_batch()
    segments = torch.zeros(4, 16, dtype=torch.long)
    segments[0, :7], segments[0, 7:15] = 1, 2
    segments[1, :16] = 1
    segments[2, :3], segments[2, 3:9], segments[2, 9:10] = 1, 2, 3
    segments[3, :1] = 1
    packed = {k: v for k, v in b.items() if k != "attention_mask"} | {"segment_ids": segments}
    ref, out = model(**packed), fast(**packed)
    torch.testing.assert_close(out.loss, ref.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(out.mlm_logits, ref.mlm_logits, rtol=1e-5, atol=1e-5)


def test_unpad_is_off_by_default_and_does_not_change_the_default_path():
    model = build_model(ModelConfig(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4,
                                    intermediate_size=64, max_position_embeddings=64))
    assert model.unpad is False
    on = build_model(ModelConfig(vocab_size=101, hidden_size=32, num_layers=1, num_heads=4,
                                 intermediate_size=64, max_position_embeddings=64), KernelsConfig(unpad=True))
    assert on.unpad is True


# ---------------------------------------------------------------------------------------------
# The systems
# ---------------------------------------------------------------------------------------------
def test_ours_and_the_peer_compute_the_same_loss_on_the_same_batch():
    """The benchmark compares the same task: HF's dense-label loss equals our sparse-head loss."""
    from pretrain.hf import to_hf_state_dict
    torch.manual_seed(0)
    ours = systems.OursStep(TINY, systems.Variant(), "fp32", torch.device("cpu"))
    peer = systems.PeerStep(TINY, "fp32", torch.device("cpu"))
    missing, unexpected = peer.model.load_state_dict(
        to_hf_state_dict(ours.model.consolidated_state_dict(), TINY), strict=False)
    assert not unexpected and all("position_ids" in k or "token_type_ids" in k for k in missing)
    bs = B.make_batches(32, 4, TINY.vocab_size, count=1, seed=2)
    ours.model.eval()
    peer.model.eval()
    with torch.no_grad():
        ours_loss = ours.model(**bs.padded[0]).loss
        peer_loss = peer.model(**bs.peer[0]).loss
    torch.testing.assert_close(ours_loss, peer_loss, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["default", "adamw", "packing", "unpad", "dense", "ops"])
def test_every_variant_trains(name):
    variant = systems.parse_variant(name)
    torch.manual_seed(0)
    step = systems.OursStep(TINY, variant, "fp32", torch.device("cpu"))
    bs = B.make_batches(32, 4, TINY.vocab_size, count=1, seed=1, packed=variant.packing)
    batch = systems.ours_batch(bs, 0, variant)
    before = [p.detach().clone() for p in step.model.parameters()]
    step(batch)
    assert all(p.grad is None for p in step.model.parameters())           # zero_grad(set_to_none)
    changed = sum(not torch.equal(a, p) for a, p in zip(before, step.model.parameters()))
    assert changed > len(before) // 2


def test_variant_names_parse_and_round_trip():
    v = systems.parse_variant("compile+packing")
    assert v.compile and v.packing and v.name == "packing+compile"
    assert systems.parse_variant("default") == systems.Variant()
    assert systems.Variant().name == "default"
    with pytest.raises(ValueError, match="unknown variant 'fused'"):
        systems.parse_variant("fused")
    with pytest.raises(ValueError, match="packing\\+dense"):
        systems.parse_variant("packing+dense")


# ---------------------------------------------------------------------------------------------
# Timing helpers
# ---------------------------------------------------------------------------------------------
def test_time_steps_runs_warmup_then_times_each_step():
    seen = []
    times = time_steps(seen.append, torch.device("cpu"), warmup=2, steps=3)
    assert seen == [0, 1, 2, 3, 4] and len(times) == 3 and all(t >= 0 for t in times)
    s = summarize([4.0, 1.0, 3.0, 2.0, 100.0])
    assert s["median_s"] == 3.0 and s["p25_s"] == 2.0 and s["p75_s"] == 4.0 and s["steps"] == 5


@pytest.mark.parametrize("capacity", [5, 8, 13, 64, 100, 1000, 5000])
def test_largest_batch_search_finds_the_capacity(capacity):
    probes = []

    def fits(b):
        probes.append(b)
        return b <= capacity

    best = find_max_batch(fits, start=8, limit=1024)
    if capacity < 8:
        assert best is None
    else:
        expected = min(capacity, 1024)
        assert best <= expected and (best == expected or expected - best < 8)
    assert len(probes) < 20


def test_out_of_memory_is_survived_in_the_search_and_in_a_case(monkeypatch):
    """The GPU paths' OOM handling, exercised on CPU with a step that 'runs out of memory' above 24."""
    from pretrain.bench.run import Case, Runner, Spec

    real_call = systems.OursStep.__call__

    def call(self, batch):
        if batch["input_ids"].size(0) > 24:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_call(self, batch)

    monkeypatch.setattr(systems.OursStep, "__call__", call)
    runner = Runner(Spec(models=["tiny"], seq_lens=[32], variants=[systems.Variant()], device="cpu", log=False))
    case = Case("ours", "tiny", 32, 0)
    assert find_max_batch(lambda b: runner.fits(case, b), start=8, limit=64) == 24
    assert not any(key[3] == 2 for key in runner.batch_sets)       # probe batches were dropped
    record = runner.measure(Case("ours", "tiny", 32, 32), warmup=1, steps=2)
    assert record["status"] == "oom" and not runner.alive
    row = report.markdown({"meta": {"device": "x", "torch": "t", "transformers": "t", "precision": "fp32",
                                    "warmup": 1, "steps": 2, "rounds": 1, "timing": "t", "date": "d",
                                    "load_avg_start": [0, 0, 0], "command": "c"},
                           "results": [runner.finish(record, Case("ours", "tiny", 32, 32))], "ratios": []})
    assert "| tiny | 32 | ours: default | 32 | oom |" in row


# ---------------------------------------------------------------------------------------------
# CLI end to end and the report
# ---------------------------------------------------------------------------------------------
def test_cli_runs_a_tiny_benchmark_and_writes_json_markdown_png(tmp_path, capsys):
    md = tmp_path / "benchmarks.md"
    md.write_text("# Benchmarks\n\n## Data prep\n\nkeep me\n\n## Kernels\n\nkeep me too\n")
    args = ["bench", "--models", "tiny", "--seq-lens", "32", "--micro-batch", "4", "--variants",
            "default,packing", "--warmup", "1", "--steps", "2", "--rounds", "2", "--sweep", "2", "--device", "cpu",
            "--json", str(tmp_path / "b.json"), "--markdown", str(md), "--png", str(tmp_path / "b.png"), "--quiet"]
    assert main(args) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert [(r["system"], r["variant"]) for r in data["results"]] == [("ours", "default"), ("ours", "packing"),
                                                                    ("peer", "hf-peer")]
    for r in data["results"]:
        assert r["status"] == "ok" and r["steps"] == 4 and len(r["load_avg_1m"]) == 2
        assert r["seq_per_s"] > 0 and r["tflops"] > 0 and r["mfu"] is None
        assert len(r["cpu_times_s"]) == 4 and "host_syncs_per_step" not in r
    # packed: the same instances (and real tokens) a step in at most as many rows, each at most seq_len slots
    default, packing = data["results"][:2]
    assert default["sequences_per_step"] == packing["sequences_per_step"] == 4 == default["rows_per_step"]
    assert 1 <= packing["rows_per_step"] <= 4 and packing["slots_per_step"] <= 32 * packing["rows_per_step"]
    assert packing["real_tokens_per_s"] / packing["seq_per_s"] == pytest.approx(
        default["real_tokens_per_s"] / default["seq_per_s"])
    assert packing["real_token_fraction"] >= default["real_token_fraction"]
    assert {r["variant"] for r in data["ratios"]} == {"default", "packing"}
    assert all(r["paired_seq_per_s_ratio"] > 0 for r in data["ratios"])
    assert [r["micro_batch"] for r in data["sweep"]] == [2, 2]
    assert data["meta"]["device_type"] == "cpu" and data["meta"]["command"].startswith("python -m pretrain bench")
    text = md.read_text()
    assert "keep me\n" in text and "keep me too" in text and "## Training throughput" in text
    assert text.count("<!-- bench:train:cpu:begin -->") == 1 and "| tiny | 32 | HF peer | 4 |" in text
    assert "| CPU s/step |" in text and "host syncs/step" not in text and "ours/peer paired" in text
    assert (tmp_path / "b.png").stat().st_size > 1000
    assert "ours[default] / HF peer" in capsys.readouterr().out
    # a rerun replaces its own block and nothing else
    report.update_markdown(str(md), "NEW TABLE\n", "cpu")
    report.update_markdown(str(md), "GPU TABLE\n", "cuda")
    text = md.read_text()
    assert "NEW TABLE" in text and "| tiny | 32 |" not in text and "GPU TABLE" in text
    assert text.index("## Training throughput") < text.index("NEW TABLE") < text.index("## Kernels") \
        or text.index("## Kernels") < text.index("## Training throughput")
    assert "keep me too" in text
    # runs split over several commands (a GPU lease) merge into one table
    assert main(["bench", "--from-json", str(tmp_path / "b.json"), str(tmp_path / "b.json"),
                 "--markdown", str(tmp_path / "merged.md")]) == 0
    assert (tmp_path / "merged.md").read_text().count("| tiny | 32 | HF peer | 4 |") == 2


def test_cli_rejects_bad_options(capsys):
    assert main(["bench", "--models", "huge", "--device", "cpu"]) == 2
    assert "unknown huge" in capsys.readouterr().err
    assert main(["bench", "--variants", "default,turbo", "--device", "cpu"]) == 2
    assert "unknown variant 'turbo'" in capsys.readouterr().err
    assert main(["bench", "--from-json", "/nonexistent.json"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_benchmark_searches_the_batch_and_reports_mfu_and_memory(tmp_path):
    args = ["bench", "--models", "tiny", "--seq-lens", "128", "--variants", "default,ops,packing", "--warmup", "2",
            "--steps", "5", "--batch-limit", "64", "--sweep", "none", "--json", str(tmp_path / "b.json"), "--quiet"]
    assert main(args) == 0
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["precision"] == "bf16" and data["meta"]["timing"].startswith("cuda events")
    for r in data["results"]:
        assert r["status"] == "ok" and r["micro_batch"] == 64 and r["peak_memory_gb"] > 0
        assert isinstance(r["host_syncs_per_step"], int)
        if data["meta"]["peak_tflops"]:
            assert 0 < r["mfu"] < 1
