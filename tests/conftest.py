"""Shared fixtures: small synthetic samples that follow the schema (no renderer needed), the
session's real Slurm cluster for the ``slurm`` tests, and one quick demo run shared by the tests
that need a real run."""

from __future__ import annotations

import dataclasses
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest

from data_shards.manifest import Manifest
from data_shards.schema import Meta, Sample, View, decode_sample
from data_shards.skeleton import NUM_JOINTS
from data_shards.tario import iter_tar_samples

pytest_plugins = ["faultlog"]  # the `fault` marker, `observed` and --fault-log


def make_sample(
    key: str = "test-clip-a0000-f00000",
    views: int = 2,
    frames: int = 4,
    size: tuple[int, int] = (32, 24),
    seed: int = 0,
    action: str = "walk",
    clip: str | None = None,
) -> Sample:
    """A random but schema-valid sample; the same arguments give the same arrays."""
    rng = np.random.default_rng(seed)
    W, H = size
    meta = Meta(
        source="test",
        clip=clip or action,
        action=action,
        fps=50.0,
        frames=list(range(frames)),
        views=[View(camera=f"cam{v}", appearance=seed) for v in range(views)],
        image_size=(W, H),
        has={p: True for p in ("frames", "masks", "pose3d", "pose2d", "cameras")},
        subject="s0",
    )
    # Smooth images: JPEG keeps them close, so round trips can be compared with a tolerance.
    yy, xx = np.mgrid[0:H, 0:W]
    base = rng.integers(0, 255, size=(views, frames, 1, 1, 3))
    frames_arr = np.clip(base + (xx + yy)[None, None, :, :, None], 0, 255).astype(np.uint8)
    Rt = np.concatenate([np.tile(np.eye(3), (views, 1, 1)), rng.normal(size=(views, 3, 1))], -1)
    return Sample(
        key=key,
        meta=meta,
        frames=frames_arr,
        masks=rng.random((views, frames, H, W)) > 0.5,
        pose3d=rng.normal(size=(frames, NUM_JOINTS, 3)).astype(np.float32) * 500,
        pose2d=rng.uniform(0, W, size=(views, frames, NUM_JOINTS, 2)).astype(np.float32),
        K=np.tile(np.eye(3, dtype=np.float32), (views, frames, 1, 1)),
        Rt=Rt,
    )


@pytest.fixture
def sample_factory():
    return make_sample


def read_split(split_dir: Path) -> list[Sample]:
    """Every sample of a split, decoded in file order (checks the manifest's count)."""
    manifest = Manifest.load(split_dir)
    samples = [
        decode_sample(raw)
        for info in manifest.shards
        for raw in iter_tar_samples(split_dir / info.name)
    ]
    assert len(samples) == manifest.samples
    return samples


# ------------------------------------------------------- a real Slurm cluster (marker "slurm")


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A real two-node Slurm cluster on loopback, one per session: started on first use
    (installing Debian's Slurm with apt when missing and allowed) and always stopped by its pid
    files at the end, whatever the tests did; a watchdog stops it too if the session dies first.
    Where it cannot run (not root, apt failed) the tests skip with the reason; under ``CI=true``
    that is a failure instead: CI must run them."""
    from localcluster import ClusterUnavailable, LocalCluster

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


@pytest.fixture(scope="session")
def lift_shards(tmp_path_factory) -> Path:
    """Real renders of the embedded motion, small: train walk + jump, val run, test dance_b,
    2 cameras, 8-frame windows at 64 px (about 15 s to render, once per session)."""
    from data_shards.synth import SynthConfig, build_splits

    root = tmp_path_factory.mktemp("lift_shards")
    splits = {"train": ("walk", "jump"), "val": ("run",), "test": ("dance_b",)}
    build_splits(root, SynthConfig(views=2, frames=8, size=64), splits=splits, progress=False)
    return root


# ------------------------------------------------- one real quick demo run, shared per session

ROOT = Path(__file__).resolve().parents[1]


@dataclasses.dataclass
class QuickDemo:
    out: Path
    """The run folder (``make demo OUT=...``)."""
    run: subprocess.CompletedProcess
    """The ``make demo`` process (text stdout / stderr)."""


@pytest.fixture(scope="session")
def quick_demo(tmp_path_factory) -> QuickDemo:
    """`make demo` in its quick form, as a new user runs it (a few minutes), once per session:
    the README test checks its table and its rerun, the report test pages it. Not checked here:
    each test asserts what it needs of it."""
    out = tmp_path_factory.mktemp("quick_demo")
    run = subprocess.run(
        ["make", "demo", f"OUT={out}", "DEMO_ARGS=--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return QuickDemo(out, run)


@pytest.fixture(scope="session")
def mediapipe():
    """The 2D detector, installed by `make install`; where it is not, tests that need it skip
    with the reason, except under CI=true, where that is a failure."""
    try:
        import mediapipe.python.solutions.pose  # noqa: F401
    except ImportError as e:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true and mediapipe is not installed: {e}", pytrace=False)
        pytest.skip(f"mediapipe not installed: {e}")
