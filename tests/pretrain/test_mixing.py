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
