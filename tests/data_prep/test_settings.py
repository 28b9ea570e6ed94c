"""The config engine shared by data_prep and pretrain, on a small tree of its own."""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal, Optional

import pytest

from data_prep import settings
from data_prep.settings import ConfigError, ConfigWarning, Rules, setting


@dataclass(frozen=True)
class Base:
    mode: Literal["a", "b"] = "a"
    """The mode."""


@dataclass(frozen=True)
class Part(Base):
    size: int = setting(4, ge=1, le=8)
    """Elements per part."""
    rate: float = setting(0.5, ge=0, lt=1)
    """A rate."""
    where: Optional[str] = setting(None, path=True)
    """A place."""


@dataclass
class Tree:
    seed: int = setting(0, ge=0)
    """Seed."""
    part: Part = setting(factory=Part)


RULES = Rules()
WARN = Rules()


@RULES.check("part.size", "seed")
def _size_over_seed(cfg: Tree):
    if cfg.part.size <= cfg.seed:
        return f"part.size ({cfg.part.size}) must exceed seed ({cfg.seed})"


@WARN.check("part.mode", "part.rate")
def _rate_unused(cfg: Tree):
    if cfg.part.mode == "b" and cfg.part.rate != 0.5:
        return "part.rate has no effect with part.mode=b"


def build(data: dict, **kw) -> Tree:
    return settings.build(Tree, data, rules=RULES, warn=WARN, **kw)


def test_every_problem_at_once_and_a_rule_only_over_valid_keys():
    with pytest.raises(ConfigError) as err:
        build({"seed": 9, "part": {"size": 0, "mode": "c", "rat": 0.1}})
    assert err.value.problems == ["part.size: got 0, expected between 1 and 8",
                                  "part.mode: got 'c', expected one of 'a', 'b'",
                                  "part.rat: unknown key (did you mean 'part.rate'?)"]
    with pytest.raises(ConfigError) as err:
        build({"seed": 9, "part": {"rate": 1.0}})
    assert err.value.problems == ["part.rate: got 1.0, expected 0 <= value < 1",
                                  "part.size (4) must exceed seed (9)"]


def test_warnings_and_inherited_fields():
    with pytest.warns(ConfigWarning, match="part.rate has no effect with part.mode=b"):
        cfg = build({"part": {"mode": "b", "rate": 0.25}})
    assert cfg.part == Part(mode="b", rate=0.25)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build({"part": {"mode": "b"}})


def test_numbers_paths_and_lists():
    assert build({"part": {"rate": "1e-1"}}).part.rate == 0.1
    assert type(build({"part": {"rate": 0}}).part.rate) is float
    assert type(build({"part": {"rate": 0}}, widen_ints=False).part.rate) is int
    assert build({"part": {"where": "~/x"}}).part.where == settings.os.path.expanduser("~/x")
    with pytest.raises(ConfigError, match=r"part.rate: got nan, expected a finite number 0 <= value < 1"):
        build({"part": {"rate": float("nan")}})
    with pytest.raises(ConfigError, match="part: expected a mapping of keys, got 3"):
        build({"part": 3, "seed": 100})  # and no rule about part's defaults


def test_the_reference_lists_every_key_with_its_docstring():
    text = settings.reference(Tree)
    assert "| `seed` | an integer, >= 0 | `0` | Seed. |" in text
    assert "| `part.mode` | one of `a`, `b` | `a` | The mode. |" in text  # declared on the base class
    assert "| `part.where` | a path or null | null | A place. |" in text


def test_layers_bases_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("seed: 1\npart:\n  size: 2\n  rate: 0.1\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\npart:\n  size: 3\n")
    data = settings.merge(settings.read_file(tmp_path / "child.yaml"),
                          settings.parse_overrides(["part.rate=0.2", "seed=2"], "part.size=2"))
    assert data == {"seed": 2, "part": {"size": 3, "rate": 0.2}}
    assert settings.merge({"s": {"a": 1, "b": 2}}, {"s": {"b": 3}}, {"s": (("a", "b"),)}) == {"s": {"b": 3}}
    assert settings.unflatten({"part.size": 2, "seed": 1}) == {"part": {"size": 2}, "seed": 1}
    with pytest.raises(ConfigError, match="override 'part.size': expected section.key=value"):
        settings.parse_overrides(["part.size"], "part.size=2")
