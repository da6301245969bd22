"""Contrastive objective and negative samplers (issue 3): hand-computed losses, sampler
invariants over many random draws, the gather hook and determinism. CPU, a few seconds."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data_shards.configtools import ConfigError, from_dict
from pretrain.objectives import (
    CollapseConfig,
    CollapseMonitor,
    ContrastiveConfig,
    NegativeConfig,
    check_pose_labels,
    collapse_warning,
    contrastive_loss,
    make_pool,
    mpjpe_root_relative,
    sample_negatives,
)

KINDS = ("uniform", "gt_pose", "cosine")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _batch(B=2, V=3, T=12, P=8, J=17, seed=0, mask_p=0.4, pose_scale=20.0):
    """Random context/targets/mask/pose3d. Poses N(0, 20 mm): pair MPJPEs straddle 50 mm."""
    g = _gen(seed)
    context = torch.randn(B, V, T, P, generator=g)
    targets = torch.randn(B, V, T, P, generator=g)
    mask = torch.rand(B, V, T, generator=g) < mask_p
    pose3d = torch.randn(B, T, J, 3, generator=g) * pose_scale
    return context, targets, mask, pose3d


def _decode(rows: np.ndarray, B: int, V: int, T: int):
    """Pool rows -> (rank, b, v, t) under the package's flattening convention."""
    n = rows % (B * V * T)
    return rows // (B * V * T), n // (V * T), (n // T) % V, n % T


def _np_mpjpe(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64) - a[..., :1, :]
    b = b.astype(np.float64) - b[..., :1, :]
    return np.linalg.norm(a - b, axis=-1).mean(-1)


def _np_cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return (a * b).sum(-1)


def _sample(kind, context, targets, mask, pose3d, seed=0, **kw):
    cfg = NegativeConfig(kind=kind, **kw)
    pool = make_pool(targets, mask, pose3d)
    return pool, sample_negatives(cfg, pool, _gen(seed))


# --- the loss against hand computations ------------------------------------------------------


def _np_info_nce(c, pos_list, negs, tau, form):
    """Multi-positive InfoNCE for one anchor, evaluated separately in numpy (float64)."""
    sp = np.array([_np_cos(c, p) for p in pos_list]) / tau
    sn = np.array([_np_cos(c, n) for n in negs]) / tau
    neg_sum = np.exp(sn).sum()
    if form == "mean":
        return float(np.mean([-np.log(np.exp(s) / (np.exp(s) + neg_sum)) for s in sp]))
    return float(-np.log(np.exp(sp).sum() / (np.exp(sp).sum() + neg_sum)))


def _hand_case(V):
    """1 sequence of 3 frames per view; frames 0-2 of view 0 masked: 3 anchors, 2 negatives each
    (the other masked frames of the sequence; all of them, so the draw does not matter)."""
    rng = np.random.default_rng(3)
    ctx = rng.normal(size=(1, V, 3, 4)).astype(np.float32)
    tgt = rng.normal(size=(1, V, 3, 4)).astype(np.float32)
    mask = np.zeros((1, V, 3), bool)
    mask[0, 0] = True
    return ctx, tgt, mask


@pytest.mark.parametrize("num", [2, 5])  # 5 > 2 candidates: the padded slots must not count
def test_loss_matches_hand_computation(num):
    ctx, tgt, mask = _hand_case(V=1)
    cfg = ContrastiveConfig(temperature=0.5, negatives=NegativeConfig(num=num))
    loss, metrics = contrastive_loss(
        torch.tensor(ctx), torch.tensor(tgt), torch.tensor(mask), cfg, generator=_gen()
    )
    c, q = ctx[0, 0], tgt[0, 0]
    expected = [
        _np_info_nce(c[i], [q[i]], [q[j] for j in range(3) if j != i], 0.5, "mean")
        for i in range(3)
    ]
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    pos = [_np_cos(c[i], q[i]) for i in range(3)]
    negs = [[_np_cos(c[i], q[j]) for j in range(3) if j != i] for i in range(3)]
    assert metrics["accuracy"] == pytest.approx(
        np.mean([p > max(n) for p, n in zip(pos, negs, strict=True)])
    )
    assert metrics["sim_positive"] == pytest.approx(np.mean(pos), abs=1e-6)
    assert metrics["sim_negative"] == pytest.approx(np.mean(negs), abs=1e-6)
    assert metrics["num_masked"] == 3 and metrics["negatives_per_anchor"] == 2


