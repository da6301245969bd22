"""What a run reports: one JSON line per logged step, TensorBoard scalars, a progress bar.

Only rank 0 writes. On resume from step S, lines and events after S (written by the run that
was killed before it could checkpoint them) are dropped first, so ``metrics.jsonl`` of a
resumed run reads like the one of an uninterrupted run. A write that fails (a full disk) raises
an ``OSError`` naming the file; the lines already written stay as they were.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
TIMING_FIELDS = ("frames_per_s", "time_s")
"""Fields that depend on the machine's speed (left out when comparing runs)."""


def _json_value(v: Any) -> Any:
    if isinstance(v, float) and not math.isfinite(v):
        return None  # strict JSON has no NaN / inf
    return v


def _named(e: OSError, path: Path, note: str = "") -> OSError:
    """``e`` with the file named (a failed ``write`` names none) and the errno kept, so the
    loop can tell a full disk (exit 74) from other errors."""
    return OSError(e.errno, f"{e.strerror or e}{note}", str(path))


def truncate_after(path: Path, step: int) -> None:
    """Keep the lines of a metrics file whose ``step`` is <= ``step`` (atomic rewrite through
    ``metrics.jsonl.part``; nothing is written when no line goes). A failed rewrite removes the
    part file and raises an ``OSError`` naming the metrics file, which is left unchanged."""
    if not path.exists():
        return
    text = path.read_text()
    kept = []
    for line in text.splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                kept.append(line)
        except json.JSONDecodeError:
            break  # a line cut by a kill: it and anything after it go
    new = "".join(line + "\n" for line in kept)
    if new == text:
        return
    part = path.with_name(path.name + ".part")
    try:
        with open(part, "w") as f:
            f.write(new)
            f.flush()
            os.fsync(f.fileno())
        os.replace(part, path)
    except OSError as e:
        part.unlink(missing_ok=True)
        raise _named(e, path, f" (dropping lines after step {step}; it is unchanged)") from None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The records of a metrics file (for tests and reports)."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class MetricsLogger:
    """JSONL + TensorBoard + tqdm on rank 0; a no-op elsewhere."""

    def __init__(
        self,
        out_dir: Path | None,
        enabled: bool,
        start_step: int,
        max_steps: int,
        tensorboard: bool = True,
        progress: bool = True,
        desc: str | None = None,
    ):
        """``out_dir`` None: no file and no TensorBoard, the progress bar only."""
        self.enabled = enabled
        self._file = self._tb = self._bar = None
        self._path = None if out_dir is None else out_dir / METRICS_FILE
        if not enabled:
            return
        if self._path is not None:
            out_dir.mkdir(parents=True, exist_ok=True)
            truncate_after(self._path, start_step)
            self._file = open(self._path, "a")
        if tensorboard and out_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(str(out_dir / "tensorboard"), purge_step=start_step + 1)
            except ImportError as e:  # tensorboard is a dependency; keep training without it
                log.warning("TensorBoard disabled: %s", e)
        if progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, initial=start_step, unit="step", desc=desc,
                             dynamic_ncols=True, leave=False)  # fmt: skip

    def log(self, record: dict[str, Any]) -> None:
        """Write one step's record (``step`` required; non-finite floats become null)."""
        if not self.enabled:
            return
        if self._file is not None:
            clean = {k: _json_value(v) for k, v in record.items()}
            try:
                self._file.write(json.dumps(clean) + "\n")
                self._file.flush()
            except OSError as e:
                raise _named(e, self._path) from None
        if self._tb is not None:
            for k, v in record.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(f"train/{k}", v, record["step"])
        if self._bar is not None:
            loss = record.get("loss")
            shown = {"loss": "skipped" if loss is None or not math.isfinite(loss)
                     else f"{loss:.4g}"}  # fmt: skip
            if "frames_per_s" in record:
                shown["fps"] = f"{record['frames_per_s']:.0f}"
            self._bar.set_postfix(shown, refresh=False)

    def advance(self, steps: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(steps)

    def note(self, message: str) -> None:
        """A line for the user that does not break the progress bar."""
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        file, self._file, self._tb, self._bar = self._file, None, None, None
        if file is not None:
            try:
                file.close()
            except OSError as e:  # flushing the last lines on a full disk
                raise _named(e, self._path) from None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
