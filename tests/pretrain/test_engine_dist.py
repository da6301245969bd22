"""Launcher-aware dist module and the local launcher: environment parsing (torchrun, deepspeed,
SLURM srun), node lists, collectives (single-process path and 2 gloo ranks), signal
forwarding, a dead rank named, and the preemption flag."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from pretrain.engine import dist
from pretrain.engine.dist import DistEnv, expand_nodelist, expand_tasks_per_node
from pretrain.engine.preemption import PreemptionFlag

ROOT = Path(__file__).resolve().parents[2]
AREA = "Pretraining"  # of docs/reliability.md (tests/faultlog.py)

# ----------------------------------------------------------------------------- dist


def test_torchrun_env():
    env = {
        "RANK": "3",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "2",
        "MASTER_ADDR": "node7",
        "MASTER_PORT": "29400",
        "TORCHELASTIC_RUN_ID": "x",
    }
    assert DistEnv.from_environ(env) == DistEnv(3, 1, 8, 2, "node7", 29400, "torchrun")


def test_deepspeed_launcher_env():
    env = {
        "RANK": "5",
        "LOCAL_RANK": "1",
        "WORLD_SIZE": "8",
        "LOCAL_SIZE": "4",
        "CROSS_RANK": "1",
        "CROSS_SIZE": "2",
        "MASTER_ADDR": "10.0.0.1",
        "MASTER_PORT": "29500",
    }
    e = DistEnv.from_environ(env)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (5, 1, 8, 4)
    assert (e.master_addr, e.master_port, e.launcher) == ("10.0.0.1", 29500, "deepspeed")


SLURM = {
    "SLURM_PROCID": "5",
    "SLURM_LOCALID": "1",
    "SLURM_NTASKS": "7",
    "SLURM_NODEID": "2",
    "SLURM_TASKS_PER_NODE": "2(x3),1",
    "SLURM_JOB_NODELIST": "gpu[08-10],cpu3",
    "SLURM_JOB_ID": "123456",
    "SLURM_STEP_ID": "0",
}


def test_slurm_srun_env():
    e = DistEnv.from_environ(SLURM)
    assert (e.rank, e.local_rank, e.world_size, e.local_world_size) == (5, 1, 7, 2)
    assert e.master_addr == "gpu08" and e.launcher == "slurm"
    assert e.master_port == dist.SLURM_PORT_BASE + 123456 % 20000
    # an exported rendezvous; an array job id
    e = DistEnv.from_environ({**SLURM, "MASTER_ADDR": "head", "MASTER_PORT": "4242"})
    assert (e.master_addr, e.master_port) == ("head", 4242)
    last_node = {"SLURM_JOB_ID": "77_3", "SLURM_NODEID": "3", "SLURM_LOCALID": "0"}
    e = DistEnv.from_environ({**SLURM, **last_node})
    assert e.master_port == dist.SLURM_PORT_BASE + 77 and e.local_world_size == 1


def test_slurm_step_layout_beats_inherited_ntasks_per_node():
    """Seen under Slurm 22.05: sbatch --ntasks-per-node=2 -N 2, then `srun -n 3`: the step's
    tasks still carry SLURM_NTASKS_PER_NODE=2, but node 1 runs one task."""
    step = {**SLURM, "SLURM_NTASKS": "3", "SLURM_NTASKS_PER_NODE": "2",
            "SLURM_TASKS_PER_NODE": "2(x2)", "SLURM_STEP_TASKS_PER_NODE": "2,1",
            "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1"}  # fmt: skip
    assert DistEnv.from_environ(step).local_world_size == 1
    layouts = ("SLURM_TASKS_PER_NODE", "SLURM_STEP_TASKS_PER_NODE")
    no_spec = {k: v for k, v in step.items() if k not in layouts}
    assert DistEnv.from_environ(no_spec).local_world_size == 2  # SLURM_NTASKS_PER_NODE


def test_slurm_batch_shell_is_one_process_and_torchrun_under_srun_wins():
    batch = {k: v for k, v in SLURM.items() if k != "SLURM_STEP_ID"}
    assert DistEnv.from_environ({**batch, "SLURM_PROCID": "0"}).world_size == 1
    e = DistEnv.from_environ({**SLURM, "RANK": "9", "WORLD_SIZE": "16", "TORCHELASTIC_RUN_ID": "j"})
    assert (e.rank, e.world_size, e.launcher) == (9, 16, "torchrun")


def test_bad_env_is_an_error_naming_it():
    with pytest.raises(ValueError, match="rank 4 outside"):
        DistEnv.from_environ({"RANK": "4", "WORLD_SIZE": "4"})
    with pytest.raises(ValueError, match="SLURM_JOB_ID"):
        DistEnv.from_environ({k: v for k, v in SLURM.items() if k != "SLURM_JOB_ID"})
    assert DistEnv.from_environ({}).launcher == "single"


@pytest.mark.parametrize(
    "text, hosts",
    [
        ("n[1-3,5]", ["n1", "n2", "n3", "n5"]),
        ("gpu[08-10]", ["gpu08", "gpu09", "gpu10"]),
        ("a[1-2],b3,c", ["a1", "a2", "b3", "c"]),
        ("r[1-2]-n[1-2]", ["r1-n1", "r1-n2", "r2-n1", "r2-n2"]),
        ("node-7", ["node-7"]),
    ],
)
def test_expand_nodelist(text, hosts):
    assert expand_nodelist(text) == hosts


@pytest.mark.parametrize("text", ["n[1-", "n1]", "n[a-b]", ""])
def test_expand_nodelist_rejects_garbage(text):
    with pytest.raises(ValueError):
        expand_nodelist(text)


def test_expand_tasks_per_node():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    with pytest.raises(ValueError):
        expand_tasks_per_node("2(x)")


def test_single_process_collectives(capsys):
    x = torch.randn(4, 3, requires_grad=True)
    y = dist.all_gather_with_grad(x)
    assert y is x
    y.sum().backward()
    assert torch.equal(x.grad, torch.ones(4, 3))
    assert dist.is_main() and dist.all_reduce_flag(True) and not dist.all_reduce_flag(False)
    assert dist.ranks_where(True) == [0] and dist.all_reduce_sum([1.0, 2.0]) == [1.0, 2.0]
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]
    dist.print0("hello")
    assert capsys.readouterr().out == "hello\n"


GATHER_SCRIPT = """
import json, os, sys, torch
from pretrain.engine import dist
env = dist.init_distributed(backend="gloo", timeout_s=60)
x = torch.full((2, 3), float(env.rank + 1), requires_grad=True)
y = dist.all_gather_with_grad(x)                     # (4, 3): rank 0's rows, then rank 1's
w = torch.arange(4.0).repeat_interleave(1).view(4, 1) * (env.rank + 1)
(y * w).sum().backward()                             # loss_r = sum_i w_r[i] * y[i]
out = dict(y=y.tolist(), grad=x.grad.tolist(), flag=dist.all_reduce_flag(env.rank == 1),
           where=dist.ranks_where(env.rank == 1), sums=dist.all_reduce_sum([1.0, env.rank]))
