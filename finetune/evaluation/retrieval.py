"""Nearest-neighbour retrieval evaluation: FAISS index, chunked search, retrieval MPJPE.

For each validation frame (query) the nearest train frames (gallery) in embedding space are
found with FAISS (on the GPU when FAISS sees one, else the CPU; exact flat by default, IVF-PQ
for millions); the score is the error between the query's 3D pose and the retrieved frame's,
root-relative in each frame's camera coordinates:

- top-1 MPJPE (protocol 1) and P-MPJPE (protocol 2, after Procrustes alignment with rotation,
  translation and scale, reflections excluded), mm; top-k: the minimum over the k retrieved;
- Hit@k at MPJPE thresholds: share of queries with a top-k match within the threshold;
- per action; options to exclude matches from the query's own clip and a cross-view mode where
  a query never matches a frame of its own camera.

Reference rows use the same scoring (:func:`score_neighbours`): ``oracle`` (the gallery frame
nearest in ground-truth pose, found by FAISS on flattened poses: L2 over all joints, the
closest proxy of MPJPE an index can rank by), ``oracle, viewpoint-free`` (the same on poses
turned about the camera's vertical axis to face one way: the best a representation that ignores
which way the body faces the camera could retrieve, e.g. one trained to match the same instant
seen from cameras around it) and ``chance`` (random gallery frames, seeded).
A random-init encoder and raw pixels are just other embeddings (:mod:`finetune.evaluation.embed`).

FAISS GPU indexes return at most :data:`MAX_FETCH` (2048) neighbours per query, so the search
that skips excluded matches fetches no more than that from any index, on the GPU or the CPU, and
the queries still short of k admissible matches there are answered by :func:`exact_search`: brute
force over the vectors the index stores, with the same exclusions, the same metric and, for
IVF-PQ, the same probed cells, i.e. what an unlimited fetch would give.

Indexes are cached beside their embeddings with a sha256 that is checked before FAISS parses
a byte (a corrupted index often loads and searches without error).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import faiss
import numpy as np
import torch

from data_shards.skeleton import JOINT_INDEX
from finetune.evaluation.embed import Embeddings
from finetune.evaluation.metrics import mpjpe, p_mpjpe
from finetune.evaluation.store import is_complete, open_verified, save_verified, stored_key

FAISS_METRICS = {"l2": faiss.METRIC_L2, "ip": faiss.METRIC_INNER_PRODUCT}
INDEX_KINDS = ("flat", "ivfpq")
MAX_FETCH = 2048
"""Most neighbours :func:`search` asks of an index per query: FAISS GPU indexes refuse a larger k
(``GPU_MAX_SELECTION_K`` in faiss/gpu/utils/DeviceDefs.cuh). Applied on the CPU too, so that a
CPU run takes the path a GPU run takes; queries still short of admissible neighbours at this
many go to :func:`exact_search`."""

Exclusion = tuple[np.ndarray, np.ndarray]
"""(query groups (Nq,), gallery groups (Ng,)): a match with an equal group is excluded."""


@dataclasses.dataclass(frozen=True)
class RetrievalConfig:
    """How retrieval is run and scored; validated when built."""

    k: int = 5
    """Neighbours retrieved per query (top-k metrics use the first k)."""
    ks: tuple[int, ...] = (1, 5)
    """The k values reported (each <= k)."""
    thresholds_mm: tuple[float, ...] = (50.0, 100.0, 150.0)
    """MPJPE thresholds of Hit@k."""
    kind: str = "flat"
    """'flat' (exact) or 'ivfpq' (approximate, for millions of frames)."""
    metric: str = "l2"
    """'l2' or 'ip' (inner product = cosine on L2-normalised embeddings)."""
    gpu: str | bool = "auto"
    """'auto': GPU when FAISS sees one; True: require one; False: CPU."""
    chunk: int = 8192
    """Queries searched at once (memory bound: chunk x fetched neighbours)."""
    exclude_same_clip: bool = False
    """Never match a frame of the query's own clip (sequence)."""
    cross_view: bool = False
    """Never match a frame seen by the query's own camera (queries from one camera, gallery
    from the others)."""
    seed: int = 0
    """Seed of the chance row and of IVF-PQ training samples."""

    def __post_init__(self) -> None:
        if self.kind not in INDEX_KINDS:
            raise ValueError(f"kind={self.kind!r}; expected one of {INDEX_KINDS}")
        if self.metric not in FAISS_METRICS:
            raise ValueError(f"metric={self.metric!r}; expected one of {tuple(FAISS_METRICS)}")
        if self.k < 1 or not self.ks or any(not 1 <= k <= self.k for k in self.ks):
            raise ValueError(f"need 1 <= ks <= k; got k={self.k}, ks={self.ks}")
        if self.chunk < 1:
            raise ValueError(f"chunk={self.chunk} must be >= 1")


