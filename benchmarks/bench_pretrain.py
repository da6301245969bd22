"""Training-step throughput of the pretraining task, measured side by side in one run.

    .venv/bin/python benchmarks/bench_pretrain.py --shards runs/demo/shards/train [--steps 6]

For each image size (64 and 128 px by default) and the ResNet-50 backbone:
- plain torch loop (forward, backward, AdamW) on a fixed synthetic batch;
- the DeepSpeed engine (ZeRO-0, fp32, one process) on the same synthetic batch: its overhead
  against the plain loop (goal <= 5%);
- the DeepSpeed engine fed by the shard reader (decode, resize, collate in 2 workers): the ratio
  end-to-end / synthetic (goal >= 0.9: the data pipeline is not the bottleneck).
Frames per second count every frame through the backbone (B x V x T per step); the three
runs take their steps in turn and each reports its median step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time

import torch

from data_shards.configtools import apply_overrides
from data_shards.read import ShardReader
from pretrain.engine import dist
from pretrain.engine.loop import build_engine
from pretrain.recipes import get_recipe
from pretrain.task import PretrainTask


def config(size: int, batch: int, workers: int, shards: str):
    base = get_recipe("demo_cpu")
    return apply_overrides(base, [
        "model.backbone.name=resnet50", "model.backbone.background_mask=false",
        f"data.size={size}", f"data.train={shards}", "data.views=2", f"data.num_workers={workers}",
        f"engine.micro_batch_per_rank={batch}", "objective.negatives.kind=uniform",
    ])  # fmt: skip


def interleaved(runs: dict, steps: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per step of each ``name: (step_fn, batches)``, the runs' steps taken in
    turn (plain, DeepSpeed, end-to-end, plain, ...) so drift on a shared machine hits all."""
    for fn, batches in runs.values():
        for _ in range(warmup):
            fn(next(batches))
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(steps):
        for name, (fn, batches) in runs.items():
            start = time.perf_counter()
            fn(next(batches))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def repeat(batch):
    while True:
        yield batch


def forever(reader):
    while True:
        yield from reader


def bench_size(size: int, args) -> dict:
    cfg = config(size, args.batch, args.workers, args.shards)
    reader = ShardReader(cfg.data.reader_config(args.batch, seed=0), 0, 1)
    synthetic = next(iter(reader))
    frames = synthetic["frames"].shape[0:3].numel()  # B x V x T
    torch.manual_seed(0)
    plain = PretrainTask(cfg.model, cfg.objective)
    opt = torch.optim.AdamW(plain.parameters(), lr=1e-4)
    step = {"n": 0}

    def plain_step(batch):
        loss, _ = plain(batch, step["n"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step["n"] += 1

    engine_cfg = dataclasses.replace(cfg.engine, grad_clip=0.0)
    engine = build_engine(PretrainTask(cfg.model, cfg.objective), engine_cfg, 1)

    def ds_step(batch):
        loss, _ = engine(batch, step["n"])
        engine.backward(loss)
        engine.step()
        step["n"] += 1

    t = interleaved({"plain": (plain_step, repeat(synthetic)),
                     "deepspeed": (ds_step, repeat(synthetic)),
                     "end_to_end": (ds_step, forever(reader))}, args.steps)  # fmt: skip
    return dict(size=size, frames_per_step=frames, **{k: frames / v for k, v in t.items()})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", default="runs/demo/shards/train")
    p.add_argument("--sizes", default="64,128")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=2, help="windows per step (x 2 views x 8 frames)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    dist.init_distributed()
    rows = [bench_size(int(s), args) for s in args.sizes.split(",")]
    print(f"machine: {platform.node()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; resnet50, {args.batch} windows x 2 views x 8 "
          "frames")  # fmt: skip
    print("\n| px | plain torch frames/s | DeepSpeed frames/s | DS overhead | end-to-end frames/s"
          " | end-to-end / synthetic |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    for r in rows:
        overhead = r["plain"] / r["deepspeed"] - 1
        print(f"| {r['size']} | {r['plain']:.1f} | {r['deepspeed']:.1f} | {overhead:+.1%} | "
              f"{r['end_to_end']:.1f} | {r['end_to_end'] / r['deepspeed']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
