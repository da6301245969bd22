"""Preflight (world size vs the SLURM allocation, samples vs ranks x workers x batch) and the
hang report (2 gloo processes, one of which stops answering: the other names it and exits)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from data_shards.manifest import Manifest, ShardInfo
from data_shards.read import ReaderConfig
from data_shards.stages import Plan
from pretrain.engine.dist import DistEnv, free_port
from pretrain.engine.launch import rank_env
from pretrain.engine.preflight import PreflightError, check_data, check_world

ROOT = Path(__file__).resolve().parents[2]
AREA = "SLURM"  # of docs/reliability.md (tests/faultlog.py)
WORLD = (
    "a stale RANK/WORLD_SIZE from the submitting shell; srun tasks != nodes x tasks per node; a "
    "multi-task job running `posebert pretrain` outside srun; more local ranks than GPUs"
)
DATA = "fewer training samples than ranks x loader workers x batch"
HUNG = "rank 1 of 2 stuck inside a step (gloo, a short process-group timeout)"


def _srun_env(procid: int, ntasks: int, nodes: int, per_node: int, **extra: str) -> dict:
    env = {
        "SLURM_JOB_ID": "42",
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": str(procid),
        "SLURM_LOCALID": str(procid % per_node),
        "SLURM_NODEID": str(procid // per_node),
        "SLURM_NTASKS": str(ntasks),
        "SLURM_STEP_NUM_TASKS": str(ntasks),
        "SLURM_JOB_NUM_NODES": str(nodes),
        "SLURM_NTASKS_PER_NODE": str(per_node),
        "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
        "SLURM_JOB_NODELIST": f"n[1-{nodes}]",
    }
    env.update(extra)
    return env


def test_outside_slurm_nothing_to_check():
    check_world(DistEnv(), {}, cuda_devices=0)


def test_srun_job_matching_its_allocation():
    env = _srun_env(3, 4, 2, 2)
    check_world(DistEnv.from_environ(env), env, cuda_devices=0)


@pytest.mark.fault(AREA, WORLD, injected="RANK=0 WORLD_SIZE=1 beside srun's 4 tasks")
def test_stale_rank_variables_in_the_job_script(observed):
    env = _srun_env(3, 4, 2, 2, RANK="0", WORLD_SIZE="1")
    with pytest.raises(
        PreflightError,
        match=r"world size 1 from RANK/WORLD_SIZE .* srun started "
        "4 task",
    ) as err:
        check_world(DistEnv.from_environ(env), env, cuda_devices=0)
    observed(f"{type(err.value).__name__}: {err.value}")


@pytest.mark.fault(AREA, WORLD, injected="srun starting 2 tasks in a job of 2 nodes x 2 tasks")
def test_srun_with_fewer_tasks_than_allocated(observed):
    env = _srun_env(1, 2, 2, 2, SLURM_STEP_TASKS_PER_NODE="1(x2)", SLURM_LOCALID="0")
    env["SLURM_NODEID"] = "1"
    with pytest.raises(
        PreflightError,
        match=r"srun started 2 task\(s\) but the job was "
        r"allocated 2 node\(s\) x 2 task\(s\) per node = 4",
    ) as err:
        check_world(DistEnv.from_environ(env), env, cuda_devices=0)
    observed(f"{type(err.value).__name__}: {err.value}")


@pytest.mark.fault(AREA, WORLD, injected="torchrun under srun with WORLD_SIZE 6 for 2 tasks x 4")
def test_torchrun_under_srun_counts_local_processes(observed):
    env = _srun_env(
        0,
        2,
        2,
        1,
        RANK="5",
        LOCAL_RANK="1",
        WORLD_SIZE="8",
        LOCAL_WORLD_SIZE="4",
        TORCHELASTIC_RUN_ID="x",
    )
    check_world(DistEnv.from_environ(env), env, cuda_devices=0)
    env["WORLD_SIZE"] = "6"
    with pytest.raises(PreflightError, match="2 task\\(s\\) x 4 local processes") as err:
        check_world(DistEnv.from_environ(env), env, cuda_devices=0)
    observed(f"{type(err.value).__name__}: {err.value}")


@pytest.mark.fault(AREA, WORLD, injected="the batch step of a 4-task job, no srun")
def test_multi_task_job_without_srun(observed):
    env = {"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "batch", "SLURM_PROCID": "0", "SLURM_NTASKS": "4"}
    with pytest.raises(PreflightError, match="start one rank per task with srun") as err:
        check_world(DistEnv(), env, cuda_devices=0)
    observed(f"{type(err.value).__name__}: {err.value}")


@pytest.mark.fault(AREA, WORLD, injected="4 ranks on a node with 2 GPUs; 2 ranks on 4 GPUs")
def test_gpus(observed):
    env = _srun_env(1, 4, 1, 4)
    with pytest.raises(PreflightError, match=r"4 ranks on this node but 2 GPU\(s\) visible") as e:
        check_world(DistEnv.from_environ(env), env, cuda_devices=2)
    observed(f"{type(e.value).__name__}: {e.value}")
    env = _srun_env(1, 2, 1, 2, SLURM_GPUS_ON_NODE="4")
    with pytest.raises(PreflightError, match=r"4 GPU\(s\) allocated on this node but 2 rank") as e:
        check_world(DistEnv.from_environ(env), env, cuda_devices=4)
    observed(f"{type(e.value).__name__}: {e.value}")


def _split(root: Path, counts: list[int]) -> Path:
    split = root / "train"
    split.mkdir(parents=True)
    shards = [ShardInfo(f"shard-{i:06d}.tar", n, 0, "0" * 64) for i, n in enumerate(counts)]
    Manifest(
        "train", shards, views=2, frames=8, image_size=(32, 32), fps=50.0, has={"pose3d": True}
    ).save(split)
    return split


@pytest.mark.fault(AREA, DATA, injected="check_data of 12 samples for 2 ranks x 2 workers x 4")
def test_too_few_samples_names_the_numbers_and_the_fix(tmp_path, observed):
    split = _split(tmp_path, [4, 4, 4])
    check_data(ReaderConfig(split, batch_size=4, num_workers=2), world_size=1)
    with pytest.raises(PreflightError) as e:
        check_data(ReaderConfig(split, batch_size=4, num_workers=2), world_size=2)
    msg = str(e.value)
    assert "12 samples in 3 shard(s)" in msg and "2 rank(s) x 2 loader worker(s) x batches of 4"
    assert "at least 16" in msg and "data.num_workers" in msg and "micro_batch_per_rank" in msg
    observed(f"{type(e.value).__name__}: {msg}")


@pytest.mark.fault(AREA, DATA, injected="13 samples for 4 layouts of ranks x workers x batch; "
                   "preflight compared with the reader's plan")  # fmt: skip
@pytest.mark.parametrize("world, workers, batch", [(2, 2, 4), (3, 1, 4), (2, 3, 2), (4, 0, 3)])
def test_data_check_agrees_with_the_reader_plan(tmp_path, world, workers, batch, observed):
    """One source of truth: preflight fails exactly when the reader's plan would."""
    split = _split(tmp_path, [5, 5, 3])
    plan = Plan(13, world, world - 1, batch, max(1, workers), True)
    try:
        plan.check()
        reader_ok = True
    except Exception:
        reader_ok = False
    try:
        check_data(ReaderConfig(split, batch_size=batch, num_workers=workers), world)
        ok = True
    except PreflightError:
        ok = False
    assert ok == reader_ok
    observed(f"{world} ranks x {workers} workers x {batch}: preflight passes {ok}, reader plan "
             f"passes {reader_ok}")  # fmt: skip


