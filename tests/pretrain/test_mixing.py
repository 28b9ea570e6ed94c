"""Weighted mixing: the position -> (source, ordinal) map, its prefix bound, the data.sources config."""
from __future__ import annotations

import random
from fractions import Fraction

import pytest

from pretrain.config import ConfigError, SourceConfig, load_config
from pretrain.mixing import Blend


def _merged(blend: Blend, n: int) -> list[tuple[int, int]]:
    """The definition, by brute force: every source's items at (j + 1/2) / w_i, sorted (ties by source)."""
    k = len(blend.units)
    items = sorted((Fraction(2 * j + 1, blend.units[i]), i, j) for i in range(k) for j in range(n))
    return [(i, j) for _, i, j in items[:n]]


@pytest.mark.parametrize("weights", [[0.7, 0.3], [1, 1, 1], [5, 0.05, 1], [0.123, 2, 0.5, 1], [1, 3]])
def test_positions_follow_the_merged_ideal_order_and_every_prefix_keeps_the_bound(weights):
    blend = Blend(weights)
    n, k = 4000, len(weights)
    got = [blend(p) for p in range(n)]
    assert got == _merged(blend, n)
    counts = [0] * k
    for p, (source, ordinal) in enumerate(got):
        assert ordinal == counts[source]               # each source's ordinals in order, no gaps
        counts[source] += 1
        for i, w in enumerate(blend.shares):
            assert abs(counts[i] - w * (p + 1)) <= 0.5 + w * (k - 2) / 2 + 1e-9, (p, i)
        if p % 97 == 0:
            assert [blend.count(i, p + 1) for i in range(k)] == counts


def test_two_sources_stay_within_half_a_sample_far_into_a_run():
    blend = Blend([0.7, 0.3])
    for start in (10**9, 10**12 + 12345, 7 * 10**14):
        counts = [blend.count(i, start) for i in range(2)]
        assert sum(counts) == start and all(abs(c - w * start) <= 0.5 for c, w in zip(counts, blend.shares))
        for p in range(start, start + 500):
            source, ordinal = blend(p)
            assert ordinal == counts[source]
            counts[source] += 1
            assert all(abs(c - w * (p + 1)) <= 0.5 for c, w in zip(counts, blend.shares))


def test_random_weights_keep_the_bound():
    rng = random.Random(0)
    for _ in range(20):
        weights = [rng.uniform(0.01, 5) for _ in range(rng.randint(2, 4))]
        blend, k = Blend(weights), len(weights)
        counts = [0] * k
        for p in range(2000):
            counts[blend(p)[0]] += 1
            assert all(abs(c - w * (p + 1)) <= 0.5 + w * (k - 2) / 2 + 1e-9 for c, w in zip(counts, blend.shares))


def test_one_source_is_the_identity_and_weights_must_be_positive():
    assert [Blend([3.0])(p) for p in range(5)] == [(0, p) for p in range(5)]
    with pytest.raises(ValueError, match="positive"):
        Blend([1.0, 0.0])


def test_small_weights_are_taken_against_the_largest_and_a_negligible_one_is_refused():
    tiny = Blend([3e-7, 3e-7])                             # equal weights, however small: alternate
    assert [tiny(p) for p in range(4)] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    assert Blend([1, 1e-6]).count(1, 3_000_000) == 3       # one in a million
    with pytest.raises(ValueError, match=r"the ones at \[1\] are too small"):
        Blend([1, 4e-7])
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.sources=[{dir: /a}, {dir: /b, weight: 4.0e-7}]"])
    assert caught.value.problems == ["data.sources[1].weight: 4e-07 is too small against the largest weight (1.0) "
                                     "to get a share; raise it or leave the source out"]


def test_pipe_sources_are_named_by_the_path_before_name_or_must_be_named():
    cfg = load_config(None, ["data.sources=[{dir: 'pipe:aws s3 cp s3://b/wiki/{name} -'}, "
                             "{dir: 'pipe:curl -s \"https://h/books/shards/{name}\"'}]"])
    assert [s.name for s in cfg.data.sources] == ["wiki", "books"]
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.sources=[{dir: /a}, {dir: 'pipe:fetch {name}'}]"])
    assert caught.value.problems == ["data.sources[1].name: missing, and the pipe: command 'pipe:fetch {name}' names "
                                     "no directory before {name} to take it from: give the source a name"]
    assert load_config(None, ["data.dir=pipe:fetch {name}"]).data.source_list()[0].name == "data"


