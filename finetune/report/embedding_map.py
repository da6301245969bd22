"""The embedding map: the model's query-split embeddings in 2D, coloured by action.

A glance at whether the features separate what the frames show (actions, and so poses) or
something else: clusters that mix actions but split by camera or clothing mean the encoder
learned appearance. UMAP (McInnes et al. 2018) when the ``umap`` package is importable, else
PCA (always available: an SVD in numpy), so the map exists on every machine; the method used
is written with it. ``posebert evaluate retrieval`` writes ``embedding-map.png`` and
``embedding-map.npz`` (``xy`` (N, 2) float32, ``action`` (N,) str, ``method`` str) so the
report can redraw it.
"""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np

from data_shards.manifest import atomic_write_bytes
from finetune.report.writer import pyplot, save_figure

MAX_POINTS = 5000
"""Points kept (a seeded random subset beyond this): the map stays small and UMAP quick."""
NPZ, PNG = "embedding-map.npz", "embedding-map.png"


def project_2d(vectors: np.ndarray, seed: int = 0, method: str = "auto") -> tuple[np.ndarray, str]:
    """(N, D) -> (N, 2) float32 and the method used (``umap`` or ``pca``). ``auto``: UMAP when
    importable and there are enough points for its neighbour graph, else PCA."""
    x = np.asarray(vectors, dtype=np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"need (N, D) vectors with N >= 1, got {x.shape}")
    if method in ("auto", "umap") and len(x) > 15:
        try:
            import umap
        except ImportError:
            if method == "umap":
                raise ValueError("method='umap' but the umap package is not installed") from None
        else:
            reducer = umap.UMAP(n_components=2, random_state=seed, n_neighbors=15)
            return reducer.fit_transform(x).astype(np.float32), "umap"
    centred = x - x.mean(0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    xy = centred @ vt[:2].T
    if xy.shape[1] < 2:  # one-dimensional input: a flat second axis
        xy = np.pad(xy, ((0, 0), (0, 2 - xy.shape[1])))
    signs = np.sign(xy[np.abs(xy).argmax(0), range(2)])  # SVD signs are arbitrary: fix them
    return (xy * np.where(signs == 0, 1, signs)).astype(np.float32), "pca"


def map_figure(xy: np.ndarray, actions: np.ndarray, title: str):
    """Scatter of ``xy`` coloured by action (a legend entry per action)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.0, 4.8))
    names = sorted(set(np.asarray(actions).astype(str).tolist()))
    for i, name in enumerate(names):
        pts = xy[np.asarray(actions).astype(str) == name]
        ax.scatter(pts[:, 0], pts[:, 1], s=6, alpha=0.7, color=f"C{i % 10}", label=name,
                   linewidths=0)  # fmt: skip
    ax.set_title(title, fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(fontsize=7, markerscale=2, loc="best")
    fig.tight_layout()
    return fig


def write_embedding_map(vectors: np.ndarray, actions: np.ndarray, out_dir: str | os.PathLike,
                        split: str, seed: int = 0) -> Path:  # fmt: skip
    """Project (a seeded subset of at most :data:`MAX_POINTS` of) ``vectors``, write
    ``OUT/embedding-map.npz`` and ``OUT/embedding-map.png``; returns the PNG's path."""
    rows = np.arange(len(vectors))
    if len(rows) > MAX_POINTS:
        rows = np.sort(np.random.default_rng(seed).choice(rows, MAX_POINTS, replace=False))
    xy, method = project_2d(np.asarray(vectors)[rows], seed)
    acts = np.asarray(actions)[rows].astype(str)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    np.savez_compressed(buf, xy=xy, action=acts, method=np.asarray(method), split=np.asarray(split))
    atomic_write_bytes(out / NPZ, buf.getvalue())
    return save_figure(map_figure(xy, acts, map_title(method, split, len(xy))), out / PNG)


def map_title(method: str, split: str, n: int) -> str:
    return f"model embeddings of the {split} frames ({n}), {method.upper()}, coloured by action"


def read_embedding_map(out_dir: str | os.PathLike) -> dict | None:
    """``xy``, ``action``, ``method``, ``split`` of ``OUT/embedding-map.npz``; None when absent;
    one-line ``ValueError`` when unreadable (never unpickled)."""
    path = Path(out_dir) / NPZ
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {"xy": z["xy"], "action": z["action"].astype(str), "method": str(z["method"]),
                    "split": str(z["split"]) if "split" in z.files else "query"}  # fmt: skip
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise ValueError(f"{path}: not an embedding map ({e})") from None
    if data["xy"].ndim != 2 or data["xy"].shape[1] != 2 or len(data["action"]) != len(data["xy"]):
        raise ValueError(f"{path}: xy {data['xy'].shape} and action {data['action'].shape} "
                         "do not match")  # fmt: skip
    return data
