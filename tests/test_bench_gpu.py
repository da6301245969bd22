"""benchmarks/bench_gpu.py, the measuring half of benchmarks/gpu_check.sh, end to end on the CPU
with a tiny model and tiny shards: every section of the report comes out, measured or with
the reason it was not; and its report (goals, MFU, markdown) from hand-made figures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_sample

from data_shards.write import WriterConfig, write_split

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import bench_gpu_report as report  # noqa: E402

SECTIONS = ("flops", "gpu_tests", "synthetic_32", "e2e_gpu_32", "e2e_cpu_32", "search")
FAKE_TESTS = """
import pytest

@pytest.mark.gpu
def test_marked():
    pass

def test_not_marked():
    pass
"""


@pytest.fixture(scope="module")
def tiny_check(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("gpu_check")
    samples = [make_sample(key=f"tiny-{i}", views=2, frames=8, size=(32, 32), seed=i)
               for i in range(6)]  # fmt: skip
    write_split(root / "shards" / "32", "train", samples, {}, {}, WriterConfig(max_samples=2))
    (root / "fake_gpu_tests").mkdir()
    (root / "fake_gpu_tests" / "test_fake_gpu.py").write_text(FAKE_TESTS)
    cmd = [sys.executable, str(ROOT / "benchmarks" / "bench_gpu.py"), "--device", "cpu",
           "--tiny", "--sizes", "32", "--shards", str(root / "shards"), "--json",
           str(root / "out" / "gpu_check.json"), "--work", str(root / "work"),
           "--tests", str(root / "fake_gpu_tests")]  # fmt: skip
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return root / "out"


def test_tiny_cpu_run_reports_every_section(tiny_check):
    results = json.loads((tiny_check / "gpu_check.json").read_text())
    sections = results["sections"]
    assert tuple(sections) == SECTIONS
    for name in ("flops", "synthetic_32", "e2e_cpu_32", "search", "gpu_tests"):
        assert sections[name]["status"] == "ok", (name, sections[name])
    assert sections["gpu_tests"]["summary"].startswith("1 passed, 1 deselected")
    # data.decode=gpu needs CUDA: refused before any process starts, with the reason
    gpu = sections["e2e_gpu_32"]
    assert gpu["status"] == "ok" or (gpu["status"] == "skipped" and "decode" in gpu["reason"])
    syn = sections["synthetic_32"]
    assert syn["frames_per_step"] == 16  # 1 window x 2 views x 8 frames
    assert syn["plain"]["frames_per_s"] > 0 and syn["deepspeed"]["frames_per_s"] > 0
    e2e = sections["e2e_cpu_32"]
    assert e2e["steps"] >= 1 and e2e["frames_per_s"] > 0 and e2e["frames_per_step"] == 16
    assert sections["flops"]["32"]["train"] > sections["flops"]["32"]["forward"] > 0
    search = sections["search"]
    assert search["n"] == 4096 and search["search_s"] > 0 and search["check"]["checked"] == 64
    assert search["check"]["top1_equal"] > 0.8  # bf16 products: near-ties may swap
    assert results["finished"] and results["versions"]["torch"]
    assert len(results["goals"]) == 5 and len(results["mfu"]) == 4
    for goal in results["goals"]:  # a value, or the reason there is none
        assert goal["value"] is not None or goal["reason"], goal
    md = (tiny_check / "gpu_check.md").read_text()
    for heading in ("## Goals", "## Throughput", "## Top-1 search", "## GPU tests", "## Sections"):
        assert heading in md
    for name in SECTIONS:
        assert f"| {name} |" in md


def _fake_results(card: str | None) -> dict:
    def syn(plain, ds):
        return dict(status="ok", plain=dict(frames_per_s=plain), deepspeed=dict(frames_per_s=ds))

    sections = {
        "flops": dict(status="ok", **{"128": dict(train=8e9), "224": dict(train=24e9)}),
        "synthetic_224": syn(6500.0, 6300.0),
        "e2e_gpu_224": dict(status="ok", frames_per_s=6048.0),
        "e2e_cpu_224": dict(status="failed", reason="ran past its 45 s budget"),
        "search": dict(status="ok", n=1_000_000, d=256, search_s=12.5, matmul_flops=8e14),
        "synthetic_128": dict(status="failed", reason="DeepSpeed engine: boom",
                              plain=dict(frames_per_s=20000.0),
                              deepspeed=dict(steps=0, error="build_engine: boom")),
        "e2e_gpu_128": dict(status="skipped", reason="data.decode=gpu refused here"),
        "e2e_cpu_128": dict(status="not_run", reason="the check stopped"),
    }  # fmt: skip
    return dict(machine=dict(card=card), settings=dict(sizes=[128, 224]), sections=sections)


def test_goals_and_mfu_from_figures():
    results = _fake_results("NVIDIA H100 80GB HBM3")
    report.derive(results)
    goals = {g["goal"]: g for g in results["goals"]}
    over = goals["DeepSpeed overhead (engine vs plain loop, synthetic), 224 px"]
    assert over["value"] == pytest.approx(6500 / 6300 - 1) and over["met"] is True
    ratio = goals["end to end (GPU decoding) / synthetic (DeepSpeed), 224 px"]
    assert ratio["value"] == pytest.approx(0.96) and ratio["met"] is True
    cpu = goals["end to end (CPU decoding) / synthetic (DeepSpeed), 224 px"]
    assert cpu["value"] is None and cpu["met"] is None and "45 s budget" in cpu["reason"]
    assert goals["DeepSpeed overhead (engine vs plain loop, synthetic), 128 px"]["reason"] == (
        "build_engine: boom"
    )
    assert goals["end to end with GPU decoding, 224 px, frames/s per GPU"]["met"] is True
    search = goals["top-1 search 1,000,000 x 1,000,000 x 256, seconds"]
    assert search["value"] == 12.5 and search["met"] is True
    assert results["peak"]["flops"] == 989.4e12
    mfu = {(row["px"], row["run"]): row for row in results["mfu"]}
    assert mfu[(224, "e2e_gpu")]["mfu"] == pytest.approx(6048 * 24e9 / 989.4e12)
    assert mfu[(224, "e2e_gpu")]["mfu_vs_matmul"] == pytest.approx(6048 * 24e9 / 8e14)
    assert mfu[(128, "plain")]["mfu"] == pytest.approx(20000 * 8e9 / 989.4e12)
    assert mfu[(128, "deepspeed")]["mfu"] is None and mfu[(128, "deepspeed")]["reason"]


def test_unknown_card_and_small_search_leave_goals_open():
    results = _fake_results(None)
    results["sections"]["search"].update(n=4096, d=32)
    report.derive(results)
    assert results["peak"]["flops"] is None and all(row["mfu"] is None for row in results["mfu"])
    search = results["goals"][-1]
    assert search["value"] == 12.5 and search["met"] is None and "1M x 1M x 256" in search["reason"]
    results["started"], results["finished"] = "2026-12-06T00:00:00+00:00", None
    results["machine"].update(host="h", cpus=2, processor="x86_64", tiny=True)
    results["versions"] = {"torch": "2.14.1"}
    results["settings"].update(recipe="debug_cpu", workers=2)
    md = report.markdown(results)
    assert "(did not finish)" in md and "| e2e_cpu_128 | not_run |" in md
