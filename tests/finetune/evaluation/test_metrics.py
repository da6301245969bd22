"""Pose metrics against values worked out by hand (the arithmetic is in each test's comments)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from finetune.evaluation.metrics import (
    mpjpe,
    mpjve,
    n_mpjpe,
    p_mpjpe,
    procrustes_align,
    root_relative,
)

METRICS = [mpjpe, p_mpjpe, n_mpjpe, mpjve]

# Six joints on the axes, centred at the origin, with distinct extents 1, 2, 3 (so the
# cross-covariance with any rotated copy has distinct singular values and a unique fit).
AXES = np.array(
    [[1, 0, 0], [-1, 0, 0], [0, 2, 0], [0, -2, 0], [0, 0, 3], [0, 0, -3]], dtype=np.float64
)


def _rot_z(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]])


def _rot_x(deg: float) -> np.ndarray:
    c, s = math.cos(math.radians(deg)), math.sin(math.radians(deg))
    return np.array([[1, 0, 0], [0, c, -s], [0, s, c]])


# --- MPJPE (protocol 1) ---


def test_mpjpe_offset_345_is_5():
    target = np.array([[0, 0, 0], [1, 1, 1]])  # ints are accepted
    pred = target + np.array([3, 4, 0])
    assert mpjpe(pred, target) == pytest.approx(5.0)


def test_mpjpe_is_mean_over_joints_and_poses():
    target = np.zeros((2, 2, 3))
    pred = target.copy()
    pred[0, 0] = [3, 4, 0]  # pose 0: joint errors 5 and 0 -> 2.5
    pred[1] = [0, 0, 1]  # pose 1: joint errors 1 and 1 -> 1
    np.testing.assert_allclose(mpjpe(pred, target, reduce="none"), [2.5, 1.0])
    assert mpjpe(pred, target) == pytest.approx(1.75)


def test_mpjpe_identical_is_zero():
    assert mpjpe(AXES, AXES.copy()) == 0.0


# --- P-MPJPE (protocol 2) ---


def test_p_mpjpe_of_similarity_transformed_copy_is_zero():
    pred = 2.5 * AXES @ (_rot_z(37) @ _rot_x(-70)) + np.array([10.0, -3.0, 7.0])
    assert mpjpe(pred, AXES) > 1.0
    assert p_mpjpe(pred, AXES) == pytest.approx(0.0, abs=1e-9)


def test_p_mpjpe_of_mirrored_pose_is_not_zero():
    # Mirror x -> -x. With reflections allowed the fit would be exact. Without: the
    # cross-covariance is H = pred^T target = diag(-2, 8, 18); the best rotation is the identity
    # (trace 24), the scale is 24 / |pred|^2 = 24 / 28 = 6/7. Joint errors after scaling:
    # x joints |(-6/7) - 1| = 13/7 each, y joints 2/7, z joints 3/7; mean = (36/7) / 6 = 6/7.
    mirrored = AXES * np.array([-1.0, 1.0, 1.0])
    assert p_mpjpe(mirrored, AXES) == pytest.approx(6 / 7)
    # Moving the mirrored pose rigidly changes nothing: the alignment absorbs it.
    moved = 0.5 * mirrored @ _rot_z(120) + np.array([1.0, 2.0, 3.0])
    assert p_mpjpe(moved, AXES) == pytest.approx(6 / 7)


def test_procrustes_align_recovers_target():
    pred = 0.3 * AXES @ _rot_z(-45) + np.array([5.0, 0.0, -1.0])
    np.testing.assert_allclose(procrustes_align(pred, AXES), AXES, atol=1e-9)


def test_p_mpjpe_per_pose():
    # Pose 0 is an exact similarity copy (0); pose 1 is mirrored (6/7, see above).
    pred = np.stack([3 * AXES @ _rot_z(90), AXES * np.array([-1.0, 1.0, 1.0])])
    target = np.stack([AXES, AXES])
    np.testing.assert_allclose(p_mpjpe(pred, target, reduce="none"), [0.0, 6 / 7], atol=1e-9)


# --- N-MPJPE (scale only) ---


def test_n_mpjpe_of_scaled_copy_is_zero():
    assert mpjpe(2.0 * AXES, AXES) > 0.0
    assert n_mpjpe(2.0 * AXES, AXES) == pytest.approx(0.0, abs=1e-12)


def test_n_mpjpe_of_rotated_copy_is_not_zero():
    # Target (1,0,0), (-1,0,0); pred rotated 90 degrees about z: (0,1,0), (0,-1,0).
    # <pred, target> = 0, so the best scale is 0 and each joint is off by |target| = 1.
    # Without the scale fit each joint is off by sqrt(2).
    target = np.array([[1.0, 0, 0], [-1.0, 0, 0]])
    pred = np.array([[0, 1.0, 0], [0, -1.0, 0]])
    assert n_mpjpe(pred, target) == pytest.approx(1.0)
    assert mpjpe(pred, target) == pytest.approx(math.sqrt(2))


def test_n_mpjpe_least_squares_scale():
    # Target (2,0,0), (0,2,0); pred (1,0,0), (0,3,0): s = (2 + 6) / (1 + 9) = 0.8.
    # s * pred = (0.8,0,0), (0,2.4,0): errors 1.2 and 0.4, mean 0.8.
    target = np.array([[2.0, 0, 0], [0, 2.0, 0]])
    pred = np.array([[1.0, 0, 0], [0, 3.0, 0]])
    assert n_mpjpe(pred, target) == pytest.approx(0.8)


# --- MPJVE (velocities) ---


def test_mpjve_of_constant_offset_is_zero():
    rng = np.random.default_rng(0)
    target = rng.normal(size=(4, 5, 3))  # (T, J, 3)
    pred = target + np.array([3.0, 4.0, 0.0])
    assert mpjpe(pred, target) == pytest.approx(5.0)
    assert mpjve(pred, target) == pytest.approx(0.0, abs=1e-12)


def test_mpjve_of_known_velocity_error():
    # The target stands still; the prediction drifts by (3, 4, 0) per frame from an offset of 10:
    # every velocity is off by 5 per frame, whatever the offset.
    target = np.zeros((3, 2, 3))  # (T, J, 3)
    steps = np.arange(3, dtype=np.float64)[:, None, None]  # (T, 1, 1)
    pred = target + 10.0 + steps * np.array([3.0, 4.0, 0.0])
    assert mpjve(pred, target) == pytest.approx(5.0)
    np.testing.assert_allclose(mpjve(pred, target, reduce="none"), [5.0, 5.0])


def test_mpjve_per_step():
    # One joint, T = 3: pred positions x = 0, 1, 1 against a still target -> step errors 1 and 0.
    target = np.zeros((3, 1, 3))
    pred = np.array([[[0.0, 0, 0]], [[1.0, 0, 0]], [[1.0, 0, 0]]])
    np.testing.assert_allclose(mpjve(pred, target, reduce="none"), [1.0, 0.0])
    assert mpjve(pred, target) == pytest.approx(0.5)


# --- numpy and torch, shapes, gradients ---


@pytest.mark.parametrize("metric", METRICS)
def test_numpy_and_torch_agree(metric):
    rng = np.random.default_rng(1)
    pred = rng.normal(size=(2, 5, 17, 3))  # (B, T, J, 3)
    target = rng.normal(size=(2, 5, 17, 3))
    out_np = metric(pred, target)
    out_t = metric(torch.from_numpy(pred), torch.from_numpy(target))
    assert isinstance(out_t, torch.Tensor) and out_t.dim() == 0
    assert isinstance(out_np, np.floating)
    assert float(out_t) == pytest.approx(float(out_np), rel=1e-12)
    out32 = metric(torch.from_numpy(pred).float(), torch.from_numpy(target).float())
    assert out32.dtype == torch.float32
    assert float(out32) == pytest.approx(float(out_np), rel=1e-4)


@pytest.mark.parametrize(
    ("metric", "expected"),
    [(mpjpe, (2, 5)), (p_mpjpe, (2, 5)), (n_mpjpe, (2, 5)), (mpjve, (2, 4))],
)
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_reduce_none_shapes(metric, expected, kind):
    rng = np.random.default_rng(2)
    pred, target = rng.normal(size=(2, 2, 5, 17, 3))  # each (B, T, J, 3)
    if kind == "torch":
        pred, target = torch.from_numpy(pred), torch.from_numpy(target)
    per_pose = metric(pred, target, reduce="none")
    assert isinstance(per_pose, type(pred))
    assert tuple(per_pose.shape) == expected
    # The mean of the per-pose values is the overall mean (equal joint counts).
    assert float(per_pose.mean()) == pytest.approx(float(metric(pred, target)))


def test_single_pose_gives_scalar():
    out = mpjpe(AXES, AXES + 1.0, reduce="none")
    assert np.ndim(out) == 0 and out == pytest.approx(math.sqrt(3))


@pytest.mark.parametrize("metric", METRICS)
def test_torch_gradients(metric):
    gen = torch.Generator().manual_seed(3)
    target = torch.randn(2, 3, 6, 3, generator=gen, dtype=torch.float64)  # (B, T, J, 3)
    pred = torch.randn(2, 3, 6, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda p: metric(p, target), (pred,))


def test_half_precision_torch_inputs():
    pred = torch.from_numpy(2.0 * AXES @ _rot_z(30)).to(torch.bfloat16)
    out = p_mpjpe(pred, torch.from_numpy(AXES).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and float(out) == pytest.approx(0.0, abs=0.05)


# --- root_relative ---


def test_root_relative():
    x = np.array([[[1.0, 2, 3], [4, 6, 3]]])  # (1, J=2, 3)
    np.testing.assert_allclose(root_relative(x), [[[0, 0, 0], [3, 4, 0]]])
    np.testing.assert_allclose(root_relative(x, root=1), [[[-3, -4, 0], [0, 0, 0]]])
    out = root_relative(torch.from_numpy(x), root=-1)
    assert isinstance(out, torch.Tensor)
    np.testing.assert_allclose(out.numpy(), [[[-3, -4, 0], [0, 0, 0]]])
    with pytest.raises(ValueError, match="out of range"):
        root_relative(x, root=2)


# --- bad input ---


@pytest.mark.parametrize("metric", METRICS)
def test_mismatched_shapes_raise(metric):
    with pytest.raises(ValueError, match="shapes differ"):
        metric(np.zeros((2, 17, 3)), np.zeros((2, 16, 3)))


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("shape", [(17, 2), (3,), (2, 0, 3)])
def test_not_pose_shaped_raises(metric, shape):
    with pytest.raises(ValueError, match=r"\(\.\.\., J, 3\)"):
        metric(np.zeros(shape), np.zeros(shape))


@pytest.mark.parametrize("shape", [(1, 17, 3), (2, 1, 17, 3), (17, 3)])
def test_mpjve_needs_two_frames(shape):
    with pytest.raises(ValueError, match="at least 2 frames"):
        mpjve(np.zeros(shape), np.zeros(shape))


def test_bad_reduce_mixed_kinds_and_empty_raise():
    with pytest.raises(ValueError, match="reduce"):
        mpjpe(AXES, AXES, reduce="sum")
    with pytest.raises(TypeError, match="same kind"):
        mpjpe(AXES, torch.from_numpy(AXES))
    with pytest.raises(TypeError, match="numpy array or a torch tensor"):
        mpjpe(AXES.tolist(), AXES.tolist())
    with pytest.raises(ValueError, match="zero poses"):
        mpjpe(np.zeros((0, 17, 3)), np.zeros((0, 17, 3)))
    assert mpjpe(np.zeros((0, 17, 3)), np.zeros((0, 17, 3)), reduce="none").shape == (0,)


def test_score_sequences_by_hand():
    from finetune.evaluation.metrics import score_sequences

    true = [np.zeros((3, 2, 3)), np.zeros((1, 2, 3))]
    pred = [np.zeros((3, 2, 3)), np.zeros((1, 2, 3))]
    pred[0][1, :, 0] = 3.0  # walk: frame 1 off by 3 mm in every joint
    pred[1][0, :, 0] = 6.0  # run: its only frame off by 6 mm
    out = score_sequences(pred, true, ["walk", "run"])
    assert out["all"]["mpjpe"] == pytest.approx((3 + 6) / 4) and out["all"]["frames"] == 4
    # velocity: walk's two steps are +3 and -3 mm; run (one frame) has no step
    assert out["all"]["mpjve"] == pytest.approx(3.0)
    assert out["per_action"]["walk"]["mpjpe"] == pytest.approx(1.0)
    run = out["per_action"]["run"]
    assert (run["mpjpe"], run["mpjve"], run["frames"]) == (6.0, None, 1)
    assert set(run) == {"mpjpe", "p_mpjpe", "n_mpjpe", "mpjve", "frames"}
    with pytest.raises(ValueError, match="does not match"):
        score_sequences([np.zeros((2, 2, 3))], [np.zeros((3, 2, 3))], ["walk"])