@pytest.mark.parametrize("anchor_view", [0, 1])
@pytest.mark.parametrize("form", ["mean", "sum"])
def test_multiview_positives_match_hand_computation(form, anchor_view):
    ctx, tgt, mask = _hand_case(V=2)
    mask = np.roll(mask, anchor_view, axis=1)  # the anchors' view: 0 or 1
    a, o = anchor_view, 1 - anchor_view
    args = (torch.tensor(ctx), torch.tensor(tgt), torch.tensor(mask))
    cfg = ContrastiveConfig(temperature=0.2, multi_positive=form)
    loss, metrics = contrastive_loss(*args, cfg, generator=_gen())
    c, q = ctx[0, a], tgt[0]
    negs = [[q[a, j] for j in range(3) if j != i] for i in range(3)]
    expected = [_np_info_nce(c[i], [q[a, i], q[o, i]], negs[i], 0.2, form) for i in range(3)]
    assert loss.item() == pytest.approx(np.mean(expected), rel=1e-5)
    # sim_positive and accuracy are about the anchor's own view.
    own = [_np_cos(c[i], q[a, i]) for i in range(3)]
    assert metrics["sim_positive"] == pytest.approx(np.mean(own), abs=1e-6)
    # Without multi-view positives the other view's target is simply ignored.
    single_cfg = ContrastiveConfig(temperature=0.2, multiview_positives=False)
    single, _ = contrastive_loss(*args, single_cfg, generator=_gen())
    one_view = [_np_info_nce(c[i], [q[a, i]], negs[i], 0.2, "mean") for i in range(3)]
    assert single.item() == pytest.approx(np.mean(one_view), rel=1e-5)
    assert abs(single.item() - loss.item()) > 1e-3


def test_multiview_positive_pulls_the_other_view():
    """Moving the other view's target towards the context lowers the multi-view loss only."""
    context, targets, mask, _ = _batch(V=2, seed=4)
    near = targets.clone()
    near[:, 1] = context[:, 0] + 0.01 * near[:, 1]  # view 1's targets ~ view 0's context
    mask = mask.clone()
    mask[:, 1] = False  # anchors in view 0 only
    cfgs = {mv: ContrastiveConfig(multiview_positives=mv) for mv in (True, False)}
    loss = {
        (mv, t): contrastive_loss(context, tg, mask, cfgs[mv], generator=_gen())[0].item()
        for mv in (True, False)
        for t, tg in (("far", targets), ("near", near))
    }
    assert loss[(True, "near")] < loss[(True, "far")] - 0.1
    assert loss[(False, "near")] == pytest.approx(loss[(False, "far")], rel=1e-6)


def test_forms_agree_with_one_positive_and_diversity_is_weighted():
    context, targets, mask, _ = _batch(V=1, seed=5)
    out = {
        form: contrastive_loss(
            context, targets, mask, ContrastiveConfig(multi_positive=form), generator=_gen()
        )[0].item()
        for form in ("mean", "sum")
    }
    assert out["mean"] == pytest.approx(out["sum"], rel=1e-6)
    cfg = ContrastiveConfig(diversity_weight=0.25)
    total, metrics = contrastive_loss(
        context, targets, mask, cfg, generator=_gen(), diversity=torch.tensor(2.0)
    )
    assert total.item() == pytest.approx(metrics["loss_contrastive"] + 0.5, rel=1e-6)
    assert metrics["loss_diversity"] == 2.0 and metrics["loss"] == pytest.approx(total.item())


@pytest.mark.parametrize("kind", KINDS)
def test_gradients_flow_to_context_and_targets(kind):
    context, targets, mask, pose3d = _batch(seed=6)
    context.requires_grad_(True)
    targets.requires_grad_(True)
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind=kind, num=10))
    loss, _ = contrastive_loss(context, targets, mask, cfg, generator=_gen(), pose3d=pose3d)
    loss.backward()
    assert torch.isfinite(context.grad).all() and torch.isfinite(targets.grad).all()
    assert context.grad[mask].abs().sum() > 0 and targets.grad.abs().sum() > 0
    assert context.grad[~mask].abs().sum() == 0  # only masked frames are anchors


