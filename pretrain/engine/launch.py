"""Start N local ranks of the same entry point, torchrun-style, and supervise them.

Used by ``posebert pretrain --nproc-per-node N``. Each child gets RANK, LOCAL_RANK, WORLD_SIZE,
LOCAL_WORLD_SIZE, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT (read back by
:class:`pretrain.engine.dist.DistEnv`). Unlike a ``torchrun`` agent, which dies on SIGUSR1
without telling its workers, this launcher forwards SIGUSR1, SIGUSR2, SIGTERM and SIGHUP to
every rank (SIGINT as SIGTERM), so the ranks checkpoint and exit with the requeue code together.
Every repeat is forwarded too and the ranks ignore it: a burst of signals (Slurm's warning then
its SIGTERM, an impatient Ctrl-C) never cuts the checkpoint they are writing; a second SIGINT
used to kill every rank mid-save (issue 16). SIGQUIT (Ctrl-\\) is the way to stop at once: it
kills every rank's process group (an uncommitted checkpoint is ignored by the next run). Once
the ranks have exited, :func:`relaunch` ignores these signals, so a late one cannot turn the
ranks' exit code into 143.

Rank 0 writes straight to the terminal (its progress bar stays intact); the other ranks'
output is prefixed with ``[rank R]``. When a rank exits non-zero, the others get ``grace_s``
seconds to finish on their own (an orderly exit code such as 75 reaches every rank at the same
step), then are killed with their process groups, and the launcher returns that rank's code
(128 + signal number for a rank killed by a signal) after one line naming it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import IO

from pretrain.engine.dist import free_port
from pretrain.signals import EARLY_SIGNAL_ENV, early_signal

FORWARDED = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGHUP)
HANDLED = (*FORWARDED, signal.SIGINT)
"""Signals the ranks act on (SIGINT reaches them as SIGTERM), however often they arrive."""
STOP_NOW = signal.SIGQUIT
"""Kills every rank's process group at once, checkpoint or not."""


def rank_env(base: Mapping[str, str], rank: int, nproc: int, port: int) -> dict[str, str]:
    """``base`` plus the torchrun-style variables of local rank ``rank`` of ``nproc``."""
    env = dict(base)
    env.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(nproc),
        LOCAL_WORLD_SIZE=str(nproc),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        POSEBERT_LAUNCHER="local",
        PYTHONUNBUFFERED="1",
    )
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return env


def _pump(stream: IO[bytes], prefix: bytes, sink: IO[bytes]) -> None:
    for line in iter(stream.readline, b""):
        sink.write(prefix + line)
        sink.flush()
    stream.close()


def _code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe(returncode: int) -> str:
    if returncode < 0:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(-returncode).name}"
    return f"exited with code {returncode}"


def _kill_group(p: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(p.pid, signal.SIGKILL)


@contextlib.contextmanager
def _forward_signals(procs: list[subprocess.Popen], then_ignore: bool = False) -> Iterator[None]:
    """Forward signals to the ranks while the body runs; then restore the previous handlers,
    or with ``then_ignore`` ignore those signals (the process only exits afterwards: a Python
    handler is reset to the default action, death, while the interpreter shuts down)."""

    def forward(signum: int, frame: object) -> None:
        if signum == STOP_NOW:
            for p in procs:
                _kill_group(p)
            return
        if signum == signal.SIGINT:
            signum = signal.SIGTERM
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    p.send_signal(signum)

    in_main = threading.current_thread() is threading.main_thread()
    handled = (*HANDLED, STOP_NOW) if in_main else ()
    previous = {s: signal.signal(s, forward) for s in handled}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_IGN if then_ignore else handler)


