"""`posebert slurm`: rendering, dry runs, the pipeline's dependency chain, status, and the job
scripts' own logic (requeue on 75, the restart cap, no requeue on scancel, array slicing), all
without a cluster: ``sbatch``, ``srun``, ``scontrol``, ``squeue`` and ``posebert`` are stubs on
PATH that record their arguments.

The same scripts on a real (two-node, loopback) cluster are the ``slurm``-marked tests in
tests/integration/test_slurm.py.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import textwrap
import time
from pathlib import Path

import pytest

from pipelines import chain
from pipelines import slurm as pslurm
from slurm import cli as slurm_cli
from slurm import jobs
from slurm import resources as rs
from slurm import submit as sm

CPU = dict(nodes=2, gpus_per_node=0, tasks_per_node=1, cpus_per_task=2, time="00:10:00")
AREA = "SLURM"  # of docs/reliability.md (tests/faultlog.py)
SBATCH = "`sbatch` missing from PATH or failing; the second job of a chain refused"


def _stub(bin_dir: Path, name: str, body: str) -> Path:
    path = bin_dir / name
    path.write_text("#!/bin/bash\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


@pytest.fixture
def tools(tmp_path, monkeypatch):
    """Stub sbatch (records argv, prints 'Submitted batch job N', N = 101, 102, ...), scontrol
    and squeue on PATH; returns the folder holding the logs."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    logs = tmp_path / "logs"
    logs.mkdir()
    _stub(
        bin_dir,
        "sbatch",
        f"""
        n=$(cat {logs}/next 2>/dev/null || echo 101)
        echo $((n + 1)) > {logs}/next
        printf '%s\\n' "$*" >> {logs}/sbatch.argv
        cp "${{@: -1}}" {logs}/job-$n.sbatch
        echo "Submitted batch job $n"
    """,
    )
    _stub(
        bin_dir,
        "scontrol",
        f"""
        printf '%s\\n' "$*" >> {logs}/scontrol.argv
        case "$*" in
          "show job -o 101") echo "JobId=101 JobName=posebert-pretrain JobState=RUNNING \\
Reason=None Restarts=1 ExitCode=0:0 NodeList=n[1-2]";;
          *) echo "slurm_load_jobs error: Invalid job id specified" >&2; exit 1;;
        esac
    """,
    )
    _stub(
        bin_dir,
        "squeue",
        """
        case "$*" in
          *" 102 "*) echo "102|PENDING|Dependency";;
        esac
    """,
    )
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return logs


def _parser() -> argparse.ArgumentParser:
    from posebert.cli import OneLineParser

    parser = OneLineParser(prog="posebert")
    slurm_cli.register(parser.add_subparsers(dest="stage", required=True))
    return parser


def posebert_slurm(*argv: str) -> int:
    args = _parser().parse_args(["slurm", *argv])
    return args.handler(args)


# ----------------------------------------------------------------------------- rendering


def test_render_pretrain_cpu_job(tmp_path):
    res = rs.Resources(**CPU, signal_s=60, partition="debug")
    job = jobs.pretrain_job(res, "debug_cpu", tmp_path / "run", tmp_path / "shards", ["train.x=1"])
    text = job.render()
    head = [line for line in text.splitlines() if line.startswith("#SBATCH")]
    for d in (
        "--nodes=2",
        "--ntasks-per-node=1",
        "--cpus-per-task=2",
        "--time=00:10:00",
        "--signal=USR1@60",
        "--requeue",
        "--open-mode=append",
        "--partition=debug",
        f"--output={tmp_path}/run/slurm/%x-%j.out",
        "--job-name=posebert",
    ):
        assert f"#SBATCH {d}" in head
    assert not any("gpus" in line for line in head)
    assert "#@" not in text
    assert f"STAGE=(pretrain --recipe debug_cpu --out {tmp_path}/run --set=train.x=1)" in text
    assert f"POSEBERT_COMMON={rs.COMMON}" in text
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0
    # directives come before the first command, or sbatch ignores them
    first_command = next(
        i for i, line in enumerate(text.splitlines()[1:], 1) if line and not line.startswith("#")
    )
    assert max(text.splitlines().index(h) for h in head) < first_command


