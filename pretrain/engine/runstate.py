"""What a checkpoint holds besides DeepSpeed's tensors, and the randomness it must restore.

- RNG states of python, numpy and torch (CPU and CUDA) per rank, as plain lists and tensors so
  the safe loader (``weights_only=True``) reads them back;
- the code version (``git describe``, else the installed package version);
- the run's meta (world size + resolved config) and :func:`check_compatible`, which refuses a
  resume under another world size or config, naming the field;
- seeds: :func:`seed_everything` for a fresh run, :func:`step_generator` for a task's
  per-step randomness (seeded by (seed, step, rank), so nothing needs restoring).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import random
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pretrain.engine.checkpoint import ResumeMismatch


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, Mapping):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: list(obj) if isinstance(obj, tuple) else obj}


def check_compatible(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignore: Iterable[str] = ()
) -> None:
    """Raise :class:`ResumeMismatch` naming the first field whose value differs between the
    checkpoint's meta and this run's (``world_size``, then every field of ``config``). Fields
    named in ``ignore`` (dotted, e.g. ``train.max_steps``) may change, wherever they sit in the
    config tree (``run.train.max_steps`` too), with everything below them."""
    if saved.get("world_size") != current.get("world_size"):
        raise ResumeMismatch(
            f"world_size: checkpoint written by {saved.get('world_size')} ranks, this run has "
            f"{current.get('world_size')} (convert it explicitly, e.g. DeepSpeed's "
            "ds_to_universal, and start a new run directory)"
        )
    old, new = _flatten(saved.get("config", {})), _flatten(current.get("config", {}))
    skip = tuple(ignore)
    for key in sorted(set(old) | set(new)):
        if any(f".{p}." in f".{key}." for p in skip):
            continue
        if old.get(key, "<absent>") != new.get(key, "<absent>"):
            raise ResumeMismatch(
                f"{key}: checkpoint has {old.get(key, '<absent>')!r}, this run "
                f"{new.get(key, '<absent>')!r} (use a new run directory to change it)"
            )


def code_version() -> str:
    """``git describe`` of the checkout this code runs from, else the installed version."""
    here = Path(__file__).resolve().parent
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        out = subprocess.run(
            ["git", "-C", str(here), "describe", "--always", "--dirty", "--tags"],
            capture_output=True,
            text=True,
            timeout=10,
        )
        if out.returncode == 0 and out.stdout.strip():
            return f"git {out.stdout.strip()}"
    with contextlib.suppress(importlib.metadata.PackageNotFoundError):
        return f"posebert {importlib.metadata.version('posebert')}"
    return "unknown"


def capture_rng() -> dict[str, Any]:
    """This process's RNG states as plain lists and tensors (loadable with weights_only)."""
    version, state, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out: dict[str, Any] = {
        "python": [version, list(state), gauss],
        "numpy": [kind, keys.tolist(), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Mapping[str, Any]) -> None:
    version, values, gauss = state["python"]
    random.setstate((version, tuple(values), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence(list(values)).generate_state(1, np.uint64)[0] >> 1)


def seed_everything(seed: int, rank: int) -> None:
    """Seed python, numpy and torch global RNGs from (seed, rank)."""
    s = _mix(seed, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def step_generator(
    seed: int, step: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by (seed, step, rank): the task's randomness for one step, the same
    after a resume."""
    return torch.Generator(device=device).manual_seed(_mix(seed, step, rank))
