"""`tcn` (VideoPose3D): receptive fields, shapes, causality, the strided 1-frame model, the
checkpoint import, training on real shards and the semi-supervised objective."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from finetune.clips import Sequence, read_splits
from finetune.heads.lift import tcn
from finetune.heads.lift.base import LiftData, labelled_clips
from finetune.heads.lift.videopose3d import (
    TCNShape,
    TemporalModel,
    TemporalModelOptimized1f,
    load_videopose3d,
    pad_sequence,
)


def _trained_bn(model: torch.nn.Module, rf: int) -> torch.nn.Module:
    """A few train-mode passes so batch norm's running statistics are not the identity."""
    torch.manual_seed(1)
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, rf + 4, 17, 2) * 2 + 0.3)
    return model.eval()


@pytest.mark.parametrize(("widths", "rf"), [((1, 1, 1), 1), ((3, 3, 3), 27), ((3,) * 5, 243)])
def test_receptive_fields_and_output_shapes(widths, rf):
    shape = TCNShape(filter_widths=widths, channels=8)
    model = TemporalModel(shape).eval()
    assert shape.receptive_field == model.receptive_field == rf
    assert model(torch.randn(2, rf + 13, 17, 2)).shape == (2, 14, 17, 3)
    strided = TemporalModelOptimized1f(shape).eval()
    assert strided(torch.randn(5, rf, 17, 2)).shape == (5, 1, 17, 3)
    traj = TemporalModel(TCNShape(joints_out=1, filter_widths=widths, channels=8)).eval()
    assert traj(torch.randn(1, rf, 17, 2)).shape == (1, 1, 1, 3)
    with pytest.raises(ValueError, match="receptive field"):
        model(torch.randn(1, rf - 1, 17, 2)) if rf > 1 else model(torch.randn(1, 0, 17, 2))


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("widths", [(3, 3, 3), (3,) * 5, (3, 5)])
def test_strided_single_frame_model_matches_the_dilated_one(widths, causal):
    shape = TCNShape(filter_widths=widths, channels=16, causal=causal)
    dilated = _trained_bn(TemporalModel(shape), shape.receptive_field)
    strided = TemporalModelOptimized1f(shape)
    strided.load_state_dict(dilated.state_dict())  # one state dict for both
    strided.eval()
    x = torch.randn(2, shape.receptive_field + 6, 17, 2)
    with torch.no_grad():
        seq = dilated(x)
        one = torch.cat([strided(x[:, t : t + shape.receptive_field]) for t in range(7)], 1)
    torch.testing.assert_close(one, seq, rtol=1e-5, atol=1e-5)


def _sequence(pose2d: np.ndarray) -> Sequence:
    n = len(pose2d)
    K = np.tile(np.array([[200, 0, 64], [0, 200, 64], [0, 0, 1]], np.float32), (n, 1, 1))
    return Sequence("val", "c", "a", "cam0", 0, 25.0, (128, 128), pose2d.astype(np.float32),
                    np.zeros((n, 17, 3), np.float32), K)  # fmt: skip


@pytest.mark.parametrize("causal", [True, False])
def test_causal_predictions_never_read_future_frames(causal):
    config = tcn.TCNConfig(filter_widths=(3, 3), channels=16, causal=causal)
    model = _trained_bn(TemporalModel(config.shape()), 9)
    fitted = tcn.FittedTCN(model, None, config, [])
    rng = np.random.default_rng(0)
    x = rng.uniform(20, 100, (30, 17, 2))
    t = 14
    later = x.copy()
    later[t + 1 :] += rng.normal(0, 10, later[t + 1 :].shape)
    a, b = fitted.predict("val", [_sequence(x), _sequence(later)])
    assert a.shape == b.shape == (30, 17, 3)  # a prediction for every frame (edge padding)
    assert not np.allclose(a[t + 1 :], b[t + 1 :])
    if causal:
        np.testing.assert_array_equal(a[: t + 1], b[: t + 1])
    else:  # the centred model looks 4 frames ahead
        assert not np.allclose(a[t], b[t])
        np.testing.assert_array_equal(a[: t - 3], b[: t - 3])


def test_replicate_padding():
    x = np.arange(5, dtype=np.float32)[:, None]
    np.testing.assert_array_equal(pad_sequence(x, 5)[:, 0], [0, 0, 0, 1, 2, 3, 4, 4, 4])
    np.testing.assert_array_equal(pad_sequence(torch.from_numpy(x), 5, causal=True)[:, 0],
                                  [0, 0, 0, 0, 0, 1, 2, 3, 4])  # fmt: skip


