"""Training curves of the report, from the JSON-lines logs every stage writes.

Pretraining writes ``<run>/pretrain/metrics.jsonl`` (:mod:`pretrain.engine.loop`: ``loss`` and
its terms ``loss_contrastive`` / ``loss_diversity``, ``accuracy`` (positive beats every
distractor), ``negative_purity``, ``perplexity`` / ``code_perplexity`` with the quantizer on,
``sim_positive`` / ``sim_negative``, ``lr``, ``frames_per_s``, ``time_s``, reader counters);
fine-tuning heads write one per trained row through :mod:`finetune.loop` (``step``, their loss
terms, ``lr``, ``time_s``). Every numeric series is plotted; series are grouped into panels by
what they measure (:data:`GROUPS`) so a panel's lines share a scale, and the logs of one stage
(e.g. the rows of the pose head) share one figure so they can be compared.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from finetune.report.writer import pyplot

Series = dict[str, np.ndarray]
"""Series name -> (steps, values) as a (2, N) float array; NaN where a value was not finite."""


GROUPS: tuple[tuple[str, Callable[[str], bool]], ...] = (
    ("loss", lambda k: k == "loss" or k.startswith("loss") or k.endswith("loss")
     or "_loss" in k),  # fmt: skip
    ("accuracy and negative purity", lambda k: "acc" in k or "purity" in k or "hit" in k),
    ("codebook perplexity", lambda k: "perplexity" in k),
    ("training error (mm)", lambda k: "mpjpe" in k or k.endswith("_mm")),
    ("scheduled sampling", lambda k: "sampling" in k or k == "share"),
    ("cosine similarity", lambda k: k.startswith("sim_")),
    ("learning rate", lambda k: k == "lr" or k.startswith("lr_")),
    ("frames per second", lambda k: k.endswith("per_s")),
    ("seconds", lambda k: k.endswith("time_s") or k == "seconds"),
    ("counters", lambda k: k.startswith(("reader_", "skipped", "num_", "negatives_"))
     or k == "epoch"),  # fmt: skip
)
"""Panels in display order: (title, which series go there); the rest go to ``other``."""


def read_log(path: str | os.PathLike) -> Series:
    """Every numeric series of a metrics file keyed by name, against ``step`` (or the line
    number when a line has none). A line cut by a kill or not JSON is skipped: a report of a
    run still training must not fail."""
    points: dict[str, list[tuple[float, float]]] = {}
    for n, line in enumerate(Path(path).read_text(errors="replace").splitlines()):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step", n)
        if not isinstance(step, (int, float)) or isinstance(step, bool):
            step = n
        for key, value in record.items():
            if key == "step" or isinstance(value, bool):
                continue
            if value is None or isinstance(value, (int, float)):  # None: a non-finite value
                v = math.nan if value is None else float(value)
                points.setdefault(key, []).append((float(step), v))
    # a key that was null on every line carries nothing to plot
    return {k: np.array(p, dtype=float).T for k, p in points.items()
            if not all(math.isnan(v) for _, v in p)}  # fmt: skip


def group_of(key: str) -> str:
    return next((title for title, test in GROUPS if test(key)), "other")


def panels(logs: dict[str, Series]) -> dict[str, list[tuple[str, str]]]:
    """Panel title -> (log name, series name) pairs, panels in :data:`GROUPS` order."""
    out: dict[str, list[tuple[str, str]]] = {title: [] for title, _ in GROUPS}
    out["other"] = []
    for name, series in logs.items():
        for key in series:
            out[group_of(key)].append((name, key))
    return {title: pairs for title, pairs in out.items() if pairs}


STYLES = ("-", "--", ":", "-.")


def curves_figure(logs: dict[str, Series], title: str, columns: int = 3):
    """One panel per group of :func:`panels`; one log: a colour per series; several (rows of
    a head): a colour per row and a line style per series.
    A panel whose positive values span more than two decades is drawn on a log scale."""
    groups = panels(logs)
    if not groups:
        raise ValueError(f"{title}: no numeric series to plot")
    plt = pyplot()
    cols = min(columns, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.4 * cols, 3.0 * rows), squeeze=False)
    names = list(logs)
    for ax, (panel, pairs) in zip(axes.flat, groups.items(), strict=False):
        keys = list(dict.fromkeys(key for _, key in pairs))
        for name, key in pairs:
            x, y = logs[name][key]
            if len(logs) == 1:  # one log: a colour per series
                colour, style, label = f"C{keys.index(key) % 10}", "-", key
            else:  # several rows: a colour per row, a line style per series
                colour, label = f"C{names.index(name) % 10}", f"{name}: {key}"
                style = STYLES[keys.index(key) % len(STYLES)]
            ax.plot(x, y, style, color=colour, label=label, linewidth=1.1,
                    marker="." if len(x) < 4 else None)  # fmt: skip
        _scale(ax, [logs[n][k][1] for n, k in pairs])
        ax.set_title(panel, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if len(pairs) > 1:
            ax.legend(fontsize=6, loc="best")
    for ax in list(axes.flat)[len(groups) :]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def _scale(ax, values: Sequence[np.ndarray]) -> None:
    y = np.concatenate(values)
    y = y[np.isfinite(y)]
    if y.size and (y > 0).all() and y.max() / y.min() > 100:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 4))