# ------------------------------------------------------------------------------ the index


def use_gpu(gpu: str | bool) -> bool:
    n = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    if gpu == "auto":
        return n > 0
    if gpu and n == 0:
        raise RuntimeError("gpu=True but FAISS sees no GPU (faiss.get_num_gpus() == 0)")
    return bool(gpu)


def build_index(
    vectors: np.ndarray,
    kind: str = "flat",
    metric: str = "l2",
    gpu: str | bool = "auto",
    nlist: int | None = None,
    m: int | None = None,
    nbits: int = 8,
    nprobe: int = 16,
    seed: int = 0,
) -> faiss.Index:
    """A FAISS index over ``vectors`` (N, D). IVF-PQ: ``nlist`` cells (default ~4 sqrt N, at
    least 39 training points each), ``m`` sub-quantizers of ``nbits`` bits, ``nprobe`` cells
    visited per query."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    N, d = x.shape
    if N == 0:
        raise ValueError("cannot build an index over 0 vectors")
    if metric not in FAISS_METRICS:
        raise ValueError(f"metric={metric!r}; expected one of {tuple(FAISS_METRICS)}")
    if kind == "flat":
        index = faiss.IndexFlat(d, FAISS_METRICS[metric])
    elif kind == "ivfpq":
        nlist = nlist or max(1, min(int(4 * np.sqrt(N)), N // 39))
        m = m or next(c for c in (16, 8, 4, 2, 1) if d % c == 0)
        nbits = max(1, min(nbits, int(np.log2(N))))  # PQ training needs >= 2**nbits points
        quantizer = faiss.IndexFlat(d, FAISS_METRICS[metric])
        index = faiss.IndexIVFPQ(quantizer, d, nlist, m, nbits, FAISS_METRICS[metric])
        rng = np.random.default_rng(seed)
        sample = x[rng.choice(N, min(N, 256 * max(nlist, 2**nbits)), replace=False)]
        index.train(sample)
        index.nprobe = min(nprobe, nlist)
    else:
        raise ValueError(f"kind={kind!r}; expected one of {INDEX_KINDS}")
    if use_gpu(gpu):
        index = faiss.index_cpu_to_all_gpus(index)
    index.add(x)
    return index


def save_index(index: faiss.Index, path: str | os.PathLike, key: str | None = None) -> Path:
    """Atomic write with a sha256 file beside it (GPU indexes are copied to the CPU first);
    ``key`` is stored inside (:func:`finetune.evaluation.store.save_verified`)."""
    if hasattr(faiss, "index_gpu_to_cpu") and "Gpu" in type(index).__name__:
        index = faiss.index_gpu_to_cpu(index)
    return save_verified(path, faiss.serialize_index(index).tobytes(), key)


def load_index(path: str | os.PathLike, gpu: str | bool = "auto",
               key: str | None = None) -> faiss.Index:  # fmt: skip
    """The index at ``path``; its sha256 (and ``key``, when given) is verified before FAISS
    parses it (the bytes checked are the bytes parsed: no re-read between check and use)."""
    data = open_verified(path, key)
    index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    return faiss.index_cpu_to_all_gpus(index) if use_gpu(gpu) else index


def cached_index(gallery: Embeddings, folder: str | os.PathLike, config: RetrievalConfig,
                 key: str | None = None) -> faiss.Index:  # fmt: skip
    """The gallery's index from ``folder`` (the embeddings' cache folder), built and saved when
    missing or half-written; a tampered one raises
    :class:`finetune.evaluation.store.ChecksumError`. ``key`` (the gallery embeddings' cache
    key) is stored in the index file with the index settings and checked on reuse; an index
    file of an older format (no key) is rebuilt."""
    path = Path(folder) / f"index-{config.kind}-{config.metric}.faiss"
    if key is not None:
        key = f"index {key} kind={config.kind} metric={config.metric} seed={config.seed}"
    if is_complete(path) and (key is None or stored_key(path) is not None):
        return load_index(path, config.gpu, key)
    index = build_index(gallery.vectors, config.kind, config.metric, config.gpu, seed=config.seed)
    save_index(index, path, key)
    return index


# ----------------------------------------------------------------------------- the search


def search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    chunk: int = 8192,
    exclude: Sequence[Exclusion] = (),
    max_elements: int = 1 << 24,
) -> tuple[np.ndarray, np.ndarray]:
    """Top-``k`` of each query: distances (Nq, k) float32 and ids (Nq, k) int64, best first.

    Queries go ``chunk`` at a time. With ``exclude`` the search fetches more neighbours than
    k and drops the excluded ones, fetching 4x more for the rows still short (up to
    :data:`MAX_FETCH` or the whole index, in sub-chunks of at most ``max_elements`` ids); rows
    still short at :data:`MAX_FETCH` are answered by :func:`exact_search`, which gives what an
    unlimited fetch would. Rows with fewer than k admissible matches are padded with id -1 and
    distance NaN.
    """
    q = np.ascontiguousarray(queries, dtype=np.float32)
    Nq = len(q)
    D = np.full((Nq, k), np.nan, dtype=np.float32)
    ids = np.full((Nq, k), -1, dtype=np.int64)
    capped = []  # rows still short at MAX_FETCH
    for start in range(0, Nq, chunk):
        rows = np.arange(start, min(start + chunk, Nq))
        fetch = min(index.ntotal, MAX_FETCH, 2 * k if exclude else k)
        while len(rows):
            short = []
            step = max(1, max_elements // max(fetch, 1))
            for s in range(0, len(rows), step):
                sub = rows[s : s + step]
                d, i = index.search(q[sub], fetch)
                keep = i >= 0
                for qg, gg in exclude:
                    keep &= qg[sub][:, None] != gg[np.maximum(i, 0)]
                order = np.argsort(~keep, axis=1, kind="stable")[:, :k]  # kept first, in order
                got = np.take_along_axis(keep, order, 1)
                D[sub, : order.shape[1]] = np.where(got, np.take_along_axis(d, order, 1), np.nan)
                ids[sub, : order.shape[1]] = np.where(got, np.take_along_axis(i, order, 1), -1)
                # fewer ids than asked (-1 last): the row saw every candidate (an IVF index's
                # probed cells hold fewer than `fetch`), a larger fetch would add nothing
                short.append(sub[(keep.sum(1) < k) & (i[:, -1] >= 0)])
            rows = np.concatenate(short)
            if fetch >= index.ntotal:
                break
            if fetch >= MAX_FETCH:
                capped.append(rows)
                break
            fetch = min(index.ntotal, MAX_FETCH, 4 * fetch)
    rows = np.concatenate(capped) if capped else np.zeros(0, dtype=np.int64)
    if len(rows):
        rules = [(qg[rows], gg) for qg, gg in exclude]
        D[rows], ids[rows] = exact_search(index, q[rows], k, rules, max_elements)
    return D, ids


def exact_search(
    index: faiss.Index,
    queries: np.ndarray,
    k: int,
    exclude: Sequence[Exclusion] = (),
    max_elements: int = 1 << 24,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """What :func:`search` returns when it may fetch any number of neighbours, by brute force.

    Every vector the index stores (as stored: decoded PQ codes for IVF-PQ) is scored against
    every query with the index's metric, in float64 on torch ``device`` (default: CUDA when the
    index is on a GPU and torch sees one, else the CPU); excluded matches and, for an IVF index,
    vectors outside the ``nprobe`` cells FAISS visits for the query are dropped and the best k
    kept. Stored vectors go in slices of about ``max_elements`` scores. Distances as FAISS
    reports them (squared L2, or inner product), computed more exactly (FAISS: float32), so
    near-equal ones may be ordered differently; rows short of k are padded with -1 and NaN.
    """
    stored = _readable(index)
    ivf = faiss.try_extract_index_ivf(stored)
    if device is None:
        device = "cuda" if _on_gpu(index) and torch.cuda.is_available() else "cpu"
    if stored.metric_type not in (faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT):
        raise ValueError(f"metric_type={stored.metric_type}; expected L2 or inner product")
    l2 = stored.metric_type == faiss.METRIC_L2
    q32 = np.ascontiguousarray(queries, dtype=np.float32)
    q = torch.from_numpy(q32).to(device, torch.float64)  # (Nq, D)
    Nq, Ng = len(q), stored.ntotal
    rules = [[torch.from_numpy(c).to(device) for c in _group_codes(qg, gg)] for qg, gg in exclude]
    if ivf is not None:  # the cell of each stored vector, the cells probed for each query
        cell = torch.from_numpy(faiss.vector_to_array(ivf.direct_map.array) >> 32).to(device)
        probes = min(ivf.nprobe, ivf.nlist)  # as IndexIVF.search clamps it
        probed = torch.from_numpy(ivf.quantizer.search(q32, probes)[1]).to(device)
    best = torch.full((Nq, k), torch.inf, dtype=torch.float64, device=device)  # lower = better
    best_ids = torch.full((Nq, k), -1, dtype=torch.int64, device=device)
    qs = max(1, min(Nq, 4096))
    gs = max(1, max_elements // max(qs, stored.d))
    for g in range(0, Ng, gs):
        x = torch.from_numpy(stored.reconstruct_n(g, min(gs, Ng - g))).to(device, torch.float64)
        gids, xx = torch.arange(g, g + len(x), device=device), (x * x).sum(1)
        for s in range(0, Nq, qs):
            qq = q[s : s + qs]
            score = -(qq @ x.T)  # (n, G)
            if l2:
                score = 2 * score + (qq * qq).sum(1, keepdim=True) + xx
            drop = torch.zeros(score.shape, dtype=torch.bool, device=device)
            for qg, gg in rules:
                drop |= qg[s : s + qs, None] == gg[None, g : g + len(x)]
            if ivf is not None:
                visit = torch.zeros(len(qq), ivf.nlist, dtype=torch.bool, device=device)
                drop |= ~visit.scatter_(1, probed[s : s + qs], True)[:, cell[g : g + len(x)]]
            merged = torch.cat([best[s : s + qs], score.masked_fill(drop, torch.inf)], 1)
            best[s : s + qs], at = merged.topk(k, dim=1, largest=False)
            ids = torch.cat([best_ids[s : s + qs], gids.expand(len(qq), -1)], 1)
            best_ids[s : s + qs] = ids.gather(1, at)
    found = torch.isfinite(best)
    D = torch.where(found, best if l2 else -best, torch.nan).to(torch.float32)
    return D.cpu().numpy(), torch.where(found, best_ids, -1).cpu().numpy()


def _on_gpu(index: faiss.Index) -> bool:
    return "Gpu" in type(index).__name__ or isinstance(index, faiss.IndexReplicas)


def _readable(index: faiss.Index) -> faiss.Index:
    """``index`` or a CPU copy of it whose ``reconstruct_n`` gives the stored vectors: a GPU
    index is copied to the CPU, an IVF one given a direct map (id -> cell, offset) on a copy,
    leaving the caller's index as it was."""
    if _on_gpu(index):
        index = faiss.index_gpu_to_cpu(index)
    elif faiss.try_extract_index_ivf(index) is not None:
        index = faiss.clone_index(index)
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf.make_direct_map()
    return index


