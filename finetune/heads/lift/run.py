"""`posebert finetune lift --method M --shards DIR --out OUT`: train and score a lifting method.

Every row of the method's ablation (``--rows`` picks some) is trained on the train clips and
scored on each held-out split (val, test) with :func:`finetune.evaluation.metrics.score_sequences`:
MPJPE, P-MPJPE, N-MPJPE (mm, 17 joints, root-relative in the camera's coordinates) and MPJVE
(mm per frame, within each sequence), overall (``all``) and per action (``per_action``). Rows
are saved one by one under OUT/rows/, so a rerun continues with the rows not yet done (a row
whose config changed is trained again; the code version is not part of that check); each
trained row logs to OUT/rows/<row>/ (metrics.jsonl + tensorboard, the layout of every
fine-tuning run). OUT/lift.json, OUT/lift.md (the table with the command of every row) and
OUT/lift.png (loss curves and the MPJPE of every row) are written by
:func:`finetune.report.write_stage`; each row's weights as OUT/rows/<row>.safetensors (and
OUT/rows/<row>.png where the method draws one, e.g. the VAE-GAN latent space), which
:func:`load_row` turns back into a model that predicts. A row whose loss or predictions turn
non-finite stops the run with one line naming it, and saves nothing of that row.

``input_2d`` (``--input``) picks the 2D every method reads, train and held-out: ``gt``, the
shards' projections, or ``detected``, the detector's keypoints (``det2d``, written by ``posebert
shards detect``; lost frames interpolated, :func:`finetune.heads.lift.data.fill_lost`). With
``detected`` the rows start from no detector-imitation noise (``noise_px`` = ``drop_prob`` = 0:
the detections are the real thing; ``--set`` still sets them), and lift.json's ``protocol``
names the input and the share of lost frames per split. Scores are always against the
ground-truth 3D of every frame.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from data_shards.configtools import from_dict, resolve, to_dict
from data_shards.manifest import Manifest, atomic_write_text, find_splits
from finetune.clips import read_splits
from finetune.evaluation.metrics import score_sequences
from finetune.heads.lift.base import FitLog, Fitted, LiftData, LiftMethod, get_method
from finetune.heads.lift.data import INPUTS, check_joints, lost_frames, root_relative_m
from finetune.loop import resolve_device
from finetune.report import md_table, pyplot, write_stage


def parse_rows(method: LiftMethod, text: str | None) -> list[str]:
    if not text:
        return list(method.rows)
    names = [r.strip() for r in text.split(",") if r.strip()]
    unknown = [r for r in names if r not in method.rows]
    if unknown or not names:
        raise ValueError(f"{method.name}: unknown row(s) {', '.join(unknown) or text!r}; "
                         f"choose from {', '.join(method.rows)}")  # fmt: skip
    return list(dict.fromkeys(names))


def build_config(method: LiftMethod, row: str, overrides: list[str], input_2d: str = "gt"):
    """The method's recipe (on detected input without its detector-imitation noise), the row's
    changes, then the user's ``--set`` overrides."""
    if input_2d not in INPUTS:
        raise ValueError(f"unknown 2D input {input_2d!r}; choose from {', '.join(INPUTS)}")
    start = {}
    if input_2d == "detected":  # the real detections, no imitation noise on top
        start = {"input": "detected", "noise_px": 0.0, "drop_prob": 0.0}
    return resolve(method.config(**{**start, **method.rows[row]}), overrides)


def require_det2d(shards: str | os.PathLike) -> None:
    """One-line ``ValueError`` unless every split under ``shards`` carries ``det2d``."""
    lacking = [name for name, d in find_splits(shards).items()
               if not Manifest.load(d).has.get("det2d")]  # fmt: skip
    if lacking:
        raise ValueError(f"{shards}: split(s) {', '.join(lacking)} carry no det2d (the detector's "
                         f"2D keypoints); run `posebert shards detect {shards}` first, or lift "
                         "from --input gt")  # fmt: skip


def detection_counts(splits: dict[str, list], min_confidence: float = 0.0) -> dict[str, dict]:
    """Per split: frames, frames where the detector lost the person (filled, see
    :func:`fill_lost`), their share, and sequences where it found nobody at all."""
    out = {}
    for split, sequences in splits.items():
        lost = [lost_frames(s.det2d, min_confidence) for s in sequences]
        frames, missed = sum(len(x) for x in lost), int(sum(x.sum() for x in lost))
        out[split] = {"frames": frames, "lost": missed, "lost_share": round(missed / frames, 4),
                      "sequences_never_found": sum(bool(x.all()) for x in lost)}  # fmt: skip
    return out


