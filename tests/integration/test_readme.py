"""The README's two set-up commands, as a new user runs them (the main job in its quick form)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    assert setup_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.fault(
    "Fine-tuning heads and the demo",
    "`posebert demo` run again on its finished folder, and on it with other settings",
    injected="the quick demo's command rerun, then run without --quick on the same --out",
)  # fmt: skip
def test_main_job_quick(quick_demo, observed):
    """`make demo` in its quick form: every stage of `posebert demo` on a sliver of the data,
    ending in the one results table; run again, it finds every stage done."""
    tmp_path, r = quick_demo.out, quick_demo.run  # run once per session (tests/conftest.py)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for split in ("train", "val", "test"):
        assert (tmp_path / "shards" / split / "manifest.json").is_file()
    table = (tmp_path / "results.md").read_text()
    for row in ("| retrieval top-1 | model |", "| retrieval top-1 | oracle |",
                "| pose head, probe, 10% labels | pretrained |",
                "| pose head, full, 100% labels | random-init |", "| pose-gpt |",
                "| zero-velocity |", "| constant-velocity |",
                "| video 3D (dance_b, 640x360, 25 fps) | tcn rf27, trained on detected 2D |",
                "| video 3D (dance_b, 640x360, 25 fps) | mean pose |"):  # fmt: skip
        assert row in table, table
    assert table in r.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    stages = {"shards", "shards-appearance-swap", "pretrain", "export", "retrieval", "pose",
              "future", "detect", "lift-detected", "render-video", "predict"}
    assert table.startswith("Pretraining levers on: background-mask, augment, appearance-swap, "
                            "span-mask (the ablation's best variant).")  # fmt: skip
    assert set(results["stages"]) == stages
    video = results["video"]  # the held-out clip as a video, through the detector and the TCN
    assert video["frames"] == 40 and 0 < video["detection_rate"] <= 1
    assert video["mpjpe"] > 0 and video["mean_pose"]["mpjpe"] > 0
    assert (tmp_path / "predict" / "dance_b.mp4").is_file()
    again = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "posebert"), "demo", "--out", str(tmp_path), "--quick"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("done already") == len(stages)
    assert (tmp_path / "results.md").read_text() == table
    observed(f"rerun: exit {again.returncode}, {again.stdout.count('done already')} of "
             f"{len(stages)} stages done already, the same table: "
             f"{(tmp_path / 'results.md').read_text() == table}")  # fmt: skip
    dry = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "posebert"), "demo", "--out", str(tmp_path / "none"),
         "--dry-run"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert dry.returncode == 0 and not (tmp_path / "none").exists()
    printed = [line for line in dry.stdout.splitlines() if ": $ posebert " in line]
    assert len(printed) == len(stages) and "--levers background-mask,augment" in dry.stdout
    other = subprocess.run(
        [str(ROOT / ".venv" / "bin" / "posebert"), "demo", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert other.returncode == 2 and "other settings" in other.stderr
    assert len(other.stderr.strip().splitlines()) == 1
    observed(f"other settings: exit {other.returncode}: {other.stderr.strip()}")
