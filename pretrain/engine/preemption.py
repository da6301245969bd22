"""Preemption: signal handlers that only set a flag; the loop acts on it at a step boundary.

Under SLURM, saving inside a handler fails intermittently, and SLURM may deliver the
warning signal to one task before another. So a handler records the signal and returns; at the
next step boundary all ranks agree (one all_reduce, :func:`pretrain.engine.dist.all_reduce_flag`)
that one of them was signalled, write one checkpoint together and exit with
:data:`pretrain.engine.loop.EXIT_REQUEUE`, on which the SLURM scripts requeue the job.
"""

from __future__ import annotations

import signal
import types
from collections.abc import Iterable

from pretrain.signals import PREEMPT_SIGNALS, early_signal

DEFAULT_SIGNALS = PREEMPT_SIGNALS


class PreemptionFlag:
    """Install with ``with PreemptionFlag() as flag:``; ``flag.signum`` is the first signal
    received (None if none). The previous handlers are restored on exit."""

    def __init__(self, signals: Iterable[int] = DEFAULT_SIGNALS):
        self.signals = tuple(signals)
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def _handler(self, signum: int, frame: types.FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def set(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""

    def ignore_from_now(self) -> None:
        """Ignore these signals for the rest of the process (once it is exiting anyway); leaving
        the ``with`` block then restores nothing, so no default handler (a KeyboardInterrupt,
        death by SIGTERM) is back in force for even an instant before the process exits."""
        for s in self.signals:
            signal.signal(s, signal.SIG_IGN)
        self._previous.clear()

    def __enter__(self) -> PreemptionFlag:
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        early = early_signal()  # received while the process was still importing
        if self.signum is None and early is not None and early in self.signals:
            self.signum = early
        return self

    def __exit__(self, *exc: object) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
