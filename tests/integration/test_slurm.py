"""The SLURM path against a real two-node cluster on loopback (tests/localcluster.py).

A 2-node srun and a gloo all_reduce whose rendezvous comes from SLURM_NODELIST; then the
project's own job scripts through ``posebert slurm``: the two-node CPU pretraining of
``debug_cpu``, the same run preempted (SIGUSR1 to the ranks), requeued and finished with
exactly the parameters of the uninterrupted run, and the pretrain -> evaluate -> finetune chain.
Every wait has a timeout; a failure shows the job's log.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slurm

ROOT = Path(__file__).resolve().parents[2]
JOB_TIMEOUT_S = 240
ALLREDUCE = """
import json, os, socket, sys
import torch
import torch.distributed as tdist
from pretrain.engine.dist import DistEnv, init_distributed, shutdown

env = DistEnv.from_environ()
init_distributed(env, backend="gloo", timeout_s=60)
t = torch.tensor([float(env.rank + 1)])
tdist.all_reduce(t)
row = {"rank": env.rank, "world": env.world_size, "launcher": env.launcher,
       "master": env.master_addr, "node": os.environ["SLURMD_NODENAME"],
       "host": socket.gethostname(), "sum": t.item()}
shutdown()
print(json.dumps(row), flush=True)
"""


def job_env(cluster) -> dict[str, str]:
    """The test's environment for submitting: this cluster, CPU DeepSpeed, unbuffered logs."""
    return {**cluster.env, "DS_ACCELERATOR": "cpu", "PYTHONUNBUFFERED": "1"}


def posebert(cluster, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "posebert", *args], env=job_env(cluster),
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout)  # fmt: skip


def logs(run: Path) -> str:
    """The tails of every job log under RUN (for assertion messages)."""
    parts = [
        f"--- {p}\n" + p.read_text(errors="replace")[-3000:] for p in sorted(run.rglob("*.out"))
    ]
    return "\n".join(parts) or f"(no job log under {run})"


def finished(cluster, job_id: str, run: Path, timeout_s: float = JOB_TIMEOUT_S) -> dict:
    try:
        info = cluster.wait_job(job_id, timeout_s=timeout_s)
    except TimeoutError as e:
        pytest.fail(f"{e}\n{logs(run)}")
    assert info["JobState"] == "COMPLETED", f"{info}\n{logs(run)}"
    return info


def losses(run: Path) -> dict[int, float]:
    """step -> loss from RUN/metrics.jsonl (the last record of a step wins)."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return {}
    lines = path.read_text().split("\n")[:-1]  # complete lines only: the run may be writing
    records = [json.loads(line) for line in lines if line.strip()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def submit_pretrain(cluster, run: Path, shards: Path, *extra: str) -> str:
    """`posebert slurm submit pretrain` on both nodes, one CPU rank each; the job id."""
    r = posebert(cluster, "slurm", "submit", "pretrain", "--nodes", "2", "--gpus-per-node", "0",
                 "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
                 "--recipe", "debug_cpu", "--shards", str(shards), "--out", str(run),
                 "--set", "train.progress=false", *extra)  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    m = re.search(r"pretrain: job (\d+)", r.stdout)
    assert m, r.stdout
    return m.group(1)


def export_tensors(cluster, run: Path, out: Path) -> dict:
    from safetensors.torch import load_file

    r = posebert(cluster, "export", "--run", str(run), "--out", str(out))
    assert r.returncode == 0, r.stderr
    (weights,) = out.glob("*.safetensors")
    return load_file(weights)


@pytest.fixture(scope="module")
def shards(tmp_path_factory, slurm_cluster) -> Path:
    """walk (train), run (val), dance_b (test): 2 cameras, 8 frames, 32 px (debug_cpu)."""
    root = tmp_path_factory.mktemp("slurm_shards")
    r = posebert(slurm_cluster, "shards", "synth", "--out", str(root), "--clips",
                 "walk,run,dance_b", "--views", "2", "--frames", "8", "--size", "32",
                 "--workers", "1")  # fmt: skip
    assert r.returncode == 0, r.stderr
    return root


@pytest.fixture(scope="module")
def reference(slurm_cluster, shards, tmp_path_factory) -> Path:
    """An uninterrupted two-node debug_cpu pretraining run submitted with the project's script."""
    run = tmp_path_factory.mktemp("slurm_reference") / "run"
    job = submit_pretrain(slurm_cluster, run, shards)
    info = finished(slurm_cluster, job, run)
    assert info["NumNodes"] == "2" and info["NodeList"] == "n[1-2]", info
    assert info["Restarts"] == "0", info
    return run


