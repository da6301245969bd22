"""The cyclic autoencoder lifter: shapes, the bone-symmetry loss, the decoder's skip connection,
training lowers the loss on real shards, unlabelled 3D is never read."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.skeleton import LEFT_JOINTS, NUM_JOINTS, RIGHT_JOINTS, flip_permutation
from finetune.clips import read_splits
from finetune.heads.lift import base, cyclic
from finetune.heads.lift.base import LiftData, labelled_clips
from finetune.heads.lift.cyclic import CyclicConfig, CyclicLifter, bone_symmetry_loss

SMALL = dict(width=64, decoder_width=32, blocks=1, dropout=0.0, batch_size=64,
             optim=dataclasses.replace(CyclicConfig.optim, lr=3e-3))  # fmt: skip


@pytest.fixture(scope="module")
def data(lift_shards) -> LiftData:
    return LiftData(Path(lift_shards), read_splits(lift_shards))


def test_shapes_and_root_relative_output():
    model = CyclicLifter(CyclicConfig(decoder_weight=1.0, **SMALL)).eval()
    x = torch.randn(5, NUM_JOINTS, 2)
    pose3d, recon = model(x)
    assert pose3d.shape == (5, NUM_JOINTS, 3) and recon.shape == (5, NUM_JOINTS, 2)
    assert torch.all(pose3d[:, 0] == 0)
    # the full recipe is Martinez et al.'s: 1024 wide, two residual modules of two layers
    full = CyclicLifter(CyclicConfig())
    assert full.encoder.stem[0].out_features == 1024 and len(full.encoder.blocks) == 2
    assert len(full.encoder.blocks[0].layers) == 2


def test_bone_symmetry_zero_for_mirror_symmetric_pose_positive_otherwise():
    rng = np.random.default_rng(0)
    pose = rng.normal(size=(NUM_JOINTS, 3))
    # make it mirror-symmetric about the x = 0 plane: right side = left side with x negated;
    # the centre joints (pelvis, spine, ...) sit on the plane
    centre = [j for j in range(NUM_JOINTS) if j not in LEFT_JOINTS + RIGHT_JOINTS]
    pose[centre, 0] = 0
    pose[list(RIGHT_JOINTS)] = pose[list(LEFT_JOINTS)] * [-1, 1, 1]
    np.testing.assert_allclose(pose[flip_permutation()] * [-1, 1, 1], pose)
    symmetric = torch.tensor(pose, dtype=torch.float32)
    assert float(bone_symmetry_loss(symmetric)) == pytest.approx(0.0, abs=1e-6)
    bent = symmetric.clone()
    bent[RIGHT_JOINTS[2]] += torch.tensor([0.3, 0.0, 0.0])  # stretch one right shin
    assert float(bone_symmetry_loss(bent)) > 0.01
    # and it is differentiable, batched
    batch = torch.stack([symmetric, bent]).requires_grad_(True)
    bone_symmetry_loss(batch).backward()
    assert batch.grad is not None and batch.grad.abs().sum() > 0


def test_skip_makes_the_untrained_decoder_return_its_input():
    x2d = torch.randn(6, NUM_JOINTS, 2)
    pose3d = torch.randn(6, NUM_JOINTS, 3)
    with_skip = CyclicLifter(CyclicConfig(decoder_weight=1.0, skip=True, **SMALL)).eval()
    torch.testing.assert_close(with_skip.decode(pose3d, x2d), x2d)
    without = CyclicLifter(CyclicConfig(decoder_weight=1.0, **SMALL)).eval()
    assert (without.decode(pose3d, x2d) - x2d).abs().mean() > 0.1


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="CyclicConfig.dropout"):
        CyclicConfig(dropout=1.0)
    with pytest.raises(ValueError, match="CyclicConfig.skip"):
        CyclicConfig(skip=True)
    with pytest.raises(ValueError, match="CyclicConfig.steps"):
        CyclicConfig(steps=0)


@pytest.mark.parametrize("row", ["encoder loss only", "+ skip"])
def test_training_lowers_the_loss_and_predicts_mm(data, row):
    config = CyclicConfig(**{**cyclic.ROWS[row], **SMALL, "steps": 60})
    fitted = cyclic.fit(data, config)
    first, last = fitted.losses[0], fitted.losses[-1]
    assert last["step"] == 59 and {"encoder"} <= set(last)  # the last of 60 steps, from 0
    assert last["loss"] < 0.6 * first["loss"]
    assert last["encoder"] < 0.6 * first["encoder"]
    preds = fitted.predict("val", data.splits["val"])
    assert [p.shape for p in preds] == [(s.frames, NUM_JOINTS, 3) for s in data.splits["val"]]
    assert np.isfinite(np.concatenate(preds)).all()
    assert 50 < np.abs(np.concatenate(preds)).max() < 3000  # millimetres, body sized
    assert set(fitted.state_dict()) == set(fitted.model.state_dict())


def test_unlabelled_clips_3d_is_never_read(data):
    config = CyclicConfig(**{**cyclic.ROWS["+ both"], **SMALL, "steps": 10, "labels": 0.5})
    labelled = labelled_clips(data.train, config.labels, config.seed)
    assert 0 < len(labelled) < len({s.clip for s in data.train})
    poisoned = [s if s.clip in labelled else s._replace(pose3d=np.full_like(s.pose3d, np.nan))
                for s in data.train]  # fmt: skip
    fitted = cyclic.fit(dataclasses.replace(data, splits={**data.splits, "train": poisoned}),
                        config)  # fmt: skip
    assert all(np.isfinite(v) for entry in fitted.losses for v in entry.values())
    assert all(torch.isfinite(v).all() for v in fitted.state_dict().values()
               if v.is_floating_point())  # fmt: skip


def test_skip_residual_gets_a_gradient_under_noisy_input(data):
    """The "+ skip" row reads detector-like 2D and reconstructs the clean 2D, so the zero-
    initialised residual is asked for a correction: its gradient is non-zero (with a clean input,
    input = target, it would be exactly zero)."""
    config = CyclicConfig(**{**cyclic.ROWS["+ skip"], **SMALL})
    assert config.noise_px > 0 and config.drop_prob > 0  # the recipe's detector noise
    torch.manual_seed(0)
    frames = cyclic.train_frames(data.train, config)
    assert (frames["inputs"] - frames["clean"]).abs().mean() > 0.005
    model = CyclicLifter(config).train()
    pose3d = model.encode(frames["inputs"][:64])
    terms = cyclic.cycle_terms(model, frames["inputs"][:64], pose3d, frames["clean"][:64],
                               frames["targets"][:64], frames["mask"][:64], config)  # fmt: skip
    terms["decoder"].backward()
    assert model.decoder.head.weight.grad.abs().sum() > 1e-3
    clean = CyclicConfig(**{**cyclic.ROWS["+ skip"], **SMALL, "noise_px": 0.0, "drop_prob": 0.0})
    frames = cyclic.train_frames(data.train, clean)
    model = CyclicLifter(clean).train()
    x = frames["inputs"][:64]
    base.joint_distance(model.decode(model.encode(x), x), frames["clean"][:64]).backward()
    assert model.decoder.head.weight.grad.abs().sum() == 0


def test_rows_share_the_input_corruption():
    configs = [CyclicConfig(**overrides) for overrides in cyclic.ROWS.values()]
    assert len({(c.noise_px, c.drop_prob) for c in configs}) == 1


def test_decoder_gradient_into_the_zero_initialised_encoder_is_bounded():
    """The cause of the old "+ decoder" collapse: batch norm after the decoder's first layer
    divides by the batch spread of the 3D, ~0 from the zero-initialised encoder head, and sent
    a gradient ~1e5 times the 3D loss's into the encoder. Without it the gradient is small."""
    torch.manual_seed(0)
    x2d = torch.randn(32, NUM_JOINTS, 2) * 0.2
    grads = {}
    for norm in (True, False):
        model = CyclicLifter(CyclicConfig(**{**SMALL, "decoder_weight": 1.0,
                                             "decoder_norm": norm})).train()  # fmt: skip
        with torch.no_grad():  # a nearly untrained head: tiny spread of the 3D over the batch
            model.encoder.head.weight.normal_(0, 1e-5)
        pose3d = model.encode(x2d)
        recon = model.decode(pose3d, x2d)
        grads[norm] = torch.autograd.grad(base.joint_distance(recon, x2d), pose3d)[0].norm()
    assert grads[True] > 100 * grads[False]
    assert grads[False] < 1.0
