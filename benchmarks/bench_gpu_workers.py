"""The measurements of ``bench_gpu.py`` that run in a child process of their own.

    python benchmarks/bench_gpu_workers.py synthetic --recipe R --set K=V ... --json OUT
    python benchmarks/bench_gpu_workers.py search --n 1000000 --d 256 --json OUT

Each writes its JSON after every round, so a child stopped at its time budget still leaves
what it measured. ``bench_gpu.py`` starts them, enforces the budgets and writes the report.

- ``synthetic``: the pretraining task on one fixed batch of the carried shards, resident on
  the device: a plain torch loop (forward, backward, gradient clipping, AdamW; bf16 autocast
  when the recipe's precision is bf16; channels_last from the backbone config) and the
  project's DeepSpeed engine (:func:`pretrain.engine.loop.build_engine`, the recipe's ZeRO
  stage and precision), their steps taken in turn so drift hits both alike.
- ``search``: exact top-1 (L2) of N queries against N gallery vectors with low-precision
  matrix products in blocks and a running argmax, its agreement with a float64 reference on
  a sample of queries, and the device's bf16 matrix-product rate (the achievable peak).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _dump(path: str, data: dict) -> None:
    tmp = Path(path + ".part")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _summary(times: list[float], frames: int) -> dict:
    """Mean (total frames over total time) and median-step frames/s of timed steps."""
    if not times:
        return dict(steps=0)
    return dict(steps=len(times), frames_per_s=frames * len(times) / sum(times),
                median_frames_per_s=frames / statistics.median(times),
                step_s=[round(t, 5) for t in times])  # fmt: skip


# ------------------------------------------------------------------------------ synthetic


def _device_batch(cfg, device: torch.device) -> dict:
    """One batch of the run's shards, read in this process and moved to ``device``."""
    from data_shards.read import ShardReader
    from pretrain.engine.stream import to_device

    reader_cfg = cfg.data.reader_config(cfg.engine.micro_batch_per_rank, seed=0)
    reader_cfg = dataclasses.replace(reader_cfg, num_workers=0)
    batch = next(iter(ShardReader(reader_cfg, 0, 1)))
    return to_device(batch, device)