def test_no_masked_frame_gives_a_connected_zero():
    context, targets, mask, pose3d = _batch(seed=7)
    context.requires_grad_(True)
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose"))
    loss, metrics = contrastive_loss(
        context, targets, torch.zeros_like(mask), cfg, generator=_gen(), pose3d=pose3d
    )
    loss.backward()
    assert loss.item() == 0 and metrics["num_masked"] == 0 and metrics["accuracy"] == 0


# --- sampler invariants ----------------------------------------------------------------------


@pytest.mark.parametrize("hardest", [False, True])
def test_gt_pose_never_returns_a_negative_within_the_threshold(hardest):
    B, V, T = 2, 2, 16
    for seed in range(12):
        context, targets, mask, pose3d = _batch(B, V, T, seed=seed)
        pool, neg = _sample(
            "gt_pose",
            context,
            targets,
            mask,
            pose3d,
            seed,
            num=24,
            pose_threshold_mm=50.0,
            hardest=hardest,
        )
        anchors = pool.anchors.numpy()
        _, ab, _, at = _decode(anchors, B, V, T)
        _, nb, _, nt = _decode(neg.index.numpy(), B, V, T)
        poses = pose3d.numpy()
        dist_all = _np_mpjpe(poses[ab, at][:, None, None], poses[None])  # (A, B, T)
        dist = dist_all[np.arange(len(ab))[:, None], nb, nt]  # (A, K)
        valid = neg.valid.numpy()
        assert valid.any() and (dist[valid] > 50.0 - 1e-3).all()
        # As many as there are candidates beyond the threshold (each instant in V views).
        available = (dist_all > 50.0).reshape(len(ab), -1).sum(1) * V
        np.testing.assert_array_equal(valid.sum(1), np.minimum(available, 24))
        if hardest:  # the closest beyond the threshold: no unpicked candidate is closer
            for a in range(len(ab)):
                beyond = np.sort(np.repeat(dist_all[a][dist_all[a] > 50.0], V))
                np.testing.assert_allclose(
                    np.sort(dist[a][valid[a]]), beyond[: valid[a].sum()], rtol=1e-5
                )
        _, metrics = contrastive_loss(
            context,
            targets,
            mask,
            ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose", num=24, hardest=hardest)),
            generator=_gen(seed),
            pose3d=pose3d,
        )
        assert metrics["negative_purity"] == 0.0


def test_cosine_respects_its_cutoff_and_takes_the_most_similar():
    B, V, T = 2, 2, 10
    for seed in range(6):
        context, targets, mask, pose3d = _batch(B, V, T, P=4, seed=seed)
        pool, neg = _sample("cosine", context, targets, mask, pose3d, num=8, cosine_cutoff=0.5)
        flat = targets.reshape(-1, 4).numpy()
        anchors = pool.anchors.numpy()
        sims = _np_cos(flat[anchors][:, None], flat[None])  # (A, N)
        _, ab, _, at = _decode(anchors, B, V, T)
        _, cb, _, ct = _decode(np.arange(len(flat)), B, V, T)
        eligible = (sims <= 0.5) & ~((cb[None] == ab[:, None]) & (ct[None] == at[:, None]))
        for a in range(len(anchors)):
            picked = neg.index[a][neg.valid[a]].numpy()
            assert (sims[a, picked] <= 0.5 + 1e-6).all()
            best = np.sort(sims[a][eligible[a]])[::-1][:8]
            np.testing.assert_allclose(np.sort(sims[a, picked])[::-1], best, atol=1e-6)


def test_uniform_stays_within_the_sequence_and_never_returns_the_anchor():
    B, V, T = 3, 2, 20
    for seed in range(10):
        context, targets, mask, pose3d = _batch(B, V, T, seed=seed)
        pool, neg = _sample("uniform", context, targets, mask, None, seed, num=5)
        _, ab, av, at = _decode(pool.anchors.numpy(), B, V, T)
        _, nb, nv, nt = _decode(neg.index.numpy(), B, V, T)
        valid = neg.valid.numpy()
        m = mask.numpy()
        assert ((nb == ab[:, None]) & (nv == av[:, None]))[valid].all()  # same sequence
        assert (nt != at[:, None])[valid].all()  # never the anchor itself
        assert m[nb, nv, nt][valid].all()  # only masked frames
        others = m.sum(-1)[ab, av] - 1  # other masked frames of the anchor's sequence
        np.testing.assert_array_equal(valid.sum(1), np.minimum(others, 5))
        for row, ok in zip(neg.index.numpy(), valid, strict=True):  # drawn without replacement
            assert len(set(row[ok])) == ok.sum()


