"""The one report writer: every stage writes ``<stage>.json``, ``<stage>.md`` and its figures
the same way.

``<stage>.json`` holds ``stage``, a ``protocol`` block (what was measured and how: splits,
units, pose convention, alignment), the stage's ``rows`` and, when the stage was run by a
command, that ``command``; ``posebert report`` reads these files. Everything is written
atomically (a killed run never leaves half a file that a rerun would accept).
"""

from __future__ import annotations

import io
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from pathlib import Path

from data_shards.manifest import atomic_write_bytes, atomic_write_text


def md_table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    """Lines of a markdown table (cells already formatted)."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def gap_closed(value: float, chance: float, oracle: float) -> float:
    """Share of the chance -> oracle gap a retrieval error closes (0 = chance, 1 = oracle)."""
    return (chance - value) / (chance - oracle) if chance != oracle else 0.0


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    pyplot().close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


_COMMAND: list[str] | None = None


def record_command(argv: Sequence[str]) -> None:
    """Remember the ``posebert`` command line this process runs (set by ``posebert``'s main)."""
    global _COMMAND
    _COMMAND = list(argv)


def command_line() -> str | None:
    """The ``posebert`` command that is running, for the record in ``<stage>.json``; None when
    the stage was called from Python rather than the command line."""
    return None if _COMMAND is None else shlex.join(["posebert", *_COMMAND])


def write_stage(out: str | os.PathLike, stage: str, result: Mapping, markdown: str,
                figures: Mapping[str, object] | None = None) -> dict:  # fmt: skip
    """Write ``OUT/<stage>.json`` (``result`` with ``stage`` first; it must carry a
    ``protocol`` block), ``OUT/<stage>.md`` and each figure (name -> matplotlib figure) as
    ``OUT/<name>.png``. Returns the JSON content as a reader gets it back (lists, not tuples)."""
    if "protocol" not in result:
        raise ValueError(f"{stage}: a stage's result needs its protocol block")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps({"stage": stage, **result}, indent=1) + "\n"
    atomic_write_text(out / f"{stage}.json", text)
    atomic_write_text(out / f"{stage}.md", markdown)
    for name, fig in (figures or {}).items():
        save_figure(fig, out / f"{name}.png")
    return json.loads(text)


def read_stage(out: str | os.PathLike, stage: str) -> dict:
    """``OUT/<stage>.json``; one-line ``ValueError`` when missing or not a stage's JSON."""
    path = Path(out) / f"{stage}.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ValueError(f"{path}: missing (run the {stage} stage first)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not JSON ({e})") from None
    if not isinstance(data, dict) or "protocol" not in data:
        raise ValueError(f"{path}: not a {stage} result (no protocol block)")
    return data
