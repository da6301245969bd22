"""The retrieval gallery: query frames beside the train frame the model retrieved for them.

Each row: the query frame and the retrieved frame, both with their 2D skeletons drawn, and the
retrieval's MPJPE. Frames come from the shards by key, so the picture shows exactly the pixels
the encoder was given (before any resize).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from data_shards.manifest import Manifest
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


def gallery_png(query: Embeddings, gallery: Embeddings, scores: Scores, query_split: str,
                gallery_split: str, out: str | os.PathLike, rows: int = 8, seed: int = 0,
                scale: int = 2) -> Path:  # fmt: skip
    """Write ``rows`` random queries (seeded) and their top-1 retrievals as one PNG."""
    found = np.flatnonzero(scores.neighbours[:, 0] >= 0)
    if len(found) == 0:
        raise ValueError("no query has a retrieved neighbour to show")
    picked = np.sort(np.random.default_rng(seed).choice(found, min(rows, len(found)), False))
    hits = scores.neighbours[picked, 0]
    q_samples = load_samples(query_split, {str(query.keys[i]) for i in picked})
    g_samples = load_samples(gallery_split, {str(gallery.keys[i]) for i in hits})
    tiles = [(_tile(query, q, q_samples, scale), _tile(gallery, g, g_samples, scale))
             for q, g in zip(picked, hits, strict=True)]  # fmt: skip
    w, h = tiles[0][0].size
    sheet = Image.new("RGB", (2 * w, len(tiles) * (h + 14)), "white")
    draw = ImageDraw.Draw(sheet)
    for i, ((q_img, g_img), q) in enumerate(zip(tiles, picked, strict=True)):
        y = i * (h + 14)
        sheet.paste(q_img, (0, y + 14))
        sheet.paste(g_img, (w, y + 14))
        label = f"{query.actions[q]} -> {gallery.actions[scores.neighbours[q, 0]]}: "
        draw.text((2, y), label + f"MPJPE {scores.mpjpe[q, 0]:.0f} mm", fill="black")
    out = Path(out)
    sheet.save(out)
    return out
