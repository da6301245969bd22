"""The linear-probe readout: reads linear pose, finds none in noise, never looks at the queries
to choose its regularisation."""

from __future__ import annotations

import numpy as np
import pytest

from data_shards.skeleton import NUM_JOINTS
from finetune.evaluation.embed import Embeddings
from finetune.evaluation.probe import LAMBDAS, ridge_fit, ridge_probe


def _rows(n: int, d: int, clips: int, seed: int, linear: bool) -> Embeddings:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d))
    if linear:  # the pose is a linear function of the features
        w = np.random.default_rng(99).normal(size=(d, NUM_JOINTS * 3)) * 50
        pose = x @ w + 100
    else:  # features and pose unrelated
        pose = rng.normal(size=(n, NUM_JOINTS * 3)) * 200
    return Embeddings(
        vectors=x.astype(np.float32), pose3d=pose.reshape(n, NUM_JOINTS, 3).astype(np.float32),
        keys=np.array([f"k{i // 8}" for i in range(n)]),
        clips=np.array([f"{seed}-c{i % clips}" for i in range(n)]),
        actions=np.array(["walk"] * n), cameras=np.array(["c0"] * n),
        views=np.zeros(n, int), frames=np.arange(n),
    )  # fmt: skip


def test_ridge_fit_solves_the_normal_equations():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(50, 4)), rng.normal(size=(50, 3))
    (w0, b0), (w1, b1) = ridge_fit(x, y, [0.0, 5.0])
    expected = np.linalg.lstsq(np.c_[x, np.ones(50)], y, rcond=None)[0]
    np.testing.assert_allclose(w0, expected[:4], atol=1e-10)
    np.testing.assert_allclose(b0, expected[4], atol=1e-10)
    xc = x - x.mean(0)  # the penalised solution shrinks the weights, not the bias
    shrunk = np.linalg.solve(xc.T @ xc + 5 * np.eye(4), xc.T @ (y - y.mean(0)))
    np.testing.assert_allclose(w1, shrunk)
    assert np.linalg.norm(w1) < np.linalg.norm(w0)


def test_probe_reads_linear_pose_and_finds_none_in_noise():
    linear = ridge_probe(_rows(600, 8, 6, 1, True), _rows(200, 8, 2, 2, True))
    assert linear["mpjpe"] < 1.0 and linear["lambda"] == min(LAMBDAS)
    noise_train, noise_query = _rows(600, 8, 6, 3, False), _rows(200, 8, 2, 4, False)
    noise = ridge_probe(noise_train, noise_query)
    mean = noise_train.pose3d.mean(0)
    floor = np.linalg.norm(noise_query.pose3d - mean, axis=-1).mean()
    assert noise["mpjpe"] == pytest.approx(floor, rel=0.05)  # no better than the mean pose
    assert noise["folds"] == 5 and set(noise["cv_mpjpe"]) == {f"{lam:g}" for lam in LAMBDAS}


def test_lambda_is_chosen_without_the_queries():
    train = _rows(400, 8, 5, 5, False)
    a = ridge_probe(train, _rows(100, 8, 2, 6, True))
    b = ridge_probe(train, _rows(100, 8, 2, 7, False))
    assert a["lambda"] == b["lambda"] and a["cv_mpjpe"] == b["cv_mpjpe"]


def test_empty_input_is_one_clear_error():
    rows = _rows(10, 4, 2, 0, True)
    with pytest.raises(ValueError, match="train and query frames"):
        ridge_probe(rows.subset(np.zeros(10, bool)), rows)
