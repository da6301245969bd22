"""`posebert evaluate retrieval`: how close, in 3D pose, is each val frame's nearest train frame?

Rows, all searched the same way: the pretrained encoder, the same architecture at random
initialisation, raw pixels (frames downsampled to 16 x 16), and the references oracle (the train
frame nearest in ground-truth pose) and chance (a random train frame). Poses are compared
root-relative in the query camera's coordinates (what one image determines), in mm.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from data_shards.manifest import Manifest, atomic_write_text, find_splits
from finetune.embed import EncoderEmbedder, RawPixels, embed_split_cached
from finetune.gallery import gallery_png
from finetune.retrieval import RetrievalConfig, cached_index, reference_rows, retrieve


def _embedders(encoder_dir: Path, seed: int) -> dict:
    model = EncoderEmbedder.from_dir(encoder_dir)
    torch.manual_seed(seed)
    random_init = EncoderEmbedder(type(model.model)(model.model.cfg), transforms=model.transforms)
    return {"model": model, "random-init": random_init, "raw pixels 16x16": RawPixels(16)}


def run_retrieval(encoder_dir: str | os.PathLike, shards: str | os.PathLike,
                  out_dir: str | os.PathLike, config: RetrievalConfig,
                  query_split: str = "val", batch_size: int = 8,
                  progress: bool = True) -> dict:  # fmt: skip
    """Embed train (gallery) and ``query_split`` for every row, search, score; write
    ``OUT/retrieval.json``, ``OUT/retrieval.md`` and ``OUT/gallery.png`` (the model's top-1
    retrievals); return the JSON content."""
    splits = find_splits(shards)
    for name in ("train", query_split):
        if name not in splits:
            raise ValueError(f"{shards}: no {name!r} split (have {', '.join(splits)})")
    out = Path(out_dir)
    cache = out / "cache"
    rows, query, gallery, shown = {}, None, None, None
    for name, embedder in _embedders(Path(encoder_dir), config.seed).items():
        gallery, folder = embed_split_cached(embedder, splits["train"], cache, batch_size,
                                             progress=progress)  # fmt: skip
        query, _ = embed_split_cached(embedder, splits[query_split], cache, batch_size,
                                      progress=progress)  # fmt: skip
        index = cached_index(gallery, folder, config)
        scores = retrieve(query, gallery, config, index)
        rows[name] = scores.summary(config.ks, config.thresholds_mm)
        if name == "model":  # the gallery picture shows the model's retrievals
            shown = (query, gallery, scores)
    for name, scores in reference_rows(query, gallery, config).items():
        rows[name] = scores.summary(config.ks, config.thresholds_mm)
    manifest = Manifest.load(splits[query_split])
    result = {
        "protocol": {
            "joints": 17, "units": "mm", "pose": "root-relative, query camera coordinates",
            "alignment": {"mpjpe": "none", "p_mpjpe": "similarity (rotation, scale, "
                          "translation), no reflection"},
            "gallery": "train", "queries": query_split, "views": manifest.views,
            "frames_per_window": manifest.frames, "exclude_same_clip": config.exclude_same_clip,
            "cross_view": config.cross_view, "k": config.k, "index": config.kind,
        },
        "rows": rows,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "retrieval.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "retrieval.md", markdown_table(result))
    gallery_png(*shown, splits[query_split], splits["train"], out / "gallery.png", seed=config.seed)
    return result


def markdown_table(result: dict) -> str:
    """One row per method: top-1 / top-k MPJPE and P-MPJPE, Hit@thresholds, and the share of
    the chance -> oracle gap the row closes (top-1 MPJPE)."""
    rows = result["rows"]
    chance = rows["chance"]["mpjpe"]["top1"]
    oracle = rows["oracle"]["mpjpe"]["top1"]
    first = next(iter(rows.values()))
    tops = list(first["mpjpe"])
    hits = list(first["hit"])
    head = (["method"] + [f"MPJPE {t}" for t in tops] + [f"P-MPJPE {t}" for t in tops]
            + [f"Hit {h}" for h in hits] + ["gap closed"])  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in rows.items():
        gap = (chance - r["mpjpe"]["top1"]) / (chance - oracle) if chance != oracle else 0.0
        cells = ([name] + [f"{r['mpjpe'][t]:.1f}" for t in tops]
                 + [f"{r['p_mpjpe'][t]:.1f}" for t in tops]
                 + [f"{r['hit'][h]:.3f}" for h in hits] + [f"{gap:.0%}"])  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    p = result["protocol"]
    lines.append(f"\n{p['queries']} queries vs {p['gallery']} gallery; {p['pose']}, "
                 f"{p['units']}; exclude same clip: {p['exclude_same_clip']}; "
                 f"cross-view: {p['cross_view']}.")  # fmt: skip
    return "\n".join(lines) + "\n"
