"""Retrieval search past FAISS's GPU limit on k: the capped escalation (MAX_FETCH) and its exact
fallback, against the uncapped escalation it replaces and against plain numpy."""

from __future__ import annotations

import faiss
import numpy as np
import pytest
import torch

import finetune.evaluation.retrieval as rt
from finetune.evaluation.retrieval import build_index, search


def _uncapped_search(index, queries, k, chunk=8192, exclude=(), max_elements=1 << 24):
    """The search before MAX_FETCH: 4x more neighbours for the rows short, up to the whole index
    (what FAISS on the CPU allows and a GPU index refuses past k = 2048)."""
    q = np.ascontiguousarray(queries, dtype=np.float32)
    Nq = len(q)
    D = np.full((Nq, k), np.nan, dtype=np.float32)
    ids = np.full((Nq, k), -1, dtype=np.int64)
    for start in range(0, Nq, chunk):
        rows = np.arange(start, min(start + chunk, Nq))
        fetch = min(index.ntotal, 2 * k if exclude else k)
        while len(rows):
            short = []
            step = max(1, max_elements // max(fetch, 1))
            for s in range(0, len(rows), step):
                sub = rows[s : s + step]
                d, i = index.search(q[sub], fetch)
                keep = i >= 0
                for qg, gg in exclude:
                    keep &= qg[sub][:, None] != gg[np.maximum(i, 0)]
                order = np.argsort(~keep, axis=1, kind="stable")[:, :k]
                got = np.take_along_axis(keep, order, 1)
                D[sub, : order.shape[1]] = np.where(got, np.take_along_axis(d, order, 1), np.nan)
                ids[sub, : order.shape[1]] = np.where(got, np.take_along_axis(i, order, 1), -1)
                short.append(sub[keep.sum(1) < k])
            rows = np.concatenate(short)
            if fetch >= index.ntotal:
                break
            fetch = min(index.ntotal, 4 * fetch)
    return D, ids


def _one_big_clip(n_clip=300, n_other=300, n_queries=30, d=8, seed=0, spread=0.1):
    """Gallery: clip 0 is ``n_clip`` frames in a tight cluster, the others ``n_other`` frames
    spread around it; queries: two thirds from clip 0 (every near neighbour is of their own
    clip), a third from elsewhere. Two cameras, at random."""
    rng = np.random.default_rng(seed)
    centre = 3.0 * rng.normal(size=d)

    def frames(own: int, other: int) -> tuple[np.ndarray, np.ndarray]:  # vectors, clips
        x = np.concatenate([spread * rng.normal(size=(own, d)), rng.normal(size=(other, d))])
        clips = np.concatenate([np.zeros(own, int), rng.integers(1, 11, other)])
        return (centre + x).astype(np.float32), clips

    gallery, g_clip = frames(n_clip, n_other)
    n_own = 2 * n_queries // 3
    queries, q_clip = frames(n_own, n_queries - n_own)
    g_cam, q_cam = rng.integers(0, 2, len(gallery)), rng.integers(0, 2, n_queries)
    return gallery, queries, [(q_clip, g_clip), (q_cam, g_cam)], n_own


def _numpy_topk(gallery, queries, k, metric, exclude):
    """Exact masked top-k in float64: distances as FAISS reports them, ids (-1 where none)."""
    g, q = gallery.astype(np.float64), queries.astype(np.float64)
    score = ((q[:, None] - g[None]) ** 2).sum(-1) if metric == "l2" else -q @ g.T
    for qg, gg in exclude:
        score[qg[:, None] == gg[None]] = np.inf
    ids = np.argsort(score, axis=1, kind="stable")[:, :k]
    best = np.take_along_axis(score, ids, 1)
    found = np.isfinite(best)
    D = np.where(found, best if metric == "l2" else -best, np.nan)
    return D, np.where(found, ids, -1)


def _spy_exact(monkeypatch) -> list[int]:
    """The number of queries of each call of the fallback."""
    calls, real = [], rt.exact_search

    def spy(index, queries, *args, **kwargs):
        calls.append(len(queries))
        return real(index, queries, *args, **kwargs)

    monkeypatch.setattr(rt, "exact_search", spy)
    return calls


@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_fallback_equals_numpy_when_most_neighbours_are_excluded(monkeypatch, metric):
    gallery, queries, exclude, n_own = _one_big_clip()
    if metric == "ip":  # cosine, as on L2-normalised embeddings: clip 0 is again the nearest
        gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
    monkeypatch.setattr(rt, "MAX_FETCH", 8)
    calls = _spy_exact(monkeypatch)
    index = build_index(gallery, metric=metric, gpu=False)
    D, ids = search(index, queries, k=3, chunk=16, exclude=exclude)
    assert n_own <= sum(calls) < len(queries)  # clip-0 queries (at least) took the fallback
    want_D, want_ids = _numpy_topk(gallery, queries, 3, metric, exclude)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(D, want_D, rtol=1e-5, atol=1e-5)
    assert (ids >= 0).all()


@pytest.mark.parametrize("cap", [8, 64, rt.MAX_FETCH])
@pytest.mark.parametrize("metric", ["l2", "ip"])
def test_capped_search_matches_the_uncapped_one(monkeypatch, cap, metric):
    """Identical ids to the old escalation wherever it ran (the CPU), fallback or not."""
    gallery, queries, exclude, _ = _one_big_clip(seed=1)
    monkeypatch.setattr(rt, "MAX_FETCH", cap)
    index = build_index(gallery, metric=metric, gpu=False)
    for rules in (exclude[:1], exclude):
        D, ids = search(index, queries, k=4, chunk=7, exclude=rules, max_elements=500)
        old_D, old_ids = _uncapped_search(index, queries, 4, chunk=7, exclude=rules,
                                          max_elements=500)  # fmt: skip
        np.testing.assert_array_equal(ids, old_ids)
        np.testing.assert_allclose(D, old_D, rtol=1e-5, atol=1e-5)


def test_cap_never_reached_is_the_old_search_bit_for_bit(monkeypatch):
    rng = np.random.default_rng(2)
    gallery, queries = rng.normal(size=(600, 8)), rng.normal(size=(50, 8))
    exclude = [(rng.integers(0, 3, 50), rng.integers(0, 3, 600))]  # a third excluded
    monkeypatch.setattr(rt, "MAX_FETCH", 64)  # below the index size, never needed here
    calls = _spy_exact(monkeypatch)
    index = build_index(gallery, gpu=False)
    D, ids = search(index, queries, k=4, chunk=16, exclude=exclude)
    old_D, old_ids = _uncapped_search(index, queries, 4, chunk=16, exclude=exclude)
    assert calls == []
    np.testing.assert_array_equal(ids, old_ids)
    np.testing.assert_array_equal(D, old_D)


def test_search_never_asks_more_than_max_fetch():
    """With the real cap: a clip of 2,500 frames around the queries needs a fetch past 2,048
    (the old escalation asked for 2,560, which a FAISS GPU index refuses)."""
    asked = []

    class Spy(faiss.IndexFlat):  # FAISS objects take no new attributes: `asked` is outside
        def search(self, x, k, **kwargs):
            asked.append(k)
            return super().search(x, k, **kwargs)

    gallery, queries, exclude, _ = _one_big_clip(n_clip=2500, n_other=400, n_queries=12)
    index = Spy(gallery.shape[1], faiss.METRIC_L2)
    index.add(gallery)
    D, ids = search(index, queries, k=5, exclude=exclude[:1])
    assert max(asked) == rt.MAX_FETCH == 2048
    want_D, want_ids = _numpy_topk(gallery, queries, 5, "l2", exclude[:1])
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(D, want_D, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("as_gpu", [False, True])
def test_ivfpq_fallback_keeps_to_the_probed_cells(monkeypatch, as_gpu):
    """IVF-PQ: the fallback ranks what FAISS would (the decoded vectors of the ``nprobe`` cells
    it visits); ``as_gpu`` takes the GPU index's copy path (index_gpu_to_cpu clones a CPU
    index)."""
    gallery, queries, exclude, _ = _one_big_clip(n_clip=300, n_other=500, seed=3)
    index = build_index(gallery, kind="ivfpq", gpu=False, nprobe=3)
    old_D, old_ids = _uncapped_search(index, queries, 4, exclude=exclude[:1])
    monkeypatch.setattr(rt, "MAX_FETCH", 8)
    monkeypatch.setattr(rt, "_on_gpu", lambda index: as_gpu)
    calls = _spy_exact(monkeypatch)
    D, ids = search(index, queries, k=4, exclude=exclude[:1])
    assert sum(calls) > 0
    assert faiss.try_extract_index_ivf(index).direct_map.type == 0  # the caller's: unchanged
    np.testing.assert_array_equal(ids < 0, old_ids < 0)
    assert (ids == old_ids).mean() >= 0.95  # float32 tables vs float64: near ties may swap
    np.testing.assert_allclose(D, old_D, rtol=1e-4, atol=1e-4)
    decoded = rt._readable(index).reconstruct_n(0, index.ntotal)
    _, everywhere = _numpy_topk(decoded, queries, 4, "l2", exclude[:1])
    assert (ids != everywhere).any()  # unprobed cells hold nearer frames, left out as by FAISS


def test_exact_search_pads_and_reads_string_groups():
    gallery = np.eye(4, dtype=np.float32)
    D, ids = rt.exact_search(build_index(gallery, gpu=False), gallery, 3,
                             [(np.array(["a"] * 4), np.array(["a", "a", "bb", "bb"]))])  # fmt: skip
    assert (ids[:, :2] >= 2).all() and (ids[:, 2] == -1).all() and np.isnan(D[:, 2]).all()
    np.testing.assert_allclose(D[:, :2], np.where(ids[:, :2] == np.arange(4)[:, None], 0, 2))


# ------------------------------------------------------------------------------------ GPU


@pytest.mark.gpu
@pytest.mark.skipif(faiss.get_num_gpus() == 0, reason="FAISS sees no GPU")
@pytest.mark.parametrize("kind", ["flat", "ivfpq"])
def test_gpu_index_past_the_cap_matches_cpu(kind):
    """The real cap on a FAISS GPU index: the escalation stops at 2,048 instead of failing."""
    gallery, queries, exclude, _ = _one_big_clip(n_clip=2500, n_other=500, n_queries=60)
    cpu = build_index(gallery, kind=kind, gpu=False)
    gpu = faiss.index_cpu_to_all_gpus(cpu)  # the same stored codes: only the search differs
    D, ids = search(cpu, queries, k=5, exclude=exclude)
    gpu_D, gpu_ids = search(gpu, queries, k=5, exclude=exclude)
    if kind == "flat":
        np.testing.assert_array_equal(gpu_ids, ids)
    else:  # GPU PQ tables round differently: near ties may swap
        assert (gpu_ids == ids).mean() >= 0.9
    np.testing.assert_allclose(gpu_D, D, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch sees no CUDA device")
@pytest.mark.parametrize("kind,metric", [("flat", "l2"), ("flat", "ip"), ("ivfpq", "l2")])
def test_exact_search_on_cuda_matches_cpu(kind, metric):
    gallery, queries, exclude, _ = _one_big_clip(n_clip=400, n_other=600, d=16, seed=4)
    index = build_index(gallery, kind=kind, metric=metric, gpu=False, nprobe=3)
    D, ids = rt.exact_search(index, queries, 5, exclude, max_elements=4096, device="cpu")
    cuda_D, cuda_ids = rt.exact_search(index, queries, 5, exclude, max_elements=4096,
                                       device="cuda")  # fmt: skip
    np.testing.assert_array_equal(cuda_ids, ids)
    np.testing.assert_allclose(cuda_D, D, rtol=1e-6, atol=1e-6)