@pytest.mark.fault(AREA, DATA, injected="`posebert pretrain` debug_cpu on a manifest of 3 "
                   "samples and no tar file")  # fmt: skip
def test_posebert_pretrain_stops_before_starting(tmp_path, observed):
    split = _split(tmp_path, [3])  # no tar files: preflight reads only the manifest
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "posebert",
            "pretrain",
            "--recipe",
            "debug_cpu",
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"data.train={split}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "DS_ACCELERATOR": "cpu"},
    )
    assert p.returncode == 2, p.stderr
    assert "posebert pretrain: error: data: 3 samples in 1 shard(s)" in p.stderr
    assert not (tmp_path / "run").exists()
    line = next(line for line in p.stderr.splitlines() if "error: data" in line)
    observed(f"exit {p.returncode}: {line}; run folder created: {(tmp_path / 'run').exists()}")


# ----------------------------------------------------------------------------- hang report

HANG = textwrap.dedent("""
    import sys, time
    from pretrain.engine import dist, preflight
    where, timeout = sys.argv[1], float(sys.argv[2])
    env = dist.init_distributed(backend="gloo", timeout_s=timeout)
    try:
        for step in range(6):
            if env.rank == 1 and step == 3 and where == "before_beat":
                time.sleep(120)
            preflight.beat(step)
            if env.rank == 1 and step == 3 and where == "after_beat":
                time.sleep(120)
            dist.all_reduce_flag(False)
    except Exception as e:
        line = preflight.report_failure(e, timeout)
        print("REPORT", line, flush=True)
        dist.shutdown(barrier_first=False)
        sys.exit(1)
    dist.shutdown()
""")