# ---------------------------------------------------------------------- checkpoint import


def _videopose3d_state_dict(widths, channels, joints=17, with_counts=True) -> dict:
    """VideoPose3D's key layout written out from its model.py, with random tensors."""
    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g) * 0.2  # noqa: E731

    def bn(prefix: str) -> dict:
        out = {f"{prefix}.weight": 1 + rand(channels), f"{prefix}.bias": rand(channels),
               f"{prefix}.running_mean": rand(channels),
               f"{prefix}.running_var": 0.5 + torch.rand(channels, generator=g)}  # fmt: skip
        if with_counts:
            out[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)
        return out

    sd = {"expand_conv.weight": rand(channels, joints * 2, widths[0]), **bn("expand_bn")}
    for i, w in enumerate(widths[1:]):
        sd[f"layers_conv.{2 * i}.weight"] = rand(channels, channels, w) / math.sqrt(channels)
        sd[f"layers_conv.{2 * i + 1}.weight"] = rand(channels, channels, 1) / math.sqrt(channels)
        sd.update(bn(f"layers_bn.{2 * i}") | bn(f"layers_bn.{2 * i + 1}"))
    sd.update({"shrink.weight": rand(joints * 3, channels, 1), "shrink.bias": rand(joints * 3)})
    return sd


def _reference(sd: dict, x: torch.Tensor, widths) -> torch.Tensor:
    """VideoPose3D's TemporalModel forward (eval), written functionally from the paper."""

    def bn(h, p):
        return F.batch_norm(h, sd[f"{p}.running_mean"], sd[f"{p}.running_var"],
                            sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5)  # fmt: skip

    h = x.flatten(2).transpose(1, 2)
    h = F.relu(bn(F.conv1d(h, sd["expand_conv.weight"]), "expand_bn"))
    dilation = widths[0]
    for i, w in enumerate(widths[1:]):
        pad = (w - 1) * dilation // 2
        res = h[:, :, pad : h.shape[2] - pad]
        h = F.relu(bn(F.conv1d(h, sd[f"layers_conv.{2 * i}.weight"], dilation=dilation),
                      f"layers_bn.{2 * i}"))  # fmt: skip
        h = res + F.relu(bn(F.conv1d(h, sd[f"layers_conv.{2 * i + 1}.weight"]),
                            f"layers_bn.{2 * i + 1}"))  # fmt: skip
        dilation *= w
    h = F.conv1d(h, sd["shrink.weight"], sd["shrink.bias"])
    return h.transpose(1, 2).reshape(x.shape[0], -1, 17, 3)


@pytest.mark.parametrize("widths", [(3, 3, 3), (3,) * 5])
def test_videopose3d_checkpoint_import(tmp_path, widths):
    sd = _videopose3d_state_dict(widths, channels=24, with_counts=widths == (3, 3, 3))
    path = tmp_path / "pretrained.bin"
    torch.save({"model_pos": sd, "epoch": 3}, path)
    from finetune import load_videopose3d as public

    model = public(path)
    assert not model.training and model.shape.filter_widths == widths
    assert (model.shape.channels, model.shape.joints_in, model.shape.joints_out) == (24, 17, 17)
    assert not model.shape.causal
    rf = math.prod(widths)
    x = torch.randn(2, rf + 5, 17, 2)
    ours = TemporalModel(TCNShape(filter_widths=widths, channels=24))
    ours.load_state_dict(sd, strict=False)
    with torch.no_grad():
        y = model(x)
        assert y.shape == (2, 6, 17, 3)
        torch.testing.assert_close(y, ours.eval()(x))
        torch.testing.assert_close(y, _reference(sd, x, widths), rtol=1e-4, atol=1e-4)


def test_checkpoint_with_the_real_files_extra_entries_loads(tmp_path):
    sd = _videopose3d_state_dict((3, 3), channels=8)
    traj = _videopose3d_state_dict((3, 3), channels=8, joints=17)
    traj["shrink.weight"], traj["shrink.bias"] = torch.randn(3, 8, 1), torch.randn(3)
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(2))], amsgrad=True).state_dict()
    path = tmp_path / "full.bin"
    torch.save({"epoch": 80, "lr": 0.00075, "optimizer": opt, "model_pos": sd,
                "model_traj": traj, "random_state": np.random.RandomState(1234).get_state()},
               path)  # fmt: skip
    assert load_videopose3d(path).receptive_field == 9
    assert load_videopose3d(path, key="model_traj").shape.joints_out == 1


