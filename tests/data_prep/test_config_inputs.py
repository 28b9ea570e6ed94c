"""Bad and unusual config input for data_prep: non-finite numbers, every float spelling, vocabulary
size limits, duplicate keys, empty files, and --config files that are not YAML text."""
from __future__ import annotations

import math

import pytest

from data_prep.cli import main
from data_prep.config import RANGES, PrepConfig, load_config
from data_prep.errors import PrepError
from data_prep.settings import keys, read_yaml_mapping, unwrap_optional
from data_prep.vocab import train_wordpiece

FLOAT_KEYS = sorted(k for k, key in keys(PrepConfig).items() if unwrap_optional(key.type)[0] is float)


def test_every_float_key_is_found():
    assert FLOAT_KEYS == ["shards.masked_lm_prob", "shards.short_seq_prob", "shards.text_per_shard_mb",
                          "shards.val_fraction", "vocab.max_text_mb"]


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, "nan", "inf", "-Infinity",
                                   pytest.param(10 ** 400, id="int-beyond-float")])
def test_non_finite_floats_are_refused(key, value):
    with pytest.raises(PrepError, match=f"{key}: got .*, expected a finite number"):
        load_config(flags={key: value})


def test_the_message_names_the_key_and_the_range():
    with pytest.raises(PrepError) as err:
        load_config(flags={"shards.val_fraction": math.nan})
    assert "shards.val_fraction: got nan, expected a finite number between 0.0 and 0.999" in str(err.value)


@pytest.mark.parametrize("flag", ["--val-fraction=nan", "--text-per-shard-mb=inf", "--masked-lm-prob=NaN",
                                  "--short-seq-prob=-inf"])
def test_non_finite_flags_are_refused_before_any_work(tmp_path, capsys, flag):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text that is long enough to be a document\n")
    code = main(["shards", "--input", str(corpus), "--tokenizer", str(tmp_path / "no-tokenizer"),
                 "--out", str(tmp_path / "out"), flag])
    err = capsys.readouterr().err
    assert code == 1 and "expected a finite number" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_non_finite_yaml_values_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shards:\n  val_fraction: .nan\n  text_per_shard_mb: .inf\n")
    with pytest.raises(PrepError) as err:
        load_config(path)
    assert "2 configuration problem(s)" in str(err.value)
    assert "shards.val_fraction: got nan" in str(err.value) and "shards.text_per_shard_mb: got inf" in str(err.value)


