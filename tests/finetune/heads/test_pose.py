"""The 3D pose regression head: labels, head, batches, scoring, and `run_pose` end to end."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_sample

from data_shards.camera import camera_root_relative
from data_shards.skeleton import NUM_JOINTS
from data_shards.write import write_split
from finetune.clips import labelled_subset
from finetune.evaluation.embed import Embeddings
from finetune.heads.pose import (
    FullConfig,
    PoseConfig,
    PoseHead,
    ProbeConfig,
    Windows,
    fit_probe,
    load_head,
    run_pose,
    scan_split,
    score,
)
from finetune.loop import OptimConfig
from pretrain.engine.schedules import LRSchedule

V, T = 2, 4


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture(scope="module")
def encoder_and_shards(tmp_path_factory):
    from pretrain.export import save_encoder
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    root = tmp_path_factory.mktemp("pose")
    for split, n, actions in (("train", 8, ("walk", "jump")), ("val", 2, ("run", "kick"))):
        samples = []
        for i in range(n):
            s = make_sample(key=f"{split}{i}", views=V, frames=T, size=(32, 32), seed=i + 20 * n,
                            action=actions[i % 2])  # fmt: skip
            s.Rt[1, :, :3] = _rotation(0.5 + i)
            samples.append(s)
        write_split(root / "shards", split, samples, {}, {})
    torch.manual_seed(0)
    model = PoseBERT(debug_cpu().model)
    save_encoder(model.state_dict(), model.cfg, root / "encoder", size=None)
    return root / "encoder", root / "shards"


def test_label_subsets_are_nested_seeded_and_never_empty():
    keys = [f"k{i:03d}" for i in range(200)]
    small, mid, full = (labelled_subset(keys, f, seed=3) for f in (0.01, 0.1, 1.0))
    assert len(small) == 2 and len(mid) == 20 and full == set(keys)
    assert small < mid < full
    assert labelled_subset(list(reversed(keys)), 0.1, seed=3) == mid  # order of reading is moot
    assert labelled_subset(keys, 0.1, seed=4) != mid
    assert len(labelled_subset(keys[:3], 0.01, seed=0)) == 1


def test_head_starts_as_the_mean_pose_and_standardises():
    feats = torch.randn(50, 6) * 5 + 3
    targets = torch.randn(50, NUM_JOINTS, 3)
    head = PoseHead(6)
    head.set_statistics(feats, targets)
    out = head(feats)
    assert out.shape == (50, NUM_JOINTS, 3)
    torch.testing.assert_close(out, targets.mean(0).expand_as(out))


def test_probe_learns_a_linear_map():
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(2000, 16, generator=gen)
    W = torch.randn(16, NUM_JOINTS * 3, generator=gen) * 0.05
    targets = (feats @ W).view(-1, NUM_JOINTS, 3)
    cfg = ProbeConfig(steps=300, optim=OptimConfig(lr=1e-2))
    head, history = fit_probe(feats, targets, cfg, seed=0)
    assert history[-1]["loss"] < 0.1 * history[0]["loss"]
    err = torch.linalg.vector_norm(head(feats) - targets, dim=-1).mean()
    assert err < 0.1 * torch.linalg.vector_norm(targets, dim=-1).mean()


def test_window_batches_keep_frames_and_targets_together():
    S, Vw, Tw = 3, 4, 6
    frames = torch.arange(S * Vw * Tw, dtype=torch.int64).view(S, Vw, Tw, 1, 1, 1)
    frames = frames.expand(S, Vw, Tw, 3, 2, 2).to(torch.uint8)
    targets = torch.arange(S * Vw * Tw, dtype=torch.float32).view(S, Vw, Tw, 1, 1)
    targets = targets.expand(S, Vw, Tw, NUM_JOINTS, 3)
    win = Windows(frames, None, targets)
    f, m, y = win.batch(5, 2, 3, torch.Generator().manual_seed(1))
    assert f.shape == (5, 2, 3, 3, 2, 2) and y.shape == (5, 2, 3, NUM_JOINTS, 3) and m is None
    torch.testing.assert_close(f[..., 0, 0, 0].float(), y[..., 0, 0])  # same (s, v, t) cell
    assert ((y[:, :, 1:, 0, 0] - y[:, :, :-1, 0, 0]) == 1).all()  # consecutive frames
    assert (y[:, 0, 0, 0, 0] != y[:, 1, 0, 0, 0]).all()  # two different views


def test_score_by_hand():
    rng = np.random.default_rng(0)
    n_seq, Tw = 4, 5
    target = rng.normal(size=(n_seq * Tw, NUM_JOINTS, 3)) * 300
    emb = Embeddings(
        vectors=np.zeros((n_seq * Tw, 2), np.float32), pose3d=target.astype(np.float32),
        keys=np.repeat([f"k{i}" for i in range(n_seq)], Tw),
        clips=np.repeat(["a", "a", "b", "b"], Tw),
        actions=np.repeat(["walk", "walk", "run", "run"], Tw),
        cameras=np.repeat(["c0"] * n_seq, Tw), views=np.zeros(n_seq * Tw, int),
        frames=np.tile(np.arange(Tw), n_seq),
    )  # fmt: skip
    pred = target + np.array([30.0, 40.0, 0.0])  # a constant 50 mm offset
    pred[emb.actions == "run"] += np.array([0.0, 0.0, 50.0])  # run: 50 mm more along z
    s = score(pred, emb, Tw)
    assert s["per_action"]["walk"]["mpjpe"] == pytest.approx(50.0)
    assert s["per_action"]["run"]["mpjpe"] == pytest.approx(np.sqrt(30**2 + 40**2 + 50**2))
    assert s["all"]["mpjve"] == pytest.approx(0.0, abs=1e-3)  # constant offsets: no velocity error
    assert s["all"]["p_mpjpe"] == pytest.approx(0.0, abs=1e-3)  # translation is aligned away
    assert s["all"]["frames"] == n_seq * Tw
    with pytest.raises(ValueError, match="whole windows"):
        score(pred[:-1], emb.subset(np.arange(n_seq * Tw - 1)), Tw)


def test_camera_root_relative_rotates_root_relative_poses():
    pose = np.random.default_rng(1).normal(size=(T, NUM_JOINTS, 3)) * 500
    Rt = np.zeros((2, 3, 4))
    Rt[0, :, :3], Rt[1, :, :3] = np.eye(3), _rotation(0.3)
    Rt[:, :, 3] = 1234.0  # translation cancels
    cam = camera_root_relative(pose, Rt)
    assert cam.shape == (2, T, NUM_JOINTS, 3)
    np.testing.assert_allclose(cam[0], pose - pose[:, :1])
    np.testing.assert_allclose(cam[1], (pose - pose[:, :1]) @ _rotation(0.3).T)


def test_run_pose_end_to_end(encoder_and_shards, tmp_path):
    encoder, shards = encoder_and_shards
    full = FullConfig(steps=3, windows=2, frames=3, optim=dataclasses.replace(
        FullConfig().optim, schedule=LRSchedule(warmup_steps=1)))  # fmt: skip
    cfg = PoseConfig(label_fractions=(0.25, 1.0), probe=ProbeConfig(steps=30), full=full,
                     batch_size=4)  # fmt: skip
    result = run_pose(encoder, shards, tmp_path / "out", cfg, progress=False)
    rows = result["rows"]
    combos = {(r["encoder"], r["mode"], r["labels"]) for r in rows}
    assert combos == {(e, m, f) for e in ("pretrained", "random-init") for m in ("probe", "full")
                      for f in (0.25, 1.0)} | {("mean pose", "-", 1.0)}  # fmt: skip
    assert {r["labelled_windows"] for r in rows if r["labels"] == 0.25} == {2}
    for r in rows:
        assert set(r["per_action"]) == {"run", "kick"}
        assert all(np.isfinite(r["all"][m]) and r["all"][m] >= 0 for m in ("mpjpe", "mpjve"))
        assert r["all"]["frames"] == 2 * V * T
    saved = json.loads((tmp_path / "out" / "pose.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(rows))
    assert "| pretrained | probe | 25% | 2 |" in (tmp_path / "out" / "pose.md").read_text()
    assert (tmp_path / "out" / "pose.png").stat().st_size > 10_000
    assert scan_split(shards / "train").keys == [f"train{i}" for i in range(8)]
    for r in rows[:-1]:  # every trained row logged its steps and was saved
        assert (tmp_path / "out" / "heads" / r["weights"]).is_file()
    from finetune.report.samples import read_samples

    samples = read_samples(tmp_path / "out", "pose")  # the best row's frames, for the report
    best = min(rows[:-1], key=lambda r: r["all"]["mpjpe"])
    assert samples["label"] == f"{best['encoder']} {best['mode']} {best['labels']:.0%}"
    assert samples["pred"].shape == samples["true"].shape == (8, NUM_JOINTS, 3)
    logs = sorted(p.parent.name for p in (tmp_path / "out" / "logs").glob("*/metrics.jsonl"))
    assert len(logs) == 8 and "pretrained-probe-25pct" in logs


def test_saved_rows_load_back_and_predict_what_was_scored(encoder_and_shards, tmp_path):
    """A probe row and a full row, reloaded from OUT/heads, give back their scored errors."""
    from finetune.evaluation.embed import embed_split

    encoder, shards = encoder_and_shards
    full = FullConfig(steps=2, windows=2, frames=3)
    cfg = PoseConfig(label_fractions=(1.0,), probe=ProbeConfig(steps=10), full=full, batch_size=4)
    rows = run_pose(encoder, shards, tmp_path, cfg, progress=False)["rows"]
    for row in (r for r in rows if r["encoder"] == "pretrained"):
        predictor = load_head(tmp_path / "heads" / row["weights"])
        emb = embed_split(predictor, shards / "val", 4, normalize=False, progress=False)
        again = score(emb.vectors.reshape(-1, NUM_JOINTS, 3), emb, T)
        assert again["all"]["mpjpe"] == pytest.approx(row["all"]["mpjpe"], rel=1e-5), row["mode"]
    with pytest.raises(FileNotFoundError, match="not a saved pose head"):
        load_head(tmp_path / "heads" / "nope")


@pytest.mark.fault(
    "Fine-tuning heads and the demo",
    "the pose head given an eval split that is not there, a folder that is not an exported "
    "encoder, label fraction 0, an unknown mode, 0 steps",
    injected="run_pose / PoseConfig / FullConfig called with each",
)
def test_bad_input_is_one_clear_error(encoder_and_shards, tmp_path, observed):
    encoder, shards = encoder_and_shards
    with pytest.raises(ValueError, match="no 'test' split") as err:
        run_pose(encoder, shards, tmp_path, PoseConfig(eval_split="test"), progress=False)
    observed(str(err.value))
    with pytest.raises(FileNotFoundError, match="not an exported encoder") as err:
        run_pose(tmp_path, shards, tmp_path / "o", PoseConfig(), progress=False)
    observed(str(err.value))
    with pytest.raises(ValueError, match="label_fractions") as err:
        PoseConfig(label_fractions=(0.0, 1.0))
    observed(str(err.value))
    with pytest.raises(ValueError, match="modes") as err:
        PoseConfig(modes=("linear",))
    observed(str(err.value))
    with pytest.raises(ValueError, match="steps must be >= 1") as err:
        FullConfig(steps=0)
    observed(str(err.value))
    with pytest.raises(dataclasses.FrozenInstanceError):
        PoseConfig().seed = 3  # type: ignore[misc]