open(os.path.join(sys.argv[1], f"r{env.rank}.json"), "w").write(json.dumps(out))
dist.shutdown()  # without it, gloo may abort in teardown (exit 134)
"""


def test_all_gather_with_grad_two_ranks(tmp_path):
    from pretrain.engine.launch import launch_local

    script = tmp_path / "gather.py"
    script.write_text(GATHER_SCRIPT)
    code = _launch_in_subprocess(
        f"sys.exit(launch_local(2, [sys.executable, {str(script)!r}, {str(tmp_path)!r}]))"
    )
    assert code == 0 and launch_local  # imported above: the module loads without DeepSpeed
    r = [json.loads((tmp_path / f"r{i}.json").read_text()) for i in range(2)]
    assert r[0]["y"] == r[1]["y"] == [[1.0] * 3] * 2 + [[2.0] * 3] * 2
    # d(sum_r loss_r)/dx_q = sum_r w_r rows of q: w_0 + w_1 = 3 * [0, 1, 2, 3]
    assert r[0]["grad"] == [[0.0] * 3, [3.0] * 3] and r[1]["grad"] == [[6.0] * 3, [9.0] * 3]
    assert r[0]["flag"] and r[0]["where"] == r[1]["where"] == [1]
    assert r[0]["sums"] == [2.0, 1.0]


# ----------------------------------------------------------------------------- launcher


def _launch_in_subprocess(code: str, timeout: float = 120, **popen) -> int:
    prog = "import sys\nfrom pretrain.engine.launch import launch_local\n" + code
    p = subprocess.run([sys.executable, "-c", prog], cwd=ROOT, timeout=timeout, **popen)
    return p.returncode


@pytest.mark.fault(
    AREA,
    "one local rank dies",
    injected="rank 1 of 2 under launch_local exits with code 3, rank 0 sleeps",
)
def test_launch_local_sets_env_and_names_a_dead_rank(tmp_path, observed):
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent("""
        import os, sys, time
        keys = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
        print(" ".join(os.environ[k] for k in keys), flush=True)
        if os.environ["RANK"] == "1":
            sys.exit(3)
        time.sleep(60)
    """)
    )
    start = time.monotonic()
    p = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from pretrain.engine.launch import launch_local; "
            f"sys.exit(launch_local(2, [sys.executable, {str(child)!r}], grace_s=1))",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    took = time.monotonic() - start
    assert p.returncode == 3 and took < 30
    assert "launch_local: rank 1 exited with code 3" in p.stderr
    line = next(line for line in p.stderr.splitlines() if "launch_local" in line)
    observed(f"exit {p.returncode} after {took:.1f} s: {line}")
    # rank 0 writes to the terminal itself, the others through the launcher's pumps: a line
    # of rank 1 may land between rank 0's text and its newline (unbuffered print), so look
    # for each line's text, not for whole lines
    port = re.search(r"0 0 2 127\.0\.0\.1 (\d+)", p.stdout).group(1)
    assert f"[rank 1] 1 1 2 127.0.0.1 {port}\n" in p.stdout


def _launch_two(child) -> subprocess.Popen:
    """``launch_local`` running two ranks of the script ``child``, in a subprocess."""
    return subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from pretrain.engine.launch import launch_local; "
            f"sys.exit(launch_local(2, [sys.executable, {str(child)!r}]))",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.fault(
    AREA,
    "SIGUSR1 to the local launcher",
    injected="os.kill of launch_local's process once both ranks are ready",
)
def test_launch_local_forwards_preemption_signals(tmp_path, observed):
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import os, signal, sys, time
        got = []
        signal.signal(signal.SIGUSR1, lambda s, f: got.append(s))
        open(os.path.join({str(tmp_path)!r}, "ready" + os.environ["RANK"]), "w").close()
        for _ in range(600):
            if got:
                sys.exit(75)
            time.sleep(0.05)
        sys.exit(1)
    """)
    )
    launcher = _launch_two(child)
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        launcher.send_signal(signal.SIGUSR1)
        _, err = launcher.communicate(timeout=60)
    finally:
        launcher.kill()
    assert launcher.returncode == 75, err
    assert "launch_local" not in err  # every rank exited 75 together: nothing to report
    observed(f"exit {launcher.returncode}, launcher lines {err.count('launch_local')}")