def test_data_sources_config_names_sources_and_refuses_both_ways_at_once():
    cfg = load_config("configs/debug.yaml", ["data.sources=[{dir: /d/wiki/shards, weight: 0.7}, "
                                             "{dir: 'http://h/books/', weight: 0.3, name: bk}]"])
    assert cfg.data.dir == ""                              # the command line's sources replace the file's dir
    assert cfg.data.sources == [SourceConfig("/d/wiki/shards", 0.7, "wiki"), SourceConfig("http://h/books/", 0.3, "bk")]
    assert load_config(None, ["data.dir=/x/shards"]).data.source_list() == [SourceConfig("/x/shards", 1.0, "x")]
    with pytest.raises(ConfigError, match=r"data.dir \(/a\) and data.sources are both set in one place"):
        load_config(None, ["data.dir=/a", "data.sources=[{dir: /b}]"])
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["data.sources=[{dir: /a, wieght: 2}, 3, {weight: -1, dir: /c}, {name: x}]",
                           "training.max_steps=0"])
    problems = caught.value.problems
    assert "training.max_steps: got 0, expected > 0" in problems
    assert "data.sources[0].wieght: unknown key (did you mean 'weight'?)" in problems
    assert "data.sources[1]: got 3, expected a mapping {dir: ..., weight: ...}" in problems
    assert "data.sources[2].weight: got -1.0, expected > 0" in problems
    assert "data.sources[3].dir: missing (the source's shard directory or URL)" in problems
    with pytest.raises(ConfigError, match="two sources are named 'a'"):
        load_config(None, ["data.sources=[{dir: /x/a/shards}, {dir: /y/a}]"])


