"""Pose-GPT future prediction: schedules, clip stitching, baselines, the no-ground-truth-after-
seed guarantee, bad input, and a short end-to-end run on tiny shards."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from conftest import make_sample

import data_shards.schema as schema
import finetune.heads.future as fut
from data_shards.manifest import Manifest
from data_shards.skeleton import NUM_JOINTS
from data_shards.write import write_split
from finetune.clips import read_motion, stitch_windows
from finetune.heads.future import Clip, FutureConfig
from finetune.loop import OptimConfig
from pretrain.engine.schedules import LRSchedule

FPS = 50.0
T = 16  # frames per shard window (stride T / 2, as synth writes them)
AREA = "Fine-tuning heads and the demo"  # of docs/reliability.md (tests/faultlog.py)
SHORT = "held-out clips too short for the shortest horizon; train clips too short for a window"


def moving_clip(frames: int, phase: float = 0.0) -> np.ndarray:
    """(frames, J, 3) mm: a rest pose whose joints swing (sinusoids) while the root walks."""
    rng = np.random.default_rng(0)
    rest = rng.normal(size=(NUM_JOINTS, 3)) * 300.0
    rest[0] = 0.0
    t = np.arange(frames)[:, None, None] / FPS
    freq = rng.uniform(0.5, 1.5, size=(1, NUM_JOINTS, 3))
    swing = 80.0 * np.sin(2 * np.pi * freq * t + phase)
    swing[:, 0] = 0.0
    root = np.zeros((frames, 1, 3))
    root[:, 0, 0] = 1500.0 * t[:, 0, 0]  # 1.5 m/s along x
    root[:, 0, 2] = 900.0
    return (rest + swing + root).astype(np.float32)


def clip_samples(name: str, poses: np.ndarray, scales: bool = False) -> list[schema.Sample]:
    """Windows of T frames every T / 2 (the last aligned to the end), like synth; with
    ``scales`` each window gets its own body-height factor, as synth renders them."""
    n = len(poses)
    starts = sorted({*range(0, n - T + 1, T // 2), n - T})
    out = []
    for i, s in enumerate(starts):
        sample = make_sample(key=f"{name}-w{s:03d}", views=1, frames=T, size=(8, 8), seed=i,
                             action=name)  # fmt: skip
        sample.meta.frames = list(range(s, s + T))
        scale = 1.0 + 0.05 * ((i % 3) - 1) if scales else 1.0
        sample.pose3d = (poses[s : s + T] * scale).astype(np.float32)
        out.append(sample)
    return out


def write_clips(root, split: str, clips: dict[str, np.ndarray], scales: bool = False) -> None:
    samples = [s for name, poses in clips.items() for s in clip_samples(name, poses, scales)]
    rng = np.random.default_rng(1)
    write_split(root, split, [samples[i] for i in rng.permutation(len(samples))], {}, {})


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("future-shards")
    write_clips(root, "train", {f"train{i}": moving_clip(64, phase=i) for i in range(5)},
                scales=True)  # fmt: skip
    write_clips(root, "val", {"short": moving_clip(24, 1.0), "long": moving_clip(40, 2.0)})
    write_clips(root, "test", {"mid": moving_clip(32, 3.0)})
    return root


def quick(**overrides) -> FutureConfig:
    fields = {"horizons_ms": (80, 160, 320), "eval_stride": 4, **overrides}
    return dataclasses.replace(fut.RECIPES["quick"](), **fields)


def small_model(cfg: FutureConfig, max_frames: int = 26) -> fut.PoseGPT:
    torch.manual_seed(0)
    model = fut.PoseGPT(cfg, max_frames, FPS)
    torch.nn.init.normal_(model.head.weight, std=0.02)  # not the zero-velocity start
    return model.eval()


# ----------------------------------------------------------------------------- schedules


def test_sampling_share_is_a_ramp_of_the_step():
    cfg = FutureConfig(steps=100, sampling_max=0.6, sampling_ramp=(0.2, 0.8))
    shares = [fut.sampling_share(s, cfg) for s in range(101)]
    assert shares[0] == shares[20] == 0.0
    assert shares[50] == pytest.approx(0.3)
    assert shares[80] == shares[100] == pytest.approx(0.6)
    assert all(a <= b for a, b in zip(shares, shares[1:], strict=False))
    assert fut.sampling_share(50, cfg) == shares[50]  # a pure function: same step, same value


def test_learning_rate_warms_up_then_decays():
    """The pretraining schedule (one implementation): warm-up, cosine to 10%."""
    cfg = FutureConfig(steps=100, optim=OptimConfig(lr=1e-3, schedule=LRSchedule(warmup_steps=9)))
    lrs = [cfg.optim.schedule.lr(s, cfg.optim.lr, cfg.steps) for s in range(100)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:], strict=False))
    assert lrs[-1] == pytest.approx(1e-4, rel=0.01)


def test_horizons_round_to_frames():
    assert fut.horizon_frames((80, 160, 320, 400, 560, 1000), 50) == (4, 8, 16, 20, 28, 50)
    assert fut.horizon_frames((80, 1000), 30) == (2, 30)
    with pytest.raises(ValueError, match="under one frame"):
        fut.horizon_frames((10,), 25)


@pytest.mark.parametrize("bad", [{"seed_frames": 1}, {"horizons_ms": ()}, {"width": 130},
                                 {"sampling_max": 1.5}, {"eval_splits": ("train",)},
                                 {"damping": 1.0}, {"speed": (1.2, 0.8)},
                                 {"residual_shares": (0.5, 2.0)},
                                 # sizes that allocate are bounded (issue 16)
                                 {"seed_frames": 1025}, {"horizons_ms": (80, 60_001)},
                                 {"layers": 65}, {"heads": 256, "width": 512},
                                 {"width": 16384, "heads": 4}, {"batch_size": 4097},
                                 {"rollout_frames": 10**6},
                                 {"layers": 64, "width": 4096}])  # fmt: skip
def test_config_refuses_bad_values(bad):
    with pytest.raises(ValueError, match=f"FutureConfig.{next(iter(bad))}") as err:
        FutureConfig(**bad)
    assert "\n" not in str(err.value)


def test_config_bounds_admit_their_limits():
    FutureConfig(seed_frames=1024, horizons_ms=(60_000,), heads=128, width=8192, layers=2,
                 batch_size=4096, rollout_frames=4096)  # fmt: skip


# ----------------------------------------------------------------------------- data


def test_stitch_rebuilds_a_clip_from_overlapping_rescaled_windows():
    poses = moving_clip(40)
    windows = [(s.meta.frames, s.pose3d) for s in clip_samples("c", poses, scales=True)]
    runs = stitch_windows(windows[::-1])  # any order
    assert len(runs) == 1 and runs[0][0] == 0
    first_scale = windows[0][1][0, 1, 0] / poses[0, 1, 0]
    np.testing.assert_allclose(runs[0][1], poses * first_scale, rtol=1e-5, atol=1e-3)


def test_stitch_splits_at_a_gap():
    poses = moving_clip(48)
    windows = [(s.meta.frames, s.pose3d) for s in clip_samples("c", poses)]
    kept = [w for w in windows if w[0][0] not in (16, 24)]  # frames 24..31 never seen
    runs = stitch_windows(kept)
    assert [(first, len(p)) for first, p in runs] == [(0, 24), (32, 16)]
    np.testing.assert_allclose(runs[1][1], poses[32:], atol=1e-3)


def test_read_clips_from_shards(shards):
    clips = read_motion(shards / "val", "val")
    assert sorted((c.name, len(c.poses)) for c in clips) == [("long", 40), ("short", 24)]
    long = next(c for c in clips if c.name == "long")
    np.testing.assert_allclose(long.poses, moving_clip(40, 2.0), atol=1e-3)


# ----------------------------------------------------------------------------- baselines


def test_baselines_exact_on_static_and_linear_motion():
    seed_static = np.repeat(moving_clip(1), 10, axis=0)
    np.testing.assert_array_equal(fut.zero_velocity(seed_static, 5)[-1], seed_static[-1])
    line = moving_clip(1) + np.arange(15)[:, None, None] * np.array([3.0, -2.0, 1.0])
    pred = fut.constant_velocity(line[:10], 5)
    np.testing.assert_allclose(pred, line[10:], atol=1e-4)
    assert np.abs(fut.zero_velocity(line[:10], 5) - line[10:]).max() > 1


def test_evaluate_scores_baselines_by_hand():
    cfg = quick(eval_splits=("val",), eval_stride=100)  # one window
    pose = moving_clip(1)[0]
    limb = np.zeros_like(pose)
    limb[5] = [4.0, 0.0, 0.0]  # only the left knee moves, 4 mm per frame
    clip = (pose + np.arange(30)[:, None, None] * limb).astype(np.float32)
    model = small_model(cfg)
    result = fut.evaluate(model, [Clip("val", "lin", 0, clip)], cfg, FPS)
    rows = result["rows"]
    for ms, h in (("80", 4), ("160", 8), ("320", 16)):
        assert rows["constant-velocity"]["val"][ms] == pytest.approx(0.0, abs=1e-3)
        assert rows["zero-velocity"]["val"][ms] == pytest.approx(4.0 * h / NUM_JOINTS, abs=0.006)
        assert result["n"]["val"][ms] == 1 and result["n"]["all"][ms] == 1


# ----------------------------------------------------------------------------- no ground truth


def test_forecast_never_sees_ground_truth_after_the_seed(monkeypatch):
    cfg = quick()
    model = small_model(cfg)
    windows = np.stack([moving_clip(26, p) for p in (0.0, 1.0, 2.0)])
    hidden = windows.copy()
    hidden[:, cfg.seed_frames :] = np.nan  # the future, unknowable
    pred = fut.forecast_windows(model, windows, cfg.seed_frames, 16, FPS)
    blind = fut.forecast_windows(model, hidden, cfg.seed_frames, 16, FPS)
    assert np.isfinite(blind).all()
    np.testing.assert_array_equal(pred, blind)
    assert np.abs(pred[:, -1] - pred[:, 0]).max() > 1  # it does forecast motion

    seen = []
    real = fut.forecast

    def spy(model, seed, horizon):
        seen.append(seed.clone())
        return real(model, seed, horizon)

    import finetune.heads.future.run as future_run

    monkeypatch.setattr(future_run, "forecast", spy)  # where forecast_windows looks it up
    clip = Clip("val", "c", 0, moving_clip(40))
    fut.evaluate(model, [clip], cfg, FPS)
    assert seen and all(s.shape[1] == cfg.seed_frames for s in seen)


def test_cached_forecast_matches_recomputing_from_scratch():
    cfg = quick()
    model = small_model(cfg)
    seed = fut.pose_features(torch.from_numpy(moving_clip(10)[None]).double(), FPS).float()
    cached = fut.forecast(model, seed, 8)
    x = seed
    with torch.no_grad():
        for _ in range(8):
            pred, _ = model(x)
            x = torch.cat([x, pred[:, -1:]], dim=1)
    torch.testing.assert_close(cached, x[:, 10:], atol=1e-5, rtol=1e-4)


# ----------------------------------------------------------------------------- bad input


@pytest.mark.fault(AREA, SHORT, injected="a 12-frame held-out clip evaluated at 80-320 ms")
def test_clips_too_short_for_any_horizon(observed):
    cfg = quick()
    with pytest.raises(ValueError, match="shortest horizon") as err:
        fut.evaluate(small_model(cfg), [Clip("val", "c", 0, moving_clip(12))], cfg, FPS)
    observed(str(err.value))


@pytest.mark.fault(AREA, SHORT, injected="a 1200 ms horizon for 64-frame train clips at 50 fps")
def test_train_clips_too_short(shards, tmp_path, observed):
    with pytest.raises(ValueError, match="training window") as err:
        fut.run_future(shards, tmp_path, quick(horizons_ms=(80, 1200)), progress=False)
    observed(str(err.value))


@pytest.mark.fault(
    AREA,
    "an empty split; an eval split that does not exist (`finetune future`)",
    injected="a manifest with no shards; eval_splits=('dev',)",
)
def test_empty_and_missing_splits(shards, tmp_path, observed):
    (tmp_path / "val").mkdir()
    Manifest("val", [], views=1, frames=T, image_size=(8, 8), fps=FPS, has={}).save(
        tmp_path / "val"
    )
    with pytest.raises(ValueError, match="empty") as empty:
        read_motion(tmp_path / "val", "val")
    with pytest.raises(ValueError, match="no 'dev' split") as missing:
        fut.run_future(shards, tmp_path, quick(eval_splits=("dev",)), progress=False)
    observed(str(empty.value))
    observed(str(missing.value))


@pytest.mark.fault(
    AREA,
    "shards whose pose3d has 16 joints (a writer that does not validate)",
    injected="one sample with 16 joints written with schema.validate switched off",
)
def test_wrong_joint_count_is_one_clear_error(tmp_path, monkeypatch, observed):
    sample = clip_samples("c", moving_clip(16))[0]
    sample.pose3d = sample.pose3d[:, :16]
    with monkeypatch.context() as m:  # a writer that does not validate
        m.setattr(schema, "validate", lambda s: None)
        write_split(tmp_path, "val", [sample], {}, {})
    with pytest.raises(ValueError, match=r"split 'val'.*pose3d.*\(16, 16, 3\)") as err:
        read_motion(tmp_path / "val", "val")
    observed(str(err.value))


# ----------------------------------------------------------------------------- end to end


def test_run_future_end_to_end(shards, tmp_path):
    cfg = quick(steps=40)
    result = fut.run_future(shards, tmp_path, cfg, progress=False)
    for name in ("future.json", "future.md", "future.png", fut.WEIGHTS, fut.CONFIG):
        assert (tmp_path / name).stat().st_size > 0
    assert json.loads((tmp_path / "future.json").read_text()) == result
    p = result["protocol"]
    assert p["horizons_frames"] == [4, 8, 16] and p["fps"] == FPS
    # val "short" (24 frames) allows 80 and 160 ms, not 320 ms (26 frames)
    assert p["n"]["val"]["320"] < p["n"]["val"]["80"]
    assert set(result["rows"]) == set(fut.METHODS)
    assert result["training"]["loss_last10"] < result["training"]["loss_first10"]
    chosen = result["training"]["selected"]  # chosen on two train clips held out of training
    assert result["training"]["selection_clips"] == ["train1", "train3"]
    assert result["training"]["train_clips"] == 3
    assert chosen["step"] % cfg.select_every == 0 or chosen["step"] == cfg.steps
    assert chosen["residual_share"] in cfg.residual_shares and chosen["score"] > 0
    table = (tmp_path / "future.md").read_text()
    assert "| pose-gpt |" in table and "320 ms" in table
    from finetune.report.samples import read_samples

    samples = read_samples(tmp_path, "future")  # forecast strips for the report
    assert samples["seed"].shape[1:] == (cfg.seed_frames, NUM_JOINTS, 3)
    assert samples["pred"].shape == samples["true"].shape and samples["fps"] == FPS
    np.testing.assert_allclose(samples["true"][:, :, 0], 0, atol=1e-3)  # root-relative
    model = fut.load_model(tmp_path)
    assert float(model.residual) == chosen["residual_share"]  # the choice is saved with it
    windows = np.stack([moving_clip(26)])
    assert np.isfinite(fut.forecast_windows(model, windows, 10, 16, FPS)).all()


# ----------------------------------------------------------------------------- training paths


def test_untrained_model_is_the_damped_mean_reverting_baseline():
    """With the transformer's output at zero, each coordinate continues ``damping`` of its
    last step and moves ``reversion`` of the way back to the mean seed pose, every frame."""
    cfg = quick(damping=0.6, reversion=0.05)
    torch.manual_seed(0)
    model = fut.PoseGPT(cfg, 26, FPS).eval()
    poses = moving_clip(10)
    seed = fut.pose_features(torch.from_numpy(poses[None]).double(), FPS).float()
    pred = fut.feature_pose_mm(fut.forecast(model, seed, 8))[0].numpy()
    relative = poses - poses[:, :1]
    anchor, x, step = relative.mean(axis=0), relative[-1], relative[-1] - relative[-2]
    expected = []
    for _ in range(8):
        nxt = x + 0.6 * step + 0.05 * (anchor - x)
        step, x = nxt - x, nxt
        expected.append(x)
    np.testing.assert_allclose(pred, np.stack(expected), atol=0.05)


def test_zero_shares_start_as_zero_velocity():
    cfg = quick(damping=0.0, reversion=0.0)
    model = fut.PoseGPT(cfg, 26, FPS).eval()
    seed = fut.pose_features(torch.from_numpy(moving_clip(10)[None]).double(), FPS).float()
    pred = fut.forecast(model, seed, 5)
    assert model.damping is None and model.reversion is None
    torch.testing.assert_close(pred[..., :-3], seed[:, -1:, :-3].expand(1, 5, -1))


def test_scheduled_sampling_replaces_the_share_after_the_seed_with_predictions():
    cfg = quick()
    model = small_model(cfg)
    x = fut.pose_features(torch.from_numpy(np.stack([moving_clip(26, p) for p in (0.0, 1.0)]))
                          .double(), FPS).float()  # fmt: skip
    gen = torch.Generator().manual_seed(0)
    assert fut.scheduled_inputs(model, x, 0.0, cfg.seed_frames, gen) is x
    mixed = fut.scheduled_inputs(model, x, 1.0, cfg.seed_frames, gen)
    with torch.no_grad():
        pred, _ = model(x[:, :-1])
    torch.testing.assert_close(mixed[:, : cfg.seed_frames], x[:, : cfg.seed_frames])
    torch.testing.assert_close(mixed[:, cfg.seed_frames :], pred[:, cfg.seed_frames - 1 :])
    half = fut.scheduled_inputs(model, x, 0.5, cfg.seed_frames, gen)
    swapped = (half != x).any(-1)[:, cfg.seed_frames :].float().mean()
    assert 0.2 < swapped < 0.8


def test_training_uses_the_scheduled_share_of_each_step_and_the_rollout(shards, monkeypatch):
    """The share passed to scheduled sampling is sampling_share(step) (a pure function of the
    step: the same on a rerun), and the rollout loss runs every rollout_every steps, feeding
    gradients through the model's own forecasts."""
    import importlib

    future_train = importlib.import_module("finetune.heads.future.train")  # not the function
    cfg = quick(steps=12, sampling_ramp=(0.0, 0.5), sampling_max=1.0, rollout_weight=1.0,
                rollout_frames=5, rollout_every=3, select_clips=0)  # fmt: skip
    shares, rollouts = [], []
    real_inputs, real_rollout = future_train.scheduled_inputs, future_train.rollout

    def spy_inputs(model, x, share, seed_frames, gen):
        shares.append(share)
        return real_inputs(model, x, share, seed_frames, gen)

    def spy_rollout(model, seed, horizon):
        out = real_rollout(model, seed, horizon)
        rollouts.append((seed.shape[1], horizon, out.requires_grad))
        return out

    monkeypatch.setattr(future_train, "scheduled_inputs", spy_inputs)
    monkeypatch.setattr(future_train, "rollout", spy_rollout)
    clips = read_motion(shards / "train", "train")
    torch.manual_seed(0)
    model = fut.PoseGPT(cfg, cfg.seed_frames + 16, FPS)
    history, chosen = fut.train(model, clips, cfg, FPS, progress=False)
    assert shares == [fut.sampling_share(i, cfg) for i in range(12)] and shares[-1] == 1.0
    assert rollouts == [(cfg.seed_frames, 5, True)] * 4  # steps 0, 3, 6, 9
    assert [r["step"] for r in history if "rollout_m" in r] == [0, 3, 6, 9]
    assert chosen == {"step": 12, "residual_share": 1.0, "score": None}


