"""`posebert report`: what it finds in a run folder and the page it writes (no browser here;
test_chromium.py opens a real one)."""

from __future__ import annotations

import base64
import io
import json
import re

import numpy as np
import pytest
from PIL import Image
from report_helpers import future_arrays, pose_arrays

from finetune.report import html
from finetune.report.cli import build_page, write_report
from finetune.report.collect import collect, log_groups
from finetune.report.embedding_map import NPZ
from finetune.report.samples import write_samples
from posebert.cli import main

HOSTILE = '<script>alert("x")</script> & <img src=http://example.com/x.png>'


def _png(path, colour=(200, 30, 30)):
    Image.new("RGB", (40, 30), colour).save(path)


def _stage(folder, stem, rows, markdown=None, **extra):
    folder.mkdir(parents=True, exist_ok=True)
    data = {"stage": stem, "protocol": {"units": "mm", "note": HOSTILE}, "rows": rows, **extra}
    (folder / f"{stem}.json").write_text(json.dumps(data))
    if markdown is not None:
        (folder / f"{stem}.md").write_text(markdown)


def _log(path, n=5, **fields):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"step": s, "loss": 1 / (s + 1), "lr": 1e-3, **fields})
                            + "\n" for s in range(n)))  # fmt: skip


@pytest.fixture
def run_dir(tmp_path):
    """A demo-shaped run folder with every kind of content the report reads."""
    root = tmp_path / "demo & <run>"
    _stage(root / "retrieval", "retrieval", {"model": {"mpjpe": {"top1": 300.0}}},
           "| method | MPJPE top1 |\n|---|---|\n| model | 300.0 |\n\nval queries; `mm`.\n")
    _png(root / "retrieval" / "gallery.png")
    (root / "retrieval" / "gallery.json").write_text(json.dumps({"rows": [
        {"group": "best", "mpjpe_mm": 90.0, "p_mpjpe_mm": 80.0,
         "query": {"key": "k1", "view": 0, "frame": 3, "action": HOSTILE, "camera": "cam0"},
         "retrieved": {"key": "k2", "view": 1, "frame": 7, "action": "walk", "camera": "c1"}}]}))
    np.savez(root / "retrieval" / NPZ, xy=np.random.default_rng(0).normal(size=(30, 2)),
             action=np.array(["walk", "run"] * 15), method=np.array("pca"),
             split=np.array("val"))  # only the npz: the report redraws the map  # fmt: skip
    _stage(root / "pose", "pose", [{"encoder": "pretrained", "mode": "probe",
                                    "all": {"mpjpe": 250.0}, "per_action": {"run": {}}}],
           command="posebert finetune pose --out x")  # no markdown: a table from the rows
    write_samples(root / "pose", "pose", **pose_arrays(2))
    _log(root / "pose" / "logs" / "pretrained-probe-10pct" / "metrics.jsonl")
    _log(root / "pose" / "logs" / "random-init-probe-10pct" / "metrics.jsonl")
    _stage(root / "future", "future", {"pose-gpt": {"all": {"80": 40.0}}},
           "| method | 80 ms |\n|---|---|\n| pose-gpt | 40.0 |\n",
           protocol={"horizons_ms": [80, 160, 1000], "units": "mm"})
    write_samples(root / "future", "future", **future_arrays(1))
    _png(root / "future" / "future.png", (30, 30, 200))
    _log(root / "pretrain" / "metrics.jsonl", accuracy=0.5, frames_per_s=80.0)
    (root / "demo.json").write_text(json.dumps({"settings": {}, "stages": {
        "pretrain": {"command": f"posebert pretrain {HOSTILE}", "seconds": 12.3}}}))
    (root / "shards" / "train").mkdir(parents=True)  # never walked
    (root / "shards" / "train" / "pose.json").write_text("not a stage")
    return root


def _images(page: str) -> list[bytes]:
    uris = re.findall(r'<img src="([^"]*)"', page)
    assert all(u.startswith("data:image/png;base64,") for u in uris), [u[:40] for u in uris]
    return [base64.b64decode(u.split(",", 1)[1]) for u in uris]


