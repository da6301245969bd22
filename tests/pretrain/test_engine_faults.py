"""Resume faults without DeepSpeed: checkpoint files rewritten behind a rewritten manifest,
tampered resume states, a full disk at resume start. The engine is a stand-in that reads its
file through the real safe checkpoint engine, as DeepSpeed's ``load_checkpoint`` does."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import pickle
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_sample
from diskfull import fill_disk

from data_shards.read import ReaderConfig, ShardReader
from data_shards.write import write_split
from pretrain.engine import checkpoint as ck
from pretrain.engine import loop
from pretrain.engine.deepspeed_config import EngineConfig
from pretrain.engine.runstate import capture_rng

MODEL_FILE = "deepspeed/mp_rank_00_model_states.pt"
CONFIG = {"run": {"recipe": "test"}}
META = {"world_size": 1, "config": CONFIG, "code_version": "test"}
ENGINE = EngineConfig(micro_batch_per_rank=2)
AREA = "Pretraining"  # of docs/reliability.md (tests/faultlog.py)
TAMPERED_STATE = "a resume state tampered behind its manifest (cursor, step, counters, RNGs)"


class _Engine:
    """What ``CheckpointManager.load`` needs of a DeepSpeed engine."""

    def __init__(self):
        self.checkpoint_engine = ck.SafeCheckpointEngine()

    def load_checkpoint(self, load_dir: str, tag: str, **kwargs) -> tuple[str, dict]:
        path = os.path.join(load_dir, tag, "mp_rank_00_model_states.pt")
        return path, self.checkpoint_engine.load(path, map_location="cpu")["client"]


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.fixture
def reader(tmp_path) -> ShardReader:
    """8 samples, batches of 2: 4 batches an epoch, one loader worker."""
    samples = [make_sample(key=f"k{i}", seed=i, views=1, frames=2, size=(8, 8)) for i in range(8)]
    write_split(tmp_path / "shards", "train", samples, {}, {})
    cfg = ReaderConfig(str(tmp_path / "shards" / "train"), batch_size=2, num_workers=0)
    return ShardReader(cfg, 0, 1)


def _client(step: int, reader: ShardReader) -> dict:
    ours = dict(step=step, skipped_steps=0, bad_in_row=0,
                config_json=json.dumps(CONFIG, sort_keys=True), code_version="test",
                ranks=[{"rng": capture_rng(), "reader": reader.state_dict()}])  # fmt: skip
    return {loop.CLIENT_KEY: ours}


def _save(root: Path, step: int, client: dict, legacy: bool = False) -> Path:
    """A committed checkpoint made by the real commit code, its model file a torch file."""
    tmp = root / f"step_{step}.tmp"
    (tmp / ck.DS_TAG).mkdir(parents=True)
    torch.save({"module": {"w": torch.ones(2)}, "client": client}, tmp / MODEL_FILE,
               _use_new_zipfile_serialization=not legacy)  # fmt: skip
    manifest = dict(format=ck.FORMAT, step=step, tag=ck.DS_TAG, meta=META,
                    files=ck._hash_unreported(tmp, {}))  # fmt: skip
    ck._commit(tmp, root / f"step_{step}", manifest)
    return root / f"step_{step}"


def _rewrite(step_dir: Path, payload: dict, legacy: bool = False) -> Path:
    """Replace the model file and make the manifest match it (an attacker or a faulty tool)."""
    f = step_dir / MODEL_FILE
    torch.save(payload, f, _use_new_zipfile_serialization=not legacy)
    manifest = json.loads((step_dir / ck.MANIFEST).read_text())
    manifest["files"][MODEL_FILE] = {"size": f.stat().st_size, "sha256": ck.sha256_file(f)}
    (step_dir / ck.MANIFEST).write_text(json.dumps(manifest))
    ck.verify(step_dir)  # the manifest matches the rewritten file
    return f


def _two_checkpoints(tmp_path: Path, reader: ShardReader) -> tuple[ck.CheckpointManager, dict]:
    m = ck.CheckpointManager(tmp_path / "run")
    older = _client(2, reader)
    _save(m.root, 2, older)
    _save(m.root, 4, _client(4, reader))
    return m, older


@pytest.mark.fault(
    AREA,
    "a checkpoint file in torch's legacy (non-zip) format rewritten with its manifest",
    injected="step_4's model file: a legacy torch.save of an object whose unpickling creates a "
    "marker file (global io.open)",
)
def test_file_that_fails_to_load_after_verifying_falls_back(tmp_path, reader, caplog, observed):
    """A file rewritten behind a rewritten manifest in torch's legacy format (not scanned
    statically): the load fails in one line naming the file, the checkpoint is moved aside as
    step_4.corrupt and the resume takes step 2; the payload never runs."""
    m, older = _two_checkpoints(tmp_path, reader)
    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(_Marker(str(marker)))) and marker.exists()  # it works
    marker.unlink()
    evil = _rewrite(m.root / "step_4", {"module": {}, "client": {}, "x": _Marker(str(marker))},
                    legacy=True)  # fmt: skip
    ref = m.find()
    assert ref.step == 4  # verified: only the load can tell
    with caplog.at_level(logging.WARNING, logger="pretrain.engine.checkpoint"):
        state, got = loop._resume(m, _Engine(), reader, ref, META, loop.TrainConfig(), ENGINE)
    assert got.step == 2 and state.step == 2 and not marker.exists()
    assert (m.root / "step_4.corrupt").is_dir() and not (m.root / "step_4").exists()
    warning = next(r.getMessage() for r in caplog.records if "moved" in r.getMessage())
    assert f"{evil}: cannot be loaded safely" in warning and "io.open" in warning
    assert "\n" not in warning and "weights_only" not in warning
    assert reader.state_dict() == older[loop.CLIENT_KEY]["ranks"][0]["reader"]
    assert ck.CheckpointManager(tmp_path / "run").resolve()[0].step == 2  # the next start too
    observed(f"resumed step {got.step}, marker created: {marker.exists()}: {warning}")


@pytest.mark.fault(
    AREA,
    "a checkpoint file rewritten together with its manifest (zip; pickle global io.open)",
    injected="step_4's model file: torch.save of an object whose unpickling creates a marker "
    "file; size and sha256 rewritten",
)
def test_zip_file_rewritten_behind_its_manifest_is_refused_by_verify(tmp_path, reader, observed):
    """The usual torch zip format: the static scan of its pickle refuses it before anything is
    unpickled, and resolve falls back to step 2 like for a truncated file."""
    m, _ = _two_checkpoints(tmp_path, reader)
    marker = tmp_path / "pwned"
    evil = m.root / "step_4" / MODEL_FILE
    torch.save({"x": _Marker(str(marker))}, evil)
    manifest = json.loads((m.root / "step_4" / ck.MANIFEST).read_text())
    manifest["files"][MODEL_FILE] = {"size": evil.stat().st_size, "sha256": ck.sha256_file(evil)}
    (m.root / "step_4" / ck.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ck.CheckpointCorrupt, match="safe loader refuses") as err:
        ck.verify(m.root / "step_4")
    assert str(err.value).startswith(f"{evil}: holds io.open")
    ref, problems = m.resolve()
    assert ref.step == 2 and str(evil) in problems[0]
    with pytest.raises(ck.CheckpointCorrupt) as err:  # and the loader itself, in one line
        ck.SafeCheckpointEngine().load(str(evil))
    assert str(evil) in str(err.value) and "\n" not in str(err.value)
    assert "weights_only" not in str(err.value) and not marker.exists()
    observed(f"resolved step_{ref.step}: {problems[0]}; marker created: {marker.exists()}")


@pytest.mark.fault(
    AREA,
    TAMPERED_STATE,
    injected="reader cursor 1,000,000 in step_4's state, the manifest rewritten",
)
def test_tampered_cursor_falls_back_to_the_previous_checkpoint(tmp_path, reader, caplog, observed):
    m, older = _two_checkpoints(tmp_path, reader)
    bad = _client(4, reader)
    bad[loop.CLIENT_KEY]["ranks"][0]["reader"]["cursors"] = [1_000_000]  # beyond the data
    f = _rewrite(m.root / "step_4", {"module": {}, "client": bad})
    with caplog.at_level(logging.WARNING, logger="pretrain.engine.checkpoint"):
        state, got = loop._resume(m, _Engine(), reader, m.find(), META, loop.TrainConfig(), ENGINE)
    assert got.step == state.step == 2 and (m.root / "step_4.corrupt").is_dir()
    assert any(f"{f}: resume state reader.cursors[0]: 1000000, expected 0..8" in r.getMessage()
               for r in caplog.records)  # fmt: skip
    assert reader.state_dict() == older[loop.CLIENT_KEY]["ranks"][0]["reader"]
    line = next(r.getMessage() for r in caplog.records if "resume state" in r.getMessage())
    observed(f"resumed step {got.step}: {line}")


@pytest.mark.fault(
    AREA,
    TAMPERED_STATE,
    injected="the only checkpoint's state claims step 40; then its latest pointer deleted",
)
def test_no_valid_checkpoint_left_is_an_error_then_and_later(tmp_path, reader, observed):
    m = ck.CheckpointManager(tmp_path / "run")
    bad = _client(4, reader)
    bad[loop.CLIENT_KEY]["step"] = 40
    _save(m.root, 4, bad)
    with pytest.raises(ck.CheckpointError, match="resume state step: 40, expected 4") as now:
        loop._resume(m, _Engine(), reader, m.find(), META, loop.TrainConfig(), ENGINE)
    (m.root / "latest").unlink()  # even without the pointer: no silent fresh start
    with pytest.raises(ck.CheckpointError, match="no valid checkpoint") as later:
        ck.CheckpointManager(tmp_path / "run").resolve()
    observed(f"{type(now.value).__name__}: {now.value}")
    observed(f"next start, no latest: {later.value}")


@pytest.mark.fault(
    AREA,
    "a checkpoint whose reader state is of another stream (seed)",
    injected="step_4 committed with a reader fingerprint of seed 99",
)
def test_a_state_of_another_stream_is_refused_not_moved_aside(tmp_path, reader, observed):
    """Another shard set or seed is a mismatch of this run, not damage: the reader refuses it
    naming the field and the checkpoint stays where it is."""
    from data_shards.stages import ReaderError

    m = ck.CheckpointManager(tmp_path / "run")
    client = _client(4, reader)
    client[loop.CLIENT_KEY]["ranks"][0]["reader"]["fingerprint"]["seed"] = 99
    _save(m.root, 4, client)
    with pytest.raises(ReaderError, match="seed=99") as err:
        loop._resume(m, _Engine(), reader, m.find(), META, loop.TrainConfig(), ENGINE)
    assert (m.root / "step_4").is_dir() and not list(m.root.glob("*.corrupt"))
    observed(f"{type(err.value).__name__}: {err.value}; moved aside: "
             f"{[p.name for p in m.root.glob('*.corrupt')]}")  # fmt: skip


def _set(path: str, value):
    def tamper(ours: dict) -> None:
        *parents, last = path.split("/")
        node = ours
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return tamper


def _drop(path: str):
    def tamper(ours: dict) -> None:
        *parents, last = path.split("/")
        node = ours
        for p in parents:
            node = node[int(p)] if isinstance(node, list) else node[p]
        del node[last]

    return tamper


TAMPERED = {
    "step": _set("step", 5),
    "step-bool": _set("step", True),
    "skipped_steps": _set("skipped_steps", -1),
    "bad_in_row": _set("bad_in_row", 3),
    "config_json": _set("config_json", '{"run": {"recipe": "other"}}'),
    "config_json-garbage": _set("config_json", "{"),
    "ranks": _set("ranks", []),
    "state.code_version": _drop("code_version"),
    "ranks[0].rng": _drop("ranks/0/rng"),
    "rng.python": _set("ranks/0/rng/python/1", [0] * 3),
    "rng.python-index": _set("ranks/0/rng/python/1/624", 10**6),
    "rng.numpy": _set("ranks/0/rng/numpy/2", 10**6),
    "rng.numpy-key": _set("ranks/0/rng/numpy/1/0", -1),
    "rng.torch": _set("ranks/0/rng/torch", torch.zeros(3, dtype=torch.uint8)),
    "rng.torch-type": _set("ranks/0/rng/torch", "abc"),
    "reader.epoch": _set("ranks/0/reader/epoch", 10**6),
    "reader.cursors[0]": _set("ranks/0/reader/cursors", [9]),
    "reader.cursors": _set("ranks/0/reader/cursors", ["a"]),
    "reader.cursors-bool": _set("ranks/0/reader/cursors", [True]),
    "reader.batches[0]": _set("ranks/0/reader/batches", [5]),
    "reader.batches": _set("ranks/0/reader/batches", [0, 0]),
    "reader.next_worker": _set("ranks/0/reader/next_worker", 1),
    "reader.errors": _set("ranks/0/reader/errors", {"bad_samples": -1}),
    "reader.epoch_errors.bad_samples": _set("ranks/0/reader/epoch_errors", {"bad_samples": 1}),
}


@pytest.mark.fault(
    AREA,
    TAMPERED_STATE,
    injected="one field of the resume state set out of range or of the wrong type (24 kinds)",
)
@pytest.mark.parametrize("name", TAMPERED)
def test_every_field_of_the_resume_state_is_checked_before_any_is_applied(tmp_path, reader,
                                                                          name,
                                                                          observed):  # fmt: skip
    ref_dir = tmp_path / "step_4"
    (ref_dir / "deepspeed").mkdir(parents=True)
    (ref_dir / MODEL_FILE).touch()
    ref = ck.CheckpointRef(4, ref_dir, {"meta": META})
    client = _client(4, reader)
    engine = EngineConfig(micro_batch_per_rank=reader.config.batch_size)
    loop._restore(copy.deepcopy(client), reader, ref, engine, 0)  # the untouched state is fine
    TAMPERED[name](client[loop.CLIENT_KEY])
    reader_before, rng_before = reader.state_dict(), (random.getstate(), np.random.get_state())
    with pytest.raises(ck.CheckpointCorrupt) as err:
        loop._restore(client, reader, ref, engine, 0)
    message = str(err.value)
    assert message.startswith(f"{ref_dir / MODEL_FILE}: resume state {name.split('-')[0]}")
    assert "\n" not in message
    assert reader.state_dict() == reader_before  # nothing applied
    assert random.getstate() == rng_before[0]
    assert all(np.array_equal(a, b) for a, b in zip(np.random.get_state(), rng_before[1],
                                                    strict=True))  # fmt: skip
    unchanged = reader.state_dict() == reader_before and random.getstate() == rng_before[0]
    observed(f"{type(err.value).__name__}: {message}; reader and RNGs unchanged: {unchanged}")


# ----------------------------------------------------------------------------- a full disk


@pytest.mark.fault(
    AREA,
    "ENOSPC at resume start (trimming metrics.jsonl, rewriting config.json)",
    injected="every file written in the run folder on a full disk (tests/diskfull.py)",
)
def test_full_disk_at_resume_start_exits_74_and_loses_nothing(tmp_path, monkeypatch, observed):
    """metrics.jsonl must drop the lines of a killed run, config.json must be rewritten: on a
    full disk both fail with one error naming the file and exit code 74 (EX_IOERR), leave the
    files as they were and no .part file."""
    from pretrain.engine.metrics import MetricsLogger, read_metrics, truncate_after

    metrics = tmp_path / "metrics.jsonl"
    lines = "".join(json.dumps({"step": s}) + "\n" for s in range(1, 8))
    metrics.write_text(lines)
    config = tmp_path / "config.json"
    config.write_text('{"old": 1}\n')
    fill_disk(monkeypatch, tmp_path)
    with pytest.raises(OSError) as err:
        MetricsLogger(tmp_path, True, 4, 10, tensorboard=False, progress=False)
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(metrics)
    observed(f"metrics.jsonl: exit {loop.exit_code_for(err.value)}: {err.value}")
    assert loop.exit_code_for(err.value) == loop.EXIT_CHECKPOINT == 74
    assert metrics.read_text() == lines and not (tmp_path / "metrics.jsonl.part").exists()
    with pytest.raises(OSError) as err:
        loop._write_config(config, '{"new": 1}\n')
    assert err.value.filename == str(config) and loop.exit_code_for(err.value) == 74
    observed(f"config.json: exit {loop.exit_code_for(err.value)}: {err.value}")
    assert config.read_text() == '{"old": 1}\n'
    truncate_after(metrics, 7)  # nothing to drop: nothing written, no error
    loop._write_config(config, '{"old": 1}\n')  # the same content: not rewritten
    assert [r["step"] for r in read_metrics(metrics)] == list(range(1, 8))
    assert loop.exit_code_for(OSError(errno.EACCES, "denied")) == 1


# ----------------------------------------------------------------------------- config bounds


@pytest.mark.parametrize("override, needle", [
    ("data.size=100000", "size: 100000 is more than the 1,024 allowed"),
    ("data.shuffle_buffer=10000000", "shuffle_buffer: 10000000 is more than"),
    ("data.frames=100000", "frames: 100000 is more than"),
    ("model.encoder.depth=100000", "EncoderConfig.depth: invalid value 100000 (1..128)"),
    ("model.encoder.width=65536", "EncoderConfig.width: invalid value 65536 (1..8192)"),
    ("model.encoder.ffn_mult=16", ""),  # within every bound: accepted
    ("model.proj_dim=100000", "PoseBERTConfig.proj_dim"),
    ("model.quantizer.entries=1000000", "QuantizerConfig.entries"),
    ("engine.micro_batch_per_rank=100000", "micro_batch_per_rank"),
    ("objective.negatives.num=100000000", "objective.negatives: num must be an int >= 1 and <= "
                                          "4096, got 100000000"),
    ("objective.negatives.num=4096", ""),
])  # fmt: skip
@pytest.mark.fault(
    AREA,
    "`--set data.size=100000` and other sizes that allocate (frames, encoder, quantizer, batch, "
    "negatives)",
    injected="`posebert pretrain --recipe debug_cpu --print-config --set FIELD=VALUE`",
)
def test_sizes_that_allocate_are_bounded_in_one_line(capsys, override, needle, observed):
    """`--set data.size=100000` used to end in `MemoryError:` with no message, mid-run."""
    from posebert.cli import main

    code = main(["pretrain", "--recipe", "debug_cpu", "--out", "x", "--print-config",
                 "--set", override])  # fmt: skip
    captured = capsys.readouterr()
    if not needle:
        assert code == 0 and json.loads(captured.out)
        observed(f"{override}: exit {code}, the config printed ({len(captured.out)} bytes)")
        return
    assert code == 2 and needle in captured.err and len(captured.err.strip().splitlines()) == 1
    observed(f"exit {code}: {captured.err.strip()}")
