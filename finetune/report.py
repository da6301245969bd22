"""What every evaluation writes the same way: markdown tables, PNG figures, the gap closed."""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

from data_shards.manifest import atomic_write_bytes


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