# --------------------------------------------------------------------------------------------
# Two prepared corpora with one tokenizer, trained together
# --------------------------------------------------------------------------------------------
def build_corpus(out, tokenizer, masking: str = "dynamic", skip: int = 1500, lines: int = 600, seq_len: int = 128):
    """Shards of the bundled corpus's paragraphs [skip, skip + lines), tokenized with ``tokenizer``."""
    import gzip
    import subprocess
    import sys

    from tests.pretrain.training_helpers import DEMO_CORPUS, REPO

    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(DEMO_CORPUS, "rt", encoding="utf-8") as f:
        text = [line for i, line in zip(range(skip + lines), f) if i >= skip]
    (out / "corpus.txt").write_text("".join(text), encoding="utf-8")
    (out / "data.yaml").write_text(f"""
out: {out}
seed: 7
workers: 1
progress: false
input: {{paths: [{out / 'corpus.txt'}], format: text}}
vocab: {{tokenizer: {tokenizer}}}
shards: {{seq_len: {seq_len}, objective: nsp, masking: {masking}, max_predictions: 20, val_fraction: 0.05,
          text_per_shard_mb: 0.05}}
""")
    proc = subprocess.run([sys.executable, "-m", "data_prep", "run", "--config", str(out / "data.yaml")],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out / "shards"


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    from tests.pretrain.training_helpers import build_shards

    root = tmp_path_factory.mktemp("mix")
    first = build_shards(root / "wiki", "dynamic", lines=900)
    return {"wiki": first / "shards", "books": build_corpus(root / "books", first / "tokenizer"),
            "tokenizer": first / "tokenizer", "root": root}


def _mixed(corpora, weights=(0.7, 0.3)) -> list[str]:
    return [f"data.sources=[{{dir: {corpora['wiki']}, weight: {weights[0]}}}, "
            f"{{dir: {corpora['books']}, weight: {weights[1]}, name: books}}]", f"data.tokenizer={corpora['tokenizer']}"]


@pytest.mark.slow
def test_exact_resume_with_two_sources_and_per_source_counts_and_eval(corpora, tmp_path):
    """Two ranks, ZeRO-2, one loader worker: stopped at step 4 and resumed, the losses of a straight
    run, bit for bit; the log holds each source's samples (which add up to the samples consumed) and
    epochs, and the held-out metrics of each source beside those over both."""
    from tests.pretrain.training_helpers import TINY, straight_and_resumed

    overrides = TINY + _mixed(corpora) + ["training.max_steps=8", "schedule.warmup_steps=2", "data.num_workers=1",
                                          "zero.stage=2", "eval.every_steps=8", "eval.max_batches=2"]
    straight, _, resumed = straight_and_resumed(tmp_path, overrides, 4)
    assert "resumed from step-000004 at step 4" in resumed.logs[0]
    expected, got = straight.losses(), resumed.losses()
    assert sorted(got) == list(range(1, 9)) and got == expected
    blend = Blend([0.7, 0.3])
    for row in straight.metrics():
        consumed = row["step"] * 16
        assert row["data/wiki/samples"] == blend.count(0, consumed)
        assert row["data/wiki/samples"] + row["data/books/samples"] == consumed
        assert abs(row["data/books/samples"] - 0.3 * consumed) <= 0.5
        assert row["data/books/epochs"] > 0
    held = straight.metrics("eval")[-1]
    for key in ("eval/mlm_loss", "eval/wiki/mlm_loss", "eval/books/mlm_loss", "eval/books/sentence_accuracy"):
        assert key in held, sorted(held)
    assert held["eval/masked_tokens"] == held["eval/wiki/masked_tokens"] + held["eval/books/masked_tokens"]


def test_mixture_positions_reach_each_source_with_its_own_order_and_epochs(corpora):
    """The loader's view: a position maps to (source, its epoch, its sample) through the blend and that
    source's own order; a small source wraps into its next epoch on its own counter."""
    from pretrain.config import DataConfig, TrainingConfig
    from pretrain.data import GlobalOrder, MixedOrder, open_split, source_seed

    data = DataConfig(sources=[SourceConfig(str(corpora["wiki"]), 1.0, "wiki"),
                               SourceConfig(str(corpora["books"]), 3.0, "books")], shuffle_buffer=64)
    training = TrainingConfig(seq_len=128, max_predictions=20, seed=5)
    split = open_split(data, "train", training, model_vocab_size=2048)
    order = MixedOrder(split, data.shuffle_buffer)
    books = split.splits[1]
    assert books.seed == source_seed(5, 1) != 5 and split.splits[0].seed == 5
    books_order = GlobalOrder(books.shard_sizes, books.seed, 64)
    seen = [order(p) for p in range(2 * books.num_samples)]
    from_books = [(e, s) for src, e, s in seen if src == 1]
    assert from_books == [books_order(j) for j in range(len(from_books))]
    assert {e for e, _ in from_books} == {0, 1}             # more draws than it has samples: its second epoch
    assert {e for src, e, _ in seen if src == 0} == {0}


def test_sources_with_other_shard_settings_or_tokenizer_are_refused_naming_both(corpora):
    from pretrain.config import DataConfig, TrainingConfig
    from pretrain.data import DataError, open_split
    from tests.pretrain.training_helpers import build_shards

    static = build_corpus(corpora["root"] / "static", corpora["tokenizer"], masking="static")
    other_tok = build_shards(corpora["root"] / "other", "dynamic", lines=400) / "shards"
    training = TrainingConfig(seq_len=128, max_predictions=20)
    for second, field in ((static, "dynamic"), (other_tok, "tokenizer_hash")):
        data = DataConfig(sources=[SourceConfig(str(corpora["wiki"]), 1.0, "wiki"),
                                   SourceConfig(str(second), 1.0, "second")])
        with pytest.raises(DataError, match=rf"data.sources: wiki \({corpora['wiki']}\) and second \({second}\) "
                                            rf"differ in {field}: "):
            open_split(data, "train", training, model_vocab_size=2048)


def test_the_shipped_mixture_config_reads_the_shards_of_the_shipped_data_configs():
    """configs/bert-large-phase1-mix.yaml mixes the outputs of configs/data/wiki.yaml and books.yaml,
    which share the tokenizer and the shard settings a mixture requires."""
    from pathlib import Path

    from data_prep.config import load_config as load_prep_config
    from tests.pretrain.training_helpers import REPO

    mix = load_config(str(REPO / "configs/bert-large-phase1-mix.yaml"))
    wiki, books = (load_prep_config(REPO / f"configs/data/{n}.yaml") for n in ("wiki", "books"))
    assert mix.data.dir == "" and [s.name for s in mix.data.sources] == ["wiki", "books"]
    assert [Path(s.dir) for s in mix.data.sources] == [Path(wiki.out, "shards"), Path(books.out, "shards")]
    assert Path(books.vocab.tokenizer) == Path(wiki.out, "tokenizer") == Path(mix.data.tokenizer)
    assert books.shards == wiki.shards
