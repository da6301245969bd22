"""A real two-node Slurm cluster on one machine, on loopback addresses only.

For the ``slurm`` tests and for users who want to try the job scripts before a real cluster::

    python tests/localcluster.py start --dir /tmp/slurm     # prints: export SLURM_CONF=...
    SLURM_CONF=/tmp/slurm/slurm.conf sbatch -N2 ...
    python tests/localcluster.py stop --dir /tmp/slurm

One munged, one slurmctld and two slurmd (``slurmd -N n1`` / ``-N n2``, Debian's Slurm is built
with multiple-slurmd support) on 127.0.0.2 / 127.0.0.3 with their own ports. Everything the
daemons write (config, munge key and socket, state, spool, logs, pid files) lives under DIR;
/etc/slurm is never read or written (``-f CONF`` for the daemons, ``SLURM_CONF`` for clients).

Node names must resolve inside jobs (MASTER_ADDR comes from SLURM_NODELIST). Where the kernel
allows it, each slurmd runs in its own UTS + mount namespace (``unshare``) with hostname n1 / n2
and a private /etc/hosts (DIR/etc/hosts, bind-mounted) that names both nodes, so nothing outside
DIR changes. Where namespaces are refused (an unprivileged container), the two lines are appended
to the real /etc/hosts once, tagged with :data:`HOSTS_TAG`.

Settings (shared/GUIDE.md section 4): no cgroups (proctrack/linuxproc, task/none), no
accounting, ``SlurmdParameters=config_overrides`` (nodes may declare more CPUs than the machine
has), ``AuthInfo=cred_expire=10`` and ``sched_interval=5,bf_interval=5`` so a requeued job starts
again after ~12 s instead of ~2 minutes. Daemons are stopped by their pid files only, after the
cluster's own jobs are cancelled.

Only the standard library is used: this file also runs as a plain script (the watchdog).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
"""Debian packages (Slurm 22.05 in bookworm), installed with --no-install-recommends."""
BINARIES = {"slurmctld": "slurmctld", "slurmd": "slurmd", "sbatch": "slurm-client",
            "sinfo": "slurm-client", "munged": "munge", "munge": "munge"}  # fmt: skip
SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
HOSTS_TAG = "# posebert local slurm cluster"
PORT_RANGE = (30200, 32700)
"""Daemon ports: above the ``MASTER_PORT`` range of :mod:`pretrain.engine.dist` (10000 + job id
% 20000) and below Linux's ephemeral range."""
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}  # fmt: skip
MAX_SOCKET_PATH = 100  # sun_path holds 108 bytes


CONF_HEADER = """\
# Written by tests/localcluster.py: a cluster on loopback (shared/GUIDE.md section 4).
ClusterName=posebert-local
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
SlurmctldDebug=info
SlurmdDebug=info
# No cgroups, no accounting: nothing outside the cluster directory is needed.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
# With AuthInfo cred_expire=10: a requeued job starts again after ~12 s, not ~2 minutes.
SchedulerParameters=sched_interval=5,bf_interval=5
SlurmdParameters=config_overrides
ReturnToService=2
MailProg=/bin/true
MinJobAge=900
KillWait=5
InactiveLimit=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10"""
"""The settings that do not depend on the cluster directory or the ports."""


class ClusterUnavailable(RuntimeError):
    """Slurm cannot be installed or started on this machine (not root, apt failed, no binaries).
    Tests skip on it (and fail under CI=true); other start failures raise ClusterError."""


class ClusterError(RuntimeError):
    """A daemon did not start or the nodes did not come up; the message ends with log tails."""


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *SBIN])
    return shutil.which(name, path=path)


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if _which(b) is None]


