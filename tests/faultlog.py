"""The fault log behind docs/reliability.md (issue "Faults and hostile input", item 5).

A test that backs a row of the page carries the ``fault`` marker, with the page's section, the
fault and how the test injects it (one short sentence each), and records through the ``observed``
fixture what it saw happen, from the values it got at run time::

    @pytest.mark.fault("Shards and the reader", "a FIFO in place of a shard file",
                       injected="os.mkfifo at the shard's path")
    def test_a_fifo_in_place_of_a_shard_is_refused_without_blocking(split, caplog, observed):
        ...
        observed(f"bad_shards={reader.errors['bad_shards']}: {warnings_of(caplog)[0]}")

Tests sharing a row give the same area and fault; parametrized tests are several cases of one row.
With ``--fault-log PATH`` every case of a marked test appends one JSON line to PATH (nodeid, area,
fault, injected, observed lines, outcome and reason, duration), cases deselected by ``-m`` too;
``tests/faults_report.py`` turns the log into the page (``make reliability``).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import re
import shlex
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import pytest

MARKER = "fault"
OBSERVED = pytest.StashKey[list]()
REPORTS = pytest.StashKey[list]()
MAX_LINE = 2000  # characters kept of one observed line
DISTRIBUTIONS = ("torch", "deepspeed", "faiss-cpu", "faiss-gpu", "webdataset", "pytest")


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--fault-log",
        metavar="PATH",
        default=None,
        help="append one JSON line per case of a test marked 'fault' to PATH",
    )


def fault_of(item: pytest.Item) -> dict | None:
    """The ``fault`` marker of ``item`` as {area, fault, injected}; None when unmarked. Raises
    ValueError naming what is wrong with the marker."""
    marks = list(item.iter_markers(MARKER))
    if not marks:
        return None
    if len(marks) > 1:
        raise ValueError("more than one 'fault' marker (a test backs one row)")
    mark = marks[0]
    names = ("area", "fault", "injected")
    if len(mark.args) > len(names) or set(mark.kwargs) - set(names):
        raise ValueError("takes fault(area, fault, injected=...)")
    fields = {**dict(zip(names, mark.args, strict=False)), **mark.kwargs}
    for name in names:
        value = fields.get(name)
        if not isinstance(value, str) or not value.strip() or "\n" in value:
            raise ValueError(f"{name} must be one non-empty line, got {value!r}")
    from faults_report import AREAS  # the page's sections, in order

    if fields["area"] not in AREAS:
        raise ValueError(f"area {fields['area']!r} is not one of {list(AREAS)}")
    return fields


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every marked test is checked at collection, whatever runs: a bad marker, or a marked test
    that does not ask for ``observed``, stops the session naming the test."""
    problems = []
    for item in items:
        try:
            fault = fault_of(item)
        except ValueError as e:
            problems.append(f"{item.nodeid}: @pytest.mark.fault: {e}")
            continue
        if fault is not None and "observed" not in getattr(item, "fixturenames", ()):
            problems.append(f"{item.nodeid}: marked 'fault' but does not use the 'observed' "
                            "fixture to record what happened")  # fmt: skip
    if problems:
        raise pytest.UsageError("\n".join(problems))


@pytest.fixture
def observed(request: pytest.FixtureRequest, tmp_path_factory) -> Callable[[object], None]:
    """``observed(line)`` records one line of what the test saw happen (a message, an exit
    code, counts), for the fault log. Paths under pytest's temporary directory are written as
    TMP/..., so that cases differing only in their folder read the same."""
    lines = request.node.stash.setdefault(OBSERVED, [])
    base = re.escape(str(tmp_path_factory.getbasetemp()))
    temp = re.compile(base + r"/[^/\s'\":;,()\[\]]+")

    def record(line: object) -> None:
        lines.append(temp.sub("TMP", str(line))[:MAX_LINE])

    return record


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    item.stash.setdefault(REPORTS, []).append(report)
    return report


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None):
    result = yield
    path = item.config.getoption("fault_log")
    fault = fault_of(item) if path else None
    if fault is not None:
        reports = item.stash.get(REPORTS, [])
        outcome, reason = _outcome(reports)
        _append(path, {"record": "case", "nodeid": item.nodeid, **fault,
                       "observed": item.stash.get(OBSERVED, []), "outcome": outcome,
                       "reason": reason,
                       "duration": round(sum(r.duration for r in reports), 3)})  # fmt: skip
    return result


def pytest_deselected(items: list[pytest.Item]) -> None:
    if not items or not (path := items[0].config.getoption("fault_log")):
        return
    option = items[0].config.option
    given = [f"{flag} {value!r}" for flag, value in (("-m", option.markexpr),
                                                      ("-k", option.keyword)) if value]  # fmt: skip
    for item in items:
        if (fault := fault_of(item)) is not None:
            _append(path, {"record": "case", "nodeid": item.nodeid, **fault, "observed": [],
                           "outcome": "deselected", "reason": "not selected by " + " ".join(given),
                           "duration": 0.0})  # fmt: skip


def _outcome(reports: list[pytest.TestReport]) -> tuple[str, str]:
    """passed / failed / skipped (or xfailed) and why, from the setup, call and teardown
    reports of one case."""
    for r in reports:
        if r.failed:
            crash = getattr(r.longrepr, "reprcrash", None)
            text = crash.message if crash is not None else str(r.longrepr)
            where = "" if r.when == "call" else f"error in {r.when}: "
            text = where + text.strip()
            if len(text) > MAX_LINE:  # the first line says what, the last ones often why
                text = text[: MAX_LINE // 4] + "\n...\n" + text[-MAX_LINE // 2 :]
            return "failed", text
    for r in reports:
        if r.skipped:
            if hasattr(r, "wasxfail"):
                return "xfailed", str(r.wasxfail)
            reason = r.longrepr[2] if isinstance(r.longrepr, tuple) else str(r.longrepr)
            return "skipped", str(reason).removeprefix("Skipped: ")
    return "passed", ""


def _append(path: str, record: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------- the session's own lines


def machine() -> dict:
    """CPU model, cores, Python and the versions of the libraries the faults involve."""
    model = ""
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo.splitlines()
                      if line.startswith("model name")), "")  # fmt: skip
    except OSError:
        pass
    versions = {}
    for name in DISTRIBUTIONS:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"cpu": model or platform.processor() or platform.machine(),
            "cores": os.cpu_count(), "usable_cores": usable, "system": platform.platform(),
            "python": platform.python_version(), "versions": versions}  # fmt: skip


def pytest_sessionstart(session: pytest.Session) -> None:
    if path := session.config.getoption("fault_log"):
        session.config.stash[_STARTED] = time.monotonic()
        args = session.config.invocation_params.args
        _append(path, {"record": "session", "started": _now(),
                       "command": shlex.join(["pytest", *args]), **machine()})  # fmt: skip


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    if path := session.config.getoption("fault_log"):
        started = session.config.stash.get(_STARTED, time.monotonic())
        _append(path, {"record": "end", "finished": _now(), "exitstatus": int(exitstatus),
                       "seconds": round(time.monotonic() - started, 1)})  # fmt: skip


_STARTED = pytest.StashKey[float]()


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).astimezone().isoformat(timespec="seconds")