_MARK = Path("/tmp/tcn_test_unpickled_code_ran")


def _side_effect() -> None:
    _MARK.write_text("ran")


class _Payload:
    def __reduce__(self):
        return (_side_effect, ())


@pytest.mark.fault(
    "Lifting heads and the ablation",
    "`load_videopose3d` on a pickle carrying code, a checkpoint without model_pos, a missing file",
    injected="torch.save of a state with an object whose __reduce__ writes a marker file; a "
    "file of {'epoch': 1}; a path that does not exist",
)
def test_a_file_holding_code_is_refused_in_one_line(tmp_path, observed):
    _MARK.unlink(missing_ok=True)
    path = tmp_path / "evil.bin"
    torch.save({"model_pos": _videopose3d_state_dict((3,), 8), "extra": _Payload()}, path)
    with pytest.raises(ValueError) as err:
        load_videopose3d(path)
    assert "\n" not in str(err.value) and "not a plain VideoPose3D checkpoint" in str(err.value)
    assert not _MARK.exists()
    observed(f"{err.value}; marker created: {_MARK.exists()}")
    torch.save({"epoch": 1}, tmp_path / "empty.bin")
    with pytest.raises(ValueError, match="no 'model_pos'") as err:
        load_videopose3d(tmp_path / "empty.bin")
    observed(str(err.value))
    with pytest.raises(ValueError, match="no such checkpoint file") as err:
        load_videopose3d(tmp_path / "missing.bin")
    observed(str(err.value))


def _huge_stride0(sd: dict) -> dict:
    """20,000 channels claimed by stride-0 tensors: a few stored bytes, 4.8 GB per layer."""
    sd = dict(sd)
    sd["expand_conv.weight"] = torch.zeros(1).expand(20000, 34, 3)
    sd["layers_conv.0.weight"] = torch.zeros(1).expand(20000, 20000, 3)
    return sd


def _shrunk_record(path: Path) -> None:
    """Cut the stored bytes of the first tensor below what its shape claims."""
    import zipfile

    src = zipfile.ZipFile(path)
    items = [(info, src.read(info.filename)) for info in src.infolist()]
    src.close()
    with zipfile.ZipFile(path, "w") as out:
        for info, data in items:
            out.writestr(info, data[:8] if info.filename.endswith("/data/0") else data)


def _blocks(n: int) -> dict:
    sd = _videopose3d_state_dict((3,), channels=1)
    for i in range(n):
        sd[f"layers_conv.{2 * i}.weight"] = torch.zeros(1, 1, 3)
    return sd


@pytest.mark.parametrize("name, make, needle", [
    ("stride0", lambda: _huge_stride0(_videopose3d_state_dict((3, 3), 8)), "not contiguous"),
    ("channels", lambda: {**_videopose3d_state_dict((3,), 8),
                          "expand_conv.weight": torch.zeros(5000, 34, 3)}, "channels"),
    ("kernel", lambda: _videopose3d_state_dict((11,), 4), "filter_widths"),
    ("blocks", lambda: _blocks(12), "more than 8 blocks"),
    ("not-a-tensor", lambda: {**_videopose3d_state_dict((3,), 4), "shrink.bias": [1.0]},
     "not a tensor"),
    ("conv-rank", lambda: {**_videopose3d_state_dict((3,), 4),
                           "expand_conv.weight": torch.zeros(4, 34)}, "3 dimensions"),
    ("short-storage", lambda: _videopose3d_state_dict((3,), 4), "expected size"),
])  # fmt: skip
@pytest.mark.fault(
    "Evaluation",
    "`load_videopose3d`: stride-0 tensors claiming 20,000 channels; channels > 4096, kernel > 9, "
    "> 8 blocks, a non-tensor entry, a stored tensor shorter than its shape",
    injected="a VideoPose3D state dict crafted each way, under 5 MB on disk",
)
def test_a_hostile_checkpoint_is_refused_before_any_layer_is_built(tmp_path, monkeypatch, name,
                                                                   make, needle,
                                                                   observed):  # fmt: skip
    """Shapes are bounded and tensors must hold their elements before the model is built (the
    stride-0 file used to allocate 4.8 GB per layer); one line naming the file."""
    import finetune.heads.lift.videopose3d as vp

    path = tmp_path / f"{name}.bin"
    torch.save({"model_pos": make()}, path)
    if name == "short-storage":
        _shrunk_record(path)
    assert path.stat().st_size < 5_000_000
    built = []
    monkeypatch.setattr(vp.TemporalModel, "__init__", lambda self, shape: built.append(shape))
    with pytest.raises(ValueError) as err:
        load_videopose3d(path)
    message = str(err.value)
    assert message.startswith(f"{path}: ") and needle in message and "\n" not in message, message
    assert not built
    observed(f"{message}; layers built: {len(built)}")


