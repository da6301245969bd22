"""Imports go one way: data_shards <- pretrain <- finetune <- pipelines (data_shards never sees
a model); slurm renders and submits job scripts and imports none of the training code.
pipelines/slurm.py groups the chain's stages into Slurm jobs (it imports slurm); slurm/cli.py,
the face of `posebert slurm`, hands those commands to it and is the one module of slurm that
may import it."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FORBIDDEN = {
    "data_shards": {"pretrain", "finetune", "pipelines", "posebert", "slurm",
                    "torch.distributed", "deepspeed"},  # fmt: skip
    "pretrain": {"finetune", "pipelines", "posebert", "slurm"},
    "finetune": {"pipelines", "posebert", "slurm"},
    "pipelines": {"posebert"},
    "slurm": {"pretrain", "finetune", "pipelines", "posebert", "torch", "deepspeed"},
}
ALLOWED = {"slurm/cli.py": {"pipelines.chain", "pipelines.slurm"}}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_go_one_way(package):
    bad = []
    for path in sorted((ROOT / package).rglob("*.py")):
        allowed = ALLOWED.get(path.relative_to(ROOT).as_posix(), set())
        for name in _imports(path) - allowed:
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad


def test_posebert_slurm_loads_no_training_code():
    """Submitting runs on a login node: `posebert slurm` and the pipeline's Slurm glue import
    neither torch nor the training packages."""
    code = ("import sys, slurm.cli, pipelines.slurm; "
            "print(sorted(m for m in ('torch', 'deepspeed', 'pretrain', 'finetune') "
            "if m in sys.modules))")  # fmt: skip
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True,
                       timeout=60)  # fmt: skip
    assert p.returncode == 0 and p.stdout.strip() == "[]", p.stdout + p.stderr