def test_render_gpu_job_one_task_per_gpu(tmp_path):
    res = rs.Resources(nodes=4, gpus_per_node=8, tasks_per_node=8, time="2-00:00:00", signal_s=300)
    text = jobs.pretrain_job(res, "base", tmp_path / "r").render()
    assert "#SBATCH --gpus-per-node=8" in text and "#SBATCH --ntasks-per-node=8" in text
    with pytest.raises(ValueError, match="one rank per GPU"):
        rs.Resources(gpus_per_node=8, tasks_per_node=1, time="10")


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(nodes=0), "--nodes"),
        (dict(gpus_per_node=-1), "--gpus-per-node"),
        (dict(tasks_per_node=0), "--tasks-per-node"),
        (dict(time="tomorrow"), "--time"),
        (dict(time="00:05:00", signal_s=300), "shorter than the time limit"),
        (dict(partition="a b"), "whitespace"),
    ],
)
def test_bad_resources_are_one_line_errors(fields, match):
    with pytest.raises(ValueError, match=match) as e:
        rs.Resources(**{"time": "01:00:00", **fields})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 1800),
        ("30:15", 1815),
        ("2:00:00", 7200),
        ("1-12", 129600),
        ("1-0:30", 88200),
        ("0-00:00:10", 10),
    ],
)
def test_time_seconds(text, seconds):
    assert rs.time_seconds(text) == seconds


def test_site_settings_follow_the_environment():
    site = rs.site_settings({**os.environ, "POSEBERT_PARTITION": "gpu-long"})
    assert site["POSEBERT_PARTITION"] == "gpu-long"
    assert int(site["POSEBERT_GPUS_PER_NODE"]) >= 0 and int(site["POSEBERT_SIGNAL_S"]) > 0


def test_dry_run_prints_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere: a dry run never calls it
    monkeypatch.setattr(rs, "site_settings", lambda environ=None: _SITE)
    out = tmp_path / "run"
    code = posebert_slurm(
        "submit",
        "pretrain",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--recipe",
        "debug_cpu",
        "--out",
        str(out),
        "--time",
        "00:10:00",
        "--dry-run",
    )
    text = capsys.readouterr().out
    assert code == 0 and not out.exists()
    assert "#SBATCH --nodes=2" in text and "STAGE=(pretrain --recipe debug_cpu" in text
    assert f"# sbatch {out}/slurm/pretrain.sbatch" in text


_SITE = {
    "POSEBERT_PARTITION": "",
    "POSEBERT_ACCOUNT": "",
    "POSEBERT_QOS": "",
    "POSEBERT_GPUS_PER_NODE": "8",
    "POSEBERT_CPUS_PER_TASK": "4",
    "POSEBERT_TIME": "24:00:00",
    "POSEBERT_EVAL_TIME": "04:00:00",
    "POSEBERT_SHARDS_TIME": "01:00:00",
    "POSEBERT_SIGNAL_S": "120",
    "POSEBERT_ARRAY_PARALLEL": "0",
    "POSEBERT_SBATCH_EXTRA": "",
}


def test_cli_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(rs, "site_settings", lambda environ=None: _SITE)
    base = ["submit", "pretrain", "--recipe", "debug_cpu", "--out", str(tmp_path), "--dry-run"]
    with pytest.raises(ValueError, match="--tasks-per-node is for CPU jobs"):
        posebert_slurm(*base, "--gpus-per-node", "4", "--tasks-per-node", "2")
    with pytest.raises(ValueError, match="--nodes must be >= 1"):
        posebert_slurm(*base, "--nodes", "0")
    finetune = ["submit", "finetune", "--encoder", "e", "--shards", "s", "--out", str(tmp_path)]
    with pytest.raises(ValueError, match="fine-tuning runs one process"):
        posebert_slurm(*finetune, "--nodes", "2", "--dry-run")