def _group_codes(qg: np.ndarray, gg: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Integer codes of query and gallery groups (labels may be strings), equal where equal."""
    _, codes = np.unique(np.concatenate([qg, gg]), return_inverse=True)
    codes = codes.reshape(-1).astype(np.int64)
    return codes[: len(qg)], codes[len(qg) :]


def exclusions(query: Embeddings, gallery: Embeddings, config: RetrievalConfig) -> list[Exclusion]:
    out = []
    if config.exclude_same_clip:
        out.append((query.clips, gallery.clips))
    if config.cross_view:
        out.append((query.cameras, gallery.cameras))
    return out


# ------------------------------------------------------------------------ errors and scores


def _per_frame_mpjpe(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.asarray(mpjpe(pred, target, reduce="none"))


def _per_frame_p_mpjpe(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    return np.asarray(p_mpjpe(pred, target, reduce="none"))


@dataclasses.dataclass
class Scores:
    """Errors of each query's retrieved frames; ``inf`` where a neighbour is missing (-1)."""

    neighbours: np.ndarray
    """(Nq, k) gallery row ids, best first; -1 = none admissible."""
    mpjpe: np.ndarray
    """(Nq, k) mm."""
    p_mpjpe: np.ndarray
    """(Nq, k) mm."""
    actions: np.ndarray
    """(Nq,) action of each query."""

    def summary(self, ks: Sequence[int], thresholds_mm: Sequence[float]) -> dict:
        """Overall and per-action means: {'queries', 'mpjpe': {'top1'..}, 'p_mpjpe', 'hit'}."""
        out = _summarise(self.mpjpe, self.p_mpjpe, ks, thresholds_mm)
        out["per_action"] = {
            a: _summarise(
                self.mpjpe[self.actions == a], self.p_mpjpe[self.actions == a], ks, thresholds_mm
            )  # fmt: skip
            for a in sorted(set(self.actions.tolist()))
        }
        return out


def _summarise(mpjpe: np.ndarray, p_mpjpe: np.ndarray, ks: Sequence[int],
               thresholds_mm: Sequence[float]) -> dict:  # fmt: skip
    found = np.isfinite(mpjpe[:, 0])
    out: dict = {"queries": int(len(mpjpe)), "unmatched": int((~found).sum())}
    best = {k: mpjpe[found, :k].min(axis=1) for k in ks}
    out["mpjpe"] = {f"top{k}": _mean(best[k]) for k in ks}
    out["p_mpjpe"] = {f"top{k}": _mean(p_mpjpe[found, :k].min(axis=1)) for k in ks}
    out["hit"] = {
        f"top{k}@{t:g}mm": float((best[k] <= t).sum() / max(len(mpjpe), 1))
        for k in ks
        for t in thresholds_mm
    }
    return out


def _mean(x: np.ndarray) -> float | None:
    return float(x.mean()) if len(x) else None


def score_neighbours(query: Embeddings, gallery: Embeddings, neighbours: np.ndarray,
                     chunk: int = 4096) -> Scores:  # fmt: skip
    """Pose errors between each query and its neighbours (chunked: chunk x k poses at once)."""
    Nq, k = neighbours.shape
    mp = np.full((Nq, k), np.inf)
    pmp = np.full((Nq, k), np.inf)
    for s in range(0, Nq, chunk):
        nb = neighbours[s : s + chunk]
        ok = nb >= 0
        target = query.pose3d[s : s + chunk, None].astype(np.float64)  # (n, 1, J, 3)
        pred = gallery.pose3d[np.maximum(nb, 0)].astype(np.float64)  # (n, k, J, 3)
        target = np.repeat(target, k, axis=1)  # (n, k, J, 3), writable for torch metrics
        mp[s : s + chunk] = np.where(ok, _per_frame_mpjpe(pred, target), np.inf)
        pmp[s : s + chunk] = np.where(ok, _per_frame_p_mpjpe(pred, target), np.inf)
    return Scores(neighbours, mp, pmp, query.actions)


# ---------------------------------------------------------------------------------- rows


def retrieve(query: Embeddings, gallery: Embeddings, config: RetrievalConfig,
             index: faiss.Index | None = None) -> Scores:  # fmt: skip
    """The model row: nearest gallery embeddings of each query embedding, scored."""
    if query.vectors.shape[1] != gallery.vectors.shape[1]:
        raise ValueError(
            f"query dim {query.vectors.shape[1]} != gallery dim {gallery.vectors.shape[1]}"
        )
    if index is None:
        index = build_index(gallery.vectors, config.kind, config.metric, config.gpu,
                            seed=config.seed)  # fmt: skip
    if index.ntotal != len(gallery):
        raise ValueError(f"index holds {index.ntotal} vectors, gallery has {len(gallery)}")
    _, nb = search(index, query.vectors, config.k, config.chunk,
                   exclusions(query, gallery, config))  # fmt: skip
    return score_neighbours(query, gallery, nb)


def oracle(query: Embeddings, gallery: Embeddings, config: RetrievalConfig,
           turn: Callable[[np.ndarray], np.ndarray] | None = None) -> Scores:  # fmt: skip
    """Reference row: nearest gallery frames in ground-truth pose (exact L2 on flat poses,
    each first mapped by ``turn`` when given), scored in the query's camera coordinates."""
    poses = [e.pose3d if turn is None else turn(e.pose3d) for e in (gallery, query)]
    index = build_index(poses[0].reshape(len(gallery), -1), "flat", "l2", config.gpu)
    _, nb = search(index, poses[1].reshape(len(query), -1), config.k, config.chunk,
                   exclusions(query, gallery, config))  # fmt: skip
    return score_neighbours(query, gallery, nb)


L_HIP, R_HIP = JOINT_INDEX["l_hip"], JOINT_INDEX["r_hip"]


def facing_one_way(pose3d: np.ndarray) -> np.ndarray:
    """Root-relative camera-frame poses (N, J, 3) turned about the camera's vertical axis (y)
    so that each one's right-to-left hip vector, seen from above, points along +x."""
    pose = pose3d.astype(np.float64)
    hips = pose[:, L_HIP] - pose[:, R_HIP]  # (N, 3)
    angle = np.arctan2(hips[:, 2], hips[:, 0])[:, None]  # turn by -angle about y
    c, s = np.cos(angle), np.sin(angle)
    out = pose.copy()
    out[..., 0] = c * pose[..., 0] + s * pose[..., 2]
    out[..., 2] = -s * pose[..., 0] + c * pose[..., 2]
    return out.astype(np.float32)


def viewpoint_free_oracle(query: Embeddings, gallery: Embeddings,
                          config: RetrievalConfig) -> Scores:  # fmt: skip
    """Reference row: nearest gallery frames in pose once both face one way
    (:func:`facing_one_way`), scored like every row in the query's camera coordinates."""
    return oracle(query, gallery, config, turn=facing_one_way)


def chance(query: Embeddings, gallery: Embeddings, config: RetrievalConfig) -> Scores:
    """Reference row: k random admissible gallery frames per query (seeded; with replacement
    across the k, which matters only for galleries of a handful of frames)."""
    rng = np.random.default_rng(config.seed)
    nb = rng.integers(0, len(gallery), size=(len(query), config.k))
    rules = exclusions(query, gallery, config)
    for _ in range(64):  # redraw excluded picks; a query with no admissible frame stays -1
        bad = np.zeros(nb.shape, dtype=bool)
        for qg, gg in rules:
            bad |= qg[:, None] == gg[nb]
        if not bad.any():
            break
        nb[bad] = rng.integers(0, len(gallery), size=int(bad.sum()))
    else:
        nb[bad] = -1
    return score_neighbours(query, gallery, nb)


def reference_rows(query: Embeddings, gallery: Embeddings,
                   config: RetrievalConfig) -> dict[str, Scores]:  # fmt: skip
    return {"oracle": oracle(query, gallery, config),
            "oracle, viewpoint-free": viewpoint_free_oracle(query, gallery, config),
            "chance": chance(query, gallery, config)}  # fmt: skip
