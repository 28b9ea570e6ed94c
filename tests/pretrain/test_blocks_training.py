"""A blocks shard directory (data_prep's complete-fill objective) trains: no sentence label, full rows."""
from __future__ import annotations

import math

from tests.pretrain.training_helpers import TINY, build_shards, data_overrides, launch


def test_blocks_shards_train(tmp_path):
    data = build_shards(tmp_path / "data", "dynamic", objective="blocks", lines=400)
    run = launch(tmp_path / "run", TINY + data_overrides(data) + ["training.max_steps=3", "model.sentence_head=none"],
                 nproc=1)
    assert run.codes == [0], run.explain()
    losses = run.losses()
    assert sorted(losses) == [1, 2, 3] and all(math.isfinite(v) for v in losses.values())