@pytest.mark.fault(
    AREA,
    "SIGINT, SIGINT, SIGTERM, SIGINT to the launcher, then SIGQUIT",
    injected="each sent to launch_local 0.2 s apart while 2 ranks sleep",
)
def test_launch_local_forwards_every_repeat_and_only_sigquit_kills(tmp_path, observed):
    """A burst of INT/TERM reaches every rank (INT as TERM) and kills nothing: a second SIGINT
    used to kill every rank, mid-checkpoint too. SIGQUIT kills every rank at once."""
    child = tmp_path / "child.py"
    child.write_text(
        textwrap.dedent(f"""
        import os, signal, time
        log = os.path.join({str(tmp_path)!r}, "got" + os.environ["RANK"])
        def note(s, f):
            with open(log, "a") as out:
                out.write(signal.Signals(s).name + "\\n")
        signal.signal(signal.SIGTERM, note)
        open(os.path.join({str(tmp_path)!r}, "ready" + os.environ["RANK"]), "w").close()
        time.sleep(120)
    """)
    )
    launcher = _launch_two(child)
    got = [tmp_path / f"got{r}" for r in range(2)]
    try:
        deadline = time.monotonic() + 60
        while not all((tmp_path / f"ready{r}").exists() for r in range(2)):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        for s in (signal.SIGINT, signal.SIGINT, signal.SIGTERM, signal.SIGINT):
            launcher.send_signal(s)
            time.sleep(0.2)
        while not all(f.exists() and len(f.read_text().split()) == 4 for f in got):
            assert time.monotonic() < deadline and launcher.poll() is None
            time.sleep(0.05)
        assert launcher.poll() is None  # every rank still running
        launcher.send_signal(signal.SIGQUIT)
        _, err = launcher.communicate(timeout=30)
    finally:
        launcher.kill()
    assert [f.read_text().split() for f in got] == [["SIGTERM"] * 4] * 2
    assert launcher.returncode == 128 + signal.SIGKILL, err
    observed(f"ranks received {[f.read_text().split() for f in got]}; after SIGQUIT exit "
             f"{launcher.returncode}")  # fmt: skip


