"""DeepSpeed CPU runs of a tiny task on real shards: loss falls, exact resume, faults.

Every run is a subprocess with a timeout (a hang fails the test). This file is also the entry
point those subprocesses run (``python test_engine_train.py --data ... --out ...``): a tiny
conv net regressing each frame's mean colour, with dropout (global RNG) and input noise from
:func:`pretrain.engine.runstate.step_generator`, and fault injection by the task itself (NaN
loss, SIGKILL, SIGUSR1 at a given step) or by wrapping the checkpoint module (kill before the
commit, file size limit during a save).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

HERE = Path(__file__).resolve()
ROOT = HERE.parents[2]
RUN_TIMEOUT_S = 400  # the first run on a machine JIT-builds DeepSpeed's shm op (~75 s)


# ----------------------------------------------------------------------------- the driver


class TinyTask(nn.Module):
    """Predict each frame's mean colour from the frame (learnable from the test shards)."""

    def __init__(self, seed: int, rank: int, faults: argparse.Namespace, out: Path):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.1)
        self.head = nn.Linear(8, 3)
        self.seed, self.rank, self.faults, self.out = seed, rank, faults, out
        self.calls: dict[int, int] = {}  # forward passes per step (micro-batches)

    def forward(self, batch: dict, step: int) -> tuple[torch.Tensor, dict[str, float]]:
        from pretrain.engine.runstate import step_generator

        f = self.faults
        done = step + 1  # steps completed once this one is
        micro = self.calls[step] = self.calls.get(step, -1) + 1
        with open(self.out / f"keys_rank{self.rank}.jsonl", "a") as fh:
            fh.write(json.dumps({"step": done, "keys": batch["keys"]}) + "\n")
        if done == f.die_at and self.rank == 0:
            os.kill(os.getpid(), signal.SIGKILL)
        if f.signal_at and done == f.signal_at[0] and self.rank == f.signal_at[1]:
            os.kill(os.getpid(), signal.SIGUSR1)
        x = batch["frames"].float() / 255.0  # (B, V, T, C, H, W)
        x = x.reshape(-1, *x.shape[-3:])  # (B*V*T, C, H, W)
        target = x.mean(dim=(2, 3))
        g = step_generator(self.seed, step, self.rank)
        x = x + 0.01 * torch.randn(x.shape, generator=g)
        x = x.to(self.conv.weight.dtype)  # bf16 / fp16 engines convert the parameters
        h = self.drop(torch.relu(self.conv(x))).mean(dim=(2, 3))
        pred = self.head(h).float()
        loss = (pred - target).pow(2).mean()
        nan_once = done in f.nan_at and self.rank in f.nan_ranks and micro in f.nan_micro
        if nan_once or (f.nan_from and done >= f.nan_from):
            loss = loss * float("nan")
        return loss, {"mse": float(loss.detach()), "pred_std": float(pred.detach().std())}


def _parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--zero", type=int, default=2)
    p.add_argument("--precision", default="fp32")
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--ckpt-every", type=int, default=2)
    p.add_argument("--nan-limit", type=int, default=3)
    p.add_argument("--lr", type=float, default=3e-2)
    p.add_argument("--tensorboard", action="store_true")
    p.add_argument("--nan-at", type=int, nargs="*", default=[])
    p.add_argument("--nan-ranks", type=int, nargs="*", default=[0, 1])
    p.add_argument("--nan-micro", type=int, nargs="*", default=[0, 1, 2, 3])
    p.add_argument("--nan-from", type=int, default=0)
    p.add_argument("--die-at", type=int, default=0)
    p.add_argument("--signal-at", type=int, nargs=2, default=None)
    p.add_argument("--kill-in-commit", type=int, default=0)
    p.add_argument("--disk-full-at", type=int, default=0)
    p.add_argument("--dump-optimizer", action="store_true")
    return p.parse_args(argv)


