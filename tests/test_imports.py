"""Imports go one way: data_shards <- pretrain <- finetune <- pipelines (data_shards never sees
a model); slurm renders and submits job scripts and imports none of the training code."""

import ast
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
        for name in _imports(path):
            if any(name == f or name.startswith(f + ".") for f in FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, bad