def _supervise(procs: list[subprocess.Popen], grace_s: float, poll_s: float) -> int:
    first_bad: tuple[int, int] | None = None
    deadline = None
    while True:
        codes = [p.poll() for p in procs]
        if first_bad is None:
            bad = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if bad:
                first_bad, deadline = bad[0], time.monotonic() + grace_s
        if all(c is not None for c in codes):
            break
        if deadline is not None and time.monotonic() > deadline:
            stopped = [r for r, c in enumerate(codes) if c is None]
            for r in stopped:
                _kill_group(procs[r])
            print(
                f"launch_local: rank {first_bad[0]} {_describe(first_bad[1])}; killed rank(s) "
                f"{stopped} still running after {grace_s:g} s",
                file=sys.stderr,
                flush=True,
            )
            for r in stopped:
                procs[r].wait()
            break
        time.sleep(poll_s)
    if first_bad is None:
        return 0
    rank, returncode = first_bad
    others = {_code(p.returncode) for r, p in enumerate(procs) if r != rank}
    if others - {_code(returncode)}:
        print(f"launch_local: rank {rank} {_describe(returncode)}", file=sys.stderr, flush=True)
    return _code(returncode)


def launch_local(
    nproc: int,
    argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    grace_s: float = 10.0,
    poll_s: float = 0.1,
    exiting: bool = False,
) -> int:
    """Run ``argv`` (a full command line, e.g. ``[sys.executable, "-m", "posebert.cli",
    "pretrain", ...]``) as ranks 0..nproc-1 on this machine; return 0 when every rank
    succeeded, else the code of the first rank that failed (named on stderr). ``exiting``:
    the caller exits with that code, so the forwarded signals stay ignored afterwards (a late
    one cannot turn the ranks' 75 into 143)."""
    if nproc < 1:
        raise ValueError(f"nproc must be >= 1, got {nproc}")
    if not argv:
        raise ValueError("argv is empty")
    base = dict(os.environ if env is None else env)
    early = early_signal()  # arrived while this launcher was starting: the ranks inherit it
    if early is not None:
        base[EARLY_SIGNAL_ENV] = str(int(early))
    port = free_port()
    procs: list[subprocess.Popen] = []
    pumps: list[threading.Thread] = []
    sink = sys.stdout.buffer
    try:
        for rank in range(nproc):
            piped = rank > 0
            p = subprocess.Popen(
                list(argv),
                env=rank_env(base, rank, nproc, port),
                stdout=subprocess.PIPE if piped else None,
                stderr=subprocess.STDOUT if piped else None,
                start_new_session=True,  # one process group per rank, killed as a whole
            )
            procs.append(p)
            if piped:
                t = threading.Thread(
                    target=_pump, args=(p.stdout, f"[rank {rank}] ".encode(), sink), daemon=True
                )
                t.start()
                pumps.append(t)
        with _forward_signals(procs, then_ignore=exiting):
            return _supervise(procs, grace_s, poll_s)
    finally:
        for p in procs:
            if p.poll() is None:
                _kill_group(p)
                p.wait()
        for t in pumps:
            t.join(timeout=5)


def relaunch(nproc: int, argv: Sequence[str] | None = None) -> int | None:
    """``--nproc-per-node N`` of any ``posebert`` command: from a process no launcher started,
    run the same command line (``argv``, default ``sys.argv[1:]``) minus that flag as N local
    ranks (:func:`launch_local`) and return their exit code; None when this process should do
    the work itself (N is 1, or it already is a rank: torchrun, deepspeed, srun)."""
    from pretrain.engine.dist import DistEnv

    if nproc < 1:
        raise ValueError(f"--nproc-per-node must be >= 1, got {nproc}")
    if nproc == 1 or DistEnv.from_environ().launched:
        return None
    args, skip = [], False
    for a in sys.argv[1:] if argv is None else argv:
        if skip or a == "--nproc-per-node" or a.startswith("--nproc-per-node="):
            skip = a == "--nproc-per-node"
            continue
        args.append(a)
    return launch_local(nproc, [sys.executable, "-m", "posebert", *args], exiting=True)