def ensure_packages(install: bool = True, timeout_s: float = 900) -> None:
    """Install Debian's Slurm and munge with apt when a binary is missing.

    Raises :class:`ClusterUnavailable` naming the reason when they are missing and cannot be
    installed (``install=False``, not root, no apt-get, apt failed)."""
    missing = missing_binaries()
    if not missing:
        return
    want = sorted({BINARIES[b] for b in missing})
    if not install:
        raise ClusterUnavailable(f"missing {', '.join(missing)} (packages {' '.join(want)})")
    if os.geteuid() != 0:
        raise ClusterUnavailable(f"missing {', '.join(missing)}; installing needs root")
    if shutil.which("apt-get") is None:
        raise ClusterUnavailable(f"missing {', '.join(missing)} and no apt-get to install them")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update"],
                ["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES]):  # fmt: skip
        try:
            r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired:
            raise ClusterUnavailable(f"{' '.join(cmd)} took over {timeout_s:.0f} s") from None
        if r.returncode != 0:
            tail = (r.stdout + r.stderr).strip().splitlines()[-8:]
            raise ClusterUnavailable(
                f"{' '.join(cmd)} failed ({r.returncode}): " + " | ".join(tail)
            )
    still = missing_binaries()
    if still:
        raise ClusterUnavailable(f"apt installed {' '.join(PACKAGES)} but {still} are missing")


def namespaces_work() -> bool:
    """Whether this process may give a child its own hostname and /etc/hosts (root with
    CAP_SYS_ADMIN; refused in unprivileged containers)."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = "echo probe > /proc/sys/kernel/hostname && mount --bind /etc/hosts /etc/hosts"
    r = subprocess.run(["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c",
                        probe], capture_output=True, timeout=30)  # fmt: skip
    return r.returncode == 0


def free_ports(n: int, rng: random.Random) -> list[int]:
    """``n`` distinct TCP ports in :data:`PORT_RANGE` that nothing listens on right now."""
    ports: list[int] = []
    for _ in range(1000):
        port = rng.randrange(*PORT_RANGE)
        if port in ports:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        ports.append(port)
        if len(ports) == n:
            return ports
    raise ClusterError(f"no {n} free ports in {PORT_RANGE}")


def parse_scontrol(text: str) -> dict[str, str]:
    """``scontrol show job -o`` output (``Key=Value`` pairs; values may hold spaces) -> dict."""
    keys = list(re.finditer(r"(?:^|\s)([A-Za-z][A-Za-z0-9_:/]*)=", text.strip()))
    out = {}
    for m, nxt in zip(keys, [*keys[1:], None], strict=True):
        out[m.group(1)] = text.strip()[m.end() : nxt.start() if nxt else None].strip()
    return out


@dataclasses.dataclass(frozen=True)
class Node:
    name: str
    addr: str
    port: int


class LocalCluster:
    """The cluster under ``directory``: ``start()``, ``stop()``, ``env`` for clients, or
    ``with LocalCluster(d) as c: subprocess.run(["sbatch", ...], env=c.env)`` (stopped on
    exit, also when the block raises).

    ``cpus_per_node`` may exceed the machine's cores (``config_overrides``): 8 lets the job
    scripts' default ``--cpus-per-task`` (slurm/common.sh) fit on a node."""

    def __init__(self, directory: str | os.PathLike, nodes: int = 2, cpus_per_node: int = 8,
                 install: bool = True, timeout_s: float = 60.0,
                 partition: str = "local") -> None:  # fmt: skip
        if not 1 <= nodes <= 8:
            raise ValueError(f"nodes must be in [1, 8], got {nodes}")
        self.dir = Path(directory).resolve()
        self.nodes_wanted = nodes
        self.cpus_per_node = cpus_per_node
        self.install = install
        self.timeout_s = timeout_s
        self.partition = partition
        self.conf = self.dir / "slurm.conf"
        self.munge_socket = self.dir / "munge" / "munge.socket"
        if len(str(self.munge_socket)) > MAX_SOCKET_PATH:
            raise ValueError(f"directory path too long for the munge socket: {self.munge_socket}")

    # ------------------------------------------------------------------ layout

    @property
    def node_names(self) -> list[str]:
        return [f"n{i + 1}" for i in range(self.nodes_wanted)]

    def _pidfile(self, daemon: str) -> Path:
        return self.dir / "run" / f"{daemon}.pid"

    def _log(self, daemon: str) -> Path:
        return self.dir / "log" / f"{daemon}.log"

    def _daemons(self) -> list[str]:
        """In stop order: nodes first, the controller, then munge."""
        return [f"slurmd.{n}" for n in self.node_names] + ["slurmctld", "munged"]

    @property
    def env(self) -> dict[str, str]:
        """The environment for sbatch / srun / squeue / scontrol against this cluster: ours,
        less any SLURM_* / SBATCH_* / SRUN_* / SALLOC_* inherited from an enclosing job, with
        SLURM_CONF and the sbin directories on PATH."""
        drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = os.pathsep.join([env.get("PATH", "/usr/bin:/bin"), *SBIN])
        return env

    def run(
        self, *cmd: str, timeout: float = 60, check: bool = True
    ) -> subprocess.CompletedProcess:
        """A Slurm client command against this cluster (text output captured)."""
        r = subprocess.run(list(cmd), env=self.env, capture_output=True, text=True,
                           timeout=timeout)  # fmt: skip
        if check and r.returncode != 0:
            raise ClusterError(f"{' '.join(cmd)} failed ({r.returncode}): {r.stderr.strip()}")
        return r

    # ------------------------------------------------------------------ start

    def start(self, owner_pid: int | None = None) -> LocalCluster:
        """Install if needed, write the config, start the daemons and wait until every node
        is idle. ``owner_pid``: a watchdog stops the cluster when that process is gone (a test
        session killed before its finalizers run). Idempotent while running."""
        if os.geteuid() != 0:
            raise ClusterUnavailable("the local Slurm cluster needs root (slurmd runs jobs)")
        ensure_packages(self.install)
        if self.running():
            self.wait_idle()
            return self
        for sub in ("run", "log", "state", "spool", "munge", "etc"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.dir / "munge", 0o711)  # munged wants the socket dir executable by all
        isolated = namespaces_work()
        nodes = self._write_config()
        self._write_hosts(nodes, isolated)
        try:
            self._start_munged()
            self._spawn("slurmctld", [_which("slurmctld"), "-f", str(self.conf)])
            for node in nodes:
                self._start_slurmd(node, isolated)
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        if owner_pid is not None:
            self._start_watchdog(owner_pid)
        return self

    def _write_config(self) -> list[Node]:
        """slurm.conf with fresh ports; kept if it exists (a restart keeps the job state)."""
        if self.conf.exists():
            return self._nodes_from_config()
        rng = random.Random()
        ports = free_ports(1 + self.nodes_wanted, rng)
        nodes = [Node(name, f"127.0.0.{i + 2}", ports[i + 1])
                 for i, name in enumerate(self.node_names)]  # fmt: skip
        mem_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
        d = self.dir
        lines = [
            CONF_HEADER,
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            f"SlurmctldPort={ports[0]}",
            f"AuthInfo=cred_expire=10,socket={self.munge_socket}",
            f"StateSaveLocation={d / 'state'}",
            f"SlurmdSpoolDir={d / 'spool'}/%n",
            f"SlurmctldPidFile={self._pidfile('slurmctld')}",
            f"SlurmdPidFile={d / 'run'}/slurmd.%n.pid",
            f"SlurmctldLogFile={self._log('slurmctld')}",
            f"SlurmdLogFile={d / 'log'}/slurmd.%n.log",
            f"PlugStackConfig={d / 'etc' / 'plugstack.conf'}",
            # Distinct job ids per cluster: concurrent clusters get distinct MASTER_PORTs.
            f"FirstJobId={rng.randrange(1000, 19000)}",
        ]
        for n in nodes:
            lines.append(f"NodeName={n.name} NodeAddr={n.addr} NodeHostname=localhost "
                         f"Port={n.port} CPUs={self.cpus_per_node} RealMemory={mem_mb} "
                         "State=UNKNOWN")  # fmt: skip
        lines.append(f"PartitionName={self.partition} Nodes={','.join(n.name for n in nodes)} "
                     "Default=YES MaxTime=INFINITE State=UP")  # fmt: skip
        (d / "etc" / "plugstack.conf").write_text("")
        tmp = self.conf.with_suffix(".tmp")
        tmp.write_text("\n".join(lines) + "\n")
        os.replace(tmp, self.conf)
        return nodes

    def _nodes_from_config(self) -> list[Node]:
        nodes = []
        for line in self.conf.read_text().splitlines():
            if line.startswith("NodeName="):
                kv = parse_scontrol(line)
                nodes.append(Node(kv["NodeName"], kv["NodeAddr"], int(kv["Port"])))
        return nodes

    def _write_hosts(self, nodes: list[Node], isolated: bool) -> None:
        """DIR/etc/hosts for the nodes' private /etc/hosts; without namespaces, the lines go
        into the real /etc/hosts (once) unless the names already resolve to our addresses."""
        ours = [f"{n.addr} {n.name} {HOSTS_TAG}" for n in nodes]
        if isolated:
            base = Path("/etc/hosts").read_text()
            (self.dir / "etc" / "hosts").write_text(
                base.rstrip("\n") + "\n" + "\n".join(ours) + "\n"
            )
            return
        wrong = []
        for n in nodes:
            try:
                addr = socket.gethostbyname(n.name)
            except OSError:
                addr = None
            if addr is not None and addr != n.addr:
                wrong.append(f"{n.name} -> {addr}")
        if wrong:
            raise ClusterUnavailable(f"node names resolve elsewhere ({', '.join(wrong)}) and "
                                     "namespaces are not available to hide that")  # fmt: skip
        current = Path("/etc/hosts").read_text()
        add = [line for line in ours if line not in current.splitlines()]
        if add:
            with open("/etc/hosts", "a") as fh:
                fh.write(("" if current.endswith("\n") else "\n") + "\n".join(add) + "\n")

    def _start_munged(self) -> None:
        key = self.dir / "munge" / "munge.key"
        if not key.exists():
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(fd, "wb") as fh:
                fh.write(os.urandom(1024))
        # --force: munged refuses a socket whose ancestors are not executable by all (pytest's
        # temp directories are 0700); only root uses this socket.
        self._spawn("munged", [_which("munged"), "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--pid-file={self._pidfile('munged')}",
                               f"--log-file={self._log('munged')}",
                               f"--seed-file={self.dir / 'munge' / 'munged.seed'}"])  # fmt: skip
        deadline = time.monotonic() + self.timeout_s
        while True:  # ready when a credential round-trips
            r = subprocess.run([_which("munge"), "-n", f"--socket={self.munge_socket}"],
                               capture_output=True)  # fmt: skip
            if r.returncode == 0:
                return
            if time.monotonic() > deadline:
                raise ClusterError("munged does not answer" + self._tails())
            time.sleep(0.2)

    def _start_slurmd(self, node: Node, isolated: bool) -> None:
        cmd = [_which("slurmd"), "-f", str(self.conf), "-N", node.name]
        if isolated:
            # Own hostname (jobs see n1 / n2) and own /etc/hosts naming the nodes; the private
            # propagation keeps the bind mount out of the host's mount table.
            script = ('echo "$1" > /proc/sys/kernel/hostname && mount --bind "$2" /etc/hosts '
                      '&& shift 2 && exec "$@"')  # fmt: skip
            cmd = ["unshare", "--uts", "--mount", "--propagation", "private", "sh", "-c", script,
                   "sh", node.name, str(self.dir / "etc" / "hosts"), *cmd]  # fmt: skip
        self._spawn(f"slurmd.{node.name}", cmd)

    def _spawn(self, daemon: str, cmd: Sequence[str]) -> None:
        """Run a self-daemonizing command; it must leave a live pid in its pid file."""
        pidfile = self._pidfile(daemon)
        with open(self._log(daemon + ".start"), "ab") as log:
            r = subprocess.run(list(cmd), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                               start_new_session=True, timeout=self.timeout_s)  # fmt: skip
        if r.returncode != 0:
            raise ClusterError(f"{daemon} failed to start ({r.returncode})" + self._tails())
        deadline = time.monotonic() + self.timeout_s
        while self._pid(daemon) is None:
            if time.monotonic() > deadline:
                raise ClusterError(f"{daemon}: no live process in {pidfile}" + self._tails())
            time.sleep(0.1)

    def _start_watchdog(self, owner_pid: int) -> None:
        subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "watch", "--dir",
                          str(self.dir), "--owner", str(owner_pid)],
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=open(self._log("watchdog"), "ab"),
                         start_new_session=True)  # fmt: skip

    # ------------------------------------------------------------------ state

    def _pid(self, daemon: str) -> int | None:
        """The live pid in the daemon's pid file, if that process is still ours (its command
        line names our config or socket: a recycled pid is never signalled)."""
        try:
            pid = int(self._pidfile(daemon).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if _alive(pid) and self._owns(pid) else None

    def _owns(self, pid: int) -> bool:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        except OSError:
            return False
        return str(self.conf) in cmdline or str(self.munge_socket) in cmdline

    def running(self) -> bool:
        """Every daemon is alive."""
        return all(self._pid(d) is not None for d in self._daemons())

    def nodes(self) -> dict[str, str]:
        """Node name -> state as sinfo reports it (idle, alloc, mix, down*, ...)."""
        r = self.run("sinfo", "-h", "-N", "-o", "%N %T", check=False, timeout=20)
        if r.returncode != 0:
            return {}
        return dict(line.split()[:2] for line in r.stdout.splitlines() if line.strip())

    def wait_idle(self) -> None:
        deadline = time.monotonic() + self.timeout_s
        want = set(self.node_names)
        states: dict[str, str] = {}
        while True:
            states = self.nodes()
            if set(states) == want and all(s == "idle" for s in states.values()):
                return
            if time.monotonic() > deadline:
                raise ClusterError(f"nodes not idle after {self.timeout_s:.0f} s: {states}"
                                   + self._tails())  # fmt: skip
            time.sleep(0.3)

    def _tails(self, lines: int = 15) -> str:
        out = []
        for log in sorted((self.dir / "log").glob("*.log")):
            text = log.read_text(errors="replace").strip().splitlines()[-lines:]
            if text:
                out.append(f"\n--- {log} ---\n" + "\n".join(text))
        return "".join(out)

    def job(self, job_id: str | int) -> dict[str, str]:
        """``scontrol show job`` fields of one job (JobState, Restarts, ExitCode, ...)."""
        return parse_scontrol(self.run("scontrol", "show", "job", "-o", str(job_id)).stdout)

    def wait_job(self, job_id: str | int, timeout_s: float = 300,
                 states: set[str] = TERMINAL_STATES) -> dict[str, str]:  # fmt: skip
        """Poll until the job's state is in ``states``; its fields. TimeoutError otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            info = self.job(job_id)
            if info.get("JobState") in states:
                return info
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after "
                                   f"{timeout_s:.0f} s: {info.get('Reason')}")  # fmt: skip
            time.sleep(1.0)

    def status(self) -> str:
        rows = [f"{d}: {'running, pid ' + str(p) if (p := self._pid(d)) else 'stopped'}"
                for d in self._daemons()]  # fmt: skip
        if self._pid("slurmctld"):
            rows += [f"node {n}: {s}" for n, s in sorted(self.nodes().items())]
        return "\n".join(rows)

    # ------------------------------------------------------------------ stop

    def stop(self, timeout_s: float = 30.0) -> None:
        """Cancel this cluster's jobs, then stop slurmd, slurmctld and munged by their pid
        files (SIGTERM, SIGKILL after ``timeout_s``), waiting for each to exit. Safe to call
        when nothing, or only part, is running."""
        if self._pid("slurmctld") and self._pid("munged"):
            self._cancel_jobs(timeout_s)
        for daemon in self._daemons():
            pid = self._pid(daemon)
            if pid is None:
                continue
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            if not _wait_gone(pid, timeout_s):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10)
            with contextlib.suppress(FileNotFoundError):
                self._pidfile(daemon).unlink()

    def _cancel_jobs(self, timeout_s: float) -> None:
        """Running jobs' processes outlive slurmd (slurmstepd is its own process): cancel
        them through the controller and give them time to end."""
        with contextlib.suppress(Exception):
            r = self.run("squeue", "-h", "-o", "%A", check=False, timeout=20)
            ids = r.stdout.split()
            if not ids:
                return
            self.run("scancel", *ids, check=False, timeout=20)
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                r = self.run("squeue", "-h", "-o", "%A %T", check=False, timeout=20)
                if r.returncode != 0 or not r.stdout.strip():
                    return
                time.sleep(0.5)

    def __enter__(self) -> LocalCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _alive(pid: int) -> bool:
    """Running and not a zombie (a daemon's parent is init, which may reap late)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] not in ("Z", "X")


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _watch(cluster: LocalCluster, owner: int) -> None:
    """Stop the cluster once ``owner`` is gone; leave quietly once the cluster is stopped."""
    while _alive(owner):
        if cluster._pid("slurmctld") is None and cluster._pid("munged") is None:
            return
        time.sleep(1.0)
    cluster.stop()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python tests/localcluster.py",
                                description=__doc__.splitlines()[0])  # fmt: skip
    p.add_argument("action", choices=("start", "stop", "status", "watch"))
    p.add_argument("--dir", required=True, help="cluster directory (config, state, logs, pids)")
    p.add_argument("--nodes", type=int, default=2, help="compute nodes (n1, n2, ...)")
    p.add_argument("--cpus-per-node", type=int, default=8,
                   help="CPUs each node declares (more than the machine has is fine)")  # fmt: skip
    p.add_argument("--no-install", action="store_true", help="never run apt-get")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the daemons")
    p.add_argument("--owner", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    cluster = LocalCluster(a.dir, nodes=a.nodes, cpus_per_node=a.cpus_per_node,
                           install=not a.no_install, timeout_s=a.timeout)  # fmt: skip
    try:
        if a.action == "start":
            t0 = time.monotonic()
            cluster.start()
            print(f"cluster up in {time.monotonic() - t0:.1f} s: {cluster.status()}",
                  file=sys.stderr)  # fmt: skip
            print(f"export SLURM_CONF={cluster.conf}")
        elif a.action == "stop":
            cluster.stop()
        elif a.action == "status":
            print(cluster.status())
            return 0 if cluster.running() else 3
        else:
            _watch(cluster, a.owner if a.owner is not None else os.getppid())
    except (ClusterUnavailable, ClusterError) as e:
        print(f"localcluster {a.action}: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