# ---------------------------------------------------------------------- training


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="filter_widths"):
        tcn.TCNConfig(filter_widths=(2, 3))
    with pytest.raises(ValueError, match="channels"):
        tcn.TCNConfig(channels=0)
    with pytest.raises(ValueError, match="warmup"):
        tcn.TCNConfig(warmup=1.0)
    config = tcn.TCNConfig(optim=dataclasses.replace(tcn.TCNConfig.optim, lr=1e-3), steps=400)
    assert config.optim.schedule.min_lr_ratio == 0.05  # the learning rate at the last step

    def learning_rate(step: int) -> float:
        return config.optim.schedule.lr(step, config.optim.lr, config.steps)

    assert learning_rate(0) == pytest.approx(1e-3)
    assert learning_rate(200) == pytest.approx(1e-3 * 0.05**0.5)
    assert learning_rate(400) == pytest.approx(5e-5)
    assert tcn.bn_momentum(0, config) == pytest.approx(0.1)
    assert tcn.bn_momentum(400, config) == pytest.approx(0.001)


@pytest.fixture(scope="module")
def lift_data(lift_shards) -> LiftData:
    return LiftData(lift_shards, read_splits(lift_shards))


def test_training_lowers_the_loss_and_predicts_every_frame(lift_data):
    config = tcn.TCNConfig(filter_widths=(3, 3), channels=32, batch_size=64, steps=60,
                           optim=dataclasses.replace(tcn.TCNConfig.optim, lr=3e-3),
                           log_every=5)  # fmt: skip
    fitted = tcn.fit(lift_data, config)
    curve = [c["loss"] for c in fitted.losses]
    assert np.mean(curve[-3:]) < 0.6 * np.mean(curve[:2])
    val = lift_data.splits["val"]
    preds = fitted.predict("val", val)
    assert [p.shape for p in preds] == [(s.frames, 17, 3) for s in val]
    assert all(np.isfinite(p).all() and (p[:, 0] == 0).all() for p in preds)
    assert set(fitted.state_dict()) == {f"model_pos.{k}" for k in fitted.pos.state_dict()}


def test_reprojection_of_the_true_pose_and_trajectory_is_zero(lift_data):
    val = lift_data.splits["val"]
    config = tcn.TCNConfig(filter_widths=(1,))
    pool = tcn._Pool(val, [s.pose2d for s in val], config, labelled=True)
    b = pool.batch(64, torch.Generator().manual_seed(0), flip=True)
    assert tcn.reprojection(b["pose"], b["traj"], b["ray"], b["scale"]) < 1e-4
    wrong = b["traj"] * torch.tensor([1.0, 1.0, 1.2])
    assert tcn.reprojection(b["pose"], wrong, b["ray"], b["scale"]) > 1e-2


def test_semi_supervised_terms_are_finite_and_never_read_unlabelled_3d(lift_data):
    config = tcn.TCNConfig(filter_widths=(3,), channels=16, batch_size=16, steps=8,
                           labels=0.5, semi=True, warmup=0.0, log_every=1)  # fmt: skip
    train = lift_data.train
    chosen = labelled_clips(train, config.labels, config.seed)
    assert 0 < len(chosen) < len({s.clip for s in train})
    hidden = [s if s.clip in chosen else s._replace(pose3d=np.full_like(s.pose3d, np.nan))
              for s in train]  # fmt: skip
    data = LiftData(lift_data.shards, {**lift_data.splits, "train": hidden})
    fitted = tcn.fit(data, config)
    for entry in fitted.losses:
        assert {"loss_3d", "loss_traj", "loss_2d", "loss_bone"} <= set(entry)
        assert all(np.isfinite(v) for v in entry.values())
    assert all(torch.isfinite(v.float()).all() for v in fitted.state_dict().values())
    assert any(k.startswith("model_traj.") for k in fitted.state_dict())