def _dump_optimizer_around_runs(out: Path) -> None:
    """Write the full fp32 weights and Adam moments (assembled from every rank's partition)
    when a call to the loop starts (after the resume) and when it ends."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from pretrain.engine import dist, loop

    def dump(engine, step: int, when: str) -> None:
        # ZeRO-1/2 link each parameter to its moments after a step; here before one too
        getattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state", lambda: None)()
        state = {}
        for name, p in engine.module.named_parameters():
            full = safe_get_full_fp32_param(p)  # collective under ZeRO
            opt = engine.optimizer.state.get(p, {}) if full is None else {}
            state[name] = p.detach().clone() if full is None else full.clone()
            for key in ("exp_avg", "exp_avg_sq"):
                value = opt.get(key) if full is None else safe_get_full_optimizer_state(p, key)
                state[f"{name}.{key}"] = value.clone()
        if dist.is_main():
            torch.save(state, out / f"optimizer_step{step}_{when}_world{dist.get_world_size()}.pt")

    run = loop._Loop.run

    def dumping_run(self, state, ref):
        if state.step:  # a fresh optimizer has no moments yet
            dump(self.engine, state.step, "start")
        result = run(self, state, ref)
        dump(self.engine, result.step, "end")
        return result

    loop._Loop.run = dumping_run


def _inject_checkpoint_faults(a: argparse.Namespace) -> None:
    import resource

    from pretrain.engine import checkpoint

    commit, save = checkpoint._commit, checkpoint.CheckpointManager.save

    def dying_commit(tmp, final, manifest):
        if manifest["step"] == a.kill_in_commit:
            os.kill(os.getpid(), signal.SIGKILL)  # DeepSpeed's files are written, no manifest
        return commit(tmp, final, manifest)

    def full_disk_save(self, engine, step, *args):
        if step != a.disk_full_at:
            return save(self, engine, step, *args)
        limits = resource.getrlimit(resource.RLIMIT_FSIZE)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (2048, limits[1]))
        try:
            return save(self, engine, step, *args)
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, limits)

    checkpoint._commit = dying_commit
    checkpoint.CheckpointManager.save = full_disk_save


def main(argv: list[str]) -> int:
    import logging

    from data_shards.read import ReaderConfig, ShardReader
    from pretrain.engine.deepspeed_config import EngineConfig, OptimizerConfig
    from pretrain.engine.dist import DistEnv
    from pretrain.engine.loop import TrainConfig, exit_code_for, train
    from pretrain.engine.schedules import LRSchedule

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    a = _parse(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    _inject_checkpoint_faults(a)
    if a.dump_optimizer:
        _dump_optimizer_around_runs(out)
    env = DistEnv.from_environ()
    torch.manual_seed(0)  # the same initial weights on every run (DeepSpeed broadcasts rank 0's)
    task = TinyTask(seed=0, rank=env.rank, faults=a, out=out)
    reader = ShardReader(
        ReaderConfig(a.data, batch_size=a.batch, seed=0, shuffle_buffer=8), env.rank, env.world_size
    )
    engine_cfg = EngineConfig(
        micro_batch_per_rank=a.batch,
        grad_accum=a.accum,
        zero_stage=a.zero,
        precision=a.precision,
        optimizer=OptimizerConfig(lr=a.lr, weight_decay=0.01),
        lr_schedule=LRSchedule(warmup_steps=2, min_lr_ratio=0.1),
    )
    train_cfg = TrainConfig(
        max_steps=a.steps,
        checkpoint_every=a.ckpt_every,
        keep_checkpoints=3,
        nan_limit=a.nan_limit,
        seed=0,
        progress=False,
        tensorboard=a.tensorboard,
        dist_timeout_s=120,
    )
    try:
        result = train(task, reader, train_cfg, engine_cfg, out, {"data": "test"})
    except Exception as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return exit_code_for(e)
    (out / f"result_rank{env.rank}.json").write_text(json.dumps(result.__dict__))
    state = {k: v.detach().clone() for k, v in task.state_dict().items()}
    torch.save(state, out / f"final_params_rank{env.rank}.pt")
    return result.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))


# ----------------------------------------------------------------------------- the tests

LAUNCH = (
    "import sys; from pretrain.engine.launch import launch_local; "
    "sys.exit(launch_local(int(sys.argv[1]), sys.argv[2:]))"
)
TIMING = {"frames_per_s", "time_s"}
AREA = "Pretraining"  # of docs/reliability.md (tests/faultlog.py)


def line_with(text: str, needle: str) -> str:
    """The first line of ``text`` holding ``needle`` (what a test observed), or ''."""
    return next((line for line in text.splitlines() if needle in line), "")


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """24 real samples (2 views x 2 frames of 16x16) in 4 shards: 3 steps per epoch on 2 ranks."""
    from conftest import make_sample

    from data_shards.write import WriterConfig, write_split

    root = tmp_path_factory.mktemp("engine-shards")
    samples = [
        make_sample(key=f"k{i:04d}", seed=i, views=2, frames=2, size=(16, 16)) for i in range(24)
    ]
    write_split(
        root,
        "train",
        samples,
        source={"test": True},
        generator={},
        config=WriterConfig(max_samples=6),
    )
    return root / "train"


def run(shards: Path, out: Path, *args: str, nproc: int = 1) -> subprocess.CompletedProcess:
    """One training run in a subprocess (through launch_local when nproc > 1); a hang fails."""
    cmd = [sys.executable, str(HERE), "--data", str(shards), "--out", str(out), *map(str, args)]
    if nproc > 1:
        cmd = [sys.executable, "-c", LAUNCH, str(nproc), *cmd]
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        stdout, stderr = p.communicate(timeout=RUN_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGQUIT)  # the launcher kills every rank's group
        time.sleep(1)
        p.kill()
        stdout, stderr = p.communicate()
        pytest.fail(f"run timed out after {RUN_TIMEOUT_S} s: {cmd}\n{stderr[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, stdout, stderr)


def metrics(out: Path) -> list[dict]:
    from pretrain.engine.metrics import read_metrics

    records = read_metrics(out / "metrics.jsonl")
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def keys_by_step(out: Path, rank: int) -> dict[int, list[list[str]]]:
    """Every batch the task saw, per step (a step run again after a resume appears twice)."""
    seen: dict[int, list[list[str]]] = {}
    for line in (out / f"keys_rank{rank}.jsonl").read_text().splitlines():
        r = json.loads(line)
        seen.setdefault(r["step"], []).append(r["keys"])
    return seen


def params(out: Path, rank: int = 0) -> dict[str, torch.Tensor]:
    return torch.load(out / f"final_params_rank{rank}.pt", weights_only=True)


def result(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"result_rank{rank}.json").read_text())


def assert_ok(p: subprocess.CompletedProcess, code: int = 0) -> None:
    assert p.returncode == code, f"exit {p.returncode}, expected {code}\n{p.stderr[-4000:]}"


@pytest.fixture(scope="module")
def reference(shards, tmp_path_factory):
    """An uninterrupted 2-rank ZeRO-2 run of 10 steps, checkpoints every 2."""
    out = tmp_path_factory.mktemp("reference")
    assert_ok(run(shards, out, "--steps", 10, "--tensorboard", nproc=2))
    return out


def test_two_ranks_zero2_trains_and_reads_each_sample_once_per_epoch(reference):
    losses = [r["loss"] for r in metrics(reference)]
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) / 3 < 0.5 * losses[0]
    first = metrics(reference)[0]
    assert first["epoch"] == 0 and first["skipped_steps"] == 0 and first["reader_bad_samples"] == 0
    # epoch 0 = steps 1-3: both ranks together saw every sample exactly once
    epoch0 = [k for r in (0, 1) for s in (1, 2, 3) for k in keys_by_step(reference, r)[s][0]]
    assert sorted(epoch0) == [f"k{i:04d}" for i in range(24)]
    ranks = [params(reference, r) for r in (0, 1)]
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    ckpt = reference / "checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["latest", "step_10", "step_6", "step_8"]
    assert (ckpt / "latest").read_text().strip() == "step_10"
    assert list((reference / "tensorboard").glob("events.out.tfevents.*"))
    assert result(reference)["status"] == "done"


@pytest.mark.fault(
    AREA,
    "SIGUSR1 at step 3 (2 ranks, ZeRO-2), restart, SIGKILL at a seeded random step, restart",
    injected="the task signals rank 1 at step 3, then SIGKILLs rank 0 at a step from "
    "POSEBERT_KILL_SEED",
)
def test_preempt_then_sigkill_then_resume_equals_uninterrupted(shards, reference, tmp_path,
                                                               observed):  # fmt: skip
    """SIGUSR1 to rank 1 at step 3 -> one checkpoint, exit 75; rerun, SIGKILL of rank 0 at a
    seeded random step -> exit 137 naming it; rerun -> bit-identical to the reference."""
    out = tmp_path / "run"
    p = run(shards, out, "--steps", 10, "--signal-at", 3, 1, nproc=2)
    assert_ok(p, 75)
    assert [r["status"] for r in map(lambda r: result(out, r), (0, 1))] == ["requeue"] * 2
    ckpt = out / "checkpoints"  # the periodic one at step 2, the preemption's at step 3
    assert sorted(x.name for x in ckpt.iterdir()) == ["latest", "step_2", "step_3"]
    assert (ckpt / "latest").read_text().strip() == "step_3" and "preempted" in p.stderr
    observed(f"SIGUSR1: exit {p.returncode}, checkpoints {sorted(x.name for x in ckpt.iterdir())}: "
             f"{line_with(p.stderr, 'preempted')}")  # fmt: skip

    die_at = random.Random(int(os.environ.get("POSEBERT_KILL_SEED", "3"))).randint(5, 9)
    p = run(shards, out, "--steps", 10, "--die-at", die_at, nproc=2)
    assert_ok(p, 128 + signal.SIGKILL)
    assert "rank 0 killed by SIGKILL" in p.stderr
    observed(f"SIGKILL at step {die_at}: exit {p.returncode}: {line_with(p.stderr, 'SIGKILL')}")
    last = (die_at - 1) // 2 * 2  # checkpoints every 2 steps, the kill hits step die_at

    p = run(shards, out, "--steps", 10, nproc=2)
    assert_ok(p)
    assert f"resumed from {out / 'checkpoints' / f'step_{last}'} (step {last})" in p.stderr
    assert result(out)["start_step"] == last
    ref, got = params(reference), params(out)
    assert all(torch.equal(ref[k], got[k]) for k in ref), "parameters differ"
    assert metrics(out) == metrics(reference)
    for rank in (0, 1):
        want, seen = keys_by_step(reference, rank), keys_by_step(out, rank)
        assert sorted(seen) == sorted(want) == list(range(1, 11))
        for step, batches in seen.items():  # steps run twice saw the same samples both times
            assert all(b == want[step][0] for b in batches), f"rank {rank} step {step}"
    same = sum(torch.equal(ref[k], got[k]) for k in ref)
    records = sum(a == b for a, b in zip(metrics(out), metrics(reference), strict=True))
    observed(f"resumed at step {result(out)['start_step']}: {same} of {len(ref)} tensors and "
             f"{records} of {len(metrics(reference))} step records equal to the uninterrupted "
             "run")  # fmt: skip


@pytest.mark.fault(
    AREA,
    "NaN loss at one step on one rank of two (ZeRO-2)",
    injected="the task multiplies rank 1's loss by NaN at step 3",
)
def test_nan_on_one_rank_is_skipped_by_all_zero2(shards, tmp_path, observed):
    p = run(shards, tmp_path, "--steps", 6, "--nan-at", 3, "--nan-ranks", 1, nproc=2)
    assert_ok(p)
    assert "step 3: non-finite loss on rank(s) [1]; step skipped" in p.stderr
    rec = metrics(tmp_path)
    assert [r["skipped"] for r in rec] == [False, False, True, False, False, False]
    assert rec[2]["loss"] is None and rec[-1]["skipped_steps"] == 1
    ranks = [params(tmp_path, r) for r in (0, 1)]
    assert all(torch.isfinite(v).all() for v in ranks[0].values())
    assert all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])  # no rank stepped alone
    finite = all(bool(torch.isfinite(v).all()) for v in ranks[0].values())
    observed(f"{line_with(p.stderr, 'non-finite')}; skipped_steps={rec[-1]['skipped_steps']}, "
             f"weights finite: {finite}")  # fmt: skip


@pytest.mark.fault(
    AREA,
    "NaN loss once, then at every step (ZeRO-0 fp32, where DeepSpeed writes NaN into weights)",
    injected="the task multiplies the loss by NaN at step 3 and from step 8 on, nan_limit 3",
)
def test_nan_once_then_every_step_zero0(shards, tmp_path, observed):
    """ZeRO-0 fp32 (where DeepSpeed itself would write NaN into the weights): one NaN step is
    skipped and counted; nan_limit in a row stop the run with exit 65, weights finite."""
    from pretrain.engine.checkpoint import CheckpointManager

    p = run(
        shards,
        tmp_path,
        "--zero",
        0,
        "--steps",
        12,
        "--nan-at",
        3,
        "--nan-from",
        8,
        "--ckpt-every",
        3,
    )
    assert_ok(p, 65)
    rec = metrics(tmp_path)
    assert [r["step"] for r in rec if r["skipped"]] == [3, 8, 9, 10]
    assert rec[-1]["step"] == 10 and rec[-1]["skipped_steps"] == 4
    assert "stopping: 3 steps in a row with a non-finite loss" in p.stderr
    assert result(tmp_path)["status"] == "nonfinite" and result(tmp_path)["step"] == 10
    assert all(torch.isfinite(v).all() for v in params(tmp_path).values())
    ref, _ = CheckpointManager(tmp_path).resolve()
    assert ref.step == 9  # the checkpoint at step 9 (inside the NaN run) holds finite weights
    observed(f"exit {p.returncode}, skipped steps {[r['step'] for r in rec if r['skipped']]}: "
             f"{line_with(p.stderr, 'stopping')}; last checkpoint step_{ref.step}")  # fmt: skip


@pytest.mark.fault(
    AREA,
    "SIGKILL during the checkpoint commit (a DeepSpeed run)",
    injected="the process SIGKILLs itself after DeepSpeed wrote step 4's files, before the "
    "manifest",
)
def test_sigkill_during_checkpoint_commit_keeps_previous(shards, tmp_path, observed):
    p = run(shards, tmp_path, "--zero", 0, "--steps", 6, "--kill-in-commit", 4)
    assert_ok(p, -signal.SIGKILL)
    ckpt = tmp_path / "checkpoints"
    assert (ckpt / "step_4.tmp" / "deepspeed").is_dir() and not (ckpt / "step_4").exists()
    assert (ckpt / "latest").read_text().strip() == "step_2"
    observed(f"killed: exit {p.returncode}, left {sorted(x.name for x in ckpt.iterdir())}")
    p = run(shards, tmp_path, "--zero", 0, "--steps", 6)
    assert_ok(p)
    observed(f"rerun: exit {p.returncode}: {line_with(p.stderr, 'resumed')}; left "
             f"{sorted(x.name for x in ckpt.iterdir())}")  # fmt: skip
    assert "(step 2)" in p.stderr and not (ckpt / "step_4.tmp").exists()
    assert [r["step"] for r in metrics(tmp_path)] == list(range(1, 7))
    assert (ckpt / "latest").read_text().strip() == "step_6"


@pytest.mark.fault(
    AREA,
    "disk full during a checkpoint save",
    injected="RLIMIT_FSIZE of 2048 bytes while step 4 is saved",
)
def test_disk_full_during_save_names_the_file(shards, tmp_path, observed):
    from pretrain.engine.checkpoint import CheckpointManager, verify

    p = run(shards, tmp_path, "--zero", 0, "--steps", 6, "--disk-full-at", 4)
    assert_ok(p, 74)
    assert "CheckpointWriteError: checkpoint step 4 not saved (rank 0): cannot write" in p.stderr
    assert "step_4.tmp/deepspeed/mp_rank_00_model_states.pt: File too large" in p.stderr
    ckpt = tmp_path / "checkpoints"
    assert sorted(x.name for x in ckpt.iterdir()) == ["latest", "step_2"]
    verify(ckpt / "step_2")
    assert CheckpointManager(tmp_path).resolve()[0].step == 2
    observed(f"exit {p.returncode}: {line_with(p.stderr, 'CheckpointWriteError')}; checkpoints "
             f"{sorted(x.name for x in ckpt.iterdir())}")  # fmt: skip


@pytest.mark.fault(
    AREA,
    "a 2-rank run resumed on 3 ranks (global batch 8), or with another learning rate",
    injected="the reference run's folder rerun with nproc 3, then with --lr 0.1",
)
def test_resume_refuses_a_world_size_without_the_global_batch_or_another_config(
    shards, reference, tmp_path, observed
):
    out = tmp_path / "copy"
    shutil.copytree(reference, out)
    p = run(shards, out, "--steps", 12, nproc=3)
    observed(f"3 ranks: exit {p.returncode}: {line_with(p.stderr, 'ResumeMismatch')}")
    assert_ok(p, 1)
    assert ("ResumeMismatch: world_size: checkpoint written by 2 ranks with a global batch of 8 "
            "(4 per rank x 1 accumulation x 2); 3 ranks cannot keep it (world sizes that can: "
            "1, 2)") in p.stderr  # fmt: skip
    p = run(shards, out, "--steps", 12, "--lr", 0.1, nproc=2)
    observed(f"another lr: exit {p.returncode}: {line_with(p.stderr, 'engine.optimizer.lr')}")
    assert_ok(p, 1)
    assert "engine.optimizer.lr: checkpoint has 0.03, this run 0.1" in p.stderr


@pytest.mark.fault(
    AREA,
    "a real run's DeepSpeed files damaged: optimizer file cut, model file deleted, latest emptied",
    injected="100 bytes cut from step_10's, step_8's model file deleted, latest emptied, then "
    "step_6's optimizer file emptied",
)
def test_real_checkpoint_damage_falls_back_or_fails_clearly(reference, tmp_path, observed):
    """The reference run's DeepSpeed files: truncate, delete, empty the pointer."""
    from pretrain.engine.checkpoint import CheckpointError, CheckpointManager

    out = tmp_path / "copy"
    shutil.copytree(reference / "checkpoints", out / "checkpoints")
    m = CheckpointManager(out)
    optim = "deepspeed/zero_pp_rank_1_mp_rank_00_optim_states.pt"
    f = out / "checkpoints" / "step_10" / optim
    f.write_bytes(f.read_bytes()[:-100])
    (out / "checkpoints" / "step_8" / "deepspeed/mp_rank_00_model_states.pt").unlink()
    (out / "checkpoints" / "latest").write_text("")
    ref, problems = m.resolve()
    assert ref.step == 6
    assert "is empty" in problems[0] and "step_10" in problems[1] and "step_8" in problems[2]
    observed(f"resolved step_{ref.step}; " + " / ".join(problems))
    (out / "checkpoints" / "step_6" / optim).write_bytes(b"")
    with pytest.raises(CheckpointError, match="no valid checkpoint") as err:
        m.resolve()
    observed(f"none valid: {type(err.value).__name__}: {err.value}")


