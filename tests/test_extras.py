"""The core installs and runs without the extras (data_shards/extras.py): with pybullet and
mediapipe unimportable, as on Python 3.12/3.13 where they have no wheel, every module imports
without reaching for them, `posebert --help` works, and each command that needs an extra exits
2 (bad usage, as everywhere in the CLI) with one line naming the extra and the pip command,
before it writes anything (after its usage errors and `--set help`)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("data_shards", "pretrain", "finetune", "pipelines", "slurm", "posebert")
"""Every package of the distribution. None is excluded: the extras' own modules
(data_shards.render, .detect, .mocap, .appearance) import them inside functions."""
NOT_IMPORTED = ("posebert.__main__",)
"""Runs the CLI when imported."""

RENDER = ("the 'render' extra (pybullet, Python 3.10/3.11", "pip install 'posebert[render]'")
VIDEO = ("the 'video' extra (mediapipe 0.10.14, Python 3.10-3.12",
         "pip install 'posebert[video]' && pip install --no-deps mediapipe==0.10.14")  # fmt: skip
COMMANDS = {  # argv after `posebert` (OUT: an empty folder) -> what its line must hold
    "shards synth --out OUT": ("posebert shards synth needs", *RENDER),
    "shards render-video dance_b --out OUT/v.mp4": ("posebert shards render-video needs", *RENDER),
    "demo --out OUT": ("posebert demo needs", *RENDER),
    "ablation --out OUT --quick": ("posebert ablation needs", *RENDER),
    "shards detect OUT": ("posebert shards detect needs", *VIDEO),
    "shards video OUT/a.mp4 --out OUT --detect": ("posebert shards video needs", *VIDEO),
    "predict OUT/a.mp4 --out OUT": ("posebert predict needs", *VIDEO),
}  # fmt: skip

SCRIPT = """
import contextlib, importlib, importlib.abc, io, json, pickle, pkgutil, sys

BLOCKED = ("pybullet", "pybullet_data", "mediapipe")
tried = []

class Unimportable(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            tried.append(name)
            raise ModuleNotFoundError(f"No module named {name!r} (the test)", name=name)
        return None

sys.meta_path.insert(0, Unimportable())
packages, not_imported, commands, out, result_path = json.loads(sys.argv[1])
failed = {}
for package in packages:
    module = importlib.import_module(package)
    for info in pkgutil.walk_packages(module.__path__, package + "."):
        if info.name not in not_imported:
            try:
                importlib.import_module(info.name)
            except Exception as e:
                failed[info.name] = repr(e)
result = {"failed": failed, "tried_on_import": list(tried), "runs": {}}

from data_shards import detect, extras, mocap
from posebert.cli import main

def run(words):
    sys.argv = ["posebert", *words]
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main()
        except SystemExit as e:
            code = e.code
    return [code, stdout.getvalue(), stderr.getvalue()]

for command in ["--help", "shards synth --out OUT --set help", *commands]:
    result["runs"][command] = run(command.replace("OUT", out).split())
deep = {}
for name, call in (("render", lambda: mocap.load_clip("walk")), ("video", detect.Detector)):
    try:
        call()
    except extras.MissingExtra as e:
        deep[name] = [e.extra, pickle.loads(pickle.dumps(e)).extra, str(e)]
result["deep"] = deep
stdout = io.StringIO()
with contextlib.redirect_stdout(stdout):
    extras.main()
result["left_out"] = stdout.getvalue()
with open(result_path, "w") as f:
    json.dump(result, f)
"""


def test_core_without_extras(tmp_path):
    out, result_path = tmp_path / "out", tmp_path / "result.json"
    out.mkdir()
    setup = [PACKAGES, NOT_IMPORTED, list(COMMANDS), str(out), str(result_path)]
    p = subprocess.run([sys.executable, "-c", textwrap.dedent(SCRIPT), json.dumps(setup)],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-4000:]
    result = json.loads(result_path.read_text())

    assert result["failed"] == {}, result["failed"]
    assert result["tried_on_import"] == [], "imported with a module, not inside its function"

    code, stdout, stderr = result["runs"]["--help"]
    assert code == 0 and stdout.startswith("usage: posebert"), (code, stdout, stderr)
    code, stdout, stderr = result["runs"]["shards synth --out OUT --set help"]  # needs no extra
    assert code == 0 and "fields of shards synth" in stdout, (code, stdout, stderr)
    for command, wanted in COMMANDS.items():
        code, stdout, stderr = result["runs"][command]
        assert code == 2, (command, code, stdout, stderr)
        lines = stderr.splitlines()
        assert len(lines) == 1 and all(w in lines[0] for w in wanted), (command, stderr)
    assert list(out.iterdir()) == [], "a command wrote before it found its extra missing"

    render, video = result["deep"]["render"], result["deep"]["video"]
    assert render[:2] == ["render", "render"] and "No module named 'pybullet_data'" in render[2]
    assert video[:2] == ["video", "video"] and "No module named 'mediapipe'" in video[2]
    left_out = result["left_out"].splitlines()
    assert len(left_out) == 2, left_out
    assert "left out the 'render' extra" in left_out[0] and "shards synth" in left_out[0]
    assert "left out the 'video' extra" in left_out[1] and "predict" in left_out[1]
