"""The pose head's outputs: ``pose.json`` / ``pose.md`` / ``pose.png`` through the one report
writer (:func:`finetune.report.write_stage`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from finetune.heads.pose.config import MODES
from finetune.heads.pose.model import MM_PER_UNIT
from finetune.report import command_line, md_table, pyplot, write_stage

METRICS = ("mpjpe", "p_mpjpe", "n_mpjpe", "mpjve")


def write_outputs(out: Path, result: dict, curves: dict[str, list[dict]]) -> dict:
    result = {**result, "command": command_line()}
    return write_stage(out, "pose", result, markdown_table(result),
                       {"pose": plot(result, curves)})  # fmt: skip


def markdown_table(result: dict) -> str:
    """Overall errors per row, then MPJPE per action."""
    rows = result["rows"]
    head = ["encoder", "head", "labels", "windows", "MPJPE", "P-MPJPE", "N-MPJPE", "MPJVE"]
    lines = md_table(head, [[r["encoder"], r["mode"], f"{r['labels']:.0%}",
                             str(r["labelled_windows"])]
                            + [f"{r['all'][m]:.1f}" for m in METRICS] for r in rows])  # fmt: skip
    actions = sorted(rows[0]["per_action"])
    lines += ["", "MPJPE (mm) per action:", ""]
    lines += md_table(["encoder", "head", "labels", *actions],
                      [[r["encoder"], r["mode"], f"{r['labels']:.0%}"]
                       + [f"{r['per_action'][a]['mpjpe']:.1f}" for a in actions]
                       for r in rows])  # fmt: skip
    p = result["protocol"]
    lines.append(f"\n{p['eval']} split, {p['eval_views']} views x {p['frames_per_window']} "
                 f"frames per window; {p['pose']}, {p['units']}; MPJVE in "
                 f"{p['mpjve_units']} at {p['fps']:g} fps.")  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(result: dict, curves: dict[str, list[dict]]):
    """MPJPE against the label fraction per (encoder, head), and the training losses."""
    fig, (ax, ax_loss) = pyplot().subplots(1, 2, figsize=(11, 4.2))
    lines: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for r in result["rows"]:
        if r["mode"] in MODES:
            lines.setdefault((r["encoder"], r["mode"]), []).append((r["labels"], r["all"]["mpjpe"]))
    for (encoder, mode), pts in lines.items():
        pts.sort()
        style = "-" if encoder == "pretrained" else "--"
        marker = "o" if mode == "probe" else "s"
        ax.plot([p[0] * 100 for p in pts], [p[1] for p in pts], style, marker=marker,
                label=f"{encoder}, {mode}")  # fmt: skip
    mean_row = next((r for r in result["rows"] if r["encoder"] == "mean pose"), None)
    if mean_row:
        ax.axhline(mean_row["all"]["mpjpe"], color="grey", lw=1, label="mean pose")
    ax.set_xscale("log")
    ticks = sorted({r["labels"] * 100 for r in result["rows"] if r["mode"] in MODES})
    ax.set_xticks(ticks, [f"{t:g}%" for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("train windows with labels (%)")
    ax.set_ylabel(f"MPJPE on {result['protocol']['eval']} (mm)")
    ax.set_title("3D pose regression head")
    ax.legend(fontsize=8)
    for name, history in curves.items():
        steps = [r["step"] for r in history]
        ax_loss.plot(steps, np.asarray([r["loss"] for r in history]) * MM_PER_UNIT, lw=0.8,
                     label=name)  # fmt: skip
    ax_loss.set_xlabel("step")
    ax_loss.set_ylabel("training MPJPE (mm)")
    ax_loss.set_yscale("log")
    ax_loss.legend(fontsize=6)
    fig.tight_layout()
    return fig