def _plain_step(cfg, device: torch.device, batch: dict) -> Callable[[int], float]:
    """A plain torch training step of the task: what DeepSpeed's overhead is measured against."""
    from pretrain.task import PretrainTask

    torch.manual_seed(0)
    task = PretrainTask(cfg.model, cfg.objective).to(device)
    opt_cfg = cfg.engine.optimizer
    adam = torch.optim.AdamW if opt_cfg.name == "adamw" else torch.optim.Adam
    params = [p for p in task.parameters() if p.requires_grad]
    opt = adam(params, lr=opt_cfg.lr, betas=opt_cfg.betas, eps=opt_cfg.eps,
               weight_decay=opt_cfg.weight_decay)  # fmt: skip
    bf16 = cfg.engine.precision == "bf16"
    clip = cfg.engine.grad_clip

    def step(n: int) -> float:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss, _ = task(batch, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()
        return float(loss.detach())  # the training loop reads every step's loss too

    return step


def _engine_step(cfg, batch: dict) -> Callable[[int], float]:
    from pretrain.engine.loop import build_engine
    from pretrain.task import PretrainTask

    torch.manual_seed(0)
    engine = build_engine(PretrainTask(cfg.model, cfg.objective), cfg.engine, 1)

    def step(n: int) -> float:
        loss, _ = engine(batch, n)
        engine.backward(loss)
        engine.step()
        return float(loss.detach())

    return step


def synthetic(args: argparse.Namespace) -> None:
    from pretrain.cli import resolve_config
    from pretrain.engine import dist

    cfg = resolve_config(args.recipe, args.set)
    device = torch.device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    dist.init_distributed()  # one process: what build_engine expects
    batch = _device_batch(cfg, device)
    frames = math.prod(batch["frames"].shape[:3])  # B x V x T
    out: dict = dict(frames_per_step=frames, precision=cfg.engine.precision,
                     zero_stage=cfg.engine.zero_stage, warmup=args.warmup)  # fmt: skip
    runs = {"plain": _plain_step(cfg, device, batch)}
    try:  # the plain loop is still measured when the engine cannot be built
        runs["deepspeed"] = _engine_step(cfg, batch)
    except Exception as e:
        out["deepspeed"] = dict(steps=0, error=f"build_engine: {type(e).__name__}: {e}"[:400])
        print(out["deepspeed"]["error"], flush=True)
    t_end = time.perf_counter() + args.budget_s
    n = 0
    for fn in runs.values():
        for _ in range(args.warmup):
            fn(n)
            n += 1
    times: dict[str, list[float]] = {name: [] for name in runs}
    losses: dict[str, float] = {}
    while min(map(len, times.values())) < args.steps and time.perf_counter() < t_end:
        for name, fn in runs.items():
            _sync(device)
            start = time.perf_counter()
            losses[name] = fn(n)
            _sync(device)
            times[name].append(time.perf_counter() - start)
            n += 1
        out.update({name: _summary(t, frames) for name, t in times.items()})
        out["last_loss"] = losses
        if device.type == "cuda":
            out["max_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        _dump(args.json, out)
    _dump(args.json, out)


# --------------------------------------------------------------------------------- search


def top1(queries: torch.Tensor, gallery: torch.Tensor, half_norm: torch.Tensor,
         qblock: int, gblock: int) -> torch.Tensor:  # fmt: skip
    """Index of the L2-nearest gallery row of every query: argmax of q.g - |g|^2 / 2 (|q|^2 is
    the same for every row of a query). Products in the inputs' dtype (fp32 accumulation),
    the norm term and the running maximum in fp32; one (qblock, gblock) block at a time."""
    out = torch.empty(len(queries), dtype=torch.long, device=queries.device)
    scores = torch.empty(qblock, gblock, dtype=torch.float32, device=queries.device)
    for qs in range(0, len(queries), qblock):
        q = queries[qs : qs + qblock]  # (bq, d)
        best = torch.full((len(q),), -math.inf, device=q.device)  # (bq,)
        arg = torch.zeros(len(q), dtype=torch.long, device=q.device)
        for gs in range(0, len(gallery), gblock):
            g = gallery[gs : gs + gblock]  # (bg, d)
            s = scores[: len(q), : len(g)]
            torch.sub(q @ g.T, half_norm[gs : gs + len(g)], out=s)  # (bq, bg) fp32
            value, index = s.max(dim=1)
            better = value > best
            best = torch.where(better, value, best)
            arg = torch.where(better, index + gs, arg)
        out[qs : qs + len(q)] = arg
    return out


def _check_top1(found: torch.Tensor, queries: torch.Tensor, gallery: torch.Tensor,
                sample: int, gen: torch.Generator) -> dict:  # fmt: skip
    """``found`` against an exact float64 search for ``sample`` random queries: the share of
    identical ids, and for the others how much farther the found row is (relative)."""
    rows = torch.randperm(len(queries), generator=gen, device="cpu")[:sample].to(queries.device)
    g = gallery.double()
    g2 = (g * g).sum(1)  # (N,)
    equal, worst = 0, 0.0
    for chunk in rows.split(64):
        q = queries[chunk].double()
        dist = g2 - 2.0 * q @ g.T + (q * q).sum(1, keepdim=True)  # (c, N) squared L2
        best = dist.argmin(1)
        got = found[chunk]
        equal += int((best == got).sum())
        d_best = dist.gather(1, best[:, None])[:, 0]
        d_got = dist.gather(1, got[:, None])[:, 0]
        worst = max(worst, float(((d_got - d_best) / d_best.clamp_min(1e-12)).max()))
    return dict(checked=len(rows), top1_equal=equal / len(rows), worst_relative_excess=worst)


def matmul_rate(device: torch.device, n: int, dtype: torch.dtype, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n product on random data (3 warm-ups, median of ``repeats``)."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    times = []
    for i in range(3 + repeats):
        _sync(device)
        start = time.perf_counter()
        a @ b
        _sync(device)
        if i >= 3:
            times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times)


def search(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    out: dict = dict(n=args.n, d=args.d, dtype=args.dtype, qblock=args.qblock,
                     gblock=args.gblock, metric="l2")  # fmt: skip
    out["matmul_flops"] = matmul_rate(device, args.matmul_n, torch.bfloat16)
    out["matmul_n"] = args.matmul_n
    _dump(args.json, out)
    gen = torch.Generator(device=device).manual_seed(0)
    gallery = torch.randn(args.n, args.d, device=device, generator=gen)  # (N, d) fp32
    queries = torch.randn(args.n, args.d, device=device, generator=gen)
    half_norm = 0.5 * (gallery.double() ** 2).sum(1).float()  # (N,)
    g_low, q_low = gallery.to(dtype), queries.to(dtype)
    top1(q_low[: args.qblock], g_low[: args.gblock], half_norm, args.qblock, args.gblock)  # warm
    seconds = []
    for _ in range(args.repeats):
        _sync(device)
        start = time.perf_counter()
        found = top1(q_low, g_low, half_norm, args.qblock, args.gblock)
        _sync(device)
        seconds.append(time.perf_counter() - start)
        out.update(search_s=min(seconds), all_search_s=seconds)
        _dump(args.json, out)
    out["check"] = _check_top1(
        found, queries, gallery, args.check, torch.Generator().manual_seed(1)
    )
    _dump(args.json, out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="what", required=True)
    s = sub.add_parser("synthetic")
    s.add_argument("--recipe", required=True)
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    s.add_argument("--warmup", type=int, default=3, help="untimed steps of each run")
    s.add_argument("--steps", type=int, default=20, help="timed steps of each run at most")
    s.add_argument("--budget-s", type=float, default=20.0, help="stop timing after this long")
    q = sub.add_parser("search")
    q.add_argument("--n", type=int, default=1_000_000, help="queries = gallery vectors")
    q.add_argument("--d", type=int, default=256)
    q.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    q.add_argument("--qblock", type=int, default=16384)
    q.add_argument("--gblock", type=int, default=65536)
    q.add_argument("--repeats", type=int, default=2)
    q.add_argument("--check", type=int, default=512, help="queries checked against float64")
    q.add_argument("--matmul-n", type=int, default=8192)
    for a in (s, q):
        a.add_argument("--device", default="cuda")
        a.add_argument("--json", required=True)
    args = p.parse_args()
    {"synthetic": synthetic, "search": search}[args.what](args)


if __name__ == "__main__":
    main()
