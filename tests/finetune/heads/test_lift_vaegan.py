"""The VAE-GAN lifter: shapes, the KL schedule, geometry, training from 2D alone, the plot."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from finetune.clips import read_splits
from finetune.heads.lift import vaegan
from finetune.heads.lift.base import LiftData
from finetune.heads.lift.data import root_relative_m
from finetune.loop import NonFiniteLoss

TINY = dict(width=64, disc_width=32, latent=51, batch_size=64, log_every=1, seed=0)


@pytest.fixture(scope="module")
def data(lift_shards) -> LiftData:
    return LiftData(lift_shards, read_splits(lift_shards))


def test_shapes_16x2_to_51_latent_to_16x3():
    config = vaegan.VAEGANConfig(width=32, disc_width=16)
    lifter = vaegan.VAELifter(config).eval()
    x = torch.randn(5, 16, 2)
    pose, mu, logvar = lifter(x, sample=False)
    assert mu.shape == logvar.shape == (5, 51) and pose.shape == (5, 16, 3)
    assert torch.equal(pose[:, 0], torch.zeros(5, 3))  # root-relative: the pelvis at the origin
    assert vaegan.discriminator(config).eval()(x.flatten(1)).shape == (5, 1)
    assert len(vaegan.BONES16) == 15 and (8, 9) in vaegan.BONES16  # thorax -> head top


def test_kl_beta_warms_up_then_cycles_zero_to_lambda():
    config = vaegan.VAEGANConfig(lambda_kld=1e-3, warmup_epochs=10, cycle_epochs=40, kl_ramp=0.5)
    per_epoch = 5  # warm-up 50 steps, cycle 200 steps, ramp 100 steps
    beta = [vaegan.kl_beta(s, per_epoch, config) for s in range(650)]
    assert beta[:50] == [0.0] * 50
    assert beta[50] == 0.0 and beta[100] == pytest.approx(0.5e-3) and beta[150] == 1e-3
    assert beta[249] == 1e-3 and beta[250] == 0.0  # the next cycle starts again at 0
    assert np.all(np.diff(beta[50:150]) > 0) and max(beta) == 1e-3
    np.testing.assert_allclose(beta[50:250], beta[250:450])
    off = dataclasses.replace(config, lambda_kld=0.0)
    assert all(vaegan.kl_beta(s, per_epoch, off) == 0 for s in range(400))


def test_bad_config_is_named():
    with pytest.raises(ValueError, match="VAEGANConfig.kl_ramp"):
        vaegan.VAEGANConfig(kl_ramp=0)
    with pytest.raises(ValueError, match="VAEGANConfig.steps"):
        vaegan.VAEGANConfig(steps=0)


def test_rotation_keeps_bones_and_projection_is_normalised():
    pose = torch.randn(4, 16, 3)
    turned = vaegan.rotate_y(pose, torch.tensor([0.3, -2.0, 3.1, 0.0]))
    bones = [(p, c) for p, c in vaegan.BONES16]
    length = [(t[:, [c for _, c in bones]] - t[:, [p for p, _ in bones]]).norm(dim=-1)
              for t in (pose, turned)]  # fmt: skip
    torch.testing.assert_close(length[0], length[1])
    torch.testing.assert_close(turned[..., 1], pose[..., 1])
    torch.testing.assert_close(turned[3], pose[3])
    rms = vaegan.project(turned).pow(2).sum(-1).mean(-1).sqrt()
    torch.testing.assert_close(rms, torch.ones(4))


def test_rigid_head_fills_the_nose_of_real_poses(data):
    rest = vaegan.rest_pose_m()
    np.testing.assert_allclose(vaegan.fill_nose(rest[None, list(vaegan.KEEP)])[0], rest, atol=1e-9)
    true = root_relative_m(data.splits["val"][0].pose3d).astype(np.float64)
    filled = vaegan.fill_nose(true[:, list(vaegan.KEEP)])
    assert np.linalg.norm(filled[:, 9] - true[:, 9], axis=-1).max() < 0.02  # metres
    np.testing.assert_array_equal(np.delete(filled, 9, axis=1), true[:, list(vaegan.KEEP)])


def test_a_few_steps_lower_the_reprojection_loss(data):
    fitted = vaegan.fit(data, vaegan.VAEGANConfig(steps=40, **TINY))
    recon = [r["recon"] for r in fitted.losses]
    assert np.mean(recon[-10:]) < 0.5 * np.mean(recon[:5])
    assert {"step", "loss", "recon", "kl", "adv", "disc", "beta"} <= set(fitted.losses[0])
    preds = fitted.predict("test", data.splits["test"])
    assert [p.shape for p in preds] == [(s.frames, 17, 3) for s in data.splits["test"]]
    p = preds[0].astype(np.float64)
    bones = np.mean([np.linalg.norm(p[:, vaegan.KEEP[c]] - p[:, vaegan.KEEP[a]], axis=-1)
                     for a, c in vaegan.BONES16], axis=0)  # fmt: skip
    np.testing.assert_allclose(bones, vaegan.rest_bone_m() * 1000, rtol=1e-4)  # the scale prior
    assert {"disc.0.weight", "lifter.encoder.0.weight"} <= set(fitted.state_dict())


def test_unsupervised_fit_never_reads_train_3d(data):
    blind = [s._replace(pose3d=np.full_like(s.pose3d, np.nan)) for s in data.train]
    no3d = LiftData(data.shards, {**data.splits, "train": blind})
    fitted = vaegan.fit(no3d, vaegan.VAEGANConfig(steps=8, **TINY))
    assert all(np.isfinite(v) for r in fitted.losses for v in r.values())
    assert all(np.isfinite(p).all() for p in fitted.predict("val", data.splits["val"]))
    # the supervised reference does read them: the loop refuses its NaN loss at once
    supervised = vaegan.VAEGANConfig(steps=2, supervised=True, **TINY)
    with pytest.raises(NonFiniteLoss, match="at step 0 .*recon=nan"):
        vaegan.fit(no3d, supervised)


def test_latent_plot_writes_a_png(data, tmp_path):
    fitted = vaegan.fit(data, vaegan.VAEGANConfig(steps=2, **TINY))
    path = vaegan.latent_plot(fitted, data.splits["val"] + data.splits["test"], tmp_path / "z.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000
