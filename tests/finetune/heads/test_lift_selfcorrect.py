"""The self-correcting temporal lifter: shapes, (non-)causality of the LSTM, the six-layer
projector, training lowers the loss on real shards, the correction never reads unlabelled 3D."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from data_shards.skeleton import NUM_JOINTS
from finetune.clips import read_splits
from finetune.heads.lift import selfcorrect
from finetune.heads.lift.base import LiftData, labelled_clips
from finetune.heads.lift.selfcorrect import (
    Projector,
    SelfCorrectConfig,
    TemporalLifter,
    lift_sequence,
)

SMALL = dict(width=32, hidden=16, layers=1, window=8, batch_size=8, projector_width=32,
             projector_steps=30,
             optim=dataclasses.replace(SelfCorrectConfig.optim, lr=3e-3))  # fmt: skip


@pytest.fixture(scope="module")
def data(lift_shards) -> LiftData:
    return LiftData(Path(lift_shards), read_splits(lift_shards))


def test_shapes_and_six_layer_projector():
    lifter = TemporalLifter(SelfCorrectConfig(**SMALL)).eval()
    out = lifter(torch.randn(3, 8, NUM_JOINTS, 2))
    assert out.shape == (3, 8, NUM_JOINTS, 3) and torch.all(out[..., 0, :] == 0)
    projector = Projector(32)
    assert sum(isinstance(m, nn.Linear) for m in projector.modules()) == 6
    assert projector(torch.randn(3, 8, NUM_JOINTS, 3)).shape == (3, 8, NUM_JOINTS, 2)
    # whole sequences, longer and shorter than a window, keep their length
    for n in (5, 8, 21):
        assert lift_sequence(lifter, np.random.rand(n, NUM_JOINTS, 2).astype(np.float32),
                             8).shape == (n, NUM_JOINTS, 3)  # fmt: skip


@pytest.mark.parametrize("bidirectional", [True, False])
def test_bidirectional_sees_the_future_unidirectional_is_causal(bidirectional):
    torch.manual_seed(0)
    lifter = TemporalLifter(SelfCorrectConfig(**SMALL, bidirectional=bidirectional)).eval()
    x = torch.randn(1, 8, NUM_JOINTS, 2)
    changed = x.clone()
    changed[:, 5] += 1.0  # change frame 5 only
    with torch.no_grad():
        diff = (lifter(changed) - lifter(x)).abs().amax(dim=(0, 2, 3))  # (T,)
    assert diff[5:].min() > 1e-4  # the changed frame and later ones always move
    if bidirectional:  # the default: documented as not causal
        assert diff[:5].min() > 1e-4
    else:
        assert diff[:5].max() == 0


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="SelfCorrectConfig.labels"):
        SelfCorrectConfig(labels=0.0)
    with pytest.raises(ValueError, match="SelfCorrectConfig.window"):
        SelfCorrectConfig(window=1)
    with pytest.raises(ValueError, match="SelfCorrectConfig.correction_weight"):
        SelfCorrectConfig(correction_weight=-1)


@pytest.mark.parametrize("row", ["supervised no correction", "supervised + correction"])
def test_training_lowers_the_loss_and_predicts_mm(data, row):
    config = SelfCorrectConfig(**{**selfcorrect.ROWS[row], **SMALL, "steps": 60})
    fitted = selfcorrect.fit(data, config)
    first, last = fitted.losses[0], fitted.losses[-1]
    assert last["step"] == 59  # the last of 60 steps, from 0
    assert last["loss"] < 0.6 * first["loss"]
    assert last["supervised"] < 0.6 * first["supervised"]
    if config.correction_weight > 0:
        assert fitted.projector_losses[-1]["projector"] < fitted.projector_losses[0]["projector"]
        assert not any(p.requires_grad for p in fitted.projector.parameters())  # frozen
    preds = fitted.predict("test", data.splits["test"])
    assert [p.shape for p in preds] == [(s.frames, NUM_JOINTS, 3) for s in data.splits["test"]]
    assert 50 < np.abs(np.concatenate(preds)).max() < 3000  # millimetres, body sized


def test_frozen_projector_does_not_move_during_lifter_training(data):
    config = SelfCorrectConfig(**{**SMALL, "correction_weight": 1.0, "steps": 5})
    torch.manual_seed(0)
    clips = selfcorrect.train_clips(data.train, config)
    labelled = [i for i, t in enumerate(clips.targets) if t is not None]
    projector, _ = selfcorrect.fit_projector(clips, labelled, config)
    fitted = selfcorrect.fit(data, config)  # same seed: the same projector, then frozen
    for k, v in projector.state_dict().items():
        torch.testing.assert_close(fitted.projector.state_dict()[k], v)


def test_correction_never_reads_unlabelled_3d(data):
    config = SelfCorrectConfig(**{**SMALL, "correction_weight": 1.0, "steps": 10,
                                  "labels": 0.5})  # fmt: skip
    labelled = labelled_clips(data.train, config.labels, config.seed)
    assert 0 < len(labelled) < len({s.clip for s in data.train})
    poisoned = [s if s.clip in labelled else s._replace(pose3d=np.full_like(s.pose3d, np.nan))
                for s in data.train]  # fmt: skip
    fitted = selfcorrect.fit(
        dataclasses.replace(data, splits={**data.splits, "train": poisoned}), config
    )
    assert all(np.isfinite(v) for entry in fitted.losses for v in entry.values())
    assert all(np.isfinite(entry["correction"]) for entry in fitted.losses)
    assert all(torch.isfinite(v).all() for v in fitted.state_dict().values())
    assert np.isfinite(np.concatenate(fitted.predict("val", data.splits["val"]))).all()
