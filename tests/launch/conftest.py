"""Fixtures of the launch tests: the real SLURM test cluster, OpenMPI, and tiny shards."""
from pathlib import Path

import pytest

from tests.launch.slurm_cluster import SlurmCluster, start_cluster
from tests.pretrain.training_helpers import build_shards


@pytest.fixture(scope="session")
def slurm():
    cluster = SlurmCluster(start_cluster())
    yield cluster
    cluster.cancel_all()


@pytest.fixture(scope="session")
def shards(tmp_path_factory) -> Path:
    """Tokenizer + dynamic-masking NSP shards from the bundled corpus (what TINY trains on)."""
    return build_shards(tmp_path_factory.mktemp("launch-data"), "dynamic")