def test_two_node_srun_and_gloo_all_reduce(slurm_cluster, tmp_path):
    r = slurm_cluster.run("srun", "--nodes=2", "--ntasks-per-node=1", "--time=1", "bash", "-c",
                          'echo "$SLURM_PROCID $SLURMD_NODENAME $SLURM_JOB_NODELIST"')  # fmt: skip
    assert sorted(r.stdout.splitlines()) == ["0 n1 n[1-2]", "1 n2 n[1-2]"], r.stdout

    (tmp_path / "allreduce.py").write_text(ALLREDUCE)
    (tmp_path / "job.sbatch").write_text(
        "#!/bin/bash\n"
        "#SBATCH --nodes=2 --ntasks-per-node=1 --time=2\n"
        f"#SBATCH --output={tmp_path}/allreduce-%j.out\n"
        f"srun {sys.executable} {tmp_path / 'allreduce.py'}\n"
    )
    t0 = time.monotonic()
    env = job_env(slurm_cluster)
    job = subprocess.run(["sbatch", "--wait", str(tmp_path / "job.sbatch")], env=env, cwd=ROOT,
                         capture_output=True, text=True, timeout=JOB_TIMEOUT_S)  # fmt: skip
    out = "".join(f.read_text() for f in tmp_path.glob("allreduce-*.out"))
    assert job.returncode == 0, job.stderr + out
    rows = sorted((json.loads(x) for x in out.splitlines() if x.startswith("{")),
                  key=lambda row: row["rank"])  # fmt: skip
    assert [(row["rank"], row["node"], row["sum"]) for row in rows] == [
        (0, "n1", 3.0),
        (1, "n2", 3.0),
    ], out
    assert all(row["world"] == 2 and row["launcher"] == "slurm" for row in rows), out
    assert {row["master"] for row in rows} == {"n1"}, out  # rank 0's node, from the node list
    print(f"2-node gloo all_reduce job: {time.monotonic() - t0:.1f} s; hosts "
          f"{[row['host'] for row in rows]}")  # fmt: skip


def test_pretrain_two_nodes_with_the_project_script(reference):
    config = json.loads((reference / "config.json").read_text())
    assert config["world_size"] == 2, config
    steps = losses(reference)
    assert sorted(steps) == list(range(1, 21)), steps
    assert (reference / "checkpoints" / "latest").read_text().strip() == "step_20"
    log = logs(reference)
    assert "2 node(s) n[1-2], 2 rank(s), restart 0" in log, log


@pytest.mark.fault(
    "SLURM",
    "`scancel --signal=USR1` to a two-node `debug_cpu` pretraining job after step 3",
    injected="scancel --signal=USR1 on a local two-node cluster, the job's own requeue",
)
def test_preempted_run_requeues_and_ends_like_the_uninterrupted_one(
    slurm_cluster, shards, reference, tmp_path, observed
):
    run = tmp_path / "run"
    job = submit_pretrain(slurm_cluster, run, shards)
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while len(losses(run)) < 3:  # under way: a few steps done, most still to come
        assert time.monotonic() < deadline, f"no progress\n{logs(run)}"
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), logs(run)
        time.sleep(0.2)
    # To the step's tasks (the ranks), not the batch shell: what --signal=USR1@S does at the
    # time limit, without waiting for it.
    slurm_cluster.run("scancel", "--signal=USR1", job)
    info = finished(slurm_cluster, job, run)
    log = logs(run)
    assert info["Restarts"] == "1", f"{info}\n{log}"
    assert "restart 1" in log and "requeueing" in log, log
    preempted = [int(m) for m in re.findall(r"preempted \(SIGUSR1\) at step (\d+)", log)]
    assert len(preempted) == 1 and 3 <= preempted[0] < 20, log

    assert losses(run) == losses(reference)
    got = export_tensors(slurm_cluster, run, tmp_path / "enc")
    want = export_tensors(slurm_cluster, reference, tmp_path / "enc_ref")
    assert got.keys() == want.keys()
    assert all(got[k].equal(want[k]) for k in want), "parameters differ after the requeue"
    same = sum(got[k].equal(want[k]) for k in want)
    observed(f"preempted at step {preempted[0]}, Restarts={info['Restarts']}; losses equal to the "
             f"uninterrupted run: {losses(run) == losses(reference)}; {same} of {len(want)} "
             "exported tensors equal")  # fmt: skip


def test_pipeline_pretrain_evaluate_finetune(slurm_cluster, shards, tmp_path):
    """Six pretraining steps, then retrieval, then both heads shrunk by the pipeline's head
    overrides (which reach the fine-tuning job's commands)."""
    run = tmp_path / "pipe"
    r = posebert(slurm_cluster, "slurm", "pipeline", "--nodes", "2", "--gpus-per-node", "0",
                 "--tasks-per-node", "1", "--cpus-per-task", "1", "--time", "10",
                 "--eval-time", "10", "--recipe", "debug_cpu", "--shards", str(shards),
                 "--out", str(run), "--set", "train.progress=false",
                 "--set", "train.max_steps=6", "--set", "train.checkpoint_every=3",
                 "--pose-set", "label_fractions=[1.0]", "--pose-set", "probe.steps=50",
                 "--pose-set", "full.steps=3", "--future-set", "steps=20",
                 "--future-set", "optim.schedule.warmup_steps=2")  # fmt: skip
    assert r.returncode == 0, r.stdout + r.stderr
    jobs = dict(re.findall(r"^(\w+): job (\d+)", r.stdout, re.M))
    assert list(jobs) == ["pretrain", "evaluate", "finetune"], r.stdout
    waiting = slurm_cluster.job(jobs["finetune"])
    assert waiting["Dependency"].startswith(f"afterok:{jobs['evaluate']}"), waiting

    for kind in ("pretrain", "evaluate", "finetune"):
        finished(slurm_cluster, jobs[kind], run, timeout_s=JOB_TIMEOUT_S)
    assert sorted(losses(run / "pretrain")) == list(range(1, 7))
    rows = json.loads((run / "retrieval" / "retrieval.json").read_text())["rows"]
    assert "model" in rows and "oracle" in rows
    pose = json.loads((run / "pose" / "pose.json").read_text())
    assert pose["protocol"]["config"]["full"]["steps"] == 3
    assert {r["labels"] for r in pose["rows"]} == {1.0}
    future = json.loads((run / "future" / "future.json").read_text())
    assert future["config"]["steps"] == 20
    status = posebert(slurm_cluster, "slurm", "status", str(run))
    assert status.returncode == 0 and status.stdout.count("COMPLETED") == 3, status.stdout
