"""Checkpoints with our own commit protocol around DeepSpeed.

DeepSpeed's ``save_checkpoint`` writes each rank's files in place and its ``latest`` file with
no temp file, fsync or barrier, and ``load_checkpoint`` unpickles with ``weights_only=False``.
So, under ``RUN/checkpoints/``:

1. every rank writes its DeepSpeed files into ``step_N.tmp/deepspeed/`` (``save_latest=False``)
   through :class:`SafeCheckpointEngine`, which fsyncs each file, hashes it and turns a full
   disk into an error naming the file instead of a partial file;
2. all ranks report success or their error (one all_gather); on any error the temp directory is
   removed and every rank raises :class:`CheckpointWriteError`;
3. rank 0 writes ``manifest.json`` (size + sha256 of every file, the run's meta: world size,
   resolved config, code version), fsyncs, renames ``step_N.tmp`` to ``step_N`` (the commit
   point), then replaces the pointer file ``latest`` with ``os.replace`` and prunes old steps.

Loading never trusts a file it has not verified: :meth:`CheckpointManager.resolve` picks the
newest ``step_N`` whose manifest matches every file (sizes and hashes, no unlisted file), falls
back to an older one with a warning when the newest is truncated or incomplete, ignores (and
cleans) ``*.tmp`` directories, and raises when checkpoints exist but none is valid (DeepSpeed
itself would silently restart from step 0). Verification also lists the pickle globals of every
``.pt`` file (a static scan, nothing unpickled) and refuses any the safe loader would refuse, so
a file rewritten behind a rewritten manifest falls back like a truncated one. Even a verified
file is then loaded with ``torch.load(weights_only=True)`` and an explicit allowlist of the few
DeepSpeed types its optimizer state holds, so a checkpoint cannot run code; a file that still
fails to load raises :class:`CheckpointCorrupt` naming it (the loop then moves that checkpoint
aside with :meth:`CheckpointManager.reject` and resumes from the next valid one).
``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is refused because it turns the safe loader off for every
other ``torch.load``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import logging
import os
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

from data_shards.manifest import atomic_write_text, fsync_path, sha256_file
from pretrain.engine import dist

log = logging.getLogger(__name__)

FORMAT = 1
MANIFEST = "manifest.json"
POINTER = "latest"
DS_TAG = "deepspeed"
_STEP_DIR = re.compile(r"^step_(\d+)$")
_TRUE = ("1", "y", "yes", "true")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written, found or trusted; the message names the path."""


class CheckpointCorrupt(CheckpointError):
    """A checkpoint directory does not match its manifest (truncated, missing or extra file)."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, quota, permissions); the previous one is intact."""


class ResumeMismatch(CheckpointError):
    """The checkpoint was made by a run with another world size or config."""


def refuse_unsafe_torch_load(environ: Mapping[str, str] | None = None) -> None:
    """Raise if ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` would turn torch's safe loader off."""
    environ = os.environ if environ is None else environ
    value = environ.get("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "")
    if value.strip().lower() in _TRUE:
        raise CheckpointError(
            f"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD={value} makes torch.load unpickle arbitrary code; "
            "unset it (checkpoints here load with weights_only=True)"
        )


def allowed_globals() -> list[Any]:
    """The non-tensor types DeepSpeed puts in its optimizer states (found by
    ``torch.serialization.get_unsafe_globals_in_checkpoint`` for ZeRO 0-3, fp32/bf16/fp16)."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


_allowed_globals = allowed_globals  # the name pretrain.export imported first


def _load_error(e: BaseException) -> str:
    """One line from a failed ``torch.load``: torch's UnpicklingError runs over many lines and
    advises ``weights_only=False``, which must never be followed for a checkpoint."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    why = next((ln for ln in lines if "Unsupported" in ln or "GLOBAL" in ln),
               lines[0] if lines else type(e).__name__)  # fmt: skip
    why = why.removeprefix("WeightsUnpickler error: ")
    return why.split(" was not an allowed global")[0].split(". Please use")[0][:300]


