"""Engine pieces without a training run: schedules, the DeepSpeed JSON, metrics files, and
checkpoint manifests, resolution, compatibility and safe loading."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import pytest
import torch

from pretrain.engine.deepspeed_config import (
    EngineConfig,
    OptimizerConfig,
    check_consistent,
    to_deepspeed_json,
)
from pretrain.engine.metrics import read_metrics, truncate_after
from pretrain.engine.schedules import LRSchedule, exponential_decay, warmup_cosine

AREA = "Pretraining"  # of docs/reliability.md (tests/faultlog.py)

# ----------------------------------------------------------------------------- schedules


def test_warmup_cosine_values():
    lr = [warmup_cosine(s, peak=1.0, warmup=4, total=14, floor=0.1) for s in range(20)]
    assert lr[:4] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert lr[4] == pytest.approx(1.0)
    assert lr[9] == pytest.approx(0.1 + 0.5 * 0.9)  # half way down the cosine
    assert lr[14:] == pytest.approx([0.1] * 6)
    assert all(a >= b for a, b in zip(lr[4:], lr[5:], strict=False))


def test_lr_schedule_uses_max_steps_and_validates():
    s = LRSchedule(warmup_steps=0, min_lr_ratio=0.0)
    assert s.lr(0, 2.0, 10) == pytest.approx(2.0) and s.lr(10, 2.0, 10) == 0.0
    assert s.lr(5, 2.0, 10) == pytest.approx(1.0)
    assert LRSchedule(decay_steps=20).lr(10, 1.0, 10) > 0.1  # decays over 20, not 10
    with pytest.raises(ValueError, match="min_lr_ratio"):
        LRSchedule(min_lr_ratio=2)
    with pytest.raises(ValueError, match="decay_steps"):
        LRSchedule(warmup_steps=5, decay_steps=2)
    with pytest.raises(ValueError, match="step"):
        warmup_cosine(-1, 1.0, 0, 1, 0.0)


def test_lr_schedule_decay_kinds():
    """Exponential: VideoPose3D's geometric decay to the floor; constant: the peak after the
    warm-up; both with the same warm-up as the cosine."""
    expo = LRSchedule(decay="exponential", min_lr_ratio=0.05)
    assert expo.lr(0, 2.0, 100) == pytest.approx(2.0)
    assert expo.lr(50, 2.0, 100) == pytest.approx(2.0 * 0.05**0.5)
    assert expo.lr(100, 2.0, 100) == pytest.approx(0.1)
    const = LRSchedule(decay="constant", warmup_steps=3)
    assert [const.lr(s, 1.0, 10) for s in (0, 2, 3, 9)] == pytest.approx([0.25, 0.75, 1, 1])
    assert LRSchedule(decay="exponential", warmup_steps=3).lr(1, 1.0, 10) == pytest.approx(0.5)


def test_exponential_decay():
    assert exponential_decay(0, 2.0, 0.5, 0.3) == 2.0
    assert exponential_decay(2, 2.0, 0.5, 0.3) == 0.5
    assert exponential_decay(10, 2.0, 0.5, 0.3) == 0.3


# ----------------------------------------------------------------------------- DeepSpeed JSON


@pytest.mark.parametrize("micro, accum, world", [(1, 1, 1), (8, 4, 2), (3, 2, 16)])
def test_deepspeed_json_is_consistent(micro, accum, world):
    cfg = EngineConfig(micro_batch_per_rank=micro, grad_accum=accum, zero_stage=2)
    ds = to_deepspeed_json(cfg, world)
    assert ds["train_batch_size"] == micro * accum * world == cfg.global_batch(world)
    assert ds["train_micro_batch_size_per_gpu"] == micro
    assert ds["gradient_accumulation_steps"] == accum
    check_consistent(ds, world)
    assert json.loads(json.dumps(ds)) == ds  # plain JSON
    assert "scheduler" not in ds  # our schedule sets the LR each step


def test_deepspeed_json_maps_every_setting():
    cfg = EngineConfig(
        zero_stage=3,
        precision="bf16",
        grad_clip=0.5,
        optimizer=OptimizerConfig(lr=1e-3, betas=(0.8, 0.9), eps=1e-7, weight_decay=0.1),
    )
    ds = to_deepspeed_json(cfg, 4)
    assert ds["zero_optimization"]["stage"] == 3 and ds["bf16"]["enabled"]
    assert not ds["fp16"]["enabled"] and ds["gradient_clipping"] == 0.5
    assert ds["optimizer"] == {
        "type": "AdamW",
        "params": {
            "lr": 1e-3,
            "betas": [0.8, 0.9],
            "eps": 1e-7,
            "weight_decay": 0.1,
            "torch_adam": True,
        },
    }
    plain_adam = OptimizerConfig(name="adam", impl="deepspeed")
    adam = to_deepspeed_json(EngineConfig(optimizer=plain_adam), 1)
    assert adam["optimizer"]["type"] == "Adam" and "torch_adam" not in adam["optimizer"]["params"]
    with pytest.raises(ValueError, match="train_batch_size"):
        check_consistent({**ds, "train_batch_size": 7}, 4)


@pytest.mark.parametrize(
    "kwargs, field",
    [
        (dict(zero_stage=4), "zero_stage"),
        (dict(precision="fp8"), "precision"),
        (dict(micro_batch_per_rank=0), "micro_batch_per_rank"),
        (dict(grad_accum=0), "grad_accum"),
        (dict(grad_clip=-1.0), "grad_clip"),
    ],
)
def test_engine_config_is_validated(kwargs, field):
    with pytest.raises(ValueError, match=field):
        EngineConfig(**kwargs)


def test_optimizer_config_is_validated():
    for kwargs, field in [
        (dict(lr=0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(eps=0), "eps"),
        (dict(weight_decay=-1), "weight_decay"),
        (dict(name="sgd"), "name"),
    ]:
        with pytest.raises(ValueError, match=field):
            OptimizerConfig(**kwargs)
    with pytest.raises(ValueError, match="world_size"):
        to_deepspeed_json(EngineConfig(), 0)


# ----------------------------------------------------------------------------- metrics, signals


def test_metrics_truncate_after_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)) + '{"step": 8')
    truncate_after(path, 4)
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4]


def test_metrics_logger_writes_json_without_nan(tmp_path):
    from pretrain.engine.metrics import MetricsLogger

    with MetricsLogger(tmp_path, True, 0, 10, tensorboard=False, progress=False) as m:
        m.log({"step": 1, "loss": float("nan"), "lr": 0.1})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": None, "lr": 0.1}]


# ----------------------------------------------------------------------------- checkpoints


def _fake_checkpoint(root: Path, step: int, payload: bytes = b"weights") -> Path:
    """A committed step directory made by the real commit code (no DeepSpeed needed)."""
    from pretrain.engine import checkpoint as ck

    tmp = root / f"step_{step}.tmp"
    (tmp / ck.DS_TAG).mkdir(parents=True)
    (tmp / ck.DS_TAG / "mp_rank_00_model_states.pt").write_bytes(payload * 100)
    (tmp / "zero_to_fp32.py").write_text("# script\n")
    files = ck._hash_unreported(tmp, {})
    manifest = dict(format=ck.FORMAT, step=step, tag=ck.DS_TAG, meta={"world_size": 1}, files=files)
    ck._commit(tmp, root / f"step_{step}", manifest)
    return root / f"step_{step}"


@pytest.fixture
def ckpts(tmp_path):
    from pretrain.engine.checkpoint import CheckpointManager

    m = CheckpointManager(tmp_path, keep=5)
    for step in (2, 4, 6):
        _fake_checkpoint(m.root, step)
    return m


@pytest.mark.fault(
    AREA,
    "a half-written step_N.tmp beside committed checkpoints (a save killed mid-commit)",
    injected="an empty step_8.tmp/deepspeed directory beside steps 2, 4, 6",
)
def test_resolve_picks_newest_and_ignores_tmp(ckpts, observed):
    (ckpts.root / "step_8.tmp" / "deepspeed").mkdir(parents=True)
    ref, problems = ckpts.resolve()
    assert ref.step == 6 and problems == [] and ckpts.read_pointer() == "step_6"
    removed = ckpts.clean_tmp()
    assert removed == [ckpts.root / "step_8.tmp"]
    assert not (ckpts.root / "step_8.tmp").exists()
    observed(f"resolved step_{ref.step}, problems {problems}; removed "
             f"{[p.name for p in removed]}")  # fmt: skip


@pytest.mark.parametrize(
    "damage, expected",
    [
        (lambda p: (p / "deepspeed/mp_rank_00_model_states.pt").write_bytes(b"w" * 10), "bytes"),
        (lambda p: (p / "deepspeed/mp_rank_00_model_states.pt").unlink(), "missing"),
        (lambda p: (p / "deepspeed/mp_rank_00_model_states.pt").write_bytes(b"x" * 700), "sha256"),
        (lambda p: (p / "deepspeed/extra.pt").write_bytes(b""), "not in the manifest"),
        (lambda p: (p / "manifest.json").write_text("{"), "unreadable"),
        (lambda p: (p / "manifest.json").unlink(), "no manifest.json"),
    ],
    ids=["truncated", "missing", "modified", "extra", "bad-manifest", "no-manifest"],
)
@pytest.mark.fault(
    AREA,
    "a checkpoint file truncated, modified, missing or extra; its manifest bad or missing",
    injected="each done to the newest of three committed checkpoints",
)
def test_damaged_newest_falls_back_to_previous(ckpts, damage, expected, observed):
    damage(ckpts.root / "step_6")
    ref, problems = ckpts.resolve()
    assert ref.step == 4
    assert len(problems) == 1 and "step_6" in problems[0] and expected in problems[0]
    ckpts.quarantine()
    assert (ckpts.root / "step_6.corrupt").is_dir() and not (ckpts.root / "step_6").exists()
    observed(f"resolved step_{ref.step}: {problems[0]}; moved to "
             f"{sorted(p.name for p in ckpts.root.glob('*.corrupt'))}")  # fmt: skip


@pytest.mark.fault(
    AREA,
    "the `latest` pointer empty, missing or dangling",
    injected="latest emptied, deleted, or naming step_9, which does not exist",
)
@pytest.mark.parametrize(
    "pointer, expected", [("", "is empty"), (None, "is missing"), ("step_9", "does not exist")]
)
def test_bad_pointer_is_reported_and_resolved(ckpts, pointer, expected, observed):
    p = ckpts.root / "latest"
    p.unlink()
    if pointer is not None:
        p.write_text(pointer)
    ref, problems = ckpts.resolve()
    assert ref.step == 6 and expected in problems[0]
    observed(f"resolved step_{ref.step}: {problems[0]}")


@pytest.mark.fault(
    AREA,
    "no valid checkpoint left, or a pointer to one that never existed",
    injected="the model file of every step deleted; a fresh folder whose latest names step_3",
)
def test_no_valid_checkpoint_is_an_error_not_a_fresh_start(ckpts, tmp_path, observed):
    from pretrain.engine.checkpoint import CheckpointError, CheckpointManager

    for step in (2, 4, 6):
        (ckpts.root / f"step_{step}" / "deepspeed/mp_rank_00_model_states.pt").unlink()
    with pytest.raises(CheckpointError, match="no valid checkpoint.*step_6.*missing") as none:
        ckpts.resolve()
    empty = CheckpointManager(tmp_path / "fresh")
    assert empty.resolve() == (None, [])
    (empty.root).mkdir(parents=True)
    (empty.root / "latest").write_text("step_3")
    with pytest.raises(CheckpointError, match="step_3") as dangling:
        empty.resolve()
    observed(f"{type(none.value).__name__}: {none.value}")
    observed(f"{type(dangling.value).__name__}: {dangling.value}")


def test_prune_keeps_the_newest(ckpts):
    ckpts.keep = 2
    ckpts.prune()
    assert [s for s, _ in ckpts.steps()] == [6, 4]


@pytest.mark.fault(
    AREA,
    "a changed config field or world size on resume",
    injected="check_compatible of a saved config against one with another world size, "
    "zero_stage or max_steps",
)
def test_check_compatible_names_the_field(observed):
    from pretrain.engine.checkpoint import ResumeMismatch
    from pretrain.engine.runstate import check_compatible

    saved = {"world_size": 2, "config": {"engine": {"zero_stage": 2}, "train": {"max_steps": 5}}}
    check_compatible(saved, json.loads(json.dumps(saved)))
    with pytest.raises(ResumeMismatch, match="world_size"):
        check_compatible(saved, {**saved, "world_size": 1})
    changed = {"world_size": 2, "config": {"engine": {"zero_stage": 3}, "train": {"max_steps": 9}}}
    with pytest.raises(
        ResumeMismatch, match="engine.zero_stage: checkpoint has 2, this run 3"
    ) as e:
        check_compatible(saved, changed, ignore=["train.max_steps"])
    observed(f"{type(e.value).__name__}: {e.value}")
    longer = {"world_size": 2, "config": {**saved["config"], "train": {"max_steps": 9}}}
    check_compatible(saved, longer, ignore=["train.max_steps"])
    nested = {"world_size": 2, "config": {"run": {"train": {"max_steps": 5, "seed": 1}}}}
    more = {"world_size": 2, "config": {"run": {"train": {"max_steps": 7, "seed": 1}}}}
    check_compatible(nested, more, ignore=["train.max_steps"])  # found anywhere in the tree
    with pytest.raises(ResumeMismatch, match="run.train.max_steps") as e:
        check_compatible(nested, more, ignore=["max_step"])  # whole names only
    observed(f"ignore=['max_step'] (not a whole name): {e.value}")


@pytest.mark.fault(
    AREA,
    "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 in the environment",
    injected="refuse_unsafe_torch_load given the variable as 1, true, YES (and 0)",
)
def test_unsafe_torch_load_env_is_refused(observed):
    from pretrain.engine.checkpoint import CheckpointError, refuse_unsafe_torch_load

    refuse_unsafe_torch_load({})
    refuse_unsafe_torch_load({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "0"})
    for value in ("1", "true", "YES"):
        with pytest.raises(CheckpointError, match="TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD") as err:
            refuse_unsafe_torch_load({"TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": value})
        observed(f"{value}: {type(err.value).__name__}: {err.value}")


class _Marker:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.fault(
    AREA,
    "a checkpoint file rewritten together with its manifest (pickle global io.open)",
    injected="the model file replaced by a torch.save'd object whose unpickling creates a "
    "marker file; sizes and hashes rewritten",
)
def test_tampered_checkpoint_with_rewritten_manifest_runs_no_code(tmp_path, observed):
    """An attacker who rewrites a file *and* its manifest still cannot run code: the manifest
    check lists the file's pickle globals without unpickling, and every file is loaded with
    weights_only=True; both refuse it in one line naming the file."""
    from pretrain.engine.checkpoint import CheckpointCorrupt, SafeCheckpointEngine, verify

    marker = tmp_path / "pwned"
    assert pickle.loads(pickle.dumps(_Marker(str(marker)))) and marker.exists()  # payload works
    marker.unlink()
    root = tmp_path / "checkpoints"
    step = _fake_checkpoint(root, 2)
    evil = step / "deepspeed" / "mp_rank_00_model_states.pt"
    torch.save({"module": {}, "x": _Marker(str(marker))}, evil)
    manifest = json.loads((step / "manifest.json").read_text())
    from pretrain.engine.checkpoint import sha256_file

    manifest["files"]["deepspeed/mp_rank_00_model_states.pt"] = {
        "size": evil.stat().st_size,
        "sha256": sha256_file(evil),
    }
    (step / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointCorrupt, match="safe loader refuses") as scan:
        verify(step)  # sizes and hashes match: the scan of the pickle refuses it
    with pytest.raises(CheckpointCorrupt, match="cannot be loaded safely") as err:
        SafeCheckpointEngine().load(str(evil))
    assert str(err.value).startswith(str(evil)) and "\n" not in str(err.value)
    assert not marker.exists()
    observed(f"verify: {scan.value}")
    observed(f"load: {err.value}; marker created: {marker.exists()}")


def test_rng_state_round_trip():
    import random

    import numpy as np

    from pretrain.engine.runstate import capture_rng, restore_rng

    state = capture_rng()
    a = (random.random(), np.random.rand(), torch.rand(2))
    restore_rng(state)
    b = (random.random(), np.random.rand(), torch.rand(2))
    assert a[0] == b[0] and a[1] == b[1] and torch.equal(a[2], b[2])
    assert not any(isinstance(v, np.ndarray) for v in state["numpy"])  # weights_only-safe


def test_step_generator_depends_on_seed_step_rank():
    from pretrain.engine.runstate import step_generator

    draw = [
        torch.rand(3, generator=step_generator(*a))
        for a in [(0, 1, 0), (0, 1, 0), (0, 2, 0), (0, 1, 1), (1, 1, 0)]
    ]
    assert torch.equal(draw[0], draw[1])
    assert all(not torch.equal(draw[0], d) for d in draw[2:])
    assert not math.isnan(float(draw[0].sum()))


class _ListReader:
    """A reader that draws from the global RNG while iterating and never advances its epoch."""

    def __init__(self, per_epoch: int):
        self.epoch, self.per_epoch, self.calls = 0, per_epoch, []

    def set_epoch(self, epoch: int) -> None:
        self.calls.append(epoch)
        self.epoch = epoch

    def __iter__(self):
        torch.rand(1)  # like DataLoader's base-seed draw
        for i in range(self.per_epoch):
            yield {"keys": [f"e{self.epoch}-{i}"], "x": torch.zeros(1, 3)}


def test_batch_stream_crosses_epochs_without_touching_the_rng():
    from pretrain.engine.stream import BatchStream, frames_in

    reader = _ListReader(2)
    stream = BatchStream(reader, torch.device("cpu"))
    state = torch.get_rng_state()
    keys = [stream.next()["keys"][0] for _ in range(5)]
    assert torch.equal(torch.get_rng_state(), state)
    assert keys == ["e0-0", "e0-1", "e1-0", "e1-1", "e2-0"] and stream.frames == 5
    assert frames_in({"frames": torch.zeros(2, 3, 4, 3, 8, 8)}) == 24
    with pytest.raises(RuntimeError, match="no batches"):
        BatchStream(_ListReader(0), torch.device("cpu")).next()


@pytest.mark.fault(
    AREA,
    "a world size that cannot keep the global batch; ZeRO-3 or bf16 without ZeRO on another "
    "world size",
    injected="engine_for a 2-rank checkpoint (global batch 16) on 3 or 8 ranks, with ZeRO-3, "
    "with bf16",
)
def test_another_world_size_keeps_the_global_batch_or_names_the_sizes_that_can(tmp_path, observed):
    from pretrain.engine import elastic
    from pretrain.engine.checkpoint import CheckpointCorrupt, CheckpointRef, ResumeMismatch
    from pretrain.engine.deepspeed_config import EngineConfig

    def ref(world, accum=2, micro=4):
        engine = {"micro_batch_per_rank": micro, "grad_accum": accum}
        return CheckpointRef(8, tmp_path, {"meta": {"world_size": world,
                                                    "config": {"engine": engine}}})  # fmt: skip

    cfg = EngineConfig(micro_batch_per_rank=4, grad_accum=2, zero_stage=2)
    assert elastic.engine_for(ref(2), cfg, 2) is cfg
    assert [elastic.engine_for(ref(2), cfg, w).grad_accum for w in (1, 4)] == [4, 1]
    assert elastic.may_change(ref(2), 4) == ("engine.grad_accum",)
    assert elastic.may_change(ref(2), 2) == elastic.may_change(None, 4) == ()
    with pytest.raises(
        ResumeMismatch, match=r"global batch of 16 .*world sizes that can: 1, 2, 4\)$"
    ) as three:
        elastic.engine_for(ref(2), cfg, 3)
    observed(f"3 ranks: {three.value}")
    with pytest.raises(ResumeMismatch, match="8 ranks cannot keep it"):
        elastic.engine_for(ref(2), cfg, 8)
    with pytest.raises(ResumeMismatch, match="ZeRO-3 optimizer partitions") as zero3:
        elastic.engine_for(ref(2), EngineConfig(zero_stage=3, micro_batch_per_rank=4), 4)
    with pytest.raises(ResumeMismatch, match="bf16 without ZeRO") as bf16:
        elastic.engine_for(ref(2), EngineConfig(precision="bf16", micro_batch_per_rank=4), 4)
    observed(f"ZeRO-3: {zero3.value}")
    observed(f"bf16: {bf16.value}")
    with pytest.raises(CheckpointCorrupt, match="world_size 'two' is not a count"):
        elastic.engine_for(ref("two"), cfg, 4)
    meta = {"world_size": 4, "config": {"engine": {"micro_batch_per_rank": 4, "grad_accum": 1}}}
    elastic.check_global_batch(ref(2), meta)
    with pytest.raises(ResumeMismatch, match="global batch: checkpoint .* has 16, this run 32"):
        elastic.check_global_batch(ref(2), {**meta, "world_size": 8})