def test_pipeline_dry_run_prints_every_job_and_writes_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no sbatch anywhere: a dry run never calls it
    monkeypatch.setattr(rs, "site_settings", lambda environ=None: _SITE)
    run = tmp_path / "run"
    code = posebert_slurm("pipeline", "--gpus-per-node", "0", "--recipe", "debug_cpu",
                          "--shards", str(tmp_path / "shards"), "--out", str(run),
                          "--pose-recipe", "quick", "--future-set", "steps=3",
                          "--dry-run")  # fmt: skip
    text = capsys.readouterr().out
    assert code == 0 and not run.exists()
    assert [line for line in text.splitlines() if line.startswith(("# ---- ", "# sbatch"))] == [
        f"# ---- {run}/slurm/pretrain.sbatch",
        f"# sbatch {run}/slurm/pretrain.sbatch",
        f"# ---- {run}/slurm/evaluate.sbatch",
        "# sbatch --dependency=afterok:<pretrain job id> --kill-on-invalid-dep=yes "
        f"{run}/slurm/evaluate.sbatch",
        f"# ---- {run}/slurm/finetune.sbatch",
        "# sbatch --dependency=afterok:<evaluate job id> --kill-on-invalid-dep=yes "
        f"{run}/slurm/finetune.sbatch",
    ]
    assert text.count("#!/bin/bash") == 3 and "#SBATCH --signal=USR1@120" in text
    assert "STAGES=(export retrieval)" in text and "STAGES=(pose future)" in text
    assert "--recipe quick" in text and "--set=steps=3" in text


# ----------------------------------------------------------------------------- submitting


@pytest.mark.fault(
    AREA,
    "the pretraining job of a submitted pipeline fails",
    injected="`posebert slurm pipeline` with a stub sbatch recording its arguments",
)  # fmt: skip
def test_pipeline_chains_afterok_and_records_ids(tools, tmp_path, capsys, monkeypatch, observed):
    monkeypatch.setattr(rs, "site_settings", lambda environ=None: _SITE)
    run = tmp_path / "run"
    code = posebert_slurm(
        "pipeline",
        "--nodes",
        "2",
        "--gpus-per-node",
        "0",
        "--recipe",
        "debug_cpu",
        "--shards",
        str(tmp_path / "shards"),
        "--out",
        str(run),
        "--time",
        "00:20:00",
    )
    assert code == 0
    argv = (tools / "sbatch.argv").read_text().splitlines()
    observed("dependent jobs submitted with: " + " / ".join(a.rsplit(" ", 1)[0] for a in argv[1:]))
    assert argv == [
        f"{run}/slurm/pretrain.sbatch",
        f"--dependency=afterok:101 --kill-on-invalid-dep=yes {run}/slurm/evaluate.sbatch",
        f"--dependency=afterok:102 --kill-on-invalid-dep=yes {run}/slurm/finetune.sbatch",
    ]
    out = capsys.readouterr().out
    assert "pretrain: job 101" in out and "evaluate: job 102 after afterok:101" in out
    assert "finetune: job 103 after afterok:102" in out
    jobs = json.loads((run / "slurm_jobs.json").read_text())["jobs"]
    assert [(j["kind"], j["job_id"]) for j in jobs] == [
        ("pretrain", "101"),
        ("evaluate", "102"),
        ("finetune", "103"),
    ]
    pretrain = (tools / "job-101.sbatch").read_text()
    assert f"--out {run}/pretrain " in pretrain and "#SBATCH --nodes=2" in pretrain
    evaluate = (tools / "job-102.sbatch").read_text()
    assert "#SBATCH --nodes=1" in evaluate
    assert f"STAGE_0=(export --run {run}/pretrain --out {run}/encoder)" in evaluate
    finetune = (tools / "job-103.sbatch").read_text()
    assert f"--encoder {run}/encoder" in finetune and "#SBATCH --ntasks-per-node=1" in finetune
    # a second submission appends
    posebert_slurm(
        "submit",
        "evaluate",
        "--gpus-per-node",
        "0",
        "--run",
        str(run / "pretrain"),
        "--shards",
        str(tmp_path / "shards"),
        "--out",
        str(run),
        "--after",
        "101",
    )
    assert len(json.loads((run / "slurm_jobs.json").read_text())["jobs"]) == 4


@pytest.mark.fault(AREA, SBATCH, injected="a stub sbatch exiting 1 with sbatch's error; then "
                   "an empty PATH")  # fmt: skip
