"""`posebert report RUN_DIR... --out DIR`: one self-contained HTML page of one or more runs.

The page (``DIR/report.html``) gathers what the stages wrote: results tables with their
protocol notes, training curves of every stage, the retrieval gallery and embedding map, 3D
skeletons and forecast strips when the heads left samples, and the command of each stage.
It reads only; a run still training can be reported (a cut log line is skipped).
"""

from __future__ import annotations

import argparse
import datetime
import os
from collections.abc import Sequence
from pathlib import Path

from data_shards import __version__
from data_shards.manifest import atomic_write_text
from finetune.report import html
from finetune.report.collect import collect
from finetune.report.sections import run_section

REPORT_FILE = "report.html"


def build_page(run_dirs: Sequence[str | os.PathLike]) -> str:
    """The page of ``run_dirs`` (one section each, in the order given). One-line
    ``ValueError`` naming a folder that is missing or holds nothing to report."""
    if not run_dirs:
        raise ValueError("name at least one run directory")
    runs = [collect(d) for d in run_dirs]
    anchors = [f"run-{i}" for i in range(1, len(runs) + 1)]
    body = "\n".join(run_section(r, a) for r, a in zip(runs, anchors, strict=True))
    when = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    meta = f"posebert {__version__}, written {when} from " + ", ".join(
        str(r.root) for r in runs)
    nav = [(a, r.root.name) for r, a in zip(runs, anchors, strict=True)]
    return html.page("PoseBERT report", meta, nav, body)


def write_report(run_dirs: Sequence[str | os.PathLike], out_dir: str | os.PathLike) -> Path:
    """Write ``OUT/report.html`` (atomically) for ``run_dirs``; returns its path."""
    text = build_page(run_dirs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / REPORT_FILE, text)
    return out / REPORT_FILE


def register(stages: argparse._SubParsersAction) -> None:
    p = stages.add_parser("report", help="one self-contained HTML page of runs: tables, curves, "
                          "galleries, skeletons, commands")  # fmt: skip
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="a posebert demo / ablation output, a stage's --out, or any folder "
                   "above them")  # fmt: skip
    p.add_argument("--out", required=True, help="output directory (gets report.html)")
    p.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    path = write_report(args.run_dirs, args.out)
    print(f"report: {path} ({path.stat().st_size / 1e6:.1f} MB)")
    return 0
