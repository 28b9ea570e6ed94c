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


def test_lengths_can_come_from_real_shards(tmp_path):
    import io
    import tarfile
    with tarfile.open(tmp_path / "train-000000.tar", "w") as tar:
        for i, n in enumerate([40, 64, 64, 20, 200]):
            buf = io.BytesIO()
            np.save(buf, np.arange(n, dtype=np.uint16))
            info = tarfile.TarInfo(f"train-000000-{i:06d}.input_ids.npy")
            info.size = buf.tell()
            buf.seek(0)
            tar.addfile(info, buf)
    lengths = B.read_shard_lengths(str(tmp_path), 64)
    assert sorted(lengths.tolist()) == [20, 40, 64, 64, 64]            # clipped to seq_len
    bs = B.make_batches(64, 16, 512, count=2, lengths=lengths, packed=True)
    drawn = torch.cat([b["attention_mask"].sum(1) for b in bs.padded])
    assert set(drawn.tolist()) <= {20, 40, 64}
    assert bs.mean_sequences(packed=True) > 16                           # short ones share rows
    with pytest.raises(ValueError, match="no train"):
        B.read_shard_lengths(str(tmp_path / "missing"), 64)


def test_packer_fills_rows_and_keeps_every_instance_intact():
    drawn = []

    def draw(state=np.random.default_rng(5)):
        drawn.append(B.draw_instance(state, 64, 512, 10))
        return drawn[-1]

    packer = B.Packer(draw, rows=6, seq_len=64)
    rows = packer.next_rows()
    placed = [inst for row in rows for inst in row]
    assert all(sum(len(i) for i in row) <= 64 for row in rows)
    assert len(placed) >= 6 and len(placed) + len(packer.pending) == len(drawn)
    batch = B.render_packed(rows, 64, 40)
    for r, row in enumerate(rows):
        start = 0
        for j, inst in enumerate(row):
            span = slice(start, start + len(inst))
            assert (batch["segment_ids"][r, span] == j + 1).all()
            assert torch.equal(batch["input_ids"][r, span], torch.from_numpy(inst.input_ids))
            start += len(inst)
        assert (batch["segment_ids"][r, start:] == 0).all()
        real = batch["masked_lm_labels"][r] != B.IGNORE_INDEX
        expected = torch.cat([torch.from_numpy(i.masked_labels) for i in row])
        assert torch.equal(batch["masked_lm_labels"][r][real], expected)
    # the next batch starts with the instances that did not fit
    waiting = list(packer.pending)
    assert packer.next_rows()[0][0] is waiting[0]


def test_packed_and_unpacked_logits_are_equal_for_the_same_instances():
    """The packing variant computes the same function: per-instance MLM logits (fp32, CPU)."""
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=512, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                      max_position_embeddings=64)
    model = build_model(cfg).eval()
    rng = np.random.default_rng(1)
    instances = [B.draw_instance(rng, 64, 512, 10, short_seq_prob=1.0) for _ in range(8)]
    packer = B.Packer(iter(instances).__next__, rows=3, seq_len=64, lookahead=1)
    try:
        rows = packer.next_rows()
    except StopIteration:
        pytest.fail("the packer drew more than the instances given")
    rows = [row for row in rows if row]
    used = [inst for row in rows for inst in row]
    assert any(len(row) > 1 for row in rows)
    packed = B.render_packed(rows, 64, 40)
    padded = B.render_padded(used, 64, 10)
    with torch.no_grad():
        out_packed = model(**packed)
        out_padded = model(**padded)
    keep_packed = packed["masked_lm_labels"].reshape(-1) != B.IGNORE_INDEX
    keep_padded = padded["masked_lm_labels"].reshape(-1) != B.IGNORE_INDEX
    a, b = out_packed.mlm_logits[keep_packed], out_padded.mlm_logits[keep_padded]
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # the same masked-token loss over the same targets
    torch.testing.assert_close(out_packed.mlm_correct, out_padded.mlm_correct)


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
