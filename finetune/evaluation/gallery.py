"""The retrieval gallery: query frames beside the train frame the model retrieved for them.

Rows: the best, median and worst queries by top-1 MPJPE (random queries hide both how good
the best matches are and what the failures look like). Each row: the query frame and the
retrieved frame, both with their 2D skeletons drawn, and the retrieval's MPJPE. Frames come
from the shards by key, so the picture shows exactly the pixels the encoder was given (before
any resize).
"""

from __future__ import annotations

import io
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_shards.manifest import Manifest, atomic_write_bytes
from data_shards.preview import draw_frame
from data_shards.schema import Sample, decode_sample
from data_shards.tario import iter_tar_samples
from finetune.evaluation.embed import Embeddings
from finetune.evaluation.retrieval import Scores


def load_samples(split_dir: str | os.PathLike, keys: set[str]) -> dict[str, Sample]:
    """The decoded samples of ``split_dir`` whose key is in ``keys`` (one pass over the split)."""
    split_dir, found = Path(split_dir), {}
    for info in Manifest.load(split_dir).shards:
        for raw in iter_tar_samples(split_dir / info.name):
            if raw["__key__"] in keys:
                found[raw["__key__"]] = decode_sample(raw)
        if len(found) == len(keys):
            break
    return found


def _tile(emb: Embeddings, row: int, samples: dict[str, Sample], scale: int) -> Image.Image:
    sample = samples[str(emb.keys[row])]
    t = sample.meta.frames.index(int(emb.frames[row]))
    return draw_frame(sample, int(emb.views[row]), t, scale)


GROUPS = ("best", "median", "worst")
MIN_TILE = 192
"""Pixels: small renders (64 px) are enlarged until a skeleton can be read."""


def pick_queries(top1_mpjpe: np.ndarray, per_group: int = 2) -> list[tuple[str, int]]:
    """(group, query row) of the ``per_group`` best, median and worst queries by top-1 MPJPE
    (queries without a neighbour are left out; ties keep query order). A query falls in its
    first group only, so a handful of queries are not shown twice."""
    found = np.flatnonzero(np.isfinite(top1_mpjpe))
    if len(found) == 0:
        raise ValueError("no query has a retrieved neighbour to show")
    order = found[np.argsort(top1_mpjpe[found], kind="stable")]  # best first
    n, k = len(order), min(per_group, len(order))
    middle = max(0, min(n - k, (n - k) // 2))
    spans = {"best": order[:k], "median": order[middle : middle + k], "worst": order[n - k :][::-1]}
    picked: dict[int, str] = {}
    for group in GROUPS:
        for row in spans[group]:
            picked.setdefault(int(row), group)
    return [(group, row) for row, group in picked.items()]


def gallery_records(query: Embeddings, gallery: Embeddings, scores: Scores,
                    picks: list[tuple[str, int]]) -> list[dict]:  # fmt: skip
    """What each gallery row shows, for ``gallery.json`` (and the report's caption table)."""
    out = []
    for group, q in picks:
        g = int(scores.neighbours[q, 0])
        out.append({
            "group": group,
            "query": {"key": str(query.keys[q]), "view": int(query.views[q]),
                      "frame": int(query.frames[q]), "action": str(query.actions[q]),
                      "camera": str(query.cameras[q])},
            "retrieved": {"key": str(gallery.keys[g]), "view": int(gallery.views[g]),
                          "frame": int(gallery.frames[g]), "action": str(gallery.actions[g]),
                          "camera": str(gallery.cameras[g])},
            "mpjpe_mm": float(scores.mpjpe[q, 0]), "p_mpjpe_mm": float(scores.p_mpjpe[q, 0]),
        })  # fmt: skip
    return out


def gallery_png(query: Embeddings, gallery: Embeddings, scores: Scores, query_split: str,
                gallery_split: str, out: str | os.PathLike, per_group: int = 2,
                scale: int | None = None) -> list[dict]:  # fmt: skip
    """Write the ``per_group`` best, median and worst queries (:func:`pick_queries`) beside
    their top-1 retrievals as one PNG, frames enlarged ``scale`` times (default: to at least
    :data:`MIN_TILE` pixels high); returns the rows shown (:func:`gallery_records`)."""
    picks = pick_queries(scores.mpjpe[:, 0], per_group)
    queries = [q for _, q in picks]
    hits = [int(scores.neighbours[q, 0]) for q in queries]
    q_samples = load_samples(query_split, {str(query.keys[i]) for i in queries})
    g_samples = load_samples(gallery_split, {str(gallery.keys[i]) for i in hits})
    if scale is None:
        height = next(iter(q_samples.values())).frames.shape[-3]  # (V, T, H, W, 3)
        scale = max(1, math.ceil(MIN_TILE / height))
    tiles = [(_tile(query, q, q_samples, scale), _tile(gallery, g, g_samples, scale))
             for q, g in zip(queries, hits, strict=True)]  # fmt: skip
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (2 * w, len(tiles) * (h + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((q_img, g_img), (group, q)) in enumerate(zip(tiles, picks, strict=True)):
        y = i * (h + 14)
        sheet.paste(q_img, (0, y + 14))
        sheet.paste(g_img, (w, y + 14))
        label = f"{group}: {query.actions[q]} -> {gallery.actions[scores.neighbours[q, 0]]}: "
        draw.text((2, y), label + f"MPJPE {scores.mpjpe[q, 0]:.0f} mm", fill="black")
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    atomic_write_bytes(Path(out), buf.getvalue())
    return gallery_records(query, gallery, scores, picks)
