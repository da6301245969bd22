"""The README's two set-up commands, as a new user runs them (the main job in its quick form)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def setup_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```sh\n(.*?)```", section, re.S).group(1)
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_test_one():
    assert setup_commands() == ["make demo", "make test"]
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_main_job_quick(tmp_path):
    """`make demo` on three clips at 64 px: install (already done), synth, verify, stats."""
    quick = "--clips walk,run,dance_b --views 2 --frames 8 --size 64 --workers 2"
    r = subprocess.run(
        ["make", "demo", f"OUT={tmp_path}", f"SYNTH_ARGS={quick}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "verify: " in r.stdout and " OK" in r.stdout
    assert (tmp_path / "preview-val.png").stat().st_size > 10_000
    for split, clip in (("train", "walk"), ("val", "run"), ("test", "dance_b")):
        assert (tmp_path / "shards" / split / "manifest.json").is_file()
        assert re.search(rf"^{clip}\s", r.stdout, re.M), r.stdout
