"""Session fixture `slurm`: a real one-node SLURM cluster on 127.0.0.1, or a skip with the reason."""
from __future__ import annotations

import pytest

from tests.cluster.slurm_cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as err:
        pytest.skip(f"no local SLURM cluster: {err}")
    yield cluster
    cluster.stop()