def test_every_float_spelling_is_accepted_in_yaml(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-3, 1E-3 and 2.5e1 as strings: float() reads them all.
    path = tmp_path / "c.yaml"
    path.write_text("shards:\n  masked_lm_prob: 1.5E-1\n  val_fraction: 1e-3\n  short_seq_prob: .5\n"
                    "  text_per_shard_mb: 2.5e1\nvocab:\n  max_text_mb: 1_0e-1\n"
                    "input:\n  jsonl_field: 1e-3\n")
    cfg = load_config(path)
    s = cfg.shards
    assert (s.masked_lm_prob, s.val_fraction, s.short_seq_prob, s.text_per_shard_mb, cfg.vocab.max_text_mb) == \
        (0.15, 0.001, 0.5, 25.0, 1.0)
    assert cfg.input.jsonl_field == "1e-3"  # a string field keeps the string


@pytest.mark.parametrize("text,expected", [("1e-3", 0.001), ("5.", 5.0), ("+1", 1), ("1_0", 10), ("'0.25'", 0.25)])
def test_float_spellings_one_by_one(tmp_path, text, expected):
    path = tmp_path / "c.yaml"
    path.write_text(f"shards:\n  text_per_shard_mb: {text}\n")
    assert load_config(path).shards.text_per_shard_mb == expected


def test_an_integer_in_a_float_field_stays_an_integer():
    # Shard settings are fingerprinted as given: 4 must not turn into 4.0 for existing runs.
    value = load_config(flags={"shards.text_per_shard_mb": 4}).shards.text_per_shard_mb
    assert value == 4 and type(value) is int


@pytest.mark.parametrize("key,value", [("workers", "1e1"), ("workers", 2.0), ("seed", "12"),
                                       ("clean.dedup", "1e-3"), ("shards.val_fraction", "0.1x"),
                                       ("shards.val_fraction", True)])
def test_other_types_keep_their_rules(key, value):
    with pytest.raises(PrepError, match=f"{key}: got {value!r}, expected"):
        load_config(flags={key: value})


def test_vocab_size_has_a_sane_maximum():
    assert RANGES["vocab.vocab_size"] == (16, 1 << 20)
    assert load_config(flags={"vocab.vocab_size": 1 << 20}).vocab.vocab_size == 1 << 20
    with pytest.raises(PrepError, match="vocab.vocab_size: got 2147483648, expected between 16 and 1048576"):
        load_config(flags={"vocab.vocab_size": 2147483648})


def test_the_documented_old_maximum_is_refused_on_the_command_line(tmp_path, capsys):
    corpus = tmp_path / "c.txt"
    corpus.write_text("some text that is long enough to be a document\n")
    assert main(["vocab", "--input", str(corpus), "--vocab-size", "2147483648", "--out", str(tmp_path / "v")]) == 1
    assert "vocab.vocab_size: got 2147483648, expected between 16 and 1048576" in capsys.readouterr().err


def test_a_vocab_larger_than_the_corpus_can_fill_is_warned_before_training(capsys):
    docs = ["the cat sat on the mat", "a dog and a cat"]
    tok = train_wordpiece(lambda: iter(docs), 1 << 20, lowercase=True, min_frequency=1)
    err = capsys.readouterr().err
    assert "warning: vocab_size 1,048,576 is more than this corpus can fill" in err
    bound = int(err.split("at most ")[1].split(" ")[0].replace(",", ""))
    assert tok.get_vocab_size() <= bound < 200


def test_no_warning_when_the_corpus_can_fill_the_vocab(capsys):
    docs = [f"word{i} other{i * 7} thing{i * 13}" for i in range(300)]
    train_wordpiece(lambda: iter(docs), 100, lowercase=True)
    assert "warning" not in capsys.readouterr().err


# ---- the YAML file itself ----------------------------------------------------------------------
def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("seed: 1\nshards:\n  seq_len: 64\n  objective: sop\n  seq_len: 128\n")
    with pytest.raises(PrepError, match=rf"^{path}:5: key 'seq_len' appears twice \(first at line 3\)$"):
        load_config(path)


def test_a_duplicate_section_is_an_error(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("shards:\n  seq_len: 64\nseed: 3\nshards:\n  objective: sop\n")
    with pytest.raises(PrepError, match=rf"{path}:4: key 'shards' appears twice \(first at line 1\)"):
        load_config(path)


def test_merge_keys_may_be_overridden(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("x: &base {seq_len: 64, objective: sop}\nshards:\n  <<: *base\n  seq_len: 128\n")
    assert read_yaml_mapping(path)["shards"]["seq_len"] == 128


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "---\n"])
def test_an_empty_file_is_an_error(tmp_path, text):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(PrepError, match=f"^{path} is empty"):
        load_config(path)


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.mkdir(), "is a directory; expected a YAML file"),
    (lambda p: p.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\xff\xfe"),
     ":1: not UTF-8 text (invalid byte at offset 0)"),
    (lambda p: p.write_bytes("seed: 1\nout: caf\xe9\n".encode("latin-1")),
     ":2: not UTF-8 text (invalid byte at offset 16)"),
    (lambda p: p.write_bytes(b"seed: 1\x00\n"), "not valid YAML"),
    (lambda p: p.write_text("- a\n- b\n"), "top level is a list; expected a mapping"),
    (lambda p: p.write_text("just words\n"), "top level is a str; expected a mapping"),
    (lambda p: p.write_text("seed: [1\n"), "not valid YAML"),
    (lambda p: None, "config file not found"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_one_line_naming_the_file(tmp_path, capsys, make, problem):
    path = tmp_path / "c.yaml"
    make(path)
    assert main(["run", "--config", str(path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and str(path) in err and problem in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_huge_file_is_not_read_whole(tmp_path):
    path = tmp_path / "model.pt"
    with open(path, "wb") as f:
        f.truncate(64 << 20)  # sparse: a checkpoint given as --config by mistake
    with pytest.raises(PrepError, match=f"{path}: larger than 4 MiB; a config file is a few KB of YAML"):
        load_config(path)
