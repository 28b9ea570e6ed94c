"""In-training evaluation under ZeRO-3, where every forward is a collective over the ranks.

A parameter over 1e5 elements is partitioned (DeepSpeed's persistence threshold), so the word
embeddings of vocab_size 4096 x 32 make each forward gather.  The held-out split of these shards
has 106 samples: 11 batches of 10, which 2 ranks cannot split evenly.  Every rank must still run
the same number of forwards (the short one runs an uncounted padding batch), and the metrics must
equal a 1-rank evaluation of the same weights.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.pretrain.training_helpers import REPO, TINY, build_shards, data_overrides, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def dynamic_data(tmp_path_factory):
    return build_shards(tmp_path_factory.mktemp("dyn"), "dynamic")


def test_zero3_eval_with_uneven_batches_neither_hangs_nor_changes_the_metrics(dynamic_data, tmp_path):
    run = launch(tmp_path / "run", TINY + data_overrides(dynamic_data) + [
        "zero.stage=3", "model.vocab_size=4096", "training.max_steps=2", "eval.every_steps=2", "eval.max_batches=0",
        "eval.micro_batch_size=10", "training.collective_timeout_s=20"], timeout=150)
    assert run.codes == [0, 0], run.explain()
    in_training = run.metrics("eval")[-1]
    assert in_training["step"] == 2
    out = tmp_path / "eval.json"
    proc = subprocess.run([sys.executable, "-m", "pretrain", "eval", "--checkpoint", str(run.run_dir / "checkpoints"),
                           "--batch-size", "10", "--out", str(out)], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    one_rank = json.loads(out.read_text())
    assert in_training["eval/masked_tokens"] == one_rank["eval/masked_tokens"]   # no batch counted twice
    for key in ("eval/mlm_accuracy", "eval/mlm_loss", "eval/sentence_accuracy"):
        assert in_training[key] == pytest.approx(one_rank[key], rel=1e-5), key