@pytest.mark.parametrize("kind", KINDS)
def test_same_instant_frames_are_never_negatives(kind):
    """Other views of the anchor's instant are made the most tempting candidates: identical pose
    and near-identical target. They are positives and must never be drawn."""
    B, V, T = 2, 4, 8
    context, targets, mask, pose3d = _batch(B, V, T, seed=9, mask_p=0.9)
    targets = targets[:, :1] + 1e-3 * targets  # views of an instant: cosine ~ 0.99999
    pool, neg = _sample(kind, context, targets, mask, pose3d, num=40, cosine_cutoff=1.0)
    _, ab, _, at = _decode(pool.anchors.numpy(), B, V, T)
    _, nb, _, nt = _decode(neg.index.numpy(), B, V, T)
    same = (nb == ab[:, None]) & (nt == at[:, None])
    assert neg.valid.any() and not same[neg.valid.numpy()].any()


def test_same_seed_same_negatives():
    context, targets, mask, pose3d = _batch(seed=11)
    for kind in KINDS:
        a = _sample(kind, context, targets, mask, pose3d, seed=1, num=6)[1]
        b = _sample(kind, context, targets, mask, pose3d, seed=1, num=6)[1]
        assert torch.equal(a.index, b.index) and torch.equal(a.valid, b.valid)
        if kind != "cosine":  # cosine ranks deterministically; the others draw
            c = _sample(kind, context, targets, mask, pose3d, seed=2, num=6)[1]
            assert not torch.equal(a.index, c.index)
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose"))
    runs = [
        contrastive_loss(context, targets, mask, cfg, generator=_gen(3), pose3d=pose3d)
        for _ in range(2)
    ]
    assert runs[0][0].item() == runs[1][0].item() and runs[0][1] == runs[1][1]


def test_purity_is_reported_for_every_sampler_with_poses():
    context, targets, mask, pose3d = _batch(seed=12, mask_p=0.6)
    still = pose3d[:, :1].expand_as(pose3d).contiguous()  # one pose for the whole clip
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="uniform", num=4))
    _, metrics = contrastive_loss(context, targets, mask, cfg, generator=_gen(), pose3d=still)
    assert metrics["negative_purity"] == 1.0  # every uniform negative shows the anchor's pose
    _, metrics = contrastive_loss(context, targets, mask, cfg, generator=_gen())
    assert "negative_purity" not in metrics
    cos = ContrastiveConfig(negatives=NegativeConfig(kind="cosine", num=4))
    _, metrics = contrastive_loss(context, targets, mask, cos, generator=_gen(), pose3d=pose3d)
    assert 0.0 <= metrics["negative_purity"] <= 1.0


def test_mpjpe_root_relative_matches_numpy():
    g = _gen(13)
    a, b = torch.randn(5, 17, 3, generator=g) * 100, torch.randn(5, 17, 3, generator=g) * 100
    np.testing.assert_allclose(
        mpjpe_root_relative(a, b + 1000.0).numpy(), _np_mpjpe(a.numpy(), b.numpy()), rtol=1e-5
    )


# --- gathering across ranks ------------------------------------------------------------------


class FakeGather:
    """Two "ranks": this one's tensor and a tagged copy (targets shifted, so they differ)."""

    def __init__(self, local_rank: int = 0):
        self.local_rank = local_rank
        self.calls = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        other = x.detach().clone()
        if other.is_floating_point() and other.ndim == 2:  # targets (N, P): the tag
            other = other + 5.0
        parts = [x, other] if self.local_rank == 0 else [other, x]
        return torch.cat(parts)