def test_selection_keeps_the_best_step_and_share(shards):
    """A score that prefers no transformer at all keeps step 0's weights with share 0."""
    cfg = quick(steps=6, select_every=2, select_clips=0)
    clips = read_motion(shards / "train", "train")
    torch.manual_seed(0)
    model = fut.PoseGPT(cfg, cfg.seed_frames + 16, FPS)
    start = {k: v.clone() for k, v in model.state_dict().items()}
    _, chosen = fut.train(model, clips, cfg, FPS, progress=False,
                          score=lambda m: float(m.residual))  # fmt: skip
    assert chosen == {"step": 0, "residual_share": 0.0, "score": 0.0}
    assert float(model.residual) == 0.0
    for name, value in model.state_dict().items():
        if name != "residual":
            torch.testing.assert_close(value, start[name])


def test_held_out_selection_clips_are_evenly_spaced_and_leave_two():
    clips = [Clip("train", f"c{i:02d}", 0, moving_clip(30)) for i in range(11)]
    kept, held = fut.hold_out(clips, 2)
    assert [c.name for c in held] == ["c03", "c07"] and len(kept) == 9
    assert fut.hold_out(clips, 0) == (clips, [])
    copies = [Clip("train", f"c03~{tag}", 0, moving_clip(30)) for tag in ("mirror", "x0.8")]
    kept, held = fut.hold_out(clips + copies, 2)  # a held-out clip's copies are not trained on
    assert [c.name for c in held] == ["c03", "c07"] and len(kept) == 9
    with pytest.raises(ValueError, match="select_clips=10 leaves fewer than 2"):
        fut.hold_out(clips, 10)


