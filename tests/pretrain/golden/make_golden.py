"""Write ``debug_cpu_losses.json``: the debug_cpu loss curve and the band it may move within.

A float reduction takes other kernels on another CPU (vector width, MKL's code path for the
vendor, thread count), so a curve written on one machine is not bit-exact on the next one; a
short contrastive run amplifies the differences step by step. This script trains the
``debug_cpu`` recipe on the test's shards once per kernel setting below, keeps the per-step
median as the reference and records, per step, the largest relative distance of any setting
from it.
``tests/pretrain/test_pretrain_run.py`` then checks a run against the reference within a band
of a few times that spread (and the first steps, where nothing has had time to diverge, tightly).

    .venv/bin/python tests/pretrain/golden/make_golden.py            # 18 settings, ~2-3 min
    .venv/bin/python tests/pretrain/golden/make_golden.py --quick    # two settings

Regenerate it whenever a change is meant to move the curve; the diff of the JSON shows how far.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

GOLDEN = Path(__file__).with_name("debug_cpu_losses.json")
SHARDS = ["--clips", "walk,kick,run", "--views", "2", "--frames", "8", "--size", "32",
          "--workers", "1"]  # fmt: skip
"""The shards of the test's ``shards`` fixture."""

SETTINGS = {
    "threads": ("1", "2"),
    "ATEN_CPU_CAPABILITY": ("default", "avx2", "avx512"),
    "ONEDNN_MAX_CPU_ISA": ("SSE41", "AVX2", "AVX512_CORE"),
}
"""Kernel choices that differ between x86-64 machines: torch's vectorised ops, oneDNN's
convolution and GEMM code path, and the thread count. (``MKL_ENABLE_INSTRUCTIONS`` changed
nothing in this run's curve, so it is not among them.)"""


def posebert(*args: str, env: dict[str, str]) -> None:
    r = subprocess.run([sys.executable, "-m", "posebert", *args], env=env, capture_output=True,
                       text=True)  # fmt: skip
    if r.returncode != 0:
        raise SystemExit(f"posebert {' '.join(args[:2])} failed:\n{r.stderr[-3000:]}")


def curve(shards: Path, out: Path, setting: dict[str, str]) -> list[float]:
    threads = setting.get("threads", "2")
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": threads,
           "MKL_NUM_THREADS": threads, **{k: v for k, v in setting.items() if k != "threads"}}
    posebert("pretrain", "--recipe", "debug_cpu", "--out", str(out), "--set",
             f"data.train={shards / 'train'}", "--set", "train.progress=false",
             env=env)  # fmt: skip
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="two settings only")
    args = parser.parse_args()
    names = list(SETTINGS)
    settings = [dict(zip(names, values, strict=True))
                for values in itertools.product(*SETTINGS.values())]  # fmt: skip
    if args.quick:
        settings = settings[:: len(settings) - 1]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        posebert("shards", "synth", "--out", str(root / "shards"), *SHARDS,
                 env={**os.environ})  # fmt: skip
        curves = []
        for i, setting in enumerate(settings):
            curves.append(curve(root / "shards", root / f"run{i}", setting))
            print(f"{setting}: {[round(x, 4) for x in curves[-1]]}", flush=True)
    steps = range(len(curves[0]))
    reference = [statistics.median(c[s] for c in curves) for s in steps]
    spread = [max(abs(c[s] - reference[s]) / abs(reference[s]) for c in curves) for s in steps]
    golden = {
        "losses": reference,
        "spread": spread,
        "settings": settings,
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
    }
    GOLDEN.write_text(json.dumps(golden, indent=1) + "\n")
    print(f"wrote {GOLDEN}; largest relative spread {max(spread):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
