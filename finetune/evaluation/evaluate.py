"""`posebert evaluate retrieval`: how close, in 3D pose, is each val frame's nearest train frame?

Rows, all searched the same way: the pretrained encoder, the same architecture at random
initialisation, raw pixels (frames downsampled to 16 x 16), and the references oracle (the train
frame nearest in ground-truth pose) and chance (a random train frame). Poses are compared
root-relative in the query camera's coordinates (what one image determines), in mm.

Several processes (``--nproc-per-node``, torchrun or srun): every rank embeds its share of each
split on its own device (``cuda:LOCAL_RANK`` when there is a GPU), rank 0 merges them into the
cache; rank 0 alone searches and writes the outputs, the other ranks return None as soon as
the embeddings are cached (a barrier would time out while rank 0 searches millions of frames).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch

from data_shards.manifest import Manifest, atomic_write_text, find_splits
from finetune.evaluation import metrics
from finetune.evaluation.cache import cache_embeddings, cache_key
from finetune.evaluation.embed import (
    Embeddings,
    EncoderEmbedder,
    RawPixels,
    default_device,
    random_init_like,
)
from finetune.evaluation.gallery import gallery_png
from finetune.evaluation.probe import ridge_probe
from finetune.evaluation.retrieval import (
    RetrievalConfig,
    Scores,
    cached_index,
    reference_rows,
    retrieve,
)
from finetune.report import command_line, gap_closed, md_table, write_stage
from finetune.report.embedding_map import write_embedding_map


def _embedders(encoder_dir: Path, seed: int, device: torch.device) -> dict:
    model = EncoderEmbedder.from_dir(encoder_dir, device)
    random_init = EncoderEmbedder(random_init_like(model.model, seed), device=device,
                                  transforms=model.transforms)  # fmt: skip
    return {"model": model, "random-init": random_init, "raw pixels 16x16": RawPixels(16)}


def run_retrieval(encoder_dir: str | os.PathLike, shards: str | os.PathLike,
                  out_dir: str | os.PathLike, config: RetrievalConfig,
                  query_split: str = "val", batch_size: int = 8,
                  progress: bool = True,
                  cache_dir: str | os.PathLike | None = None) -> dict | None:  # fmt: skip
    """Embed train (gallery) and ``query_split`` for every row, search, score; write
    ``OUT/retrieval.json``, ``OUT/retrieval.md`` and the model row's pictures
    (:func:`write_pictures`). Embeddings are cached under ``cache_dir`` (default OUT/cache),
    keyed by encoder and split, so runs with other query splits can share the gallery's.
    Returns the JSON content (rank 0; None on the other ranks of a multi-process run, which
    initialises torch.distributed when the environment names several ranks)."""
    splits = find_splits(shards)
    for name in ("train", query_split):
        if name not in splits:
            raise ValueError(f"{shards}: no {name!r} split (have {', '.join(splits)})")
    from pretrain.engine import dist

    env = dist.DistEnv.from_environ()
    owned = env.world_size > 1 and not dist.is_initialized()
    if owned:
        dist.init_distributed(env)
    try:
        cache = Path(cache_dir) if cache_dir is not None else Path(out_dir) / "cache"
        return _run(Path(encoder_dir), splits, Path(out_dir), cache, config, query_split,
                    batch_size, progress and dist.is_main())  # fmt: skip
    finally:
        if owned:  # no barrier: the other ranks left long before rank 0's search ends
            dist.shutdown(barrier_first=False)


def _run(encoder_dir: Path, splits: dict, out: Path, cache: Path, config: RetrievalConfig,
         query_split: str, batch_size: int, progress: bool) -> dict | None:  # fmt: skip
    from pretrain.engine import dist

    embedders = _embedders(encoder_dir, config.seed, default_device())
    files = {(name, split): cache_embeddings(embedder, splits[split], cache, batch_size,
                                             progress=progress)
             for name, embedder in embedders.items()
             for split in ("train", query_split)}  # fmt: skip
    # every rank took its share above; from here on rank 0 alone (no collective)
    if not dist.is_main():
        return None
    rows, query, gallery, shown = {}, None, None, None
    for name, embedder in embedders.items():  # one embedder's rows in memory at a time
        keys = {s: cache_key(embedder, splits[s]) for s in ("train", query_split)}
        gallery = Embeddings.load(files[name, "train"], keys["train"])  # refused if swapped
        query = Embeddings.load(files[name, query_split], keys[query_split])
        index = cached_index(gallery, files[name, "train"].parent, config, keys["train"])
        scores = retrieve(query, gallery, config, index)
        rows[name] = scores.summary(config.ks, config.thresholds_mm)
        rows[name]["probe"] = ridge_probe(gallery, query)  # is pose there at all?
        if name == "model":  # the gallery picture shows the model's retrievals
            shown = (query, gallery, scores)
    for name, scores in reference_rows(query, gallery, config).items():
        rows[name] = scores.summary(config.ks, config.thresholds_mm)
    mean_pose = gallery.pose3d.astype(np.float64).mean(0)
    floor = float(metrics.mpjpe(np.broadcast_to(mean_pose, query.pose3d.shape), query.pose3d))
    manifest = Manifest.load(splits[query_split])
    result = {
        "protocol": {
            "joints": 17, "units": "mm", "pose": "root-relative, query camera coordinates",
            "alignment": {"mpjpe": "none", "p_mpjpe": "similarity (rotation, scale, "
                          "translation), no reflection"},
            "gallery": "train", "queries": query_split, "views": manifest.views,
            "frames_per_window": manifest.frames, "exclude_same_clip": config.exclude_same_clip,
            "cross_view": config.cross_view, "k": config.k, "index": config.kind,
            "probe": "ridge from frozen features to the same poses, fit on train frames, "
                     "lambda by clip-wise cross-validation on train",
            "probe_mean_pose_mpjpe": floor,
        },
        "rows": rows,
    }  # fmt: skip
    out.mkdir(parents=True, exist_ok=True)
    result = write_stage(out, "retrieval", {**result, "command": command_line()},
                         markdown_table(result))  # fmt: skip
    write_pictures(shown, splits, query_split, out, config.seed)
    return result


def write_pictures(shown: tuple[Embeddings, Embeddings, Scores], splits: dict[str, Path],
                   query_split: str, out: Path, seed: int) -> None:  # fmt: skip
    """The model row's pictures for the report: ``gallery.png`` (best, median and worst
    queries beside their top-1 retrievals) with ``gallery.json`` (what each row shows), and
    the embedding map of the query frames (``embedding-map.png`` + ``.npz``)."""
    query, gallery, scores = shown
    rows = gallery_png(query, gallery, scores, splits[query_split], splits["train"],
                       out / "gallery.png")  # fmt: skip
    note = {"shows": "top-1 retrievals of the model row: best, median and worst queries by "
                     "top-1 MPJPE (mm, root-relative, query camera coordinates)",
            "rows": rows}  # fmt: skip
    atomic_write_text(out / "gallery.json", json.dumps(note, indent=1) + "\n")
    write_embedding_map(query.vectors, query.actions, out, query_split, seed)


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
            + [f"Hit {h}" for h in hits] + ["gap closed", "probe MPJPE"])  # fmt: skip
    lines = md_table(head, [
        [name] + [f"{r['mpjpe'][t]:.1f}" for t in tops] + [f"{r['p_mpjpe'][t]:.1f}" for t in tops]
        + [f"{r['hit'][h]:.3f}" for h in hits]
        + [f"{gap_closed(r['mpjpe']['top1'], chance, oracle):.0%}"]
        + [f"{r['probe']['mpjpe']:.1f}" if "probe" in r else "-"]
        for name, r in rows.items()
    ])  # fmt: skip
    p = result["protocol"]
    lines.append(f"\n{p['queries']} queries vs {p['gallery']} gallery; {p['pose']}, "
                 f"{p['units']}; exclude same clip: {p['exclude_same_clip']}; "
                 f"cross-view: {p['cross_view']}. Probe MPJPE: a ridge readout of the pose "
                 f"from the frozen features (fit on train clips); predicting the mean train "
                 f"pose scores {p['probe_mean_pose_mpjpe']:.1f}.")  # fmt: skip
    return "\n".join(lines) + "\n"
