"""The ``slurm_cluster`` fixture: a real two-node Slurm cluster on loopback, one per session.

Started on first use (installing Debian's Slurm with apt when missing and allowed) and always
stopped at the end of the session, by its pid files, whatever the tests did. A watchdog stops
it too if the session dies before its finalizers run. Where it cannot run (not root, apt
failed) the tests skip with the reason; under ``CI=true`` that is a failure instead: CI must
run them.
"""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    from slurm.localcluster import ClusterUnavailable, LocalCluster

    cluster = LocalCluster(tmp_path_factory.mktemp("slurm"))
    unavailable = None
    try:
        cluster.start(owner_pid=os.getpid())
    except ClusterUnavailable as e:
        cluster.stop()
        unavailable = str(e)
    if unavailable is not None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and no local Slurm cluster: {unavailable}", pytrace=False)
        pytest.skip(f"no local Slurm cluster: {unavailable}")
    try:
        yield cluster
    finally:
        cluster.stop()
