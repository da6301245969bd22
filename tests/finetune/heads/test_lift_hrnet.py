"""The HRNet image head: heatmap targets, soft-argmax, frames read with the sequences, training."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from data_shards.skeleton import NUM_JOINTS
from finetune.clips import read_splits
from finetune.heads.lift import hrnet
from finetune.heads.lift.base import LiftData, labelled_clips

TINY = dict(steps=2, batch_size=4, image_size=32, width=32, decoder_width=16, predict_batch=16)


def test_heatmap_target_peaks_at_the_keypoint():
    points = torch.tensor([[[3.5, 5.5], [10.5, 2.5]]])  # pixel centres (x, y)
    heat = hrnet.gaussian_heatmaps(points, (8, 16), sigma=2.0)
    assert heat.shape == (1, 2, 8, 16)
    for j, (x, y) in enumerate([(3, 5), (10, 2)]):
        row, col = divmod(int(heat[0, j].argmax()), 16)
        assert (col, row) == (x, y)
        assert heat[0, j, row, col] == pytest.approx(1.0)
    assert heat[0, 0, 5, 5] == pytest.approx(np.exp(-4 / 8), rel=1e-5)  # 2 px from the peak


def test_soft_argmax_of_a_sharp_target_returns_the_keypoint():
    gen = torch.Generator().manual_seed(0)
    points = 3 + torch.rand(4, NUM_JOINTS, 2, generator=gen) * 10  # sub-pixel, off the border
    heat = hrnet.gaussian_heatmaps(points, (16, 16), sigma=1.0)
    found = hrnet.soft_argmax(heat, 20.0)
    assert (found - points).abs().max() < 1.0
    # a low temperature (large beta) is what makes it work: beta = 1 drifts to the centre
    drift = hrnet.soft_argmax(heat, 1.0)
    assert (drift - points).abs().max() > (found - points).abs().max()


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="image_size"):
        hrnet.HRNetConfig(image_size=48)
    with pytest.raises(ValueError, match="noise_px"):
        hrnet.HRNetConfig(noise_px=2.0)
    with pytest.raises(ValueError, match="skip"):
        hrnet.HRNetConfig(skip=True)


def test_frames_come_with_the_sequences_in_one_pass(lift_shards: Path):
    """The method's read gives every sequence its frames at ``image_size``, its 2D labels
    following the resize (the keypoints keep their place on the image)."""
    config = hrnet.HRNetConfig(**TINY)
    assert hrnet.METHOD.read(config) == {"frames": True, "size": 32}
    labels = read_splits(lift_shards)["val"]
    splits = read_splits(lift_shards, **hrnet.METHOD.read(config))
    for s, plain in zip(splits["val"], labels, strict=True):
        assert s.images.shape == (s.frames, 3, 32, 32) and s.images.dtype == np.uint8
        assert s.image_size == (32, 32) and (s.clip, s.frames) == (plain.clip, plain.frames)
        np.testing.assert_allclose(s.pose2d / 32, plain.pose2d / np.array(plain.image_size))
    assert splits["val"][0].images.astype(np.float32).std() > 0  # a rendered frame, not blank
    with pytest.raises(ValueError, match="has no frames; read the sequences with frames=True"):
        hrnet.fit(LiftData(lift_shards, read_splits(lift_shards)), config)


def test_training_steps_lower_the_loss():
    """A fixed batch of 4 random frames and labels: the summed loss falls as it overfits."""
    torch.manual_seed(0)
    regularised = dict(heatmap_weight=100.0, decoder_weight=1.0, symmetry_weight=1.0)
    optim = dataclasses.replace(hrnet.HRNetConfig.optim, lr=3e-3)
    config = hrnet.HRNetConfig(**TINY, **regularised, dropout=0.0, optim=optim)
    model = hrnet.ImageLifter(config).train()
    gen = torch.Generator().manual_seed(0)
    unit = 0.2 + 0.6 * torch.rand(4, NUM_JOINTS, 2, generator=gen)
    images = torch.randint(0, 255, (4, 3, 32, 32), generator=gen, dtype=torch.uint8)
    targets = torch.randn(4, NUM_JOINTS, 3, generator=gen) * 0.2
    mask = torch.ones(4)
    optimiser = torch.optim.Adam(model.parameters(), lr=config.optim.lr)
    curve = []
    with hrnet.torch_threads(1):  # see HRNetConfig.threads
        for _ in range(25):
            out = model(images, (64, 64))
            batch = {"unit": unit, "targets": targets, "mask": mask, "image_size": (64, 64)}
            loss = hrnet.total_loss(hrnet.loss_terms(model, out, batch, config), config)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            curve.append(loss.item())
    assert np.mean(curve[-5:]) < 0.8 * np.mean(curve[:3])  # seeded: about 0.72


def test_fit_and_predict_end_to_end(lift_shards: Path):
    """Shapes on the 64 px fixture; the unlabelled train clip's 3D is never read (NaN there
    would poison the loss); one (17, 3) row per held-out frame."""
    regularised = dict(heatmap_weight=1.0, decoder_weight=1.0, symmetry_weight=1.0)
    config = hrnet.HRNetConfig(**TINY, **regularised, labels=0.5, skip=True)
    splits = read_splits(lift_shards, **hrnet.METHOD.read(config))
    labelled = labelled_clips(splits["train"], config.labels, config.seed)
    assert len(labelled) == 1
    poisoned = [s._replace(pose3d=np.full_like(s.pose3d, np.nan)) for s in splits["train"]]
    splits["train"] = [s if s.clip in labelled else p
                       for s, p in zip(splits["train"], poisoned, strict=True)]  # fmt: skip
    fitted = hrnet.fit(LiftData(lift_shards, splits), config)
    assert [c["step"] for c in fitted.losses] == [0, 1]  # the loop counts steps from 0
    assert all(np.isfinite(v) for c in fitted.losses for v in c.values())
    assert set(fitted.losses[0]) == {"step", "loss", "encoder", "heatmap", "decoder",
                                     "projector", "symmetry", "lr", "time_s"}  # fmt: skip
    for split in ("val", "test"):
        preds = fitted.predict(split, splits[split])
        assert [p.shape for p in preds] == [(s.frames, NUM_JOINTS, 3) for s in splits[split]]
        assert all(np.isfinite(p).all() for p in preds)
        assert np.allclose(np.concatenate(preds)[:, 0], 0)  # root-relative
    assert any(k.startswith("backbone.") for k in fitted.state_dict())


def test_rows_are_valid_configs():
    for row, overrides in hrnet.METHOD.rows.items():
        config = hrnet.METHOD.config(**overrides)
        assert dataclasses.asdict(config)["steps"] >= 100, row


def test_decoder_reconstructs_the_true_2d_and_its_skip_corrects_the_soft_argmax():
    """The decoder's target is the annotated 2D, not its own (soft-argmax) input: with the skip
    and an untrained residual, the reconstruction error is the soft-argmax's error, and the
    residual gets a gradient; the decoder has no batch norm (the cause of the divergence)."""
    torch.manual_seed(0)
    config = hrnet.HRNetConfig(**TINY, **hrnet.ROWS["+ skip"])
    model = hrnet.ImageLifter(config).train()
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.lifter.decoder.modules())
    unit = 0.2 + 0.6 * torch.rand(4, NUM_JOINTS, 2)
    images = torch.randint(0, 255, (4, 3, 32, 32), dtype=torch.uint8)
    batch = {"unit": unit, "targets": torch.randn(4, NUM_JOINTS, 3) * 0.2,
             "mask": torch.ones(4), "image_size": (64, 64)}  # fmt: skip
    with hrnet.torch_threads(1):
        out = model(images, (64, 64))
        terms = hrnet.loss_terms(model, out, batch, config)
        expected = (out["x2d"] - hrnet.lifter_input(unit, (64, 64))).norm(dim=-1).mean().item()
        assert terms["decoder"].item() == pytest.approx(expected, rel=1e-5)
        assert terms["decoder"].item() > 0.05
        terms["decoder"].backward()
    assert model.lifter.decoder.head.weight.grad.abs().sum() > 0