def test_sbatch_missing_or_failing_is_one_line(tools, tmp_path, monkeypatch, observed):
    script = tmp_path / "x.sbatch"
    script.write_text("#!/bin/bash\n")
    _stub(
        tools.parent / "bin",
        "sbatch",
        """
        echo "sbatch: error: Batch job submission failed: Invalid partition name specified" >&2
        exit 1
    """,
    )
    with pytest.raises(
        ValueError,
        match=r"^sbatch x.sbatch failed: sbatch: error: Batch job "
        "submission failed: Invalid partition name specified$",
    ) as failing:
        sm.sbatch(script)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="sbatch not found on PATH") as missing:
        sm.sbatch(script)
    observed(str(failing.value))
    observed(str(missing.value))


@pytest.mark.fault(AREA, SBATCH, injected="a stub sbatch refusing any job with a dependency")
def test_chain_failure_names_jobs_already_submitted(tools, tmp_path, observed):
    _stub(
        tools.parent / "bin",
        "sbatch",
        """
        case "$*" in *dependency*) echo "sbatch: error: Job dependency problem" >&2; exit 1;; esac
        echo "Submitted batch job 7"
    """,
    )
    res = rs.Resources(**CPU, signal_s=60)
    spec = pslurm.PipelineSpec(
        chain.Chain(tmp_path / "shards", tmp_path / "run", recipe="debug_cpu"),
        res,
        rs.Resources(time="10"),
        rs.Resources(time="10"),
    )
    with pytest.raises(
        ValueError, match=r"dependency problem \(already submitted: pretrain 7;"
    ) as e:
        sm.submit_chain(pslurm.pipeline_jobs(spec), tmp_path / "run")
    observed(str(e.value))


def test_status_uses_scontrol_then_squeue(tools, tmp_path, capsys):
    for job_id, kind in (("101", "pretrain"), ("102", "evaluate"), ("103", "finetune")):
        sm.record(tmp_path, sm.Submitted(kind, job_id, "s", None, "l"))
    rows = sm.status_rows(tmp_path)
    assert [(r["kind"], r["job"], r["state"]) for r in rows] == [
        ("pretrain", "101", "RUNNING"),
        ("evaluate", "102", "PENDING"),
        ("finetune", "103", "UNKNOWN"),
    ]
    assert rows[0]["restarts"] == "1" and rows[0]["where"] == "n[1-2]"
    assert rows[1]["where"] == "Dependency"
    assert posebert_slurm("status", str(tmp_path)) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["kind", "job", "state", "exit", "restarts", "where"]
    with pytest.raises(ValueError, match="no such file"):
        sm.status_rows(tmp_path / "nothing")


def test_shards_array_over_inputs(tools, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(rs, "site_settings", lambda environ=None: _SITE)
    videos = tmp_path / "videos"
    videos.mkdir()
    for name in ("c.mp4", "a.mp4", "b.mp4"):
        (videos / name).write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    code = posebert_slurm(
        "submit",
        "shards",
        "--inputs",
        "videos/*.mp4",
        "--per-task",
        "2",
        "--out",
        "shards",
        "--",
        "--size",
        "32",
    )
    assert code == 0
    text = (tools / "job-101.sbatch").read_text()
    assert "#SBATCH --array=0-1" in text and "--output=" in text and "%x-%A_%a.out" in text
    assert f"INPUTS=({videos}/a.mp4 {videos}/b.mp4 {videos}/c.mp4)" in text
    assert "EXTRA=(--size 32)" in text and "gpus" not in text
    with pytest.raises(ValueError, match="matches no file"):
        posebert_slurm("submit", "shards", "--inputs", "none/*.mp4", "--out", "s", "--dry-run")


# ----------------------------------------------------------------------------- the scripts


@pytest.fixture
def script_env(tmp_path, monkeypatch):
    """Stub posebert (records argv, exits $POSEBERT_STUB_EXIT), srun (records its options and
    the posebert command's first word in tmp_path/srun, runs its command),
    scontrol (records argv) for running rendered scripts with bash."""
    bin_dir = tmp_path / "sbin"
    bin_dir.mkdir()
    log = tmp_path / "calls"
    stub = _stub(
        bin_dir,
        "posebert",
        f"""
        printf 'posebert %s\\n' "$*" >> {log}
        touch {tmp_path}/ready
        if [[ -n "${{POSEBERT_STUB_WAIT:-}}" ]]; then
            trap 'exit 75' TERM
            for _ in $(seq 200); do sleep 0.05; done
        fi
        exit "${{POSEBERT_STUB_EXIT:-0}}"
    """,
    )
    _stub(
        bin_dir,
        "srun",
        f"""
        launch=()
        while [[ "$1" == --* ]]; do launch+=("$1"); shift; done
        printf 'srun %s %s\\n' "${{launch[*]}}" "${{2-}}" >> {tmp_path}/srun
        exec "$@"
    """,
    )
    _stub(bin_dir, "scontrol", f"printf 'scontrol %s\\n' \"$*\" >> {log}\n")
    monkeypatch.setattr(jobs, "posebert_command", lambda: [str(stub)])
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        "SLURM_JOB_ID": "77",
        "POSEBERT_MAX_RESTARTS": "3",
    }
    env.pop("SLURM_ARRAY_JOB_ID", None)
    return env, log