def load_file_safely(path: str | os.PathLike, map_location: Any = "cpu", **kwargs: Any) -> Any:
    """``torch.load`` of one checkpoint file with ``weights_only=True`` and the DeepSpeed
    allowlist (verify the directory first: :func:`verify`). A file that will not load (a
    global outside the allowlist, a broken zip or pickle) raises :class:`CheckpointCorrupt`
    naming it, in one line."""
    refuse_unsafe_torch_load()
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            return torch.load(path, map_location=map_location, weights_only=True, **kwargs)
    except FileNotFoundError:
        raise
    except Exception as e:  # pickle.UnpicklingError, RuntimeError (zip), EOFError, ...
        raise CheckpointCorrupt(f"{path}: cannot be loaded safely ({_load_error(e)})") from None


def scan_globals(path: Path) -> None:
    """Raise :class:`CheckpointCorrupt` when the torch zip file ``path`` names a pickle global
    the safe loader would refuse. A static scan of its ``data.pkl`` (nothing is unpickled),
    cheap next to the sha256 :func:`verify` computes; files in torch's legacy format are
    left to the loader."""
    if not zipfile.is_zipfile(path):
        return
    try:
        with torch.serialization.safe_globals(allowed_globals()):
            unsafe = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception as e:  # a broken zip or pickle: refused like a bad global
        raise CheckpointCorrupt(f"{path}: not a readable torch file ({_load_error(e)})") from None
    if unsafe:
        raise CheckpointCorrupt(f"{path}: holds {', '.join(sorted(unsafe)[:3])}, which the safe "
                                "loader refuses (rewritten behind the manifest?)")  # fmt: skip


def _write_error(path: str | Path, err: BaseException, written: int = 0) -> str:
    try:
        free = f"{shutil.disk_usage(Path(path).parent).free} bytes free"
    except OSError:
        free = "free space unknown"
    reason = getattr(err, "strerror", None) or str(err).splitlines()[0]
    return f"cannot write {path}: {reason} ({written} bytes written; {free} on that file system)"


