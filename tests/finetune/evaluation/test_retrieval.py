"""Retrieval: embeddings of a split, exact chunked FAISS search, reference rows, verified cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_sample

import finetune.evaluation.retrieval as rt
import finetune.evaluation.store as store_mod
from data_shards.skeleton import NUM_JOINTS
from data_shards.write import write_split
from finetune.evaluation.cache import embed_split_cached
from finetune.evaluation.embed import Embeddings, RawPixels, embed_split
from finetune.evaluation.retrieval import RetrievalConfig, build_index, search
from finetune.evaluation.store import ChecksumError

V, T = 2, 4
AREA = "Evaluation"  # of docs/reliability.md (tests/faultlog.py)


def _rotation(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


@pytest.fixture
def split(tmp_path):
    samples = []
    for c, action in enumerate(("walk", "run", "jump")):
        for i in range(2):
            s = make_sample(key=f"{action}-w{i}", views=V, frames=T, size=(32, 32),
                            seed=10 * c + i, action=action)  # fmt: skip
            s.Rt[1, :, :3] = _rotation(0.7 + c)  # a real rotation for view 1
            samples.append(s)
    write_split(tmp_path, "train", samples, {}, {})
    return tmp_path / "train", samples


def _synthetic(n: int, d: int = 8, seed: int = 0, clips: int = 4, cams: int = 2) -> Embeddings:
    rng = np.random.default_rng(seed)
    return Embeddings(
        vectors=rng.normal(size=(n, d)).astype(np.float32),
        pose3d=(rng.normal(size=(n, NUM_JOINTS, 3)) * 300).astype(np.float32),
        keys=np.array([f"k{i // 4}" for i in range(n)]),
        clips=np.array([f"c{i % clips}" for i in range(n)]),
        actions=np.array([f"a{i % 2}" for i in range(n)]),
        cameras=np.array([f"cam{i % cams}" for i in range(n)]),
        views=np.arange(n) % cams,
        frames=np.arange(n),
    )


def test_embed_split_rows_poses_in_camera_coordinates(split):
    split_dir, samples = split
    emb = embed_split(RawPixels(4), split_dir, batch_size=4, progress=False)
    assert len(emb) == len(samples) * V * T and emb.vectors.shape[1] == 3 * 4 * 4
    np.testing.assert_allclose(np.linalg.norm(emb.vectors, axis=1), 1.0, rtol=1e-5)
    by_key = {s.key: s for s in samples}
    assert sorted(set(emb.keys)) == sorted(by_key)  # every sample exactly V*T times
    assert all((emb.keys == k).sum() == V * T for k in by_key)
    for row in range(0, len(emb), 3):
        s = by_key[emb.keys[row]]
        v, t = emb.views[row], s.meta.frames.index(emb.frames[row])
        world = s.pose3d[t] - s.pose3d[t, 0]
        expected = world @ np.asarray(s.Rt[v, :, :3]).T
        np.testing.assert_allclose(emb.pose3d[row], expected, atol=1e-2)
        assert emb.cameras[row] == s.meta.views[v].camera and emb.actions[row] == s.meta.action


def test_posebert_encoder_embeds_every_frame(split):
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    torch.manual_seed(0)
    model = PoseBERT(debug_cpu().model)
    emb = embed_split(model, split[0], batch_size=3, progress=False)
    assert emb.vectors.shape == (6 * V * T, debug_cpu().model.encoder.width)
    assert np.isfinite(emb.vectors).all()


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_search_is_exact_against_numpy(metric):
    rng = np.random.default_rng(1)
    gallery, queries = rng.normal(size=(300, 16)), rng.normal(size=(53, 16))
    index = build_index(gallery, metric=metric, gpu=False)
    _, ids = search(index, queries, k=5, chunk=7)
    if metric == "l2":
        scores = ((queries[:, None] - gallery[None]) ** 2).sum(-1)
    else:
        scores = -queries @ gallery.T
    np.testing.assert_array_equal(ids, np.argsort(scores, axis=1)[:, :5])


def test_search_exclusion_matches_masked_brute_force():
    rng = np.random.default_rng(2)
    gallery, queries = rng.normal(size=(200, 8)), rng.normal(size=(40, 8))
    gg, qg = rng.integers(0, 3, 200), rng.integers(0, 3, 40)
    _, ids = search(build_index(gallery, gpu=False), queries, k=4, chunk=16, exclude=[(qg, gg)])
    dist = ((queries[:, None] - gallery[None]) ** 2).sum(-1)
    dist[qg[:, None] == gg[None]] = np.inf
    np.testing.assert_array_equal(ids, np.argsort(dist, axis=1)[:, :4])
    assert (gg[ids] != qg[:, None]).all()


def test_search_pads_when_too_few_admissible():
    gallery = np.eye(4, dtype=np.float32)
    D, ids = search(build_index(gallery, gpu=False), gallery, k=3,
                    exclude=[(np.zeros(4), np.array([0, 0, 1, 1]))])  # fmt: skip
    assert (ids[:, :2] >= 2).all() and (ids[:, 2] == -1).all() and np.isnan(D[:, 2]).all()


def test_ivfpq_index_searches():
    x = np.random.default_rng(3).normal(size=(2000, 16)).astype(np.float32)
    index = build_index(x, kind="ivfpq", gpu=False, nprobe=64)
    _, ids = search(index, x[:20], k=5)
    assert ((ids >= 0) & (ids < 2000)).all()
    assert (ids[:, 0] == np.arange(20)).mean() >= 0.5  # PQ is lossy, but self is usually top


def test_p_mpjpe_ignores_similarity_but_not_reflection():
    mp, pmp = rt._per_frame_mpjpe, rt._per_frame_p_mpjpe
    pose = np.random.default_rng(4).normal(size=(NUM_JOINTS, 3)) * 100
    moved = 1.7 * pose @ _rotation(1.1).T + np.array([5.0, -3.0, 40.0])
    assert pmp(moved, pose) == pytest.approx(0.0, abs=1e-8)
    assert mp(moved, pose) > 1.0
    mirrored = pose * np.array([-1.0, 1.0, 1.0])
    assert pmp(mirrored, pose) > 1.0
    shifted = pose + np.array([3.0, 4.0, 0.0])
    assert mp(shifted, pose) == pytest.approx(5.0)


def _turn_about_y(pose: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return pose @ np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]).T


def test_facing_one_way_forgets_only_the_turn_about_the_vertical_axis():
    pose = _synthetic(5, seed=1).pose3d
    canonical = rt.facing_one_way(pose)
    for angle in (0.3, 2.0, -2.9):
        turned = _turn_about_y(pose, angle).astype(np.float32)
        np.testing.assert_allclose(rt.facing_one_way(turned), canonical, atol=1e-3)
    hips = canonical[:, rt.L_HIP] - canonical[:, rt.R_HIP]
    assert (hips[:, 0] > 0).all() and np.abs(hips[:, 2]).max() < 1e-3  # along +x from above
    # a turn about another axis is not forgotten
    assert np.abs(rt.facing_one_way(pose @ _rotation(0.5).T.astype(np.float32))
                  - canonical).max() > 1.0  # fmt: skip


def test_viewpoint_free_oracle_finds_the_same_pose_facing_another_way():
    """The gallery holds each query's pose turned about the vertical axis and noisy copies
    facing the query's way: the viewpoint-free oracle picks the turned copy (and scores its
    camera-frame error), the plain oracle a noisy copy."""
    query = _synthetic(20, seed=3)
    rng = np.random.default_rng(4)
    turned = np.stack([_turn_about_y(p, a) for p, a in zip(
        query.pose3d, rng.uniform(1.0, 2.5, 20), strict=True)])  # fmt: skip
    noisy = query.pose3d + rng.normal(size=query.pose3d.shape) * 60
    gallery = _synthetic(40, seed=5)
    gallery.pose3d = np.concatenate([turned, noisy]).astype(np.float32)
    cfg = RetrievalConfig(k=1, ks=(1,))
    free = rt.viewpoint_free_oracle(query, gallery, cfg).neighbours[:, 0]
    np.testing.assert_array_equal(free, np.arange(20))
    np.testing.assert_array_equal(rt.oracle(query, gallery, cfg).neighbours[:, 0],
                                  np.arange(20, 40))  # fmt: skip


def test_oracle_beats_chance_and_model_sits_between():
    query, gallery = _synthetic(60, seed=5), _synthetic(400, seed=6)
    cfg = RetrievalConfig(k=5, ks=(1, 5))
    rows = rt.reference_rows(query, gallery, cfg)
    rows["model"] = rt.retrieve(query, gallery, cfg)
    s = {name: r.summary(cfg.ks, cfg.thresholds_mm) for name, r in rows.items()}
    assert s["oracle"]["mpjpe"]["top1"] <= s["chance"]["mpjpe"]["top1"]
    assert s["oracle"]["mpjpe"]["top1"] <= s["model"]["mpjpe"]["top1"]
    assert s["oracle"]["mpjpe"]["top1"] <= s["oracle, viewpoint-free"]["mpjpe"]["top1"]
    assert s["model"]["mpjpe"]["top5"] <= s["model"]["mpjpe"]["top1"]
    assert set(s["model"]["per_action"]) == {"a0", "a1"}
    brute = ((query.pose3d[:, None] - gallery.pose3d[None]) ** 2).sum((-1, -2)).argmin(1)
    np.testing.assert_array_equal(rows["oracle"].neighbours[:, 0], brute)


def test_exclude_same_clip_and_cross_view():
    emb = _synthetic(80, seed=7)
    plain = rt.oracle(emb, emb, RetrievalConfig(k=3, ks=(1,)))
    assert (plain.neighbours[:, 0] == np.arange(80)).all()  # itself, error 0
    for cfg in (RetrievalConfig(k=3, ks=(1,), exclude_same_clip=True),
                RetrievalConfig(k=3, ks=(1,), cross_view=True)):  # fmt: skip
        for row in (rt.oracle(emb, emb, cfg), rt.retrieve(emb, emb, cfg), rt.chance(emb, emb, cfg)):
            nb = row.neighbours
            assert (nb >= 0).all()
            if cfg.exclude_same_clip:
                assert (emb.clips[nb] != emb.clips[:, None]).all()
            else:
                assert (emb.cameras[nb] != emb.cameras[:, None]).all()


@pytest.mark.fault(AREA, "one flipped bit in a cached FAISS index",
                   injected="a bit of index-flat-l2.faiss flipped; FAISS parsing it fails the "
                   "test")  # fmt: skip
def test_tampered_index_refused_before_reading(tmp_path, monkeypatch, observed):
    gallery = _synthetic(50, seed=8)
    cfg = RetrievalConfig(gpu=False)
    index = rt.cached_index(gallery, tmp_path, cfg)
    path = tmp_path / "index-flat-l2.faiss"
    again = rt.cached_index(gallery, tmp_path, cfg)  # verified and loaded
    assert again.ntotal == index.ntotal == 50
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))

    def must_not_parse(*args):
        raise AssertionError("FAISS parsed a file whose checksum does not match")

    monkeypatch.setattr(rt.faiss, "deserialize_index", must_not_parse)
    with pytest.raises(ChecksumError, match="does not match") as cached:
        rt.cached_index(gallery, tmp_path, cfg)
    with pytest.raises(ChecksumError) as loaded:
        rt.load_index(path)
    observed(f"cached_index: {type(cached.value).__name__}: {cached.value}")
    observed(f"load_index: {type(loaded.value).__name__}: {loaded.value}")


@pytest.mark.fault(AREA, "a run interrupted after a cache file was written but before its "
                   "checksum, plus a stale temp file", injected="KeyboardInterrupt raised in "
                   "place of writing the .sha256; half a file left as a .tmp")  # fmt: skip
def test_rerun_after_kill_is_idempotent(split, tmp_path, monkeypatch, observed):
    split_dir = split[0]
    clean, _ = embed_split_cached(RawPixels(4), split_dir, tmp_path / "clean", progress=False)
    real_write, calls = store_mod.atomic_write_bytes, []

    def killed_before_checksum(path, data):  # the data file lands, then the process dies
        calls.append(path.name)
        if path.name.endswith(".sha256"):
            raise KeyboardInterrupt("simulated kill")
        real_write(path, data)

    cache = tmp_path / "cache"
    monkeypatch.setattr(store_mod, "atomic_write_bytes", killed_before_checksum)
    with pytest.raises(KeyboardInterrupt):
        embed_split_cached(RawPixels(4), split_dir, cache, progress=False)
    monkeypatch.setattr(store_mod, "atomic_write_bytes", real_write)
    (folder,) = cache.iterdir()
    assert (folder / "embeddings-l2norm.npz").exists()  # a half-done entry: data, no checksum
    (folder / ".embeddings-l2norm.npz.tmp999").write_bytes(b"half a file")  # a stale temp
    first, folder1 = embed_split_cached(RawPixels(4), split_dir, cache, progress=False)
    second, folder2 = embed_split_cached(RawPixels(4), split_dir, cache, progress=False)
    assert folder1 == folder2 == folder
    for emb in (first, second):
        np.testing.assert_array_equal(emb.vectors, clean.vectors)
        np.testing.assert_array_equal(emb.keys, clean.keys)
    cfg = RetrievalConfig(gpu=False)
    a = rt.cached_index(first, folder, cfg)
    b = rt.cached_index(first, folder, cfg)
    assert a.ntotal == b.ntotal == len(first)
    same = all(np.array_equal(e.vectors, clean.vectors) for e in (first, second))
    observed(f"writes before the kill {calls}; rerun and rerun again equal to a clean run: "
             f"{same}; files {sorted(p.name for p in folder.iterdir())}")  # fmt: skip


def test_cache_key_follows_encoder_and_split(split, tmp_path):
    _, f4 = embed_split_cached(RawPixels(4), split[0], tmp_path, progress=False)
    _, f8 = embed_split_cached(RawPixels(8), split[0], tmp_path, progress=False)
    assert f4 != f8


def test_random_init_cache_key_follows_the_config_not_only_the_weights():
    """Two random-init encoders with identical weights but another background-mask setting (or
    another input size) must not share cached embeddings."""
    import dataclasses

    from data_shards.transforms import Resize
    from finetune.evaluation.embed import EncoderEmbedder, random_init_like
    from pretrain.model import PoseBERT
    from pretrain.recipes import debug_cpu

    cfg = debug_cpu().model
    masked = dataclasses.replace(
        cfg, backbone=dataclasses.replace(cfg.backbone, background_mask=True))
    plain, other = random_init_like(PoseBERT(cfg), 0), random_init_like(PoseBERT(masked), 0)
    assert all(torch.equal(a, b) for a, b in zip(plain.state_dict().values(),
                                                 other.state_dict().values(), strict=True))
    keys = {EncoderEmbedder(plain).fingerprint, EncoderEmbedder(other).fingerprint,
            EncoderEmbedder(plain, transforms=(Resize(32),)).fingerprint}
    assert len(keys) == 3
    assert EncoderEmbedder(random_init_like(PoseBERT(cfg), 0)).fingerprint in keys