@pytest.mark.fault(
    AREA,
    "NaN inside a gradient-accumulation window",
    injected="grad_accum 2; the second micro-batch of step 3 multiplied by NaN",
)
def test_nan_inside_accumulation_window_leaves_weights_unchanged(shards, tmp_path, observed):
    """grad_accum=2, the second micro-batch of step 3 is NaN after the first was already
    backpropagated: the step is skipped and the parameters of step 3 equal those of step 2."""
    from pretrain.engine.checkpoint import SafeCheckpointEngine

    p = run(shards, tmp_path, "--accum", 2, "--steps", 3, "--ckpt-every", 1, "--nan-at", 3,
            "--nan-micro", 1)  # fmt: skip
    assert_ok(p)
    assert [r["skipped"] for r in metrics(tmp_path)] == [False, False, True]
    load = SafeCheckpointEngine().load
    ckpt = tmp_path / "checkpoints"
    m1, m2, m3 = (
        load(str(ckpt / f"step_{s}" / "deepspeed" / "mp_rank_00_model_states.pt"))["module"]
        for s in (1, 2, 3)
    )
    assert not torch.equal(m1["conv.weight"], m2["conv.weight"])  # a normal step moves them
    assert all(torch.equal(m2[k], m3[k]) for k in m2)
    observed(f"skipped {[r['skipped'] for r in metrics(tmp_path)]}; step 3's tensors equal to "
             f"step 2's: {sum(torch.equal(m2[k], m3[k]) for k in m2)} of {len(m2)}")  # fmt: skip


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    """64 samples in shards of 8: 4 steps per epoch at a global batch of 16."""
    from conftest import make_sample

    from data_shards.write import WriterConfig, write_split

    root = tmp_path_factory.mktemp("elastic-shards")
    samples = [make_sample(key=f"k{i:04d}", seed=i, views=1, frames=2, size=(16, 16))
               for i in range(64)]  # fmt: skip
    write_split(root, "train", samples, source={"test": True}, generator={},
                config=WriterConfig(max_samples=8))  # fmt: skip
    return root / "train"


