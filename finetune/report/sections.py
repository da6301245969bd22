"""The sections of the report page for one run folder (:class:`finetune.report.collect.Run`).

Each stage shows its tables as the stage wrote them (``<stage>.md``: the same figures and
protocol notes as on the terminal), its full protocol block, the figures it saved beside its
JSON, and the pictures drawn for the report: the retrieval gallery and embedding map, 3D
skeletons of pose predictions, forecast strips. Whatever is missing or unreadable becomes a
note on the page, never a failed report: a report is most wanted when a run went wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from finetune.report import html as h
from finetune.report.collect import STAGE_FILES, Run, StageResult, log_groups

TITLES = {"results": "Demo summary", "ablation": "Ablation summary",
          "retrieval": "Retrieval", "pose": "3D pose head", "future": "Future pose prediction",
          "lift": "Lifting", "curves": "Training curves"}  # fmt: skip
STAGE_FIGURES = {"results": (), "ablation": ("ablation",), "retrieval": (),
                 "pose": ("pose",), "future": ("future",), "lift": ("lift",)}  # fmt: skip
"""Figures a stage saves beside its JSON (``<name>.png``), shown under its tables."""
FIGURE_ERRORS = (ValueError, KeyError, IndexError, TypeError, OSError)
"""What a broken or foreign file can raise while drawing: a note, not a failed report."""


def guarded(what: str, draw: Callable[[], str]) -> str:
    """``draw()``, or a note saying why ``what`` could not be shown."""
    try:
        return draw()
    except FIGURE_ERRORS as e:
        return h.note(f"{what}: could not be shown ({type(e).__name__}: {e})")


def png_file(path: Path, caption: str) -> str:
    """A PNG the run saved, inlined; nothing when the file is absent."""
    if not path.is_file():
        return ""
    return guarded(caption, lambda: h.figure(path.read_bytes(), caption))


def rows_table(rows: object, limit: int = 20) -> str:
    """Fallback when a stage left no markdown: one line per row, scalar fields as columns
    (nested fields dotted, per-action breakdowns left to the JSON)."""
    items = list(rows.items()) if isinstance(rows, dict) else list(enumerate(rows or []))

    def flat(value: object, prefix: str = "") -> dict:
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                if k != "per_action":
                    out |= flat(v, f"{prefix}{k}.")
            return out
        return {prefix.rstrip("."): h.value_text(value)} if prefix else {}

    flats = [(name, flat(r)) for name, r in items]
    columns = list(dict.fromkeys(c for _, f in flats for c in f))
    shown = columns[:limit]
    more = f" ({len(columns) - limit} more fields in the JSON)" if len(columns) > limit else ""
    body = h.table(["row", *shown], [[n, *(f.get(c, "") for c in shown)] for n, f in flats])
    return body + (h.note(f"Only the first {limit} fields{more}.") if more else "")


def stage_section(run: Run, stage: StageResult) -> str:
    """One stage result: heading (where it lies), its tables, protocol, figures, pictures."""
    where = run.relative(stage.folder)
    where = f' <span class="path">{h.esc(where)}</span>' if where != "." else ""
    parts = [f"<h3>{h.esc(TITLES[stage.kind])}{where}</h3>"]
    if stage.error:
        parts.append(h.note(stage.error))
    if stage.markdown is not None:
        parts.append(h.markdown(stage.markdown))
    elif stage.data is not None and "rows" in stage.data:
        parts.append(rows_table(stage.data["rows"]))
    data = stage.data or {}
    if isinstance(data.get("command"), str):
        parts.append(f"<p>Command: <code>{h.esc(data['command'])}</code></p>")
    if isinstance(data.get("protocol"), dict):
        parts.append(h.details("protocol (how it was measured)",
                               h.mapping_table(data["protocol"])))  # fmt: skip
    for name in STAGE_FIGURES[stage.kind]:
        parts.append(png_file(stage.folder / f"{name}.png", f"{name}.png"))
    extra = {"retrieval": retrieval_pictures, "pose": sample_pictures,
             "future": sample_pictures}.get(stage.kind)  # fmt: skip
    if extra is not None:
        parts.append(extra(stage))
    return "\n".join(p for p in parts if p)


def retrieval_pictures(stage: StageResult) -> str:
    """The gallery (best / median / worst queries) beside what each row shows and the
    embedding map (side by side where the window is wide enough)."""
    gallery = png_file(stage.folder / "gallery.png", "query frame (left) and the model's "
                       "top-1 retrieval (right), 2D skeletons drawn")  # fmt: skip
    side = []
    rows_path = stage.folder / "gallery.json"
    if rows_path.is_file():
        def caption() -> str:
            rows = json.loads(rows_path.read_text())["rows"]
            return h.table(["", "query (action, camera, frame)", "top-1 retrieval",
                            "MPJPE mm", "P-MPJPE mm"],
                           [[r["group"], _frame_text(r["query"]), _frame_text(r["retrieved"]),
                             f"{r['mpjpe_mm']:.1f}", f"{r['p_mpjpe_mm']:.1f}"]
                            for r in rows])  # fmt: skip
        side.append(guarded("gallery.json", caption))
    side.append("<h4>Embedding map</h4>")
    side.append(guarded("embedding map", lambda: _embedding_map(stage.folder)))
    return ("<h4>Gallery: best, median and worst queries</h4>\n"
            f'<div class="row"><div>{gallery or h.note("No gallery.png here.")}</div>'
            f"<div>{''.join(side)}</div></div>")  # fmt: skip


def _frame_text(frame: dict) -> str:
    """Short enough to sit beside the gallery (the sample keys are in gallery.json)."""
    return f"{frame['action']}, {frame['camera']}, frame {frame['frame']}"


def _embedding_map(folder: Path) -> str:
    from finetune.report.embedding_map import PNG, map_figure, map_title, read_embedding_map

    if (folder / PNG).is_file():
        return png_file(folder / PNG, "model embeddings of the query frames, coloured by action")
    data = read_embedding_map(folder)
    if data is None:
        return h.note("No embedding map here (embedding-map.png / .npz, written by "
                      "posebert evaluate retrieval).")  # fmt: skip
    title = map_title(data["method"], data["split"], len(data["xy"]))
    return h.figure(h.figure_png(map_figure(data["xy"], data["action"], title)), title)


SAMPLE_PICTURES = {
    "pose": ("3D skeletons", "the pose head", "predictions (red) beside ground truth (black), "
             "root-relative, from the camera and from the side"),
    "future": ("Forecast strips", "the forecasting head", "seed frames, then ground truth "
               "(black) and forecast (red) at each horizon"),
}
"""Stage -> (heading, who leaves the samples, caption) of the prediction pictures."""


def sample_pictures(stage: StageResult) -> str:
    """The skeletons (pose) or forecast strips (future) a head left in ``<stage>-samples.npz``."""
    from finetune.report.samples import read_samples
    from finetune.report.skeletons import forecast_figure, pose_figure

    heading, who, caption = SAMPLE_PICTURES[stage.kind]

    def draw() -> str:
        samples = read_samples(stage.folder, stage.kind)
        if samples is None:
            return h.note(f"No {stage.kind}-samples.npz beside {stage.kind}.json: {who} did not "
                          "leave predictions to draw (finetune.report.samples.write_samples).")
        if stage.kind == "pose":
            fig = pose_figure(samples)
        else:
            horizons = ((stage.data or {}).get("protocol") or {}).get("horizons_ms") or ()
            fig = forecast_figure(samples, horizons)
        return h.figure(h.figure_png(fig), caption)

    return f"<h4>{heading}</h4>\n" + guarded(f"{stage.kind} samples", draw)


def curves_section(run: Run) -> str:
    from finetune.report.curves import curves_figure, read_log

    parts = []
    for stage, logs in log_groups(run).items():
        def draw(stage=stage, logs=logs) -> str:
            series = {name: read_log(path) for name, path in logs.items()}
            files = ", ".join(run.relative(p) for p in logs.values())
            return h.figure(h.figure_png(curves_figure(series, stage)), f"from {files}")
        parts.append(guarded(f"curves of {stage}", draw))
    return "\n".join(parts)


def commands_section(run: Run) -> str:
    rows = [[stage, "" if s is None else f"{s:.0f}", command]
            for stage, command, s in run.commands()]  # fmt: skip
    if not rows:
        return ""
    body = h.table(["stage", "seconds", "command"],
                   [[h.esc(a), h.esc(b), f"<code>{h.esc(c)}</code>"] for a, b, c in rows],
                   cell=str)  # fmt: skip
    return "<h3>Commands</h3>\n" + body


def missing_text(run: Run) -> str:
    missing = run.missing()
    if not missing:
        return ""
    names = [f"{TITLES[k]} ({STAGE_FILES[k]}.json)" if k in STAGE_FILES
             else "training curves (metrics.jsonl)" for k in missing]  # fmt: skip
    return h.note("Not found in this run: " + "; ".join(names) + ".", "missing")


def run_section(run: Run, anchor: str) -> str:
    """The whole section of one run folder."""
    kind = {"demo": "posebert demo", "ablation": "posebert ablation"}.get(run.kind, "run folder")
    found = ", ".join(dict.fromkeys(TITLES[s.kind] for s in run.stages)) or "none"
    parts = [f'<h2 id="{h.esc(anchor)}">{h.esc(run.root.name)}</h2>',
             f'<p class="path">{h.esc(kind)}: {h.esc(run.root.resolve())}</p>',
             f"<p>Stage results found: {h.esc(found)}; training logs: {len(run.logs)}.</p>",
             missing_text(run)]  # fmt: skip
    parts += [stage_section(run, s) for s in run.stages]
    if run.logs:
        parts += [f"<h3>{TITLES['curves']}</h3>", curves_section(run)]
    parts.append(commands_section(run))
    return "\n".join(p for p in parts if p)
