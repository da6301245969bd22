"""`posebert shards detect` throughput: BlazePose over a split's frames, 1 and 2 processes.

Both figures are measured in the same run, side by side, on copies of one split, and reported
as frames per wall second (what a user waits for, the rewrite of the split included) and per
CPU second of all processes (robust to a shared machine). The load average before and after
is printed: on a machine shared with other jobs the wall figure of 2 processes only shows a
gain when a second core is free.

    .venv/bin/python benchmarks/bench_detect.py [--shards runs/demo/shards] [--split test]

Prints a markdown table for docs/benchmarks.md and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import tempfile
import time
from pathlib import Path

from data_shards.detect_shards import detect_split
from data_shards.manifest import find_splits


def cpu_seconds() -> float:
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def bench(split_dir: Path, tmp: Path, workers: int) -> dict:
    """Detect over a fresh copy of the split with ``workers`` processes."""
    copy = shutil.copytree(split_dir, tmp / f"w{workers}" / split_dir.name)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    summary = detect_split(copy, workers=workers, overwrite=True, progress=False)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    frames = summary["frames"]
    return dict(workers=workers, frames=frames, found=summary["found"], seconds=round(wall, 1),
                frames_per_s=frames / wall, frames_per_cpu_s=frames / cpu,
                detect_seconds=summary["seconds"], streams=summary["streams"])  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="runs/demo/shards", help="shard root (posebert shards "
                   "synth --out DIR)")  # fmt: skip
    p.add_argument("--split", default="test", help="split to detect on (copied, not changed)")
    args = p.parse_args()
    split_dir = find_splits(args.shards)[args.split]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        rows = [bench(split_dir, Path(tmp), workers) for workers in (1, 2)]
    load1 = os.getloadavg()
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average {load0[0]:.2f} before, {load1[0]:.2f} after; "
          f"split {args.split} of {args.shards}: {rows[0]['frames']} frames in "
          f"{rows[0]['streams']} tracked streams")  # fmt: skip
    print("\n| shards detect | frames/s (wall) | frames/s per core (CPU s) | person found |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['workers']} process{'es' if r['workers'] > 1 else ''} | "
              f"{r['frames_per_s']:,.1f} | {r['frames_per_cpu_s']:,.1f} | "
              f"{r['found'] / r['frames']:.1%} |")
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
