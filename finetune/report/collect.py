"""What a run folder holds, for ``posebert report``: stage results, training logs, commands.

A run folder is anything the pipeline writes: a ``posebert demo`` or ``posebert ablation``
output, one stage's ``--out``, or a folder of several. It is walked, not assumed: every stage
result found (by file name, :data:`STAGE_FILES`) is reported where it lies, so a folder with
stages missing shows what is there, and the page says which stages it did not find.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

from pretrain.engine.metrics import METRICS_FILE

STAGE_FILES = {"results": "results", "ablation": "ablation", "retrieval": "retrieval",
               "pose": "pose", "future": "future", "lift": "lift"}  # fmt: skip
"""Stage kind -> the stem of its ``<stem>.json`` / ``<stem>.md`` (demo summary, ablation
summary, retrieval evaluation, pose head, forecasting head, lifting method)."""
RECORDS = {"demo.json": "demo", "ablation-run.json": "ablation"}
"""Stage records of the pipelines (``stages: {name: {command, seconds}}``)."""
EXPECTED = {"demo": ("results", "retrieval", "pose", "future", "curves"),
            "ablation": ("ablation", "retrieval", "curves"),
            None: ("retrieval", "pose", "future", "lift", "curves")}  # fmt: skip
"""What a run of each kind (by its record; None: no record) should show."""
SKIP_DIRS = {"shards", "shards-app", "cache", "checkpoints", "tensorboard", "heads", "encoder",
             "__pycache__"}  # fmt: skip
"""Folders that hold data, weights or caches, never results: not walked (a full run's shards
are thousands of files)."""


@dataclasses.dataclass
class StageResult:
    """One stage's result files in one folder."""

    kind: str
    folder: Path
    data: dict | None = None
    """The parsed ``<stem>.json`` (None when absent or unreadable)."""
    markdown: str | None = None
    """``<stem>.md`` as written by the stage (tables and protocol notes)."""
    error: str | None = None
    """Why the JSON could not be read, for the page."""

    @property
    def json_path(self) -> Path:
        return self.folder / f"{STAGE_FILES[self.kind]}.json"


@dataclasses.dataclass
class Run:
    """Everything ``posebert report`` found under one run folder."""

    root: Path
    stages: list[StageResult]
    logs: list[Path]
    """``metrics.jsonl`` files (pretraining and every fine-tuned row)."""
    records: dict[Path, dict]
    """Pipeline stage records by path (demo.json, ablation-run.json)."""
    kind: str | None
    """``demo`` / ``ablation`` when the root holds their record, else None."""

    def missing(self) -> list[str]:
        """Stage kinds this kind of run should show and does not."""
        found = {s.kind for s in self.stages} | ({"curves"} if self.logs else set())
        return [k for k in EXPECTED[self.kind] if k not in found]

    def commands(self) -> list[tuple[str, str, float | None]]:
        """(stage, command, seconds) from the records, then the stage results' ``command``."""
        out = []
        for path, record in self.records.items():
            where = "" if path.parent == self.root else f"{path.parent.relative_to(self.root)}: "
            for name, entry in (record.get("stages") or {}).items():
                if isinstance(entry, dict) and "command" in entry:
                    out.append((where + str(name), str(entry["command"]), entry.get("seconds")))
        shown = {c for _, c, _ in out}
        for s in self.stages:
            command = (s.data or {}).get("command")
            if isinstance(command, str) and command not in shown:
                out.append((f"{s.kind} ({self.relative(s.folder)})", command, None))
        return out

    def relative(self, path: Path) -> str:
        rel = path.relative_to(self.root).as_posix()
        return "." if rel == "." else rel


def _read_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        return None, f"{path.name}: unreadable ({e})"
    if not isinstance(data, dict):
        return None, f"{path.name}: not a JSON object"
    return data, None


def _stage(kind: str, folder: Path, names: set[str]) -> StageResult | None:
    stem = STAGE_FILES[kind]
    if f"{stem}.json" not in names and f"{stem}.md" not in names:
        return None
    result = StageResult(kind, folder)
    if f"{stem}.json" in names:
        result.data, result.error = _read_json(folder / f"{stem}.json")
    if f"{stem}.md" in names:
        result.markdown = (folder / f"{stem}.md").read_text(errors="replace")
    return result


def collect(root: str | os.PathLike) -> Run:
    """Walk ``root`` (folders in name order) for stage results, logs and records. One-line
    ``ValueError`` naming the folder when it is not one or holds none of them."""
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"{root}: no such directory")
    stages, logs, records = [], [], {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and not d.startswith("."))
        here, names = Path(folder), set(files)
        for kind in STAGE_FILES:
            found = _stage(kind, here, names)
            if found is not None:
                stages.append(found)
        if METRICS_FILE in names:
            logs.append(here / METRICS_FILE)
        for name in sorted(names & set(RECORDS)):
            data, _ = _read_json(here / name)
            if data is not None:
                records[here / name] = data
    if not stages and not logs:
        names = ", ".join(f"{stem}.json" for stem in STAGE_FILES.values())
        raise ValueError(f"{root}: nothing to report: no stage results ({names}) and no "
                         f"{METRICS_FILE} in it or below")  # fmt: skip
    order = list(STAGE_FILES)
    stages.sort(key=lambda s: (order.index(s.kind), str(s.folder)))
    kind = next((RECORDS[n] for n in RECORDS if (root / n) in records), None)
    return Run(root, stages, logs, records, kind)


def log_groups(run: Run) -> dict[str, dict[str, Path]]:
    """Logs by stage: the first folder below the run root (``pretrain``, ``pose``, a variant
    of an ablation), each log named by the folder that holds it within the stage."""
    groups: dict[str, dict[str, Path]] = {}
    for path in run.logs:
        parts = path.parent.relative_to(run.root).parts
        stage = parts[0] if parts else run.root.name
        name = parts[-1] if len(parts) > 1 else stage
        groups.setdefault(stage, {})[name if name not in groups.get(stage, {}) else
                                     "/".join(parts)] = path  # fmt: skip
    return groups