@pytest.mark.fault(AREA, HUNG, injected="rank 1 sleeps 120 s before or after its step-3 beat; "
                   "4 s timeout")  # fmt: skip
@pytest.mark.parametrize("where", ["before_beat", "after_beat"])
def test_hung_rank_is_named_within_the_timeout(tmp_path, where, observed):
    script = tmp_path / "hang.py"
    script.write_text(HANG)
    port, timeout = free_port(), 4
    procs = []
    for rank in range(2):
        env = rank_env({**os.environ, "PYTHONPATH": str(ROOT)}, rank, 2, port)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(script), where, str(timeout)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
        )
    try:
        start = time.monotonic()
        out, err = procs[0].communicate(timeout=60)
        elapsed = time.monotonic() - start
        assert procs[1].poll() is None  # still asleep: nothing killed it
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode != 0, err
    report = next(line for line in out.splitlines() if line.startswith("REPORT"))
    assert f"rank 0: a collective timed out after {timeout} s at step 3" in report, err
    assert "rank(s) 1 did not answer" in report
    expected = "rank 1 at 2" if where == "before_beat" else "rank 1 at 3"
    assert expected in report
    assert elapsed < 40
    observed(f"rank 0 exit {procs[0].returncode} after {elapsed:.1f} s: "
             f"{report.removeprefix('REPORT ')}")  # fmt: skip


WRAPPER = textwrap.dedent("""
    import os, sys, time
    import pretrain.task

    forward = pretrain.task.PretrainTask.forward

    def hang_on_rank_1(self, batch, step):
        if step == 3 and os.environ["RANK"] == "1":
            time.sleep(300)
        return forward(self, batch, step)

    pretrain.task.PretrainTask.forward = hang_on_rank_1
    from posebert.cli import main

    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.fault(AREA, HUNG, injected="`posebert pretrain` on 2 gloo ranks, rank 1 asleep in "
                   "step 3's forward, dist_timeout_s 5")  # fmt: skip
@pytest.mark.slow  # DeepSpeed start-up on 2 ranks (and a JIT op build on a fresh machine)
def test_posebert_pretrain_names_the_hung_rank(tmp_path, observed):
    """The whole path: `posebert pretrain` debug_cpu on 2 gloo ranks, rank 1 stuck inside step
    3's forward; rank 0 logs the report line and exits 1 soon after the 5 s timeout."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    shards = tmp_path / "shards"
    made = subprocess.run(
        [
            sys.executable,
            "-m",
            "posebert",
            "shards",
            "synth",
            "--out",
            str(shards),
            "--clips",
            "walk,kick",
            "--views",
            "2",
            "--frames",
            "8",
            "--size",
            "32",
            "--workers",
            "1",
        ],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert made.returncode == 0, made.stderr
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    port, procs = free_port(), []
    for rank in range(2):
        ranked = rank_env(env, rank, 2, port)
        argv = [
            sys.executable,
            str(script),
            "pretrain",
            "--recipe",
            "debug_cpu",
            "--out",
            str(tmp_path / "run"),
            "--set",
            f"data.train={shards}/train",
            "--set",
            "train.dist_timeout_s=5",
            "--set",
            "train.progress=false",
        ]
        procs.append(
            subprocess.Popen(
                argv,
                env=ranked,
                cwd=ROOT,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
        )
    try:
        out, _ = procs[0].communicate(timeout=300)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 1, out
    assert "rank 0: a collective timed out after 5 s at step 3: rank(s) 1 did not answer" in out
    line = next(line for line in out.splitlines() if "timed out" in line)
    observed(f"rank 0 exit {procs[0].returncode}: {line}")