@pytest.mark.parametrize("local_rank", [0, 1])
@pytest.mark.parametrize("kind", ["gt_pose", "cosine"])
def test_gather_hook_draws_negatives_from_other_ranks(kind, local_rank):
    B, V, T, P = 2, 2, 8, 6
    context, targets, mask, pose3d = _batch(B, V, T, P, seed=14)
    targets.requires_grad_(True)
    N = B * V * T
    gather = FakeGather(local_rank)
    neg_cfg = NegativeConfig(kind=kind, num=60, cosine_cutoff=0.99)
    pool = make_pool(targets, mask, pose3d, gather=gather, rank=local_rank)
    neg = sample_negatives(neg_cfg, pool, _gen())
    other = (neg.index // N != local_rank) & neg.valid
    assert gather.calls == 3 and other.any()
    local_rows = torch.arange(N) + local_rank * N
    tagged = targets.detach().reshape(N, P)[neg.index[other] % N] + 5.0
    assert torch.equal(pool.targets[neg.index[other]], tagged)  # drawn from the tagged copy
    remote = pool.instant[torch.arange(2 * N) // N != local_rank]
    assert not set(pool.instant[local_rows].tolist()) & set(remote.tolist())  # distinct instants
    if kind == "gt_pose":  # the copy doubles every candidate, except the anchor's own instant
        alone = sample_negatives(neg_cfg, make_pool(targets, mask, pose3d), _gen())
        assert torch.equal(neg.valid.sum(1), 2 * alone.valid.sum(1))
    cfg = ContrastiveConfig(negatives=neg_cfg)
    run = dict(generator=_gen(), pose3d=pose3d)
    loss, metrics = contrastive_loss(
        context, targets, mask, cfg, gather=gather, rank=local_rank, **run
    )
    alone, alone_metrics = contrastive_loss(context, targets, mask, cfg, **run)
    assert loss.item() != pytest.approx(alone.item())
    assert metrics["negatives_per_anchor"] > alone_metrics["negatives_per_anchor"]
    loss.backward()
    assert targets.grad.abs().sum() > 0  # the local part keeps its gradient


@pytest.mark.parametrize("kind", KINDS)
def test_nan_targets_give_a_nan_loss_not_an_error(kind):
    """The engine skips and counts NaN steps: the objective must hand the NaN back."""
    context, targets, mask, pose3d = _batch(seed=17)
    targets[0, 0, 0] = float("nan")
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind=kind))
    loss, _ = contrastive_loss(
        context, targets, mask | True, cfg, generator=_gen(), pose3d=pose3d, gather=FakeGather()
    )
    assert torch.isnan(loss)


def test_gather_contract_is_checked_and_uniform_does_not_gather():
    context, targets, mask, pose3d = _batch(seed=15)
    with pytest.raises(ValueError, match="rank order"):
        make_pool(targets, mask, pose3d, gather=FakeGather(local_rank=1), rank=0)
    with pytest.raises(ValueError, match="dropped the gradient"):
        make_pool(targets.requires_grad_(True), mask, gather=lambda x: x.detach())
    gather = FakeGather()
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="uniform"))
    contrastive_loss(context, targets, mask, cfg, generator=_gen(), gather=gather, rank=1)
    assert gather.calls == 0


@pytest.mark.parametrize("kind, share", [("gt_pose", 0.5), ("cosine", 0.25), ("gt_pose", 1.0)])
def test_same_window_share_comes_from_the_anchors_window_beyond_the_threshold(kind, share):
    """The first round(K x share) slots hold frames of the anchor's own window (any view, another
    instant, beyond the pose threshold); the rest come from other windows by the kind."""
    B, V, T, K = 3, 2, 16, 12
    own_k = round(K * share)
    for seed in range(6):
        context, targets, mask, pose3d = _batch(B, V, T, seed=seed)
        pool, neg = _sample(kind, context, targets, mask, pose3d, seed, num=K, same_window=share)
        assert neg.index.shape == (len(pool.anchors), K)
        _, ab, _, at = _decode(pool.anchors.numpy(), B, V, T)
        _, nb, _, nt = _decode(neg.index.numpy(), B, V, T)
        valid = neg.valid.numpy()
        own, rest = slice(0, own_k), slice(own_k, K)
        assert valid[:, own].any()
        assert (nb[:, own] == ab[:, None])[valid[:, own]].all()
        assert (nt[:, own] != at[:, None])[valid[:, own]].all()
        poses = pose3d.numpy()
        dist = _np_mpjpe(poses[ab, at][:, None], poses[nb, nt])
        assert (dist[:, own][valid[:, own]] > 50.0 - 1e-3).all()
        # as many as the window offers beyond the threshold (each instant in V views)
        dist_window = _np_mpjpe(poses[ab, at][:, None], poses[ab])  # (A, T)
        available = (dist_window > 50.0).sum(1) * V
        np.testing.assert_array_equal(valid[:, own].sum(1), np.minimum(available, own_k))
        if own_k < K:
            assert valid[:, rest].any() and (nb[:, rest] != ab[:, None])[valid[:, rest]].all()
        rows = np.where(valid, neg.index.numpy(), -1 - np.arange(K))  # no row twice
        assert all(len(set(r)) == K for r in rows)


