"""`posebert finetune lift --method M --shards DIR --out OUT`: train and score a lifting method.

Every row of the method's ablation (``--rows`` picks some) is trained on the train clips and
scored on each held-out split (val, test) with :mod:`finetune.evaluation.metrics`: MPJPE, P-MPJPE,
N-MPJPE (mm, 17 joints, root-relative in the camera's coordinates) and MPJVE (mm per frame,
within each sequence), overall and per action. Rows are saved one by one under OUT/rows/, so a
rerun continues with the rows not yet done (a row whose config changed is trained again; the
code version is not part of that check). OUT/lift.json, OUT/lift.md (the table with the
command of every row) and OUT/lift.png (loss curves and the MPJPE of every row); each row's
weights as OUT/rows/<row>.safetensors (and OUT/rows/<row>.png where the method draws one,
e.g. the VAE-GAN latent space). A row whose loss or predictions turn non-finite stops the run
with one line naming it, and saves nothing of that row.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import time
from pathlib import Path

import numpy as np
import torch

from data_shards.configtools import apply_overrides
from data_shards.manifest import atomic_write_text
from finetune.evaluation import metrics
from finetune.heads.lift.base import LiftData, LiftMethod, get_method
from finetune.heads.lift.data import Sequence, check_joints, read_splits, root_relative_m
from finetune.report import md_table, pyplot, save_figure

METRICS = ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve")


def parse_rows(method: LiftMethod, text: str | None) -> list[str]:
    if not text:
        return list(method.rows)
    names = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in names if r not in method.rows]
    if unknown or not names:
        raise ValueError(f"{method.name}: unknown row(s) {', '.join(unknown) or text!r}; "
                         f"choose from {', '.join(method.rows)}")  # fmt: skip
    return list(dict.fromkeys(names))


def build_config(method: LiftMethod, row: str, overrides: list[str]):
    """The method's recipe, the row's changes, then the user's ``--set`` overrides."""
    config = method.config(**method.rows[row])
    return apply_overrides(config, overrides) if overrides else config


def score(preds: list[np.ndarray], sequences: list[Sequence]) -> dict:
    """Metrics over every frame of the sequences, overall (``all``) and per action."""
    out: dict[str, dict] = {}
    groups: dict[str, list[int]] = {"all": list(range(len(sequences)))}
    for i, s in enumerate(sequences):
        groups.setdefault(s.action, []).append(i)
    for name, idx in groups.items():
        pred = np.concatenate([preds[i] for i in idx]).astype(np.float64)
        true = np.concatenate([root_relative_m(sequences[i].pose3d) * 1000 for i in idx])
        vel = [float(metrics.mpjve(preds[i][None].astype(np.float64),
                                   root_relative_m(sequences[i].pose3d)[None] * 1000))
               for i in idx if len(preds[i]) > 1]  # fmt: skip
        frames = [len(preds[i]) - 1 for i in idx if len(preds[i]) > 1]
        out[name] = {
            "mpjpe": float(metrics.mpjpe(pred, true)),
            "p_mpjpe": float(metrics.p_mpjpe(pred, true)),
            "n_mpjpe": float(metrics.n_mpjpe(pred, true)),
            "mpjve": float(np.average(vel, weights=frames)) if vel else None,
            "frames": int(len(pred)),
        }
    return out


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_") or "row"