def test_too_few_train_clips_to_hold_out_trains_on_all(shards, tmp_path, capsys):
    result = fut.run_future(shards, tmp_path, quick(steps=5, select_clips=4), progress=False)
    assert result["training"]["train_clips"] == 5 and result["training"]["selection_clips"] == []
    assert result["training"]["selected"]["step"] == 5
    assert "none held out" in capsys.readouterr().err


def test_speed_augmentation_resamples_windows():
    line = moving_clip(1) + np.arange(60)[:, None, None] * np.array([10.0, 0.0, 0.0])
    clip = Clip("train", "line", 0, line.astype(np.float32))
    gen = torch.Generator().manual_seed(0)
    fast = fut.random_windows([clip], 20, 32, gen, speed=(1.25, 1.25))
    step = (fast[:, 1:] - fast[:, :-1])[..., 0].double()  # (32, 19, J) mm per frame
    first = ((fast[:, 0, 0, 0] - line[0, 0, 0]) / 10.0).round()  # the window's first frame
    fits = first + 1.25 * 19 <= 59  # else the clip is too short at 1.25x: normal speed
    assert fits.any() and (~fits).any()
    torch.testing.assert_close(step[fits], torch.full_like(step[fits], 12.5), atol=1e-3, rtol=0)
    torch.testing.assert_close(step[~fits], torch.full_like(step[~fits], 10.0), atol=1e-3, rtol=0)
    too_long = fut.random_windows([clip], 55, 2, gen, speed=(1.25, 1.25))  # plays at 1x
    step = (too_long[:, 1:] - too_long[:, :-1])[..., 0].double()
    torch.testing.assert_close(step, torch.full_like(step, 10.0), atol=1e-3, rtol=0)