def _run(job: jobs.Job, tmp_path: Path, env: dict, **popen) -> subprocess.CompletedProcess:
    script = tmp_path / f"{job.kind}.sh"
    script.write_text(job.render())
    return subprocess.run(
        ["bash", str(script)], env=env, capture_output=True, text=True, timeout=60, **popen
    )


def _pretrain(tmp_path: Path, shards: Path | None = None) -> jobs.Job:
    return jobs.pretrain_job(
        rs.Resources(**CPU, signal_s=60), "debug_cpu", tmp_path / "run", shards
    )


@pytest.mark.fault(
    AREA,
    "the pretraining batch script given exit 75, 3, 0, 138 or 143, with SLURM_RESTART_COUNT 0 or "
    "at POSEBERT_MAX_RESTARTS",
    injected="a stub posebert exiting with the code; stub srun and scontrol",
)  # fmt: skip
@pytest.mark.parametrize(
    "code, restarts, want_exit, requeued",
    [(75, "0", 0, True), (75, "3", 75, False), (3, "0", 3, False), (0, "0", 0, False),
     (138, "0", 0, True), (143, "0", 143, False)],  # fmt: skip
)
def test_pretrain_script_requeues_on_75(tmp_path, script_env, code, restarts, want_exit, requeued,
                                        observed):  # fmt: skip
    env, log = script_env
    env = {**env, "POSEBERT_STUB_EXIT": str(code), "SLURM_RESTART_COUNT": restarts}
    p = _run(_pretrain(tmp_path), tmp_path, env)
    assert p.returncode == want_exit, p.stderr
    calls = log.read_text().splitlines()
    assert calls[0] == f"posebert pretrain --recipe debug_cpu --out {tmp_path}/run"
    assert ("scontrol requeue 77" in calls) == requeued
    if code == 75 and not requeued:
        assert "POSEBERT_MAX_RESTARTS" in p.stderr
    if code == 138:  # SIGUSR1 before the rank's first line of Python: nothing to lose
        assert "ended by SIGUSR1 while starting" in p.stderr
    said = p.stderr.strip().splitlines()
    observed(f"posebert {code}, restarts {restarts}: exit {p.returncode}, requeued "
             f"{'scontrol requeue 77' in calls}" + (f": {said[-1]}" if said else ""))  # fmt: skip


def test_pretrain_script_finds_array_parts(tmp_path, script_env):
    env, log = script_env
    for part in ("part-0", "part-1"):
        (tmp_path / "shards" / part / "train").mkdir(parents=True)
        (tmp_path / "shards" / part / "train" / "manifest.json").write_text("{}")
    assert _run(_pretrain(tmp_path, tmp_path / "shards"), tmp_path, env).returncode == 0
    parts = ",".join(f"{tmp_path}/shards/part-{i}/train" for i in range(2))
    assert log.read_text().split()[-1] == f"--set=data.train={parts}"
    p = _run(_pretrain(tmp_path, tmp_path / "nothing"), tmp_path, env)
    assert p.returncode == 2 and "no training split" in p.stderr