class SafeCheckpointEngine(TorchCheckpointEngine):
    """DeepSpeed's torch checkpoint engine, made safe: each file is fsynced and hashed after
    writing; a write error is recorded (not raised, so no rank is left waiting in DeepSpeed's
    barrier) and reported by :meth:`CheckpointManager.save`; loads use ``weights_only=True``."""

    def __init__(self, config_params: Any = None):
        super().__init__(config_params)
        self.root: Path | None = None
        self.written: dict[str, dict[str, Any]] = {}
        self.failure: str | None = None

    def begin(self, root: Path) -> None:
        self.root, self.written, self.failure = root, {}, None

    def save(self, state_dict: Any, path: str) -> None:
        if self.failure is not None:
            return
        sink = None
        try:
            with open(path, "wb") as f:
                sink = _RecordingWriter(f)
                torch.save(
                    state_dict, sink, _use_new_zipfile_serialization=self.zipfile_serialization
                )
                f.flush()
                os.fsync(f.fileno())
        except (OSError, RuntimeError) as e:
            # torch's zip writer turns ENOSPC / EFBIG into "unexpected pos": report the OSError
            cause = sink.error if sink is not None and sink.error is not None else e
            written = max(sink.written if sink else 0, _size_or_zero(path))
            self.failure = _write_error(path, cause, written)
            with contextlib.suppress(OSError):
                os.unlink(path)
            return
        rel = os.path.relpath(path, self.root) if self.root else path
        self.written[rel] = {"size": os.path.getsize(path), "sha256": sha256_file(Path(path))}

    def makedirs(self, path: str, exist_ok: bool = False) -> None:
        try:
            os.makedirs(path, exist_ok=exist_ok)
        except OSError as e:
            self.failure = self.failure or _write_error(path, e)

    def guard(self, fn: Any) -> Any:
        """Wrap a DeepSpeed save helper so an OSError is recorded instead of raised."""

        def guarded(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except OSError as e:
                self.failure = self.failure or _write_error(e.filename or args[0], e)

        return guarded

    def load(self, path: str, map_location: Any = None) -> Any:
        return load_file_safely(path, map_location)


def _size_or_zero(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


class _RecordingWriter:
    """A file wrapper for torch.save that remembers the OSError of a failed write."""

    def __init__(self, f: Any):
        self.f, self.written, self.error = f, 0, None

    def write(self, data: Any) -> int:
        try:
            n = self.f.write(data)
        except OSError as e:
            self.error = e
            raise
        self.written += n
        return n

    def flush(self) -> None:
        self.f.flush()


def install_safe_engine(engine: Any) -> SafeCheckpointEngine:
    """Replace a DeepSpeed engine's checkpoint engine by :class:`SafeCheckpointEngine`."""
    safe = SafeCheckpointEngine(engine._config)
    engine.checkpoint_engine = safe
    # rank 0 copies DeepSpeed's zero_to_fp32.py into the checkpoint with plain copyfile; a full
    # disk there must not leave the other ranks waiting in DeepSpeed's final barrier
    engine._copy_recovery_script = safe.guard(engine._copy_recovery_script)
    return safe


@dataclasses.dataclass(frozen=True)
class CheckpointRef:
    """A committed checkpoint directory and its manifest (already verified)."""

    step: int
    path: Path
    manifest: dict[str, Any]

    @property
    def meta(self) -> dict[str, Any]:
        return self.manifest.get("meta", {})

    def client_file(self, rank: int) -> Path:
        """The DeepSpeed file holding rank ``rank``'s client state (ZeRO-3: one per rank)."""
        ds = self.path / DS_TAG
        for prefix in ("", f"zero_pp_rank_{rank}_"):
            name = f"{prefix}mp_rank_00_model_states.pt"
            if (ds / name).is_file():
                return ds / name
        return ds


def verify(path: Path) -> dict[str, Any]:
    """The manifest of checkpoint directory ``path`` after checking every file against it
    (size and sha256) and that no unlisted file is there; raises :class:`CheckpointCorrupt`."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        files = manifest["files"]
        if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
            raise ValueError("unknown format or no files listed")
    except FileNotFoundError:
        raise CheckpointCorrupt(f"{path}: no {MANIFEST} (not a committed checkpoint)") from None
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointCorrupt(f"{path}/{MANIFEST}: unreadable ({e})") from None
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    extra = sorted(present - set(files))
    if extra:
        raise CheckpointCorrupt(f"{path}: file {extra[0]} is not in the manifest")
    for rel, info in sorted(files.items()):
        f = path / rel
        if rel not in present:
            raise CheckpointCorrupt(f"{path}: {rel} is missing")
        size = f.stat().st_size
        if size != info["size"]:
            raise CheckpointCorrupt(f"{f}: {size} bytes, manifest says {info['size']}")
        if sha256_file(f) != info["sha256"]:
            raise CheckpointCorrupt(f"{f}: sha256 differs from the manifest")
        if rel.endswith(".pt"):
            scan_globals(f)
    return manifest


def _commit(tmp: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Rank 0: manifest into ``tmp``, fsync, rename to ``final``, replace the pointer."""
    root = final.parent
    atomic_write_text(tmp / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    for d in sorted({p.parent for p in tmp.rglob("*")} | {tmp}, reverse=True):
        fsync_path(d)
    os.rename(tmp, final)
    fsync_path(root)
    atomic_write_text(root / POINTER, final.name + "\n")
    fsync_path(root)


def _hash_unreported(tmp: Path, reported: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every file under ``tmp``: the ranks' reports (sizes checked) plus files no rank reported
    (DeepSpeed's copied recovery scripts), hashed here."""
    files = {}
    for p in sorted(q for q in tmp.rglob("*") if q.is_file()):
        rel = str(p.relative_to(tmp))
        info = reported.get(rel) or {"size": p.stat().st_size, "sha256": sha256_file(p)}
        if p.stat().st_size != info["size"]:
            raise CheckpointWriteError(f"{p}: {p.stat().st_size} bytes, its writer saw {info}")
        files[rel] = info
    missing = sorted(set(reported) - set(files))
    if missing:
        raise CheckpointWriteError(f"{tmp / missing[0]}: written by a rank but not visible here")
    return files


class CheckpointManager:
    """Saves, finds and loads checkpoints under ``run_dir/checkpoints``.

    ``save`` and ``load`` are collective (every rank calls them); ``resolve``, ``clean_tmp``
    and ``prune`` touch only the file system and run on rank 0.
    """

    def __init__(self, run_dir: str | os.PathLike, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep
        self.bad: list[Path] = []

    def steps(self) -> list[tuple[int, Path]]:
        """Committed-looking step directories, newest first (``*.tmp`` excluded)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir():
                found.append((int(m.group(1)), p))
        return sorted(found, reverse=True)

    def read_pointer(self) -> str | None:
        """The pointer file's content ('' when empty), None when it does not exist."""
        try:
            return (self.root / POINTER).read_text().strip()
        except FileNotFoundError:
            return None

    def resolve(self) -> tuple[CheckpointRef | None, list[str]]:
        """The newest verified checkpoint (None on a fresh run) and what was wrong on the way:
        an empty, missing or dangling pointer, or newer checkpoints that failed verification.
        Raises :class:`CheckpointError` when checkpoints exist but none verifies."""
        pointer, steps = self.read_pointer(), self.steps()
        problems, self.bad = [], []
        if pointer == "":
            problems.append(f"{self.root / POINTER} is empty")
        elif pointer is None and steps:
            problems.append(f"{self.root / POINTER} is missing")
        elif pointer and pointer not in {p.name for _, p in steps}:
            problems.append(f"{self.root / POINTER} names {pointer}, which does not exist")
        for step, path in steps:
            try:
                return CheckpointRef(step, path, verify(path)), problems
            except CheckpointCorrupt as e:
                problems.append(str(e))
                self.bad.append(path)
        # checkpoints moved aside as step_N.corrupt count too: never a silent fresh start
        corrupt = sorted(p.name for p in self.root.glob("step_*.corrupt"))
        if corrupt and not steps:
            problems.append(f"only invalid checkpoints moved aside are left ({corrupt[-1]})")
        if steps or pointer or corrupt:
            raise CheckpointError(
                f"no valid checkpoint under {self.root}: "
                + "; ".join(problems)
                + " (move the directory away to start afresh)"
            )
        return None, problems

    def clean_tmp(self) -> list[Path]:
        """Remove ``step_*.tmp`` directories left by a save that never committed."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.glob("step_*.tmp") if p.is_dir()]
        for p in stale:
            log.warning("removing uncommitted checkpoint %s", p)
            shutil.rmtree(p, ignore_errors=True)
        return stale

    def quarantine(self) -> None:
        """Rename the invalid checkpoints :meth:`resolve` skipped to ``step_N.corrupt`` (kept for
        inspection, never loaded), so the resumed run can write ``step_N`` again."""
        for path in self.bad:
            target = path.with_name(path.name + ".corrupt")
            shutil.rmtree(target, ignore_errors=True)
            os.rename(path, target)
            log.warning("checkpoint: moved invalid %s to %s", path, target.name)
        self.bad = []

    def reject(self, ref: CheckpointRef, reason: str) -> CheckpointRef:
        """Collective: ``ref`` verified but could not be loaded or holds an invalid resume
        state (``reason``, one line naming the file): rank 0 moves it aside to
        ``step_N.corrupt`` like a checkpoint that failed verification; every rank gets the
        newest valid one left. Raises :class:`CheckpointError` when none is left."""
        if dist.is_main():
            target = ref.path.with_name(ref.path.name + ".corrupt")
            log.warning("checkpoint: %s; moved %s to %s", reason, ref.path, target.name)
            shutil.rmtree(target, ignore_errors=True)
            os.rename(ref.path, target)
        try:
            found = self.find()
        except CheckpointError as e:
            raise CheckpointError(f"{reason}; {e}") from None
        if found is None:
            raise CheckpointError(f"{reason}; no valid checkpoint left under {self.root}")
        if dist.is_main():
            log.warning("checkpoint: resuming from %s instead", found.path)
        return found

    def prune(self) -> None:
        """Keep the ``keep`` newest committed steps."""
        for _, path in self.steps()[self.keep :]:
            shutil.rmtree(path, ignore_errors=True)

    def find(self) -> CheckpointRef | None:
        """Collective: rank 0 cleans temp dirs and resolves; every rank gets the same answer."""
        answer: Any = None
        if dist.is_main():
            try:
                self.clean_tmp()
                ref, problems = self.resolve()
                for p in problems:
                    log.warning("checkpoint: %s", p)
                if ref is not None:
                    self.quarantine()
                    if problems:
                        log.warning("checkpoint: resuming from %s", ref.path)
                answer = ref
            except CheckpointError as e:
                answer = e
        answer = dist.broadcast_object(answer)
        if isinstance(answer, CheckpointError):
            raise answer
        return answer

    def save(
        self,
        engine: Any,
        step: int,
        client_state: dict[str, Any],
        meta: dict[str, Any],
    ) -> CheckpointRef:
        """Collective: write, verify and commit ``step_{step}``; the previous checkpoint stays
        untouched if anything fails."""
        final, tmp = self.root / f"step_{step}", self.root / f"step_{step}.tmp"
        safe = engine.checkpoint_engine
        if not isinstance(safe, SafeCheckpointEngine):
            raise CheckpointError("call install_safe_engine(engine) before saving")
        if dist.is_main():
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        if final.exists():  # the loop never saves a step twice; never replace a checkpoint
            raise CheckpointError(f"{final} already exists")
        dist.barrier()
        safe.begin(tmp)
        error = None
        try:
            engine.save_checkpoint(
                str(tmp), tag=DS_TAG, client_state=client_state, save_latest=False
            )
        except OSError as e:
            error = _write_error(getattr(e, "filename", None) or tmp, e)
        reports = dist.all_gather_object((error or safe.failure, safe.written))
        failed = [(r, e) for r, (e, _) in enumerate(reports) if e]
        committed: Any = None
        if not failed and dist.is_main():
            try:
                written = {k: v for _, files in reports for k, v in files.items()}
                manifest = dict(
                    format=FORMAT,
                    step=step,
                    tag=DS_TAG,
                    created=datetime.datetime.now(datetime.timezone.utc).isoformat(),
                    meta=meta,
                    files=_hash_unreported(tmp, written),
                )
                _commit(tmp, final, manifest)
                self.prune()
                committed = manifest
            except (OSError, CheckpointError) as e:
                failed = [(0, str(e) if isinstance(e, CheckpointError) else _write_error(tmp, e))]
        if dist.is_main() and failed:
            shutil.rmtree(tmp, ignore_errors=True)
        failed = dist.broadcast_object(failed)
        if failed:
            rank, message = failed[0]
            raise CheckpointWriteError(f"checkpoint step {step} not saved (rank {rank}): {message}")
        return CheckpointRef(step, final, dist.broadcast_object(committed))

    def load(self, engine: Any, ref: CheckpointRef, optimizer: bool = True) -> dict[str, Any]:
        """Collective: load the verified ``ref`` into ``engine`` (with the optimizer state unless
        ``optimizer`` is False); returns the client state."""
        refuse_unsafe_torch_load()
        if not isinstance(engine.checkpoint_engine, SafeCheckpointEngine):
            raise CheckpointError("call install_safe_engine(engine) before loading")
        load_path, client_state = engine.load_checkpoint(
            str(ref.path),
            tag=DS_TAG,
            load_module_strict=True,
            load_optimizer_states=optimizer,
            load_lr_scheduler_states=False,
        )
        if load_path is None or client_state is None:
            raise CheckpointError(f"{ref.path}: DeepSpeed could not load tag {DS_TAG!r}")
        return client_state
