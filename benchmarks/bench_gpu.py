"""GPU readiness check: every figure of the issue "GPU readiness" in one time-boxed run.

    python benchmarks/bench_gpu.py --shards .gpu/shards --json OUT/gpu_check.json
    python benchmarks/bench_gpu.py --device cpu --tiny --shards DIR --json X.json  # the test

``benchmarks/gpu_check.sh`` runs it on a lent GPU machine (docs/benchmarks.md, "GPU check").
Sections, each with its own time budget and warm-up, cut short or skipped with a recorded
reason rather than overrunning the whole check's budget (``--budget-s``):

- ``gpu_tests``: ``pytest -m gpu -q tests/gpu`` with a time limit;
- ``flops``: ResNet-50 FLOPs per frame (forward, and forward + backward: what one training
  frame costs) counted by ``torch.utils.flop_counter`` on the meta device;
- ``synthetic_PX``: frames/s of the plain torch loop and of the project's DeepSpeed engine on
  one batch resident on the device (``bench_gpu_workers.py synthetic``);
- ``e2e_cpu_PX`` / ``e2e_gpu_PX``: ``posebert pretrain`` itself from the carried shards with
  16 loader workers decoding JPEG on the CPU, then with ``--set data.decode=gpu`` (workers hand
  over JPEG bytes, the training process decodes on the GPU); frames/s from the run's own
  per-step ``metrics.jsonl``, the run stopped once enough steps are timed;
- ``search``: top-1 of 1M x 1M x 256 with bf16 products in blocks (``bench_gpu_workers.py``).

The run's config is the recipe ``cluster_resnet50_224`` (ResNet-50, channels_last, bf16,
ZeRO-2) at each size with a per-GPU batch that fits one card and torch's AdamW (DeepSpeed's
FusedAdam would spend a minute compiling). The carried split is listed several times in
``data.train`` so an epoch outlasts the measurement. The JSON is rewritten after every section
(a check killed from outside still leaves what it measured); the markdown comes with it.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import datetime
import json
import math
import os
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import bench_gpu_report as report

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MIN_SECTION_S = 8.0
"""A section is skipped, with the reason recorded, when less than this is left."""


@dataclasses.dataclass
class Plan:
    """What the check measures and how long each part may take."""

    device: str
    tiny: bool
    shards: Path
    json_path: Path
    md_path: Path
    work: Path
    recipe: str
    sizes: list[int]
    batch: dict[int, int]
    """Windows per step at each size (x views x frames = frames per step)."""
    workers: int
    extra: list[str]
    """Overrides beyond data, batch and loop (tiny runs take the GPU recipe's ZeRO-2); ``--set``
    adds more to every run."""
    budget_s: float
    budgets: dict[str, float]
    syn_warmup: int
    syn_steps: int
    syn_startup_s: float
    e2e_warmup: int
    e2e_steps: int
    e2e_min_steps: int
    e2e_window_s: float
    epoch_batches: int
    """Batches per loader worker in one epoch: the split is listed as often as that needs."""
    search: list[str]
    tests: list[str]
    skip: set[str]


def make_plan(args: argparse.Namespace) -> Plan:
    tiny = args.tiny
    sizes = [int(s) for s in (args.sizes or ("32" if tiny else "128,224")).split(",")]
    default_batch = {128: 16, 224: 8}
    batch = {px: (1 if tiny else default_batch.get(px, 8)) for px in sizes}
    for item in filter(None, (args.batch or "").split(",")):
        px, b = item.split(":")
        batch[int(px)] = int(b)
    json_path = Path(args.json)
    return Plan(
        device=args.device, tiny=tiny, shards=Path(args.shards).resolve(), json_path=json_path,
        md_path=Path(args.md) if args.md else json_path.with_suffix(".md"),
        work=Path(args.work or tempfile.mkdtemp(prefix="gpu_check-")), sizes=sizes, batch=batch,
        recipe="debug_cpu" if tiny else "cluster_resnet50_224",
        workers=args.workers if args.workers is not None else (2 if tiny else 16),
        extra=(["engine.zero_stage=2"] if tiny else []) + args.set,
        budget_s=args.budget_s,
        budgets=(dict(flops=30, gpu_tests=40, synthetic=40, e2e=40, search=30) if tiny else
                 dict(flops=30, gpu_tests=90, synthetic=45, e2e=45, search=35)),
        syn_warmup=1 if tiny else 3, syn_steps=2 if tiny else 20,
        syn_startup_s=15 if tiny else 25,
        e2e_warmup=1 if tiny else 32, e2e_steps=2 if tiny else 300,
        e2e_min_steps=1 if tiny else 5, e2e_window_s=5 if tiny else 18,
        epoch_batches=4 if tiny else 40,
        search=(["--n", "4096", "--d", "32", "--qblock", "1024", "--gblock", "1536",
                 "--matmul-n", "256", "--check", "64"] if tiny else []),
        tests=args.tests.split(","), skip=set(filter(None, (args.skip or "").split(","))),
    )  # fmt: skip


# --------------------------------------------------------------------------- child processes


class Stopped(Exception):
    """This process got SIGTERM (``timeout`` in gpu_check.sh: the whole check ran out)."""


def _stop(signum: int, frame: object) -> None:
    raise Stopped("the check was stopped from outside (SIGTERM): its time ran out")


@dataclasses.dataclass
class Child:
    returncode: int | None
    ended: str
    """'exited', 'stopped' (enough measured) or 'timeout' (its budget ran out)."""
    tail: list[str]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env() -> dict[str, str]:
    """This environment for a one-process run: no launcher variables, a free rendezvous port,
    the checkout importable."""
    launcher = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k not in launcher}
    env["MASTER_PORT"] = str(free_port())
    env["PYTHONUNBUFFERED"] = "1"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


def run_child(cmd: list[str], name: str, budget_s: float, stop: Callable[[], bool] | None = None,
              keep: list[str] | None = None) -> Child:  # fmt: skip
    """Run ``cmd`` in its own process group, its output echoed with a ``[name]`` prefix (and
    every line appended to ``keep``); the whole group is killed once ``stop()`` says enough is
    measured or ``budget_s`` has passed."""
    print(f"[{name}] $ {' '.join(c if len(c) < 200 else c[:80] + '...' for c in cmd)}",
          flush=True)  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace",
                            start_new_session=True)  # fmt: skip
    tail: collections.deque[str] = collections.deque(maxlen=40)

    def echo() -> None:
        for line in proc.stdout:  # type: ignore[union-attr]
            tail.append(line.rstrip())
            if keep is not None:
                keep.append(line.rstrip())
            print(f"[{name}] {line}", end="", flush=True)

    reader = threading.Thread(target=echo, daemon=True)
    reader.start()
    deadline, ended = time.monotonic() + budget_s, "exited"
    try:
        while proc.poll() is None:
            if stop is not None and stop():
                ended = "stopped"
            elif time.monotonic() > deadline:
                ended = "timeout"
            if ended != "exited":
                break
            time.sleep(0.5)
    finally:  # also when this process is stopped (Stopped from the SIGTERM handler)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)  # our child's own group (start_new_session)
        proc.wait()
    reader.join(timeout=5)
    return Child(proc.returncode, ended, list(tail))


def why(child: Child, budget_s: float) -> str:
    """One line saying how a child that measured too little ended."""
    if child.ended == "timeout":
        return f"ran past its {budget_s:.0f} s budget"
    errors = [line for line in child.tail if re.search(r"error|exception|refused", line, re.I)]
    last = (errors or [line for line in child.tail if line.strip()] or ["(no output)"])[-1]
    return f"exit code {child.returncode}: {last.strip()[:300]}"


# ------------------------------------------------------------------------------ the sections


def run_overrides(plan: Plan, px: int) -> tuple[list[str], dict]:
    """The ``--set`` overrides of a run at ``px`` and what they amount to (for the report)."""
    from data_shards.manifest import Manifest

    split = plan.shards / str(px) / "train"
    manifest = Manifest.load(split)
    b = plan.batch[px]
    copies = max(1, math.ceil(max(plan.workers, 1) * b * plan.epoch_batches / manifest.samples))
    sets = [f"data.train={','.join([str(split)] * copies)}", "data.views=none",
            "data.frames=none", "data.size=none", f"data.num_workers={plan.workers}",
            "data.shuffle_buffer=16", f"engine.micro_batch_per_rank={b}",
            "engine.optimizer.impl=torch", "train.log_every=1", "train.progress=false",
            "train.tensorboard=false", "train.max_steps=1000000",
            "train.checkpoint_every=1000000", *plan.extra]  # fmt: skip
    info = dict(split=str(split), listed=copies, samples=manifest.samples,
                image_size=list(manifest.image_size), batch=b, views=manifest.views,
                frames=manifest.frames, frames_per_step=b * manifest.views * manifest.frames,
                overrides=[f"data.train={split} (x{copies})", *sets[1:]])  # fmt: skip
    return sets, info


def check_config(plan: Plan, sets: list[str]) -> str | None:
    """None if this checkout's config accepts the overrides on this machine (what ``posebert
    pretrain`` checks before it starts), else the one-line reason."""
    from pretrain.cli import resolve_config

    try:
        cfg = resolve_config(plan.recipe, sets)
        check_device = getattr(cfg.data, "check_device", None)
        if check_device is not None:
            check_device()
    except Exception as e:  # ValueError/ConfigError from the config, whatever it is named
        return f"{type(e).__name__}: {e}"
    return None


OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def section_gpu_tests(plan: Plan, budget: float) -> dict:
    """``pytest -m gpu`` on ``plan.tests``, verbose so that a run stopped at its limit still
    says which tests passed."""
    paths = [p for p in plan.tests if (ROOT / p).exists()]
    if not paths:
        return dict(status="skipped", reason=f"{', '.join(plan.tests)} not in this checkout: "
                    "no gpu-marked tests to run")  # fmt: skip
    cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-v", "-rfEs", "-p", "no:cacheprovider",
           *paths]  # fmt: skip
    lines: list[str] = []
    child = run_child(cmd, "gpu_tests", budget, keep=lines)
    tests = [m.group(1, 2) for m in map(OUTCOME.match, lines) if m]
    counts = collections.Counter(outcome.lower() for _, outcome in tests)
    totals = [line for line in lines if re.search(r"\d+ (passed|failed|skipped|error)", line)]
    summary = totals[-1].strip("= ") if totals else ", ".join(f"{n} {k}" for k, n in counts.items())
    out = dict(command=" ".join(cmd[2:]), returncode=child.returncode, summary=summary,
               tests=[f"{node} {outcome}" for node, outcome in tests])  # fmt: skip
    if child.ended == "timeout":
        return dict(out, status="failed", reason=f"stopped at its {budget:.0f} s limit "
                    f"({summary or 'no test finished'})")  # fmt: skip
    if child.returncode == 5:
        return dict(out, status="skipped", reason="no gpu-marked tests were collected")
    if child.returncode != 0:
        return dict(out, status="failed", reason=summary or why(child, budget))
    if not counts.get("passed") and counts.get("skipped"):
        skips = [line for line in lines if line.startswith("SKIPPED")]
        return dict(out, status="skipped", reason="every gpu-marked test skipped itself: "
                    + (skips[0] if skips else summary))  # fmt: skip
    return dict(out, status="ok")


def section_flops(plan: Plan, budget: float) -> dict:
    """Backbone FLOPs per frame at each size: forward, and forward + backward."""
    import timm
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from pretrain.cli import resolve_config

    name = resolve_config(plan.recipe, []).model.backbone.name
    out: dict = dict(backbone=name, counted_by="torch.utils.flop_counter (meta device)")
    for px in plan.sizes:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, num_classes=0)
            x = torch.randn(2, 3, px, px)  # 2: batch norm refuses one value per channel
        with FlopCounterMode(display=False) as forward:
            model(x)
        with FlopCounterMode(display=False) as train:
            model(x).sum().backward()
        out[str(px)] = dict(forward=forward.get_total_flops() // 2,
                            train=train.get_total_flops() // 2)  # fmt: skip
    return out


def section_synthetic(plan: Plan, px: int, sets: list[str], budget: float) -> dict:
    out_json = plan.work / f"synthetic_{px}.json"
    cmd = [sys.executable, str(HERE / "bench_gpu_workers.py"), "synthetic",
           "--recipe", plan.recipe, *[a for s in sets for a in ("--set", s)],
           "--device", plan.device, "--warmup", str(plan.syn_warmup),
           "--steps", str(plan.syn_steps), "--budget-s",
           str(max(3.0, budget - plan.syn_startup_s)), "--json", str(out_json)]  # fmt: skip
    child = run_child(cmd, f"synthetic_{px}", budget)
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    if not data.get("plain", {}).get("steps"):
        return dict(data, status="failed", reason=why(child, budget))
    if not data.get("deepspeed", {}).get("steps"):
        reason = data.get("deepspeed", {}).get("error") or why(child, budget)
        return dict(data, status="failed", reason=f"DeepSpeed engine: {reason}")
    return dict(data, status="ok", ended=child.ended)


def _records(path: Path) -> list[dict]:
    records = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                break  # a line being written
    return records


def section_e2e(plan: Plan, px: int, decode: str, sets: list[str], info: dict,
                budget: float) -> dict:  # fmt: skip
    """``posebert pretrain`` from the shards, stopped once enough steps are timed."""
    if decode == "gpu":
        sets = [*sets, "data.decode=gpu"]
        problem = check_config(plan, sets)
        if problem:
            return dict(status="skipped", reason=f"data.decode=gpu refused here ({problem}): "
                        "GPU decoding not measured")  # fmt: skip
    run_dir = plan.work / f"e2e_{decode}_{px}"
    metrics = run_dir / "metrics.jsonl"
    warm = plan.e2e_warmup

    def enough() -> bool:
        timed = _records(metrics)[warm:]
        long_enough = sum(r.get("time_s", 0.0) for r in timed) >= plan.e2e_window_s
        return len(timed) >= plan.e2e_steps or (len(timed) >= plan.e2e_min_steps and long_enough)

    cmd = [sys.executable, "-m", "posebert", "pretrain", "--recipe", plan.recipe,
           "--out", str(run_dir), *[a for s in sets for a in ("--set", s)]]  # fmt: skip
    child = run_child(cmd, f"e2e_{decode}_{px}", budget, stop=enough)
    records = _records(metrics)
    timed = records[warm:]
    if not records and child.returncode == 2:  # the command refused its arguments: one line
        return dict(status="skipped", reason=why(child, budget))
    if len(timed) < plan.e2e_min_steps:
        return dict(status="failed", steps_logged=len(records),
                    reason=f"{len(records)} steps logged ({warm} warm-up + "
                    f"{plan.e2e_min_steps} needed); {why(child, budget)}")  # fmt: skip
    frames = info["frames_per_step"]
    times = [r["time_s"] for r in timed]
    half = len(times) // 2
    prefetched = max(plan.workers, 1) * 2  # DataLoader's default prefetch_factor per worker
    return dict(
        status="ok", ended=child.ended, warmup=warm, steps=len(times), frames_per_step=frames,
        frames_per_s=frames * len(times) / sum(times),
        median_frames_per_s=frames / statistics.median(times),
        first_half_frames_per_s=frames * half / sum(times[:half]) if half else None,
        second_half_frames_per_s=frames * (len(times) - half) / sum(times[half:]),
        prefetch_share_at_most=min(1.0, prefetched / len(times)),
        loop_reported_median_frames_per_s=statistics.median(r.get("frames_per_s", 0.0)
                                                            for r in timed),
        last_loss=timed[-1].get("loss"), reader_bad_samples=timed[-1].get("reader_bad_samples"),
    )  # fmt: skip


def section_search(plan: Plan, budget: float) -> dict:
    out_json = plan.work / "search.json"
    cmd = [sys.executable, str(HERE / "bench_gpu_workers.py"), "search", "--device",
           plan.device, "--json", str(out_json), *plan.search]  # fmt: skip
    child = run_child(cmd, "search", budget)
    data = json.loads(out_json.read_text()) if out_json.exists() else {}
    if "search_s" not in data:
        return dict(data, status="failed", reason=why(child, budget))
    return dict(data, status="ok", ended=child.ended)


# --------------------------------------------------------------------------------- the check


class Check:
    """Runs the sections in turn within the budget; the report is rewritten after each."""

    def __init__(self, plan: Plan, results: dict):
        self.plan, self.results = plan, results
        self.deadline = time.monotonic() + plan.budget_s
        self.stopped: str | None = None

    def run(self, name: str, budget: float, fn: Callable[[float], dict]) -> None:
        left = self.deadline - time.monotonic()
        kind = re.sub(r"_\d+$", "", name)
        if self.stopped:
            data = dict(status="not_run", reason=self.stopped)
        elif name in self.plan.skip or kind in self.plan.skip:
            data = dict(status="skipped", reason="left out with --skip")
        elif left < MIN_SECTION_S:
            data = dict(status="skipped", reason=f"only {max(left, 0):.0f} s left of the "
                        f"check's {self.plan.budget_s:.0f} s budget")  # fmt: skip
        else:
            start = time.monotonic()
            try:
                data = fn(min(budget, left))
            except Stopped as e:
                self.stopped = str(e)
                data = dict(status="failed", reason=self.stopped)
            except Exception as e:  # one section's failure is recorded; the others still run
                data = dict(status="failed", reason=f"{type(e).__name__}: {e}"[:400])
            data.setdefault("status", "ok")
            data["seconds"] = round(time.monotonic() - start, 1)
        self.results["sections"][name] = data
        print(f"== {name}: {data['status']}" + (f" ({data['reason']})" if data.get("reason")
                                                 else ""), flush=True)  # fmt: skip
        self.write()

    def write(self) -> None:
        report.derive(self.results)
        self.plan.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.plan.json_path.write_text(json.dumps(self.results, indent=1) + "\n")
        try:
            text = report.markdown(self.results)
        except Exception as e:  # the JSON holds every figure; the table must not stop the check
            text = f"# GPU check\n\nThe table could not be written ({type(e).__name__}: {e}); "
            text += f"see {self.plan.json_path.name}.\n"
        self.plan.md_path.write_text(text)


def section_names(plan: Plan) -> list[str]:
    """Sections in the order they run: the 224 px figures and the search before 128 px."""
    by_size = {px: [f"synthetic_{px}", f"e2e_gpu_{px}", f"e2e_cpu_{px}"] for px in plan.sizes}
    first = sorted(plan.sizes, reverse=True)
    return ["flops", "gpu_tests", *by_size[first[0]], "search",
            *[n for px in first[1:] for n in by_size[px]]]  # fmt: skip


def measure(plan: Plan, results: dict, name: str) -> Callable[[float], dict]:
    """The function that measures section ``name`` within a budget."""
    if name == "flops":
        return lambda budget: section_flops(plan, budget)
    if name == "gpu_tests":
        return lambda budget: section_gpu_tests(plan, budget)
    if name == "search":
        return lambda budget: section_search(plan, budget)
    kind, px = name.rsplit("_", 1)

    def sized(budget: float) -> dict:
        sets, info = run_overrides(plan, int(px))
        results["settings"]["runs"][px] = info
        if kind == "synthetic":
            return section_synthetic(plan, int(px), sets, budget)
        return section_e2e(plan, int(px), kind.split("_")[1], sets, info, budget)

    return sized


def start_results(plan: Plan) -> dict:
    results = dict(
        schema="posebert-gpu-check/1",
        started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        finished=None, machine=report.machine(plan.device, plan.tiny), versions=report.versions(),
        settings=dict(recipe=plan.recipe, device=plan.device, tiny=plan.tiny, sizes=plan.sizes,
                      workers=plan.workers, budget_s=plan.budget_s, runs={}),
        sections={name: dict(status="not_run", reason="the check stopped before this section "
                             "(killed from outside or crashed)")
                  for name in section_names(plan)},
    )  # fmt: skip
    return results


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--tiny", action="store_true", help="tiny model, sizes and search (CPU test)")
    p.add_argument("--shards", default=".gpu/shards", help="ROOT with ROOT/<px>/train splits")
    p.add_argument("--json", default=None, help="report path (default: $OUT/gpu_check.json)")
    p.add_argument("--md", default=None, help="markdown path (default: the JSON's, .md)")
    p.add_argument("--budget-s", type=float, default=420.0, help="the whole check's budget")
    p.add_argument("--sizes", default=None, help="comma-separated px (default 128,224)")
    p.add_argument("--batch", default=None, help="PX:WINDOWS,... (default 128:16,224:8)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default 16)")
    p.add_argument("--tests", default="tests/gpu", help="paths given to pytest -m gpu")
    p.add_argument("--skip", default=None, help="sections (or kinds: synthetic, e2e_gpu, ...)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="one more override of every run's config (repeatable)")  # fmt: skip
    p.add_argument("--work", default=None, help="scratch directory (default: a new temp dir)")
    args = p.parse_args()
    if args.json is None:
        if not os.environ.get("OUT"):
            p.error("--json is required when $OUT is not set")
        args.json = os.path.join(os.environ["OUT"], "gpu_check.json")
    plan = make_plan(args)
    plan.work.mkdir(parents=True, exist_ok=True)
    signal.signal(signal.SIGTERM, _stop)
    results = start_results(plan)
    check = Check(plan, results)
    check.write()
    for name in section_names(plan):
        kind = re.sub(r"_\d+$", "", name)
        key = "e2e" if kind.startswith("e2e") else kind
        check.run(name, plan.budgets[key], measure(plan, results, name))
    results["finished"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    check.write()
    print("\n" + plan.md_path.read_text(), flush=True)


if __name__ == "__main__":
    main()
