"""The command line: vocab, shards, run --config, verify, stats, inspect, merge, config errors."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from data_prep.cli import main
from data_prep.config import PrepConfig, load_config
from data_prep.errors import PrepError
from tests.data_prep.conftest import REPO, english_docs, write_lines


@pytest.fixture(scope="module")
def built(tmp_path_factory, tokenizer_dir):
    """A small static NSP shard directory made through the CLI."""
    root = tmp_path_factory.mktemp("cli")
    corpus = write_lines(root / "en.txt", english_docs(80_000))
    out = root / "shards"
    code = main(["shards", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(out),
                 "--seq-len", "64", "--objective", "nsp", "--masking", "static", "--max-predictions", "10",
                 "--text-per-shard-mb", "0.03", "--val-fraction", "0.1", "--no-progress"])
    assert code == 0
    return out


def test_vocab_command_trains_skips_and_imports(tmp_path, capsys):
    corpus = write_lines(tmp_path / "en.txt", english_docs(60_000))
    out = tmp_path / "vocab"
    assert main(["vocab", "--input", str(corpus), "--vocab-size", "600", "--out", str(out), "--cased"]) == 0
    info = json.loads((out / "vocab_info.json").read_text())
    assert info["vocab_size"] == 600 and info["lowercase"] is False
    assert main(["vocab", "--input", str(corpus), "--vocab-size", "600", "--out", str(out), "--cased"]) == 0
    assert "skipped" in capsys.readouterr().err
    imported = tmp_path / "imported"
    assert main(["vocab", "--from", str(out / "vocab.txt"), "--cased", "--out", str(imported)]) == 0
    assert json.loads((imported / "vocab_info.json").read_text())["sha256"] == info["sha256"]
    assert main(["vocab", "--out", str(tmp_path / "x")]) == 1
    assert "give --input" in capsys.readouterr().err


def test_shards_command_reports_a_missing_tokenizer(tmp_path, capsys):
    corpus = write_lines(tmp_path / "en.txt", ["some text that is long enough"])
    assert main(["shards", "--input", str(corpus), "--tokenizer", str(tmp_path / "nope"),
                 "--out", str(tmp_path / "o")]) == 1
    assert "error: tokenizer not found" in capsys.readouterr().err


def test_verify_passes_then_catches_damage(built, tmp_path, capsys):
    assert main(["verify", str(built)]) == 0
    assert "0 problem(s)" in capsys.readouterr().out
    damaged = tmp_path / "damaged"
    import shutil

    shutil.copytree(built, damaged)
    shard = sorted(damaged.glob("train-*.tar"))[0]
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF
    shard.write_bytes(bytes(data))
    (damaged / ".tmp-train-000009.tar.123").write_bytes(b"partial")
    sorted(damaged.glob("train-*.tar"))[1].unlink()
    assert main(["verify", str(damaged)]) == 1
    out = capsys.readouterr().out
    assert f"FAIL: {shard}: corrupted: sha256" in out and "no such file" in out and "temporary file" in out


def test_verify_deep_check_catches_a_consistent_but_wrong_manifest(built, tmp_path, capsys):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(built, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["shards"][0]["samples"] += 1
    manifest["splits"]["train"]["samples"] += 1      # consistent totals: only reading the shard tells
    (bad / "manifest.json").write_text(json.dumps(manifest))
    assert main(["verify", str(bad)]) == 1
    assert "lengths holds" in capsys.readouterr().out  # a sample count per chunk that is not the manifest's
    assert main(["verify", "--quick", str(bad)]) == 0


def test_stats_json_and_text(built, capsys):
    assert main(["stats", str(built), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["samples"] == s["manifest_totals"]["samples"] and s["tokens"] == s["manifest_totals"]["tokens"]
    assert 0.12 < s["masking"]["rate"] < 0.18
    assert s["sentence_labels"]["key"] == "nsp_label" and s["sentence_labels"]["total"] == s["samples"]
    assert sum(s["length_histogram"]["counts"]) == s["samples"]
    assert main(["stats", str(built), "--split", "val"]) == 0
    text = capsys.readouterr().out
    assert "split val" in text and "length histogram" in text and "nsp_label" in text
    assert "nsp at seq_len 64: " in text and "tokens per instance, fill " in text
    assert s["objective"] == "nsp" and s["fill"] == s["tokens"] / (s["samples"] * s["seq_len"])


def test_inspect_shows_masks(built, capsys):
    assert main(["inspect", str(built), "-n", "3"]) == 0
    out = capsys.readouterr().out
    assert out.count("train-000000-") == 3 and "[MASK:" in out and "[CLS]" in out and "nsp_label=" in out


def test_merge_command(tmp_path, tokenizer_dir, capsys):
    corpus = write_lines(tmp_path / "en.txt", english_docs(40_000))
    common = ["shards", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "s"),
              "--text-per-shard-mb", "0.01", "--num-nodes", "2", "--no-progress"]
    assert main(common + ["--node-rank", "0"]) == 0
    assert main(["merge", str(tmp_path / "s")]) == 1
    assert "cannot merge" in capsys.readouterr().err
    assert main(common + ["--node-rank", "1"]) == 0
    assert main(["merge", str(tmp_path / "s")]) == 0
    assert main(["verify", str(tmp_path / "s")]) == 0


def test_slurm_array_gives_the_node_slice(tmp_path, tokenizer_dir, monkeypatch):
    corpus = write_lines(tmp_path / "en.txt", english_docs(20_000))
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "2")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "1")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "2")
    assert main(["shards", "--input", str(corpus), "--tokenizer", str(tokenizer_dir), "--out", str(tmp_path / "s"),
                 "--text-per-shard-mb", "0.005", "--no-progress"]) == 0
    assert (tmp_path / "s" / "manifest.node-00001-of-00002.json").is_file()


def test_run_config_with_flags_overrides_and_relative_paths(tmp_path, capsys, monkeypatch):
    (tmp_path / "data").mkdir()
    write_lines(tmp_path / "data" / "en.txt", english_docs(40_000))
    conf_dir = tmp_path / "configs"
    conf_dir.mkdir()
    (conf_dir / "small.yaml").write_text(yaml.safe_dump({
        "out": "out", "seed": 3, "input": {"paths": ["data/*.txt"]},
        "vocab": {"vocab_size": 500}, "shards": {"seq_len": 64, "text_per_shard_mb": 0.02}}))
    monkeypatch.chdir(tmp_path)  # relative paths are the current directory's, not the YAML file's
    command = ["run", "--config", str(conf_dir / "small.yaml"), "--objective", "sop", "--whole-word-mask",
               "shards.masking=static", "progress=false"]
    assert main(command) == 0
    manifest = json.loads((tmp_path / "out" / "shards" / "manifest.json").read_text())
    fmt = manifest["sample_format"]
    assert (fmt["objective"], fmt["masking"], fmt["whole_word_mask"], fmt["seq_len"]) == ("sop", "static", True, 64)
    tok_info = json.loads((tmp_path / "out" / "tokenizer" / "vocab_info.json").read_text())
    assert manifest["tokenizer"]["sha256"] == tok_info["sha256"] and tok_info["vocab_size"] == 500
    capsys.readouterr()
    assert main(command) == 0
    err = capsys.readouterr().err
    assert "skipped" in err and " 0 built" in err


def test_every_config_key_has_a_flag_on_run_and_the_familiar_names_are_kept():
    import argparse

    from data_prep.commands import run
    from data_prep.commands._common import flags_of
    from data_prep.settings import keys

    parser = argparse.ArgumentParser()
    run.add_arguments(parser)
    dests = {a.dest for a in parser._actions}
    assert set(keys(PrepConfig)) <= dests
    names = {flag: k for k, key in keys(PrepConfig).items() for flag in flags_of(key)}
    assert (names["--input"], names["--no-dedup"], names["--whole-word-mask"], names["--seq-len"],
            names["--from"], names["--cased"], names["--no-progress"]) == \
        ("input.paths", "clean.dedup", "shards.whole_word_mask", "shards.seq_len", "vocab.tokenizer",
         "vocab.lowercase", "progress")


def test_precedence_file_base_flags_and_key_value(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\nshards:\n  seq_len: 64\n  dupe_factor: 2\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\nshards:\n  seq_len: 256\n")
    cfg = load_config(tmp_path / "child.yaml", {"seed": 5, "shards.dupe_factor": 3}, ["shards.dupe_factor=4"],
                      environment={"num_nodes": 2, "node_rank": 1, "seed": 9})
    assert (cfg.shards.seq_len, cfg.seed, cfg.shards.dupe_factor) == (256, 5, 4)
    assert (cfg.num_nodes, cfg.node_rank) == (2, 1)  # the environment (a SLURM array) is the lowest layer
    assert load_config(tmp_path / "child.yaml", environment={"seed": 9}).seed == 1


def test_config_problems_are_all_reported(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("out: x\nworkers: two\nshards:\n  seq_length: 128\n  objective: mlm\n  max_predictions: 999\n"
                   "input:\n  paths: [a.txt]\n  jsonl_feild: body\n")
    assert main(["run", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "5 configuration problem(s)" in err
    assert "shards.seq_length: unknown key (did you mean 'shards.seq_len'?)" in err
    assert "input.jsonl_feild: unknown key (did you mean 'input.jsonl_field'?)" in err
    assert "workers: got 'two', expected an integer" in err
    assert "shards.objective: got 'mlm', expected one of 'nsp', 'sop', 'full-sentences', 'blocks'" in err
    # the cross check runs beside the per-key problems, since both of its keys are valid
    assert "shards.max_predictions: got 999, expected <= shards.seq_len (128)" in err
    with pytest.raises(PrepError, match="shards.max_predictions: got 999, expected <= shards.seq_len"):
        load_config(flags={"shards.max_predictions": 999})
    assert main(["run", "--config", str(bad), "shards.seq_len"]) == 1
    assert "override 'shards.seq_len': expected section.key=value" in capsys.readouterr().err


def test_demo_config_paths_are_relative_to_the_current_directory_and_it_runs(tmp_path, monkeypatch):
    demo = REPO / "configs" / "data" / "demo.yaml"
    monkeypatch.chdir(REPO)
    cfg = load_config(demo)
    assert cfg.input.paths == ["data_prep/assets/demo_corpus_en.txt.gz"] and cfg.out == "demo_out/data"
    assert (cfg.vocab.vocab_size, cfg.shards.seq_len, cfg.shards.objective, cfg.shards.masking) == \
        (8192, 128, "nsp", "dynamic")
    out = tmp_path / "demo"
    assert main(["run", "--config", str(demo), "--out", str(out), "--no-progress"]) == 0
    assert main(["verify", str(out / "shards")]) == 0
    manifest = json.loads((out / "shards" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["shards"] >= 4 and manifest["splits"]["val"]["samples"] > 0
    assert Path(REPO / "data_prep" / "assets" / "demo_corpus_en.txt.gz").stat().st_size < 1_000_000


def test_importing_a_bare_vocab_txt_follows_its_tokenizer_config(tokenizer_dir, tmp_path):
    src = tmp_path / "bert"
    src.mkdir()
    (src / "vocab.txt").write_text((tokenizer_dir / "vocab.txt").read_text())
    (src / "tokenizer_config.json").write_text('{"do_lower_case": false}')
    assert main(["vocab", "--from", str(src / "vocab.txt"), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "vocab_info.json").read_text())["lowercase"] is False
    assert main(["vocab", "--from", str(src / "vocab.txt"), "--uncased", "--out", str(tmp_path / "b")]) == 0
    assert json.loads((tmp_path / "b" / "vocab_info.json").read_text())["lowercase"] is True


def test_bpe_vocab_then_roberta_framed_shards_verify_stats_inspect(tmp_path, capsys):
    """`vocab --model bpe`, then NSP shards framed <s> A </s></s> B </s> with whole-word flags from Ġ;
    verify, stats and inspect read them; a BPE vocabulary is cased: --uncased is one line of error."""
    from tests.data_prep.conftest import ZH_DOCS, split_samples

    corpus = write_lines(tmp_path / "en.txt", english_docs(60_000) + ZH_DOCS)
    tok = tmp_path / "vocab"
    assert main(["vocab", "--input", str(corpus), "--model", "bpe", "--vocab-size", "800", "--out", str(tok)]) == 0
    info = json.loads((tok / "vocab_info.json").read_text())
    assert (info["model"], info["vocab_size"], info["cls_id"], info["pad_id"], info["sep_id"], info["mask_id"]) == \
        ("BPE", 800, 0, 1, 2, 799)
    assert main(["vocab", "--input", str(corpus), "--model", "bpe", "--uncased", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("expected null or false with vocab.model=bpe (byte-level BPE keeps the text as it is, "
                            "as RoBERTa does)")
    out = tmp_path / "shards"
    assert main(["shards", "--input", str(corpus), "--tokenizer", str(tok), "--out", str(out), "--seq-len", "64",
                 "--objective", "nsp", "--masking", "dynamic", "--whole-word-mask", "--max-predictions", "10",
                 "--text-per-shard-mb", "0.03", "--val-fraction", "0.1", "--no-progress"]) == 0
    samples = list(split_samples(out))
    assert samples
    for s in samples:
        ids = s["input_ids"].tolist()
        assert len(ids) <= 64 and ids[0] == 0 and ids[-1] == 2 and ids.count(2) == 3 and 1 not in ids
        first = ids.index(2)
        assert ids[first + 1] == 2 and s["word_starts"][[0, first, first + 1, len(ids) - 1]].all()
    assert max(len(s["input_ids"]) for s in samples) == 64
    from data_prep.vocab import read_tokenizer

    pieces = read_tokenizer(tok).get_vocab()
    marked = {i for t, i in pieces.items() if t.startswith("\u0120")}
    starts = [(int(i) in marked, bool(w)) for s in samples for i, w in zip(s["input_ids"], s["word_starts"])]
    assert all(w for m, w in starts if m) and sum(not w for _, w in starts) > 0.1 * len(starts)
    capsys.readouterr()
    assert main(["verify", str(out)]) == 0 and main(["stats", str(out)]) == 0
    assert main(["inspect", str(out), "-n", "2"]) == 0
    shown = capsys.readouterr().out
    assert "<s> " in shown and "</s> </s>" in shown and "\u0120" in shown and "[MASK:" in shown