def test_collect_finds_every_stage_log_and_record(run_dir):
    run = collect(run_dir)
    assert [(s.kind, run.relative(s.folder)) for s in run.stages] == [
        ("retrieval", "retrieval"), ("pose", "pose"), ("future", "future")]
    assert run.kind == "demo" and run.missing() == ["results"]
    groups = log_groups(run)
    assert list(groups) == ["pose", "pretrain"]
    assert list(groups["pose"]) == ["pretrained-probe-10pct", "random-init-probe-10pct"]
    commands = run.commands()
    assert commands[0][0] == "pretrain" and commands[0][2] == 12.3
    assert ("pose (pose)", "posebert finetune pose --out x", None) in commands


def test_page_is_self_contained_escaped_and_complete(run_dir, tmp_path):
    path = write_report([run_dir], tmp_path / "out")
    page = path.read_text()
    assert path.name == "report.html"
    assert "<script" not in page and "http://" not in page.replace("http://example.com", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt;" in page  # data stays text
    assert not re.search(r'(src|href)="(?!data:|#)', page)  # nothing outside the page
    assert f'content="{html.esc(html.CSP)}"' in page  # the browser refuses anything else
    images = _images(page)
    for data in images:
        assert Image.open(io.BytesIO(data)).size[0] > 0
    # gallery, embedding map (redrawn), pose skeletons, future.png, forecast strips, 2 curves
    assert len(images) == 7
    for text in ("Retrieval", "Gallery: best, median and worst queries", "Embedding map",
                 "3D skeletons", "Forecast strips", "Training curves", "Commands",
                 "posebert finetune pose --out x", "Not found in this run: Demo summary"):
        assert text in page, text
    assert '<td class="num">300.0</td>' in page  # the stage's markdown table
    assert "<code>mm</code>" in page
    assert "all.mpjpe" in page and "per_action" not in page.split("3D pose head")[1][:2000]


def test_missing_samples_and_broken_files_become_notes(run_dir, tmp_path):
    (run_dir / "pose" / "pose-samples.npz").unlink()
    (run_dir / "future" / "future-samples.npz").write_bytes(b"garbage")
    (run_dir / "retrieval" / "retrieval.json").write_text("{not json")
    page = build_page([run_dir])
    assert "No pose-samples.npz beside pose.json" in page
    assert "future samples: could not be shown" in page
    assert "retrieval.json: unreadable" in page
    assert '<td class="num">300.0</td>' in page  # the markdown is still shown


def test_several_runs_get_one_section_each(run_dir, tmp_path):
    other = tmp_path / "eval"
    _stage(other, "retrieval", {"model": {}}, "| a |\n|---|\n| 1 |\n")
    page = build_page([run_dir, other])
    assert page.count("<h2 id=") == 2 and 'href="#run-2"' in page
    assert "Not found in this run: 3D pose head (pose.json)" in page


def test_nothing_to_report_is_one_line_naming_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty: nothing to report"):
        build_page([empty])
    assert main(["report", str(empty), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(empty) in err and "nothing to report" in err
    assert main(["report", str(tmp_path / "nope"), "--out", str(tmp_path / "out")]) == 2
    assert "no such directory" in capsys.readouterr().err
    assert not (tmp_path / "out" / "report.html").exists()


def test_cli_writes_the_page(run_dir, tmp_path, capsys):
    assert main(["report", str(run_dir), "--out", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.html").is_file()
    assert "report.html" in capsys.readouterr().out


def test_markdown_tables_lists_and_code_are_escaped():
    out = html.markdown("| a | b<i> |\n|---|---|\n| `x<y` | 1.5 |\n\nText & `code`\n\n"
                        "- item:\n  `cmd --x`\n- two\n")  # fmt: skip
    assert "<th>b&lt;i&gt;</th>" in out and "<td><code>x&lt;y</code></td>" in out
    assert '<td class="num">1.5</td>' in out
    assert "<p>Text &amp; <code>code</code></p>" in out
    assert "<li>item:<br><code>cmd --x</code></li><li>two</li>" in out
    assert html.inline("odd ` tick <b>") == "odd ` tick &lt;b&gt;"


def test_image_refuses_what_is_not_a_png():
    with pytest.raises(ValueError, match="not a PNG"):
        html.image(b"GIF89a...", "x")