@pytest.mark.fault(
    AREA,
    "`scancel` (SIGTERM to the batch shell and the ranks)",
    injected="os.killpg(SIGTERM) of the batch script while the stub rank waits",
)  # fmt: skip
def test_scancel_does_not_requeue(tmp_path, script_env, observed):
    """SIGTERM to the batch shell and the ranks (scancel): the ranks checkpoint and exit 75, the
    shell's trap notes it, and the job is not requeued."""
    env, log = script_env
    script = tmp_path / "pretrain.sh"
    script.write_text(_pretrain(tmp_path).render())
    p = subprocess.Popen(
        ["bash", str(script)],
        env={**env, "POSEBERT_STUB_WAIT": "1"},
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 30
        while not (tmp_path / "ready").exists():
            assert time.monotonic() < deadline and p.poll() is None
            time.sleep(0.05)
        time.sleep(0.2)
        os.killpg(p.pid, signal.SIGTERM)
        _, err = p.communicate(timeout=30)
    finally:
        p.kill()
    assert p.returncode == 75, err
    assert "no requeue" in err and "scontrol" not in log.read_text()
    line = next(line for line in err.splitlines() if "no requeue" in line)
    observed(f"exit {p.returncode}, scontrol calls {log.read_text().count('scontrol')}: {line}")


def test_shards_script_slices_inputs(tmp_path, script_env):
    env, log = script_env
    inputs = [f"/v/{n}.mp4" for n in "abcde"]
    job = jobs.shards_job(
        rs.Resources(time="10"), tmp_path / "out", inputs, per_task=2, extra=["--size", "32"]
    )
    assert job.resources.array == "0-2"
    p = _run(job, tmp_path, {**env, "SLURM_ARRAY_TASK_ID": "2"})
    assert p.returncode == 0, p.stderr
    assert log.read_text().strip() == (
        f"posebert shards video /v/e.mp4 --out {tmp_path}/out/part-2 --overwrite --size 32"
    )
    synth = jobs.shards_job(
        rs.Resources(time="10"), tmp_path / "o", clips=["walk", "run", "kick"], per_task=2
    )
    p = _run(synth, tmp_path, {**env, "SLURM_ARRAY_TASK_ID": "0", "SLURM_CPUS_PER_TASK": "3"})
    assert p.returncode == 0, p.stderr
    assert log.read_text().splitlines()[-1] == (
        f"posebert shards synth --clips walk,run --out {tmp_path}/o/part-0 --overwrite --workers 3"
    )


def _chain_spec(tmp_path: Path) -> pslurm.PipelineSpec:
    c = chain.Chain(tmp_path / "shards", tmp_path / "run", recipe="debug_cpu", levers="none",
                    pretrain_sets=("train.x=1",), pose_recipe="quick",
                    pose_sets=("probe.steps=5",), future_sets=("steps=3",))  # fmt: skip
    one = rs.Resources(time="10")
    return pslurm.PipelineSpec(c, rs.Resources(**CPU, signal_s=60), one, one)


def test_pipeline_jobs_run_the_chain_stages(tmp_path, script_env):
    """The three jobs together run exactly the commands of pipelines.chain.full, in order:
    pretraining and retrieval on every rank, export and the heads as one task."""
    env, log = script_env
    spec = _chain_spec(tmp_path)
    for job in pslurm.pipeline_jobs(spec):
        p = _run(job, tmp_path, env)
        assert p.returncode == 0, p.stderr
    want = [" ".join(["posebert", *s.args]) for s in chain.full(spec.chain)]
    assert log.read_text().splitlines() == want
    ranks = {"all": "--kill-on-bad-exit=1", "one": "--nodes=1 --ntasks=1"}
    launches = [f"srun {ranks[s.ranks]} {s.args[0]}" for s in chain.full(spec.chain)]
    assert (tmp_path / "srun").read_text().splitlines() == launches
    assert [s.ranks for s in chain.full(spec.chain)] == ["all", "one", "all", "one", "one"]


@pytest.mark.fault(
    AREA,
    "a stage of a pipeline job fails",
    injected="the evaluate job's stub posebert exiting 3 at its first stage (export)",
)  # fmt: skip
def test_stages_script_stops_at_the_first_failure(tmp_path, script_env, observed):
    env, log = script_env
    job = pslurm.pipeline_jobs(_chain_spec(tmp_path))[1]  # export, retrieval
    p = _run(job, tmp_path, {**env, "POSEBERT_STUB_EXIT": "3"})
    assert p.returncode == 3, p.stderr
    assert [line.split()[1] for line in log.read_text().splitlines()] == ["export"]
    assert "stage export failed; the stages after it do not run" in p.stderr
    line = next(line for line in p.stderr.splitlines() if "stage export failed" in line)
    observed(f"exit {p.returncode}, stages run {len(log.read_text().splitlines())}: {line}")