def test_same_window_off_keeps_the_samplers_draws():
    """same_window=0 draws exactly what the sampler drew before it existed (same generator use)."""
    context, targets, mask, pose3d = _batch(2, 2, 16, seed=3)
    for kind in KINDS:
        _, a = _sample(kind, context, targets, mask, pose3d, 3, num=10)
        _, b = _sample(kind, context, targets, mask, pose3d, 3, num=10, same_window=0.0)
        torch.testing.assert_close(a.index, b.index)
    _, a = _sample("gt_pose", context, targets, mask, pose3d, 3, num=10)
    _, c = _sample("gt_pose", context, targets, mask, pose3d, 3, num=10, same_window=0.5)
    assert not torch.equal(a.index, c.index)


# --- configs, bad input, collapse ------------------------------------------------------------


@pytest.mark.parametrize(
    "data, message",
    [
        ({"negatives": {"kind": "random"}}, "negatives.kind: 'random' is not one of"),
        ({"negatives": {"num": 0}}, "num must be an int >= 1"),
        ({"negatives": {"kind": "cosine", "hardest": True}}, "hardest applies to kind='gt_pose'"),
        ({"negatives": {"cosine_cutoff": 1.5}}, "cosine_cutoff must be in (-1, 1]"),
        ({"negatives": {"same_window": 1.5}}, "same_window must be in [0, 1]"),
        ({"negatives": {"same_window": 0.5}}, "same_window needs kind 'gt_pose' or 'cosine'"),
        ({"temperature": 0}, "temperature must be in (0, 10]"),
        ({"negatives": {"negative_count": 3}}, "negatives.negative_count: unknown field"),
        # upper bounds (issue 16): K sizes an (anchors, K, P) tensor every step
        ({"negatives": {"num": 10**8}},
         "negatives: num must be an int >= 1 and <= 4096, got 100000000"),
        ({"negatives": {"num": 4097}}, "negatives: num must be an int >= 1 and <= 4096"),
        ({"negatives": {"pose_threshold_mm": 1e9}},
         "negatives: pose_threshold_mm must be in (0, 10000], got 1000000000.0"),
        ({"negatives": {"pose_threshold_mm": float("inf")}}, "pose_threshold_mm must be in"),
        ({"negatives": {"pose_threshold_mm": float("nan")}}, "pose_threshold_mm must be in"),
        ({"diversity_weight": float("inf")}, "diversity_weight must be in [0, 100], got inf"),
        ({"diversity_weight": 101}, "diversity_weight must be in [0, 100]"),
        ({"temperature": float("nan")}, "temperature must be in (0, 10]"),
    ],
)  # fmt: skip
@pytest.mark.fault(
    "Pretraining",
    "objective config out of bounds: negatives.num 10^8, pose_threshold_mm inf or NaN, "
    "diversity_weight inf, temperature NaN, unknown or inconsistent fields",
    injected="ContrastiveConfig built from a dict holding each (16 kinds)",
)
def test_bad_config_names_the_field(data, message, observed):
    with pytest.raises(ConfigError) as info:
        from_dict(ContrastiveConfig, data)
    assert message in str(info.value) and "\n" not in str(info.value)
    observed(f"{type(info.value).__name__}: {info.value}")


def test_config_bounds_admit_their_limits():
    cfg = from_dict(ContrastiveConfig, {"diversity_weight": 100, "negatives": {
        "num": 4096, "pose_threshold_mm": 10000}})  # fmt: skip
    assert cfg.negatives.num == 4096


def test_gt_pose_without_poses_fails_clearly():
    context, targets, mask, _ = _batch(seed=16)
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind="gt_pose"))
    with pytest.raises(ValueError, match="gt_pose.*needs 3D poses"):
        contrastive_loss(context, targets, mask, cfg, generator=_gen())
    with pytest.raises(ValueError, match="the shards has none"):
        check_pose_labels(cfg.negatives, has_pose3d=False, source="the shards")
    check_pose_labels(NegativeConfig(kind="cosine"), has_pose3d=False)
    with pytest.raises(ValueError, match="mask must be bool"):
        contrastive_loss(context, targets, mask.float(), cfg, generator=_gen())


