"""Shard throughput: render + encode + write, and read + decode + batch, at 128 and 224 px.

Every figure is measured in the same run, side by side, and reported both as frames per wall
second and per CPU second of all processes involved ("per core": robust to a shared machine).

    .venv/bin/python benchmarks/bench_shards.py [--clips walk,run,jump] [--epochs 3]

Render worker processes are spawned and pay their start-up once; with all 15 clips (the
default) that is amortised as in a real `posebert shards synth` run.

Prints a markdown table for docs/benchmarks.md and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import tempfile
import time
from pathlib import Path

from data_shards import render, synth
from data_shards.read import measure_read_throughput
from data_shards.write import WriterConfig, write_split


def cpu_seconds() -> float:
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(u.ru_utime + u.ru_stime for u in usage)


def bench_write(root: Path, clips: list[str], size: int, workers: int) -> dict:
    """Render, composite, JPEG-encode and write ``clips`` as one split; frames per second."""
    config = synth.SynthConfig(size=size)
    cpu0, t0 = cpu_seconds(), time.perf_counter()
    samples = synth.iter_samples(clips, config, workers=workers, progress=False)
    manifest = write_split(root, "train", samples, {}, {}, WriterConfig(max_samples=16))
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
    frames = manifest.samples * manifest.views * manifest.frames
    mb = sum(s.bytes for s in manifest.shards) / 1e6
    return dict(frames=frames, seconds=wall, frames_per_s=frames / wall,
                frames_per_cpu_s=frames / cpu, workers=workers, size=size, mb=mb)  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", default=None, help="comma-separated (default: all 15)")
    p.add_argument("--epochs", type=int, default=3, help="read epochs per measurement")
    args = p.parse_args()
    clips = args.clips.split(",") if args.clips else list(synth.mocap.CLIP_NAMES)
    rows: list[tuple[str, int, dict]] = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in (128, 224):
            fps = render.benchmark(size, frames=400)
            rows.append(("render only (pose + draw + mask)", size, dict(frames_per_cpu_s=fps)))
            for workers in (1, 2):
                root = Path(tmp) / f"s{size}w{workers}"
                rows.append((f"render + encode + write, {workers} proc", size,
                             bench_write(root, clips, size, workers)))  # fmt: skip
            split = str(Path(tmp) / f"s{size}w1" / "train")
            for workers in (0, 2):
                r = measure_read_throughput(split, num_workers=workers, batch_size=8,
                                            epochs=args.epochs, start_method="fork")  # fmt: skip
                rows.append((f"read + decode + batch, {workers} workers", size, r))
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{__import__('os').cpu_count()} cores; {len(clips)} clips")  # fmt: skip
    print("\n| stage | px | frames/s (wall) | frames/s per core (CPU s) |")
    print("|---|---|---|---|")
    for name, size, r in rows:
        wall = f"{r['frames_per_s']:,.0f}" if "frames_per_s" in r else "-"
        print(f"| {name} | {size} | {wall} | {r['frames_per_cpu_s']:,.0f} |")
    print("\n" + json.dumps([dict(stage=n, px=s, **r) for n, s, r in rows], indent=1))


if __name__ == "__main__":
    main()