def test_relaunch_reruns_the_command_line_without_the_flag_only_outside_a_launcher(monkeypatch):
    """One relaunch helper for every ``--nproc-per-node``: the same command as N ranks, never
    from inside a rank (torchrun, srun), and not for N = 1."""
    from pretrain.engine import launch

    seen = {}
    monkeypatch.setattr(launch, "launch_local", lambda n, argv, **kw: seen.update(n=n, argv=argv,
                                                                                **kw) or 0)
    for name in ("RANK", "WORLD_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    argv = ["evaluate", "retrieval", "--nproc-per-node", "2", "--k", "3", "--nproc-per-node=2"]
    assert launch.relaunch(2, argv) == 0 and seen["n"] == 2
    assert seen["exiting"]  # the command exits next: late signals stay ignored
    assert seen["argv"][1:] == ["-m", "posebert", "evaluate", "retrieval", "--k", "3"]
    assert launch.relaunch(1, argv) is None
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert launch.relaunch(2, argv) is None  # already a rank: do the work
    with pytest.raises(ValueError, match="nproc-per-node"):
        launch.relaunch(0, argv)


def test_preemption_flag_only_records():
    before = signal.getsignal(signal.SIGUSR1)
    with PreemptionFlag() as flag:
        assert not flag.set
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(0.05)
        assert flag.set and flag.name == "SIGUSR2"  # the first one is kept
    assert signal.getsignal(signal.SIGUSR1) is before


def test_a_flag_told_to_ignore_restores_no_handler_on_exit():
    """Once the run has decided to exit 75, leaving the block must not bring back the default
    handlers for an instant (SIGINT's KeyboardInterrupt, death by SIGTERM)."""
    flag = PreemptionFlag((signal.SIGUSR1, signal.SIGUSR2))
    before = {s: signal.getsignal(s) for s in flag.signals}
    try:
        with flag:
            flag.ignore_from_now()
        assert all(signal.getsignal(s) is signal.SIG_IGN for s in flag.signals)
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)