def _slug(row: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", row).strip("_") or "row"


def score_split(fitted: Fitted, split: str, sequences: list) -> dict:
    """The fitted row's predictions on a held-out split, scored against the sequences' 3D."""
    preds = fitted.predict(split, sequences)
    if not all(np.isfinite(p).all() for p in preds):
        raise ValueError(f"non-finite predictions on {split}")
    return score_sequences(preds, [root_relative_m(s.pose3d) * 1000 for s in sequences],
                           [s.action for s in sequences])  # fmt: skip


def _read(method: LiftMethod, shards, configs: dict) -> dict[str, LiftData]:
    """Per row, the data its config reads; rows that read alike share one pass."""
    passes: dict[str, LiftData] = {}
    out = {}
    for row, config in configs.items():
        kwargs = method.read(config)
        key = json.dumps(kwargs, sort_keys=True)
        if key not in passes:
            passes[key] = LiftData(Path(shards), read_splits(shards, **kwargs))
            for sequences in passes[key].splits.values():
                check_joints(sequences)
        out[row] = passes[key]
    return out


def train_row(method: LiftMethod, row: str, config, data: LiftData, out: Path,
              progress: bool) -> dict:  # fmt: skip
    """Train one row, score it on every held-out split and save it (OUT/rows/<row>.json,
    .safetensors and the method's figure); its log in OUT/rows/<row>/."""
    print(f"[lift {method.name}] {row}: training ({config})", flush=True)
    log_dir = out / "rows" / _slug(row)
    shutil.rmtree(log_dir, ignore_errors=True)  # a retrained row starts a fresh log
    log = FitLog(f"lift {method.name}, row {row!r}", log_dir, progress)
    torch.manual_seed(config.seed)
    t0 = time.perf_counter()
    fitted = method.fit(data, config, log)
    seconds = time.perf_counter() - t0
    heldout = {s: seqs for s, seqs in data.splits.items() if s != "train"}
    with torch.no_grad():
        try:
            scores = {s: score_split(fitted, s, seqs) for s, seqs in heldout.items()}
        except ValueError as e:
            raise ValueError(f"lift {method.name}, row {row!r}: {e}; nothing of this row was "
                             "saved") from None  # fmt: skip
    from safetensors.torch import save_file

    weights = {k: v.detach().cpu().contiguous() for k, v in fitted.state_dict().items()}
    save_file(weights, str(out / "rows" / f"{_slug(row)}.safetensors"))
    if method.figure is not None:
        method.figure(fitted, [s for seqs in data.splits.values() for s in seqs],
                      out / "rows" / f"{_slug(row)}.png")  # fmt: skip
    result = {"method": method.name, "config": to_dict(config), "seconds": round(seconds, 1),
              "scores": scores, "losses": fitted.losses}  # fmt: skip
    atomic_write_text(out / "rows" / f"{_slug(row)}.json", json.dumps(result, indent=1) + "\n")
    return result


def run_lift(method_name: str, shards: str | os.PathLike, out_dir: str | os.PathLike,
             rows: str | None = None, overrides: list[str] | None = None,
             progress: bool = True, input_2d: str = "gt") -> dict:  # fmt: skip
    """Train and score each row not yet saved on the 2D input ``input_2d`` (``gt`` or
    ``detected``); write OUT/lift.json, .md, .png; return the JSON."""
    method = get_method(method_name)
    chosen = parse_rows(method, rows)
    overrides = list(overrides or [])
    # a bad --set fails here, before any reading
    configs = {row: build_config(method, row, overrides, input_2d) for row in chosen}
    for config in configs.values():  # device=cuda without CUDA: one line, before reading too
        resolve_device(config.device)
    inputs = sorted({c.input for c in configs.values()})
    if "detected" in inputs:
        require_det2d(shards)
    data = _read(method, shards, configs)
    heldout = [s for s in data[chosen[0]].splits if s != "train"]
    out = Path(out_dir)
    (out / "rows").mkdir(parents=True, exist_ok=True)
    results = {}
    for row in chosen:
        path = out / "rows" / f"{_slug(row)}.json"
        saved = json.loads(path.read_text()) if path.is_file() else {}
        if _same_row(saved.get("config"), to_dict(configs[row])):
            print(f"[lift {method.name}] {row}: done already ({path})", flush=True)
        else:
            saved = train_row(method, row, configs[row], data[row], out, progress)
        results[row] = saved | {"command": _command(method, row, shards, out, overrides,
                                                    input_2d)}  # fmt: skip
    first = configs[chosen[0]]  # --set applies to every row: the rows share their input
    protocol = {"joints": 17, "units": "mm", "pose": "root-relative, camera coordinates",
                "train": "train clips", "heldout": heldout, "input": ",".join(inputs),
                "inputs": describe_input(method, inputs, first.min_confidence)}  # fmt: skip
    if "detected" in inputs and method.reads_2d:
        protocol["detected"] = detection_counts(data[chosen[0]].splits, first.min_confidence)
        protocol["min_confidence"] = first.min_confidence
    result = {
        "method": method.name,
        "describe": method.describe,
        "protocol": protocol,
        "rows": {row: {k: v for k, v in r.items() if k != "losses"} for row, r in results.items()},
    }  # fmt: skip
    figure = lift_figure(result, {row: r["losses"] for row, r in results.items()})
    return write_stage(out, "lift", result, markdown_table(result), figures={"lift": figure})


def _same_row(saved: dict | None, config: dict) -> bool:
    """Whether a saved row's config is this one's, ``device`` aside (where a row trained does
    not make it another row; rows saved before the field existed have none)."""
    if not isinstance(saved, dict):
        return False
    return {k: v for k, v in saved.items() if k != "device"} == {
        k: v for k, v in config.items() if k != "device"}  # fmt: skip


def load_row(out_dir: str | os.PathLike, row: str, device: str | None = None) -> Fitted:
    """A saved row (OUT/rows/<row>.json + .safetensors) rebuilt by its method's ``restore``:
    ``predict(split, sequences)`` gives what the fitted row gave (the image head needs the
    sequences read with its frames: ``read_splits(shards, **method.read(fitted.config))``).
    ``device`` (``auto``, ``cpu``, ``cuda``) replaces the ``device`` the row trained with."""
    path = Path(out_dir) / "rows" / f"{_slug(row)}.json"
    if not path.is_file():
        raise ValueError(f"{path}: no saved row {row!r} (run posebert finetune lift first)")
    saved = json.loads(path.read_text())
    method = get_method(saved["method"])
    config = from_dict(method.config, saved["config"])
    if device is not None:
        config = dataclasses.replace(config, device=device)
    from safetensors.torch import load_file

    fitted = method.restore(config, load_file(str(path.with_suffix(".safetensors"))))
    fitted.losses = saved["losses"]
    return fitted


def describe_input(method: LiftMethod, inputs: list[str], min_confidence: float = 0.0) -> str:
    """The protocol's words for the 2D input of the rows."""
    if not method.reads_2d:
        return (f"the frames (pixels): {method.name} reads no 2D keypoints, so --input "
                f"{','.join(inputs)} does not change its input")  # fmt: skip
    lost = "frames where it lost the person"
    if min_confidence > 0:
        lost += f" or its mean joint confidence is below {min_confidence:g}"
    words = {"gt": "the shards' 2D projections (crop pixels), with the row's imitation noise "
                   "and dropped joints",
             "detected": "the detector's 2D keypoints (the shards' det2d: BlazePose, crop "
                         f"pixels), train and held-out; {lost} linearly interpolated between "
                         "the nearest detected frames of the sequence, held at its ends; no "
                         "imitation noise unless set"}  # fmt: skip
    return "; ".join(words[i] for i in inputs)


def _command(method: LiftMethod, row: str, shards, out: Path, overrides: list[str],
             input_2d: str = "gt") -> str:  # fmt: skip
    args = ["posebert", "finetune", "lift", "--method", method.name, "--shards", str(shards),
            "--out", str(out), "--rows", row,
            *(["--input", input_2d] if input_2d != "gt" else []),
            *(f"--set={o}" for o in overrides)]  # fmt: skip
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
    protocol = result["protocol"]
    lines = [f"Method `{result['method']}`: {result['describe']}", "",
             f"Input (`--input {protocol.get('input', 'gt')}`): {protocol['inputs']}."]
    for split, c in protocol.get("detected", {}).items():
        lines.append(f"- {split}: the detector lost the person in {c['lost']} of {c['frames']} "
                     f"frames ({c['lost_share']:.1%}, filled); "
                     f"{c['sequences_never_found']} sequence(s) never found")
    lines += [""]
    lines += md_table(head, rows)
    lines += ["", f"mm, 17 joints, {result['protocol']['pose']}; trained on the train clips, "
              f"scored on {', '.join(heldout)}.", "", "Commands:", ""]  # fmt: skip
    lines += [f"- {name}: `{r['command']}`" for name, r in result["rows"].items()]
    return "\n".join(lines) + "\n"


def lift_figure(result: dict, losses: dict[str, list[dict]]):
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
    return fig
