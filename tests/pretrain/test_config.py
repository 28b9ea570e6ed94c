"""The typed config tree: YAML + base + CLI overrides, and validation that reports every problem."""
import subprocess
import sys
from pathlib import Path

import pytest

from pretrain.config import Config, ConfigError, config_from_dict, load_config

REPO = Path(__file__).resolve().parents[2]
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.yaml"))


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_defaults_are_valid():
    assert isinstance(config_from_dict({}), Config)


def test_precedence_cli_over_file_over_base_over_defaults(tmp_path):
    write(tmp_path, "base.yaml", "training:\n  max_steps: 10\n  seq_len: 64\nmodel:\n  num_layers: 3\n")
    child = write(tmp_path, "child.yaml", "base: base.yaml\ntraining:\n  max_steps: 20\n")
    cfg = load_config(child, ["training.seq_len=32"])
    assert cfg.training.max_steps == 20      # file beats base
    assert cfg.training.seq_len == 32        # CLI beats base
    assert cfg.model.num_layers == 3         # base beats defaults
    assert cfg.model.hidden_size == 768      # default


def test_misspelled_key_gets_one_clear_message_with_suggestion(tmp_path):
    path = write(tmp_path, "c.yaml", "model:\n  hiden_size: 128\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert err.value.problems == ["model.hiden_size: unknown key (did you mean 'model.hidden_size'?)"]
    assert str(path) in str(err.value)


def test_ill_typed_value_names_key_value_and_expected_type():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.max_steps=ten"])
    assert err.value.problems == ["training.max_steps: got 'ten', expected an integer"]


def test_all_problems_reported_together():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["zero.stage=7", "model.arch=bret", "optimizer.lrr=1", "model.num_heads=5",
                           "training.precision=fp8"])
    text = "\n".join(err.value.problems)
    assert len(err.value.problems) == 5, text
    assert "zero.stage: got 7, expected one of 0, 1, 2, 3" in text
    assert "did you mean 'bert'" in text
    assert "did you mean 'optimizer.lr'" in text
    assert "must be divisible by model.num_heads (5)" in text
    assert "training.precision: got 'fp8', expected one of 'fp32', 'bf16', 'fp16'" in text


def test_batch_product_rule_prints_every_factor():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["training.micro_batch_size=8", "training.grad_accum_steps=2",
                           "training.global_batch_size=64"], world_size=3)
    assert "8 x 2 x 3 = 48 != 64" in str(err.value)
    cfg = load_config(None, ["training.micro_batch_size=8", "training.global_batch_size=64"], world_size=4)
    assert cfg.grad_accum_steps(4) == 2


def test_ints_widen_to_float_but_bools_are_not_numbers():
    assert load_config(None, ["optimizer.lr=1"]).optimizer.lr == 1.0
    with pytest.raises(ConfigError, match="model.num_layers: got True, expected an integer"):
        load_config(None, ["model.num_layers=true"])