def run_lift(method_name: str, shards: str | os.PathLike, out_dir: str | os.PathLike,
             rows: str | None = None, overrides: list[str] | None = None,
             progress: bool = True) -> dict:  # fmt: skip
    """Train and score each row not yet saved; write OUT/lift.json, .md, .png; return the JSON."""
    method = get_method(method_name)
    chosen = parse_rows(method, rows)
    overrides = list(overrides or [])
    configs = {row: build_config(method, row, overrides) for row in chosen}  # bad --set: now
    data = LiftData(Path(shards), read_splits(shards))
    for sequences in data.splits.values():
        check_joints(sequences)
    heldout = [s for s in data.splits if s != "train"]
    out = Path(out_dir)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    results = {}
    for row in chosen:
        path = out / "rows" / f"{_slug(row)}.json"
        config = configs[row]
        settings = json.loads(json.dumps(dataclasses.asdict(config)))  # as saved: lists
        if path.is_file():
            saved = json.loads(path.read_text())
            if saved["config"] == settings:
                print(f"[lift {method.name}] {row}: done already ({path})", flush=True)
                results[row] = saved | {"command": _command(method, row, shards, out, overrides)}
                continue
        print(f"[lift {method.name}] {row}: training ({config})", flush=True)
        torch.manual_seed(config.seed)
        t0 = time.perf_counter()
        fitted = method.fit(data, config, progress)
        seconds = time.perf_counter() - t0
        bad = next((c["step"] for c in fitted.losses
                    if not all(np.isfinite(v) for v in c.values())), None)  # fmt: skip
        if bad is not None:
            raise ValueError(f"lift {method.name}, row {row!r}: non-finite loss at step {bad}; "
                             "nothing of this row was saved (try a lower lr)")  # fmt: skip
        scores = {}
        with torch.no_grad():
            for split in heldout:
                preds = fitted.predict(split, data.splits[split])
                if not all(np.isfinite(p).all() for p in preds):
                    raise ValueError(f"lift {method.name}, row {row!r}: non-finite predictions "
                                     f"on {split}; nothing of this row was saved")  # fmt: skip
                scores[split] = score(preds, data.splits[split])
        from safetensors.torch import save_file

        weights = {k: v.detach().cpu().contiguous() for k, v in fitted.state_dict().items()}
        save_file(weights, str(out / "rows" / f"{_slug(row)}.safetensors"))
        if method.figure is not None:
            method.figure(fitted, [s for seqs in data.splits.values() for s in seqs],
                          out / "rows" / f"{_slug(row)}.png")  # fmt: skip
        results[row] = {"config": settings, "seconds": round(seconds, 1), "scores": scores,
                        "losses": fitted.losses, "command": _command(method, row, shards,
                                                                     out, overrides)}  # fmt: skip
        atomic_write_text(path, json.dumps(results[row], indent=1) + "\n")
    result = {
        "method": method.name,
        "describe": method.describe,
        "protocol": {"joints": 17, "units": "mm",
                     "pose": "root-relative, camera coordinates",
                     "train": "train clips", "heldout": heldout,
                     "inputs": "the shards' 2D projections (crop pixels), with the row's noise "
                               "and dropped joints"},
        "rows": {row: {k: v for k, v in r.items() if k != "losses"} for row, r in results.items()},
    }  # fmt: skip
    atomic_write_text(out / "lift.json", json.dumps(result, indent=1) + "\n")
    atomic_write_text(out / "lift.md", markdown_table(result))
    plot(result, {row: r["losses"] for row, r in results.items()}, out / "lift.png")
    return result


def _command(method: LiftMethod, row: str, shards, out: Path, overrides: list[str]) -> str:
    args = ["posebert", "finetune", "lift", "--method", method.name, "--shards", str(shards),
            "--out", str(out), "--rows", row, *(f"--set={o}" for o in overrides)]  # fmt: skip
    return shlex.join(args)


def markdown_table(result: dict) -> str:
    heldout = result["protocol"]["heldout"]
    head = ["row", *(f"{s} MPJPE" for s in heldout), *(f"{s} P-MPJPE" for s in heldout),
            *(f"{s} MPJVE" for s in heldout), "train s"]  # fmt: skip
    rows = []
    for name, r in result["rows"].items():
        cells = [name]
        for m in ("mpjpe", "p_mpjpe", "mpjve"):
            for s in heldout:
                value = r["scores"][s]["all"][m]
                cells.append("-" if value is None else f"{value:.1f}")
        rows.append([*cells, f"{r['seconds']:.0f}"])
    lines = [f"Method `{result['method']}`: {result['describe']}", ""]
    lines += md_table(head, rows)
    lines += ["", f"mm, 17 joints, {result['protocol']['pose']}; trained on the train clips, "
              f"scored on {', '.join(heldout)}.", "", "Commands:", ""]  # fmt: skip
    lines += [f"- {name}: `{r['command']}`" for name, r in result["rows"].items()]
    return "\n".join(lines) + "\n"


def plot(result: dict, losses: dict[str, list[dict]], path: Path) -> Path:
    """Left: each row's total loss per step; right: MPJPE per row and held-out split."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for row, curve in losses.items():
        if curve:
            left.plot([c["step"] for c in curve], [c["loss"] for c in curve], label=row)
    left.set_xlabel("step")
    left.set_ylabel("training loss")
    left.set_yscale("symlog", linthresh=1e-3)
    left.legend(fontsize=7)
    heldout = result["protocol"]["heldout"]
    names = list(result["rows"])
    width = 0.8 / max(1, len(heldout))
    for i, split in enumerate(heldout):
        values = [result["rows"][n]["scores"][split]["all"]["mpjpe"] for n in names]
        right.barh([k + i * width for k in range(len(names))], values, width, label=split)
    right.set_yticks([k + 0.4 - width / 2 for k in range(len(names))], names, fontsize=7)
    right.invert_yaxis()
    right.set_xlabel("MPJPE (mm)")
    right.legend(fontsize=8)
    fig.suptitle(f"lifting: {result['method']}")
    fig.tight_layout()
    return save_figure(fig, path)
