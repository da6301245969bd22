"""What a checkpoint holds besides DeepSpeed's tensors, and the randomness it must restore.

- RNG states of python, numpy and torch (CPU and CUDA) per rank, as plain lists and tensors so
  the safe loader (``weights_only=True``) reads them back;
- the code version (``git describe``, else the installed package version);
- the run's meta (world size + resolved config) and :func:`check_compatible`, which refuses a
  resume under another world size or config, naming the field;
- checks of every field of a saved resume state (:func:`check_loop_state`,
  :func:`check_rng_state`, :func:`check_reader_state`: types and ranges against this run)
  before any of it is applied, so a state tampered behind its manifest (a cursor beyond the
  data, a step that is not the checkpoint's) is refused instead of silently trusted;
- seeds: :func:`seed_everything` for a fresh run, :func:`step_generator` for a task's
  per-step randomness (seeded by (seed, step, rank), so nothing needs restoring).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
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
    saved: Mapping[str, Any],
    current: Mapping[str, Any],
    ignore: Iterable[str] = (),
    world_may_change: bool = False,
) -> None:
    """Raise :class:`ResumeMismatch` naming the first field whose value differs between the
    checkpoint's meta and this run's (``world_size`` unless ``world_may_change``, then every
    field of ``config``). Fields named in ``ignore`` (dotted, e.g. ``train.max_steps``) may
    change, wherever they sit in the config tree (``run.train.max_steps`` too), with everything
    below them."""
    if not world_may_change and saved.get("world_size") != current.get("world_size"):
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


def seed_everything(seed: int, rank: int, step: int | None = None) -> None:
    """Seed python, numpy and torch global RNGs from (seed, rank), and ``step`` when a run
    continues without saved RNG states (another world size: :mod:`pretrain.engine.elastic`)."""
    s = _mix(seed, rank) if step is None else _mix(seed, rank, step, 1)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def step_generator(
    seed: int, step: int, rank: int, device: torch.device | str = "cpu"
) -> torch.Generator:
    """A generator seeded by (seed, step, rank): the task's randomness for one step, the same
    after a resume."""
    return torch.Generator(device=device).manual_seed(_mix(seed, step, rank))


# ------------------------------------------------------------------ resume state validation
# Each check raises ValueError("field: problem"); the loop names the file and falls back.

_MT_KEYS = 624  # MT19937 words (python's state adds the position as a 625th)
_LOOP_FIELDS = ("step", "skipped_steps", "bad_in_row", "config_json", "code_version", "ranks")
_READER_FIELDS = ("version", "epoch", "cursors", "batches", "next_worker", "errors",
                  "epoch_errors", "fingerprint")  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _show(v: Any) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _need(ok: bool, field: str, value: Any, expected: str) -> None:
    if not ok:
        raise ValueError(f"{field}: {_show(value)}, expected {expected}")


def _fields(state: Any, names: tuple[str, ...], what: str) -> None:
    if not isinstance(state, Mapping):
        raise ValueError(f"{what}: {type(state).__name__}, expected a mapping")
    missing = [n for n in names if n not in state]
    if missing:
        raise ValueError(f"{what}.{missing[0]}: missing")


def check_loop_state(state: Any, step: int, config: Any, world_size: int) -> None:
    """The loop's own saved state against the checkpoint it came from: ``step`` equal to the
    checkpoint's step, counters within [0, step], the config copy equal to the manifest's,
    one entry per rank of ``world_size`` (the manifest's)."""
    _fields(state, _LOOP_FIELDS, "state")
    s = state
    _need(_is_int(s["step"]) and s["step"] == step, "step", s["step"], f"{step} (the checkpoint's)")
    skipped = s["skipped_steps"]
    _need(_is_int(skipped) and 0 <= skipped <= step, "skipped_steps", skipped, f"0..{step}")
    _need(_is_int(s["bad_in_row"]) and 0 <= s["bad_in_row"] <= skipped, "bad_in_row",
          s["bad_in_row"], f"0..{skipped} (skipped_steps)")  # fmt: skip
    _need(isinstance(s["code_version"], str), "code_version", s["code_version"], "a string")
    try:
        same = isinstance(s["config_json"], str) and json.loads(s["config_json"]) == config
    except ValueError:
        same = False
    _need(same, "config_json", s["config_json"], "the manifest's config")
    ranks = s["ranks"]
    _need(isinstance(ranks, list) and len(ranks) == world_size, "ranks", ranks,
          f"a list of {world_size} (one per rank)")  # fmt: skip
    for r, entry in enumerate(ranks):
        _fields(entry, ("rng", "reader"), f"ranks[{r}]")


def _parts(value: Any, n: int, field: str) -> list[Any]:
    _need(isinstance(value, (list, tuple)) and len(value) == n, field, value, f"{n} parts")
    return list(value)


def check_rng_state(state: Any) -> None:
    """A :func:`capture_rng` state that :func:`restore_rng` can apply: tried on scratch
    generators, so this process's RNGs are untouched until every part is known good."""
    _fields(state, ("python", "numpy", "torch"), "rng")
    version, values, gauss = _parts(state["python"], 3, "rng.python")
    _need(isinstance(values, list) and len(values) == _MT_KEYS + 1, "rng.python", values,
          f"{_MT_KEYS + 1} integers")  # fmt: skip
    _need(gauss is None or isinstance(gauss, float), "rng.python", gauss, "None or a float")
    try:
        random.Random().setstate((version, tuple(values), gauss))
    except (TypeError, ValueError, OverflowError) as e:
        raise ValueError(f"rng.python: {e}") from None
    kind, keys, pos, has_gauss, cached = _parts(state["numpy"], 5, "rng.numpy")
    _need(kind == "MT19937" and isinstance(keys, list) and len(keys) == _MT_KEYS
          and all(_is_int(k) and 0 <= k < 2**32 for k in keys), "rng.numpy", keys,
          f"MT19937 and {_MT_KEYS} unsigned 32-bit integers")  # fmt: skip
    _need(_is_int(pos) and 0 <= pos <= _MT_KEYS, "rng.numpy", pos, f"a position 0..{_MT_KEYS}")
    _need(has_gauss in (0, 1) and isinstance(cached, float), "rng.numpy", (has_gauss, cached),
          "a gauss flag 0/1 and a float")  # fmt: skip
    try:
        np.random.RandomState().set_state((kind, np.asarray(keys, np.uint32), pos, has_gauss,
                                           cached))  # fmt: skip
    except (TypeError, ValueError) as e:
        raise ValueError(f"rng.numpy: {e}") from None
    cpu = state["torch"]
    _need(isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.ndim == 1,
          "rng.torch", type(cpu).__name__, "a uint8 vector")  # fmt: skip
    try:
        torch.Generator().set_state(cpu)
    except RuntimeError as e:
        raise ValueError(f"rng.torch: {str(e).splitlines()[0]}") from None
    cuda = state.get("cuda", [])
    _need(isinstance(cuda, list) and all(isinstance(t, torch.Tensor) and t.dtype == torch.uint8
                                         for t in cuda), "rng.cuda", type(cuda).__name__,
          "a list of uint8 tensors")  # fmt: skip
    if cuda and torch.cuda.is_available():  # restore_rng applies them only then
        size, devices = torch.cuda.get_rng_state().numel(), torch.cuda.device_count()
        _need(len(cuda) <= devices and all(t.numel() == size for t in cuda), "rng.cuda",
              [t.numel() for t in cuda], f"at most {devices} states of {size} bytes")  # fmt: skip


def check_reader_state(state: Any, reader: Any, max_epoch: int) -> None:
    """A :class:`data_shards.read.ShardReader` state (other readers: left to the reader):
    types of every field, epoch in [0, ``max_epoch``] (each epoch takes at least one batch),
    counters >= 0, one cursor per loader worker, and (when the state is of this reader's
    stream: same fingerprint, else the reader's ``load_state_dict`` refuses it, naming the
    field) each worker's cursor and batch count within its share of the data."""
    from data_shards.read import ShardReader

    if not isinstance(reader, ShardReader):
        return
    _fields(state, _READER_FIELDS, "reader")
    epoch, cursors, batches = state["epoch"], state["cursors"], state["batches"]
    _need(_is_int(epoch) and 0 <= epoch <= max_epoch, "reader.epoch", epoch, f"0..{max_epoch}")
    for name, values in (("cursors", cursors), ("batches", batches)):
        _need(isinstance(values, list) and all(_is_int(v) and v >= 0 for v in values),
              f"reader.{name}", values, "a list of integers >= 0")  # fmt: skip
    workers = len(cursors)
    _need(len(batches) == workers, "reader.batches", batches, f"{workers} values (one a worker)")
    nxt = state["next_worker"]
    _need(_is_int(nxt) and 0 <= nxt < max(workers, 1), "reader.next_worker", nxt,
          f"0..{workers - 1}")  # fmt: skip
    for name in ("errors", "epoch_errors"):
        counts = state[name]
        _need(isinstance(counts, Mapping) and all(isinstance(k, str) and _is_int(v) and v >= 0
                                                  for k, v in counts.items()),
              f"reader.{name}", counts, "counts >= 0 by name")  # fmt: skip
    for k, v in state["epoch_errors"].items():
        total = state["errors"].get(k, 0)
        _need(v <= total, f"reader.epoch_errors.{k}", v, f"<= errors.{k} ({total})")
    _need(isinstance(state["fingerprint"], Mapping), "reader.fingerprint", state["fingerprint"],
          "a mapping")  # fmt: skip
    if state["fingerprint"] != reader.state_dict()["fingerprint"]:
        return  # another stream (or world size): load_state_dict / resplit check it
    history = state.get("history", [])
    try:  # the segment the cursors count in, after earlier world sizes within the epoch
        total = len(reader.remaining(epoch, history)) if history else reader.dataset.epoch_total
    except ValueError as e:
        raise ValueError(f"reader.{e}") from None
    plan = reader.dataset.plan_for(total)
    _need(workers == plan.workers, "reader.cursors", cursors, f"{plan.workers} (loader workers)")
    for w in range(workers):
        lo, hi = plan.worker_range(w)
        _need(cursors[w] <= hi - lo, f"reader.cursors[{w}]", cursors[w],
              f"0..{hi - lo} (the samples of worker {w} on this rank)")  # fmt: skip
        n = len(plan.batch_sizes(w))
        _need(batches[w] <= n, f"reader.batches[{w}]", batches[w], f"0..{n} (its batches)")