def test_base_cycle_and_missing_base_are_reported(tmp_path):
    a = write(tmp_path, "a.yaml", "base: b.yaml\n")
    write(tmp_path, "b.yaml", "base: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(a)
    c = write(tmp_path, "c.yaml", "base: nope.yaml\n")
    with pytest.raises(ConfigError, match="config file not found: .*nope.yaml"):
        load_config(c)


def test_bad_override_syntax():
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(None, ["max_steps"])


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_every_shipped_yaml_parses_through_the_real_cli(path):
    proc = subprocess.run([sys.executable, "-m", "pretrain", "config", "--config", str(path)],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    assert "model:" in proc.stdout


def test_shipped_recipes_have_the_published_hyperparameters():
    p1 = load_config(str(REPO / "configs/bert-large-phase1.yaml"), world_size=8)
    assert (p1.training.seq_len, p1.training.global_batch_size, p1.training.max_steps) == (128, 65536, 7038)
    assert (p1.optimizer.name, p1.optimizer.lr, p1.schedule.warmup_ratio) == ("lamb", 6e-3, 0.2843)
    assert p1.grad_accum_steps(8) == 32
    p2 = load_config(str(REPO / "configs/bert-large-phase2.yaml"), world_size=8)
    assert (p2.training.seq_len, p2.training.global_batch_size, p2.training.max_steps) == (512, 32768, 1563)
    assert (p2.optimizer.lr, p2.schedule.warmup_ratio, p2.training.max_predictions) == (4e-3, 0.128, 80)
    assert p2.checkpoint.init_from
    large = load_config(str(REPO / "configs/bert-large.yaml"))
    assert (large.model.num_layers, large.model.hidden_size, large.model.num_heads) == (24, 1024, 16)


def test_cli_reports_invalid_config_with_exit_2(tmp_path):
    path = write(tmp_path, "bad.yaml", "model:\n  hidden_sise: 3\n")
    proc = subprocess.run([sys.executable, "-m", "pretrain", "config", "--config", path],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2
    assert "model.hidden_sise: unknown key (did you mean 'model.hidden_size'?)" in proc.stderr


def test_every_field_of_both_trees_is_documented():
    from data_prep.settings import keys

    from data_prep.config import PrepConfig

    undocumented = [k for tree in (Config, PrepConfig) for k, key in keys(tree).items() if not key.doc]
    assert undocumented == []


def test_the_configuration_reference_is_generated_from_the_field_docstrings():
    from data_prep.settings import render_reference_doc

    doc = (REPO / "docs" / "configuration.md").read_text()
    assert "<!-- reference pretrain.config:Config -->" in doc and "<!-- reference data_prep.config:PrepConfig -->" in doc
    assert render_reference_doc(doc) == doc, "regenerate: python -m data_prep.settings docs/configuration.md"


DATA_CONFIGS = sorted((REPO / "configs" / "data").glob("*.yaml"))


@pytest.mark.parametrize("path", DATA_CONFIGS, ids=[p.name for p in DATA_CONFIGS])
def test_every_shipped_data_yaml_loads_through_data_preps_loader(path):
    from data_prep.config import load_config as load_prep_config
    cfg = load_prep_config(path)
    assert cfg.out and cfg.input.paths


def test_bert_large_data_configs_feed_the_training_recipes():
    from data_prep.config import load_config as load_prep_config
    p1 = load_prep_config(REPO / "configs/data/wiki.yaml")
    p2 = load_prep_config(REPO / "configs/data/wiki-512.yaml")
    t1 = load_config(str(REPO / "configs/bert-large-phase1.yaml"))
    t2 = load_config(str(REPO / "configs/bert-large-phase2.yaml"))
    assert (p1.shards.seq_len, p1.shards.max_predictions) == (t1.training.seq_len, t1.training.max_predictions)
    assert (p2.shards.seq_len, p2.shards.max_predictions) == (t2.training.seq_len, t2.training.max_predictions)
    # both relative to the current directory (the repository root), as every path in a config
    assert Path(p1.out, "shards") == Path(t1.data.dir)
    assert Path(p2.out, "shards") == Path(t2.data.dir)
    assert Path(p2.vocab.tokenizer) == Path(t2.data.tokenizer) == Path(p1.out, "tokenizer")
    assert p1.vocab.vocab_size == t1.model.vocab_size


def test_warmup_steps_and_ratio_replace_each_other_layer_by_layer(tmp_path):
    """A ratio given over a base file that sets warmup steps used to be ignored without a word: now
    the later layer's choice wins, whichever of the two it sets; one layer setting both is an error."""
    from pretrain.optim import resolve_warmup_steps

    steps_file = REPO / "configs" / "bert-tiny.yaml"  # bert_common.yaml sets schedule.warmup_steps: 10000
    cfg = load_config(str(steps_file), ["schedule.warmup_ratio=0.1", "training.max_steps=2000"])
    assert (cfg.schedule.warmup_steps, resolve_warmup_steps(cfg.schedule, 2000)) == (None, 200)
    ratio_file = REPO / "configs" / "debug.yaml"  # sets schedule.warmup_ratio: 0.1
    cfg = load_config(str(ratio_file), ["schedule.warmup_steps=3"])
    assert (cfg.schedule.warmup_ratio, resolve_warmup_steps(cfg.schedule, cfg.training.max_steps)) == (None, 3)
    child = tmp_path / "child.yaml"
    child.write_text(f"base: {ratio_file}\nschedule:\n  warmup_steps: 5\n")
    assert load_config(str(child)).schedule.warmup_ratio is None
    with pytest.raises(ConfigError, match=r"schedule.warmup_steps \(3\) and schedule.warmup_ratio \(0.1\) are both "
                                          r"set in one place"):
        load_config(str(steps_file), ["schedule.warmup_ratio=0.1", "schedule.warmup_steps=3"])
    assert resolve_warmup_steps(load_config(None, ["training.max_steps=2000"]).schedule, 2000) == 20  # 1% default


def test_a_cross_field_problem_is_kept_beside_a_bad_value_whose_name_it_shares():
    # optimizer.lr's leaf name is inside "min_lr_ratio": both are reported.
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimizer.lr=abc", "schedule.min_lr_ratio=5"])
    assert err.value.problems == ["optimizer.lr: got 'abc', expected a number",
                                  "schedule.min_lr_ratio: got 5.0, expected between 0 and 1"]


def test_a_rule_runs_when_its_keys_are_valid_and_not_when_one_was_refused():
    with pytest.raises(ConfigError) as err:
        load_config(None, ["optimizer.lr=abc", "model.num_heads=5"])
    assert len(err.value.problems) == 2 and "must be divisible by model.num_heads (5)" in str(err.value)
    with pytest.raises(ConfigError) as err:
        load_config(None, ["model.num_heads=five"])  # no rule about the default 12 heads
    assert err.value.problems == ["model.num_heads: got 'five', expected an integer"]


def test_lamb_only_options_with_adamw_warn():
    from data_prep.settings import ConfigWarning

    with pytest.warns(ConfigWarning, match="optimizer.nvlamb=true has no effect: it is a LAMB option and "
                                           "optimizer.name=adamw"):
        load_config(None, ["optimizer.name=adamw", "optimizer.nvlamb=true"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(str(REPO / "configs/bert-base.yaml"))           # AdamW with LAMB's defaults: quiet
        load_config(None, ["optimizer.nvlamb=true"])                   # LAMB: used


def test_row_cap_without_packing_warns():
    from data_prep.settings import ConfigWarning

    with pytest.warns(ConfigWarning, match="data.max_instances_per_row=16 has no effect: it caps packed rows and "
                                           "data.packing=false"):
        load_config(None, ["data.max_instances_per_row=16"])
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load_config(None, ["data.packing=true", "data.max_instances_per_row=16"])


def test_a_command_prints_a_config_warning_once_as_a_warning_line(capsys):
    from pretrain.cli import main

    assert main(["config", "--config", str(REPO / "configs/debug.yaml"), "optimizer.name=adamw",
                 "optimizer.nvlamb=true"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: optimizer.nvlamb=true has no effect: it is a LAMB option")


def test_mlm_probability_with_static_shards_is_reported_for_the_trainer():
    from pretrain.config import ignored_option_warnings

    cfg = load_config(None, ["data.mlm_probability=0.2"])
    assert ignored_option_warnings(cfg, static_masking=False) == []
    (warning,) = ignored_option_warnings(cfg, static_masking=True)
    assert warning.startswith("data.mlm_probability=0.2 has no effect: the shards are statically masked")
    assert ignored_option_warnings(load_config(None), static_masking=True) == []


def test_sentence_labels_a_model_leaves_unused_are_reported_for_the_trainer():
    from pretrain.config import ignored_option_warnings

    roberta = load_config(REPO / "configs" / "roberta-base.yaml")
    for objective in ("nsp", "sop"):
        (warning,) = ignored_option_warnings(roberta, static_masking=False, objective=objective)
        assert warning == (f"the shards are {objective} instances but model.sentence_head is none: their sentence "
                           "labels are ignored (masked LM only)")
    assert ignored_option_warnings(roberta, static_masking=False, objective="full-sentences") == []
    assert ignored_option_warnings(load_config(None), static_masking=False, objective="nsp") == []


def test_distilbert_needs_transformers_layer_norm_eps():
    with pytest.raises(ConfigError, match=r"model.layer_norm_eps: got 1e-05 with model.arch=distilbert, expected "
                                          r"1e-12 \(transformers' DistilBERT has it built in"):
        load_config(None, ["model.arch=distilbert", "model.sentence_head=none", "model.layer_norm_eps=1e-5"])


def test_allgather_bucket_is_its_own_key():
    cfg = load_config(None, ["zero.reduce_bucket_size=1000"])
    assert (cfg.zero.reduce_bucket_size, cfg.zero.allgather_bucket_size) == (1000, 50_000_000)
    with pytest.raises(ConfigError, match="zero.allgather_bucket_size: got 0, expected > 0"):
        load_config(None, ["zero.allgather_bucket_size=0"])


def test_paths_are_relative_to_the_current_directory_and_tilde_is_expanded(tmp_path):
    sub = tmp_path / "configs"
    sub.mkdir()
    path = write(sub, "c.yaml", "data:\n  dir: shards\nlogging:\n  run_dir: ~/runs/x\n")
    cfg = load_config(path)
    assert cfg.data.dir == "shards"                       # as given: the current directory's
    assert cfg.logging.run_dir == str(Path.home() / "runs" / "x")


def test_a_dumped_config_reads_back_equal(tmp_path):
    from pretrain.config import dump_config

    cfg = load_config(str(REPO / "configs/bert-large-phase2.yaml"))
    path = write(tmp_path, "dumped.yaml", dump_config(cfg))
    assert load_config(path) == cfg
