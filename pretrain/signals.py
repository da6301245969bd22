"""Preemption signals that arrive before the training loop is ready are not lost.

``posebert pretrain`` spends seconds importing torch and DeepSpeed before the loop installs its
handlers (:class:`pretrain.engine.preemption.PreemptionFlag`); a SIGUSR1 from Slurm, a SIGTERM or
a Ctrl-C in that window used to kill the process with 138 / 143 / 130, so nothing was
checkpointed and Slurm did not requeue. :func:`record_early` is called first thing by the
command line (this module imports nothing heavy): its handlers only record the signal, and
the flag adopts it when the loop starts, so the run checkpoints at its first step boundary and
exits with the requeue code like any preempted run.
"""

from __future__ import annotations

import os
import signal

PREEMPT_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
"""Signals that checkpoint and stop a run (SIGINT and SIGHUP too: a closed terminal or a
Ctrl-C keeps the work done so far)."""

EARLY_SIGNAL_ENV = "POSEBERT_EARLY_SIGNAL"
"""Set by ``--nproc-per-node``'s launcher for ranks started after it was signalled."""

_received: list[int] = []


def _record(signum: int, frame: object) -> None:
    _received.append(signum)


def record_early(signals: tuple[int, ...] = PREEMPT_SIGNALS) -> None:
    """Record these signals from now on instead of dying of them (and one the launcher received
    before starting this rank)."""
    for s in signals:
        signal.signal(s, _record)
    inherited = os.environ.get(EARLY_SIGNAL_ENV, "")
    if inherited.isdigit() and int(inherited) in signals and not _received:
        _received.append(int(inherited))


def early_signal() -> int | None:
    """The first signal :func:`record_early` recorded, None if none."""
    return _received[0] if _received else None