def test_collapse_warnings():
    healthy = {
        "loss_contrastive": 2.3,
        "accuracy": 0.6,
        "num_masked": 40,
        "negatives_per_anchor": 100,
        "perplexity": 80.0,
    }
    assert collapse_warning(healthy) is None
    assert "perplexity" in collapse_warning({**healthy, "perplexity": 1.01})
    assert "accuracy 1.000" in collapse_warning(
        {**healthy, "loss_contrastive": 1e-4, "accuracy": 1.0}
    )
    assert "no usable negatives" in collapse_warning({**healthy, "negatives_per_anchor": 0})
    monitor = CollapseMonitor(CollapseConfig(patience=3))
    bad = {**healthy, "perplexity": 1.0}
    lines = [monitor.update(m) for m in (bad, bad, healthy, bad, bad, bad, bad, bad, bad)]
    assert [line is not None for line in lines] == [False] * 5 + [True, False, False, True]
    assert lines[-1].endswith("for 6 steps")


# --- the frame-level multi-view term -----------------------------------------------------------


@pytest.mark.parametrize("weight", [0.5, 2.0])
def test_frame_term_matches_hand_computation(weight):
    """Every frame of every view is an anchor; positive: the same instant in the other view;
    distractors (uniform): the other frames of its own sequence."""
    ctx, tgt, mask = _hand_case(V=2)
    args = (torch.tensor(ctx), torch.tensor(tgt), torch.tensor(mask))
    plain, _ = contrastive_loss(*args, ContrastiveConfig(temperature=0.2), generator=_gen())
    cfg = ContrastiveConfig(temperature=0.2, frame_weight=weight)
    loss, metrics = contrastive_loss(*args, cfg, generator=_gen())
    q = tgt[0]
    expected = [_np_info_nce(q[v, i], [q[1 - v, i]], [q[v, j] for j in range(3) if j != i],
                             0.2, "mean") for v in range(2) for i in range(3)]  # fmt: skip
    assert metrics["loss_frame"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert loss.item() == pytest.approx(plain.item() + weight * np.mean(expected), rel=1e-5)
    beats = [_np_cos(q[v, i], q[1 - v, i]) > max(_np_cos(q[v, i], q[v, j]) for j in range(3)
                                                 if j != i) for v in range(2) for i in range(3)]
    assert metrics["frame_accuracy"] == pytest.approx(np.mean(beats))


@pytest.mark.parametrize("kind", KINDS)
def test_frame_term_reaches_every_frame_and_is_off_by_default(kind):
    context, targets, mask, pose3d = _batch(seed=4)
    _, metrics = contrastive_loss(context, targets, mask, ContrastiveConfig(
        negatives=NegativeConfig(kind=kind, num=8)), generator=_gen(), pose3d=pose3d)
    assert "loss_frame" not in metrics
    none = torch.zeros_like(mask)  # no masked frame: the masked-prediction term is a zero
    targets.requires_grad_(True)
    cfg = ContrastiveConfig(negatives=NegativeConfig(kind=kind, num=8), frame_weight=1.0)
    loss, metrics = contrastive_loss(context, targets, none, cfg, generator=_gen(), pose3d=pose3d)
    loss.backward()
    assert (targets.grad.abs().sum(-1) > 0).all()  # every frame of every view
    assert np.isfinite(metrics["loss_frame"]) and 0 <= metrics["frame_accuracy"] <= 1
    assert loss.item() == pytest.approx(metrics["loss_frame"], rel=1e-6)


def test_frame_term_needs_views_and_continuous_targets():
    context, targets, mask, pose3d = _batch(V=1)
    cfg = ContrastiveConfig(frame_weight=1.0)
    with pytest.raises(ValueError, match="2 or more views"):
        contrastive_loss(context, targets, mask, cfg, generator=_gen())
    context, targets, mask, pose3d = _batch(V=2)
    with pytest.raises(ValueError, match="quantizer"):
        contrastive_loss(context, targets, mask, cfg, generator=_gen(), quantized=True)
    with pytest.raises(ValueError, match="frame_weight"):
        ContrastiveConfig(frame_weight=-1.0)
