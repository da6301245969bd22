"""The `posebert` command: exit codes and one-line errors, run as a user runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_sample

from data_shards.write import WriterConfig, write_split


def posebert(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "posebert", *args], capture_output=True, text=True, timeout=120
    )


@pytest.fixture(scope="module")
def shard_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    for split, n in (("train", 5), ("val", 2)):
        samples = [make_sample(key=f"{split}-{i}", seed=i, action="ab"[i % 2]) for i in range(n)]
        write_split(root, split, samples, {}, {}, WriterConfig(max_samples=2))
    return root


@pytest.mark.fault(
    "Command line",
    "bad arguments: --frames 0, --size abc, an unknown subcommand, no --out",
    injected="`python -m posebert shards ...` run with each",
)
@pytest.mark.parametrize(
    "args, needle",
    [
        (["shards", "synth", "--out", "x", "--frames", "0"], "--frames"),
        (["shards", "synth", "--out", "x", "--size", "abc"], "--size"),
        (["shards", "bogus"], "invalid choice"),
        (["shards", "synth"], "--out"),
    ],
)
def test_bad_arguments_give_one_line_and_exit_2(args, needle, observed):
    r = posebert(*args)
    assert r.returncode == 2
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
    assert needle in r.stderr
    observed(f"exit {r.returncode}: {r.stderr.strip()}")


def test_stats_counts_per_split_and_action(shard_root):
    r = posebert("shards", "stats", str(shard_root))
    assert r.returncode == 0, r.stderr
    assert "train: 5 windows x 2 views x 4 frames = 40 frames" in r.stdout
    line_a = next(line for line in r.stdout.splitlines() if line.startswith("a "))
    assert line_a.split()[1:] == ["3", "1"]


@pytest.mark.fault(
    "Writing and verifying",
    "`posebert shards verify` on a copy with a shard cut short",
    injected="the last 3000 bytes of one shard of a copy cut off",
)
def test_verify_passes_then_fails_loudly_on_a_damaged_copy(shard_root, tmp_path, observed):
    assert posebert("shards", "verify", str(shard_root)).returncode == 0
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(shard_root, copy)
    shard = copy / "train" / "shard-000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    r = posebert("shards", "verify", str(copy))
    assert r.returncode == 1
    assert "train/shard-000001.tar" in r.stderr
    lines = r.stderr.strip().splitlines()
    observed(f"exit {r.returncode}, {len(lines)} line(s): " + " / ".join(lines))


@pytest.mark.fault(
    "Command line",
    "a missing input directory",
    injected="`posebert shards stats` on a path that does not exist",
)
def test_missing_input_is_one_line(tmp_path, observed):
    r = posebert("shards", "stats", str(tmp_path / "nope"))
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()]
    assert "no such directory" in r.stderr
    observed(f"exit {r.returncode}: {r.stderr.strip()}")


@pytest.mark.fault(
    "Ingest",
    "a missing video file given to `posebert shards video`",
    injected="the command run on a path that does not exist (after a good run)",
)
def test_video_command_end_to_end(tmp_path, observed):
    sys.path.insert(0, str(Path(__file__).parent / "data_shards"))
    from test_video import write_mp4

    files = [str(write_mp4(tmp_path / f"{n}.mp4", 24)) for n in ("a", "b")]
    out = tmp_path / "out"
    r = posebert("shards", "video", *files, "--out", str(out), "--frames", "8", "--size", "32")
    assert r.returncode == 0, r.stderr
    assert "train: 6 windows" in r.stdout  # 2 files x 24 frames / 8
    assert posebert("shards", "verify", str(out)).returncode == 0
    r = posebert("shards", "video", str(tmp_path / "nope.mp4"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "nope.mp4" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    observed(f"exit {r.returncode}: {r.stderr.strip()}")


def test_h36m_command_end_to_end(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent / "data_shards"))
    from h36m_fixture import make_h36m_fixture

    fx = make_h36m_fixture(tmp_path / "h36m", {"S1": ("Walking 1",), "S9": ("Walking 1",)})
    out = tmp_path / "out"
    r = posebert(
        "shards",
        "h36m",
        "--npz3d",
        str(fx.npz3d),
        "--npz2d",
        str(fx.npz2d),
        "--frames-dir",
        str(fx.frames_dir),
        "--cameras",
        str(fx.cameras_json),
        "--out",
        str(out),
        "--frames",
        "8",
        "--size",
        "64",
    )
    assert r.returncode == 0, r.stderr
    assert "train: 5 windows" in r.stdout and "val: 5 windows" in r.stdout
    assert posebert("shards", "verify", str(out)).returncode == 0


def test_synth_appearances_per_sample_become_extra_views(tmp_path):
    r = posebert("shards", "synth", "--out", str(tmp_path), "--clips", "walk,run", "--views", "2",
                 "--frames", "4", "--size", "32", "--appearances-per-sample", "2")  # fmt: skip
    assert r.returncode == 0, r.stderr
    from data_shards.manifest import Manifest
    from data_shards.read import ReaderConfig, ShardReader

    assert Manifest.load(tmp_path / "train").views == 4
    config = ReaderConfig(str(tmp_path / "train"), batch_size=1, shuffle=False, frames="off")
    meta = next(iter(ShardReader(config, 0, 1)))["meta"][0]
    cams = [v.camera for v in meta.views]
    looks = [v.appearance for v in meta.views]
    assert cams[:2] == cams[2:] and looks[0] != looks[2]  # each camera twice, in two appearances


def test_shard_writing_takes_set_overrides_and_names_a_bad_field(tmp_path):
    r = posebert("shards", "synth", "--out", str(tmp_path), "--clips", "walk,run", "--views", "1",
                 "--frames", "4", "--size", "32", "--set", "writer.max_samples=3",
                 "--set", "source.crop_margin=0.3")  # fmt: skip
    assert r.returncode == 0, r.stderr
    from data_shards.manifest import Manifest

    manifest = Manifest.load(tmp_path / "train")
    assert max(s.samples for s in manifest.shards) == 3 and len(manifest.shards) > 1
    bad = posebert("shards", "synth", "--out", str(tmp_path / "b"), "--set", "source.margin=1")
    assert bad.returncode == 2 and "source.margin: unknown field" in bad.stderr
    assert len(bad.stderr.strip().splitlines()) == 1
    listed = posebert("shards", "video", "x.mp4", "--out", str(tmp_path / "v"), "--set", "help")
    assert listed.returncode == 0 and "source.crop_box = None" in listed.stdout


def test_render_video_writes_a_video_and_its_truth(tmp_path):
    out = tmp_path / "dance.mp4"
    r = posebert("shards", "render-video", "dance_b", "--out", str(out), "--set", "max_frames=6",
                 "--set", "size=[96,64]")  # fmt: skip
    assert r.returncode == 0, r.stderr
    import av
    import numpy as np

    with av.open(str(out)) as video:
        frames = [f.to_ndarray(format="rgb24") for f in video.decode(video=0)]
    assert len(frames) == 6 and frames[0].shape == (64, 96, 3)
    truth = np.load(f"{out}.truth.npz")
    assert truth["joints_3d"].shape == (6, 17, 3) and float(truth["fps"]) == 25.0
    bad = posebert("shards", "render-video", "nope", "--out", str(tmp_path / "x.mp4"))
    assert bad.returncode == 2 and "unknown clip 'nope'" in bad.stderr
    assert not (tmp_path / "x.mp4").exists()