@pytest.mark.fault(
    AREA,
    "preempted on 2 ranks, requeued on 4, preempted, requeued on 1, then on 2 (ZeRO-2)",
    injected="SIGUSR1 from the task at steps 3, 5, 7; the same command with nproc 2, 4, 1, 2",
)
def test_resume_on_another_world_size_keeps_data_optimizer_and_loss(shards64, tmp_path, observed):
    """2 ranks x 2 accumulation -> 4 ranks -> 1 rank -> 2 ranks, the same command each time:
    the global batch of 16 is kept, every sample of an epoch is read once across the changes,
    Adam's moments and the fp32 weights carry over exactly, the loss follows an uninterrupted
    run."""
    common = ("--batch", 4, "--accum", 2, "--zero", 2, "--ckpt-every", 100, "--dump-optimizer")
    ref = tmp_path / "uninterrupted"
    assert_ok(run(shards64, ref, "--steps", 8, *common, nproc=2))
    out = tmp_path / "elastic"
    for stop, nproc in ((3, 2), (5, 4), (7, 1)):  # preempted (exit 75), requeued on other nodes
        assert_ok(
            run(shards64, out, "--steps", 8, "--signal-at", stop, 0, *common, nproc=nproc), 75
        )
    assert_ok(run(shards64, out, "--steps", 8, *common, nproc=2))
    assert json.loads((out / "config.json").read_text())["world_size"] == 2
    carried = []  # tensors equal across each change of world size, of how many
    for step, before, after in ((3, 2, 4), (5, 4, 1), (7, 1, 2)):
        saved = torch.load(out / f"optimizer_step{step}_end_world{before}.pt", weights_only=True)
        loaded = torch.load(out / f"optimizer_step{step}_start_world{after}.pt", weights_only=True)
        assert saved.keys() == loaded.keys() and any("exp_avg_sq" in k for k in saved)
        carried.append(f"{sum(torch.equal(saved[k], loaded[k]) for k in saved)}/{len(saved)}")
        for k in saved:
            assert torch.equal(saved[k], loaded[k]), f"{k} changed from {before} to {after} ranks"
    seen: dict[int, list[str]] = {}
    for rank in range(4):
        for step, batches in keys_by_step(out, rank).items():
            seen.setdefault(step, []).extend(k for b in batches for k in b)
    for epoch, steps in ((0, range(1, 5)), (1, range(5, 9))):
        keys = [k for s in steps for k in seen[s]]
        assert sorted(keys) == [f"k{i:04d}" for i in range(64)], f"epoch {epoch}"
    got, want = metrics(out), metrics(ref)
    assert [r["step"] for r in got] == list(range(1, 9))
    assert [r["epoch"] for r in got] == [r["epoch"] for r in want]
    for a, b in zip(got, want, strict=True):  # other batches, the same optimization
        assert abs(a["loss"] - b["loss"]) <= 0.25 * b["loss"], (a["step"], a["loss"], b["loss"])
    worst = max(abs(a["loss"] - b["loss"]) / b["loss"] for a, b in zip(got, want, strict=True))
    per_epoch = [len({k for s in steps for k in seen[s]}) for steps in (range(1, 5), range(5, 9))]
    observed(f"2 -> 4 -> 1 -> 2 ranks: fp32 weights and Adam moments equal across the changes "
             f"{carried}; distinct samples per epoch {per_epoch} of 64; losses within "
             f"{worst:.1%} of the uninterrupted run")  # fmt: skip
