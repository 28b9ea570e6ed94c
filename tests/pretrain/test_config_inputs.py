"""Bad and unusual input to the training config: non-finite numbers, every float spelling, duplicate
keys, empty files, and --config files that are not YAML text."""
from __future__ import annotations

import dataclasses
import typing

import pytest

from pretrain.cli import main
from pretrain.config import Config, ConfigError, load_config


def _float_keys(cls=Config, prefix: str = "") -> list[str]:
    """Every dotted key whose annotation is float, Optional[float] or list[float]."""
    keys = []
    for name, tp in typing.get_type_hints(cls).items():
        if dataclasses.is_dataclass(tp):
            keys += _float_keys(tp, f"{name}.")
        elif float in (tp, *typing.get_args(tp)):
            keys.append(prefix + name)
    return keys


FLOAT_KEYS = _float_keys()


def test_float_keys_are_found():
    assert {"optimizer.lr", "optimizer.betas", "schedule.warmup_ratio", "data.mlm_probability",
            "logging.peak_tflops", "model.layer_norm_eps", "distill.temperature"} <= set(FLOAT_KEYS) and len(FLOAT_KEYS) == 21


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("spelling", [".nan", ".inf", "-.inf", "nan", "inf", "-Infinity", "1e400", "9" * 400])
def test_non_finite_values_are_refused_in_every_float_field(key, spelling):
    override, shown = (f"{key}=[{spelling}, 0.9]", f"{key}[0]") if key == "optimizer.betas" else \
        (f"{key}={spelling}", key)
    with pytest.raises(ConfigError) as err:
        load_config(None, [override])
    assert f"{shown}: got " in str(err.value) and "expected a finite number" in str(err.value)


def test_non_finite_values_in_a_file_are_refused(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: .nan\n  max_grad_norm: .inf\n")
    with pytest.raises(ConfigError) as err:
        load_config(str(path))
    text = str(err.value)
    assert "2 configuration problem(s)" in text
    assert "optimizer.lr: got nan, expected a finite number" in text
    assert "optimizer.max_grad_norm: got inf, expected a finite number" in text


@pytest.mark.parametrize("spelling,value", [("1e-3", 1e-3), ("1E-3", 1e-3), (".5", 0.5), ("5.", 5.0), ("+1", 1.0),
                                            ("1_000", 1000.0), ("2.5e1", 25.0), ("'0.25'", 0.25), ("3", 3.0)])
def test_every_float_spelling_is_accepted_on_the_command_line(spelling, value):
    cfg = load_config(None, [f"optimizer.lr={spelling}"])
    assert cfg.optimizer.lr == value and type(cfg.optimizer.lr) is float


def test_every_float_spelling_is_accepted_in_a_file(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1e-4\n  eps: 1E-8\n  betas: [9e-1, .98]\nschedule:\n  warmup_ratio: 1e-2\n")
    cfg = load_config(str(path))
    assert (cfg.optimizer.lr, cfg.optimizer.eps, cfg.optimizer.betas, cfg.schedule.warmup_ratio) == \
        (1e-4, 1e-8, [0.9, 0.98], 0.01)


@pytest.mark.parametrize("override,problem", [
    ("training.max_steps=1e3", "training.max_steps: got '1e3', expected an integer"),
    ("training.max_steps=10.0", "training.max_steps: got 10.0, expected an integer"),
    ("logging.tensorboard=1e-3", "logging.tensorboard: got '1e-3', expected true/false"),
    ("optimizer.lr=1e-3x", "optimizer.lr: got '1e-3x', expected a number"),
    ("optimizer.lr=true", "optimizer.lr: got True, expected a number"),
])
def test_other_types_keep_their_rules(override, problem):
    with pytest.raises(ConfigError, match=problem):
        load_config(None, [override])


def test_a_string_field_keeps_a_number_like_string():
    assert load_config(None, ["data.tokenizer=1e-3"]).data.tokenizer == "1e-3"


# ---- the YAML file itself ----------------------------------------------------------------------
def test_a_duplicate_key_is_an_error_naming_both_lines(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("optimizer:\n  lr: 1.0e-3\n  eps: 1.0e-6\n  lr: 2.0e-3\n")
    with pytest.raises(ConfigError, match=rf"{path}:4: key 'lr' appears twice \(first at line 2\)"):
        load_config(str(path))


def test_a_duplicate_key_in_a_base_file_is_an_error(tmp_path):
    (tmp_path / "base.yaml").write_text("training:\n  max_steps: 10\ntraining:\n  seq_len: 64\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\n")
    with pytest.raises(ConfigError, match=rf"{tmp_path / 'base.yaml'}:3: key 'training' appears twice"):
        load_config(str(child))


def test_a_base_may_still_be_overridden_by_its_child(tmp_path):
    (tmp_path / "base.yaml").write_text("training:\n  max_steps: 10\n")
    child = tmp_path / "child.yaml"
    child.write_text("base: base.yaml\ntraining:\n  max_steps: 20\n")
    assert load_config(str(child)).training.max_steps == 20


@pytest.mark.parametrize("name", ["c.yaml", "base.yaml"])
def test_an_empty_file_or_base_is_an_error(tmp_path, name):
    (tmp_path / "base.yaml").write_text("# nothing here yet\n")
    (tmp_path / "c.yaml").write_text("" if name == "c.yaml" else "base: base.yaml\n")
    with pytest.raises(ConfigError, match=f"{tmp_path / name} is empty"):
        load_config(str(tmp_path / "c.yaml"))


@pytest.mark.parametrize("make,problem", [
    (lambda p: p.mkdir(), "is a directory; expected a YAML file"),
    (lambda p: p.write_bytes(b"\x80\x02}q\x00(X\x05\x00\x00\x00model"),  # a pickle, e.g. a checkpoint
     ":1: not UTF-8 text (invalid byte at offset 0)"),
    (lambda p: p.write_bytes("training:\n  seed: 1 # \xe9\n".encode("latin-1")), ":2: not UTF-8 text"),
    (lambda p: p.write_bytes(b"training:\x00\n"), "not valid YAML"),
    (lambda p: p.write_text("- training\n"), "top level is a list; expected a mapping"),
    (lambda p: p.write_text("training: [1\n"), "not valid YAML"),
    (lambda p: p.write_text(""), "is empty"),
])
def test_a_config_that_is_not_a_yaml_mapping_is_reported_naming_the_file(tmp_path, capsys, make, problem):
    path = tmp_path / "c.yaml"
    make(path)
    assert main(["config", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and f"{path}" in err and problem in err, err
    assert "Traceback" not in err
