"""docs/reliability.md from a run of the fault suite (issue "Faults and hostile input", item 5).

Reads the JSON lines ``pytest --fault-log LOG`` appends (tests/faultlog.py) and the summary
``tests/data_shards/fuzz_shards.py --out FUZZ_JSON`` writes, and writes the page: the command,
date, machine and totals, one table per area (fault | how it is injected | observed outcome |
cases), failed cases shown as failed, then the shard fuzzer's section. ``make reliability`` runs
all three steps::

    python tests/faults_report.py --log LOG --fuzz FUZZ_JSON --out docs/reliability.md
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent

AREAS = {  # the page's sections, in order: the text before and after each table
    "Shards and the reader": (
        '"Lost" counts the samples a reader could not deliver; everything else in the epoch is '
        "delivered unchanged.", ""),
    "Writing and verifying": ("", ""),
    "Ingest": ("", ""),
    "Command line": ("", ""),
    "Pretraining": (
        "Every multi-process case runs in a subprocess with a timeout, so a hang fails the test.",
        ""),
    "Evaluation": ("", ""),
    "Evaluation cache: SIGKILL and several ranks": (
        "A child process runs `embed_split_cached` with an embedder whose cache file is ~20 MB, "
        "and is SIGKILLed; then the cache is inspected and the run repeated in-process.", ""),
    "Fine-tuning heads and the demo": ("", ""),
    "Lifting heads and the ablation": ("", ""),
    "SLURM": (
        "`tests/integration/test_slurm.py` runs against a real two-node Slurm cluster on "
        "loopback (`tests/localcluster.py`, marker `slurm`); where none can be started it is "
        "skipped, with the reason below.", ""),
    "Shard fuzzer": ("What it found, each fixed with a regression test, and the check that the "
                     "fuzzer itself fails a broken reader:", ""),
}  # fmt: skip

FUZZER = """\
Each run takes real shards written by the project's writer (3 shards x 2 samples, 2 views x 2
frames, 24x16 px, every part) and damages them in 1,000 seeded ways (20,000 under `-m slow`).
Every damaged copy is read by `ShardReader` and by `verify()` in child processes, with the
address space capped at what the imports map plus 2 GiB and a 30 s watchdog per mutation. A
mutation passes only if every delivered sample equals the written one and any loss is counted
or refused in one line naming the file. It fails on a crash, a MemoryError or RecursionError
(even one caught and counted), a signal, a hang, the pickle marker file appearing, a file
created by reading, a wrong or unknown sample, an uncounted loss, a message of several lines,
or `verify` passing where the reader loses data. A test breaks the reader on purpose inside the
child (no hash check, verify unpickling, a hang, a segfault) and checks the fuzzer reports each.
Run it by hand: `python tests/data_shards/fuzz_shards.py --count N --out FILE` (a table and a
JSON summary)."""

LEGEND = """\
Outcomes ("intact": every sample delivered unchanged; "intact, verify flags": intact, and verify
names the damage; "counted": the loss counted and named; "refused": one line naming the manifest
or split; "repeated": an identical sample delivered twice, from a manifest rewritten to list the
same sample twice; "changed (undetectable)": a payload flip under a manifest whose hash was
rewritten to match, which no reader can detect, allowed for that kind only; "FAIL": anything
else):"""

RUN = ("passed", "failed")  # outcomes of a case that ran; skipped / deselected ones did not
MAX_CELL = 400  # characters of one observed line shown in a cell


# ----------------------------------------------------------------------------- reading


def read_log(path: str | os.PathLike) -> tuple[list[dict], list[dict], list[dict]]:
    """(sessions, session ends, cases) of a fault log; a case seen twice keeps its last line."""
    sessions, ends, cases = [], [], {}
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not a JSON line ({e})") from None
        kind = rec.get("record")
        if kind == "session":
            sessions.append(rec)
        elif kind == "end":
            ends.append(rec)
        elif kind == "case":
            cases.pop(rec["nodeid"], None)
            cases[rec["nodeid"]] = rec
        else:
            raise ValueError(f"{path}:{n}: unknown record {kind!r}")
    return sessions, ends, list(cases.values())


def rows_of(cases: list[dict]) -> dict[str, dict[str, dict]]:
    """area -> fault -> {"injected": [...], "cases": [...]}, in the log's order."""
    areas: dict[str, dict[str, dict]] = {}
    for case in cases:
        row = areas.setdefault(case["area"], {}).setdefault(
            case["fault"], {"injected": [], "cases": []}
        )
        if case["injected"] not in row["injected"]:
            row["injected"].append(case["injected"])
        row["cases"].append(case)
    return areas


def totals(cases: list[dict]) -> dict[str, int]:
    count = {o: sum(c["outcome"] == o for c in cases) for o in
             ("passed", "failed", "skipped", "xfailed", "deselected")}  # fmt: skip
    count["run"] = count["passed"] + count["failed"]
    return count


# ----------------------------------------------------------------------------- cells


def _cell(text: str) -> str:
    """Text for a Markdown table cell: one line, pipes escaped."""
    return " ".join(str(text).split()).replace("|", "\\|")


def _code(text: str) -> str:
    text = " ".join(str(text).split())
    if len(text) > MAX_CELL:
        text = text[: MAX_CELL - 1] + "…"
    return "`" + text.replace("`", "'").replace("|", "\\|") + "`"


def failure_text(reason: str) -> str:
    """A failure's first line, and its last informative one (an assertion message often ends
    with the output that explains it; pytest's own "assert ..." / "+ where" lines do not)."""
    lines = [line.strip() for line in reason.splitlines() if line.strip()]
    if not lines:
        return "failed"
    last = next((line for line in reversed(lines[1:])
                 if not line.startswith(("assert ", "+", "where ", "and "))), "")  # fmt: skip
    return f"{lines[0]} … {last}" if last else lines[0]


def _case_name(nodeid: str) -> str:
    """``test_x[param]`` of ``path::test_x[param]``."""
    return nodeid.rsplit("::", 1)[-1]


def _outcome_text(case: dict) -> str:
    lines = case["observed"]
    return " · ".join(" ".join(line.split()) for line in lines)


def observed_cell(cases: list[dict]) -> str:
    """Failures first (never hidden), then a representative observed outcome and how many
    distinct outcomes the cases that passed recorded; or why nothing ran."""
    failed = [c for c in cases if c["outcome"] == "failed"]
    passed = [c for c in cases if c["outcome"] == "passed"]
    parts = [f"**FAILED** {_case_name(c['nodeid'])}: {_code(failure_text(c['reason']))}"
             + (f" (observed: {_code(_outcome_text(c))})" if c["observed"] else "")
             for c in failed[:3]]  # fmt: skip
    if len(failed) > 3:
        parts.append(f"**and {len(failed) - 3} more failed**")
    if passed:
        shown = next((c for c in passed if c["observed"]), passed[0])
        text = " ".join(_code(line) for line in shown["observed"]) or "*(nothing recorded)*"
        distinct = len({_outcome_text(c) for c in passed})
        if len(passed) > 1:
            text += (f" ({distinct} distinct outcomes in {len(passed)} cases)" if distinct > 1
                     else f" (the same in all {len(passed)} cases)")  # fmt: skip
        parts.append(text)
    if not failed and not passed:
        reasons = sorted({f"{c['outcome']}: {c['reason']}" for c in cases})
        parts.append("*not run* (" + "; ".join(_cell(r) for r in reasons) + ")")
    return "; ".join(parts)


def cases_cell(cases: list[dict]) -> str:
    n = totals(cases)
    text = f"{n['passed']}/{n['run']}"
    if n["failed"]:
        text += f", **{n['failed']} failed**"
    if n["skipped"] + n["xfailed"]:
        text += f", {n['skipped'] + n['xfailed']} skipped"
    if n["deselected"]:
        text += f", {n['deselected']} not run"
    return text


def table(rows: dict[str, dict]) -> list[str]:
    lines = ["| fault | how it is injected | observed outcome | cases (passed/run) |",
             "|---|---|---|---|"]  # fmt: skip
    for fault, row in rows.items():
        lines.append(f"| {_cell(fault)} | {_cell('; '.join(row['injected']))} | "
                     f"{observed_cell(row['cases'])} | {cases_cell(row['cases'])} |")  # fmt: skip
    return lines


def _test_files(rows: dict[str, dict]) -> str:
    files = dict.fromkeys(c["nodeid"].split("::")[0] for r in rows.values() for c in r["cases"])
    return ", ".join(f"`{f}`" for f in files)


# ----------------------------------------------------------------------------- the page


def header(sessions: list[dict], ends: list[dict], cases: list[dict], fuzz: dict | None,
           fuzz_path: str | None, command: str, argv: list[str]) -> list[str]:  # fmt: skip
    first = sessions[0] if sessions else {}
    lines = ["# Reliability: faults tried and what happened", "",
             f"Generated by `{command}` from a run of the fault suite; do not edit by hand "
             "(run it again to regenerate the page). Each row is backed by tests marked "
             "`@pytest.mark.fault(area, fault, injected=...)`; the observed column is what "
             "those tests recorded at run time (`observed(...)`, tests/faultlog.py), with paths "
             "under pytest's temporary directory written as TMP.", ""]  # fmt: skip
    for i, s in enumerate(sessions):
        end = ends[i] if i < len(ends) else {}
        took = f"{end['seconds']:,.0f} s, exit status {end['exitstatus']}" if end else "no end"
        lines.append(f"- tests: `{s['command']}` (started {s['started']}; {took})")
    if fuzz is not None:
        lines.append(f"- fuzzer: `python tests/data_shards/fuzz_shards.py --count "
                     f"{fuzz['count']} --seed {fuzz['seed']} --jobs {fuzz['jobs']} --out "
                     f"{fuzz_path}` ({fuzz['seconds']:,.0f} s)")  # fmt: skip
    lines += [f"- page: `{shlex.join(['python', *argv])}`", ""]
    if first:
        v = first.get("versions", {})
        faiss = v.get("faiss-cpu") or v.get("faiss-gpu") or "-"
        lines.append(f"Machine: {first['cpu']}, {first['cores']} cores "
                     f"({first.get('usable_cores')} usable), {first['system']}; Python "
                     f"{first['python']}, torch {v.get('torch', '-')}, DeepSpeed "
                     f"{v.get('deepspeed', '-')}, FAISS {faiss}, webdataset "
                     f"{v.get('webdataset', '-')}, pytest {v.get('pytest', '-')}.")  # fmt: skip
    n = totals(cases)
    text = (
        f"Totals: {n['run']} cases run: {n['passed']} passed, {n['failed']} failed; "
        f"{n['skipped'] + n['xfailed']} skipped"
    )
    if n["deselected"]:
        text += (
            f"; {n['deselected']} not run (marked `slow`, `gpu` or `multigpu`: "
            "`make reliability SLOW=1` runs the slow ones)"
        )
    if fuzz is not None:
        text += f". Shard fuzzer: {fuzz['count']:,} mutations, {len(fuzz['failures'])} failures"
    return [*lines, "", text + ".", ""]


def section(area: str, rows: dict[str, dict]) -> list[str]:
    intro, outro = AREAS.get(area, ("", ""))
    lines = [f"## {area}", ""]
    if rows:
        lines += [f"Tests: {_test_files(rows)}.", ""]
    if intro:
        lines += [intro, ""]
    lines += [*table(rows), ""] if rows else ["No case of this area is in the log.", ""]
    return lines + ([outro, ""] if outro else [])


def fuzzer_section(fuzz: dict | None, fuzz_date: str, cores: str, rows: dict) -> list[str]:
    lines = ["## Shard fuzzer (`tests/data_shards/test_fuzz_shards.py`)", "", FUZZER, ""]
    if fuzz is None:
        lines += ["The fuzzer was not run for this page (no `--fuzz` summary given).", ""]
    else:
        sys.path.insert(0, str(HERE / "data_shards"))
        from fuzz_shards import table as fuzz_table  # the script's own table

        failures = fuzz["failures"]
        lines += [f"{fuzz['count']:,} run (seed {fuzz['seed']}), {fuzz['jobs']} processes on "
                  f"{cores}, {fuzz_date}: {len(failures)} failures in {fuzz['seconds']:,} s "
                  f"(median {fuzz['median_mutation_s']} s a mutation).", "", LEGEND, "",
                  fuzz_table(fuzz), ""]  # fmt: skip
        for f in failures:
            lines.append(f"- **FAIL** {f['id']} {_cell(f['kind'])} / {_cell(f['variant'])} "
                         f"[{f.get('rehash')}] {_cell(f.get('detail', ''))}: "
                         f"{_code('; '.join(f['why']))}")  # fmt: skip
        if failures:
            lines.append("")
    intro, outro = AREAS["Shard fuzzer"]
    if rows:
        lines += [intro, "", *table(rows), ""]
    return lines + [outro, ""]


def render(log: str | os.PathLike, fuzz_path: str | None = None, command: str | None = None,
           argv: list[str] | None = None) -> str:  # fmt: skip
    """The page, from a fault log and (optionally) a fuzzer summary."""
    argv = list(argv if argv is not None else sys.argv)
    sessions, ends, cases = read_log(log)
    fuzz = json.loads(Path(fuzz_path).read_text()) if fuzz_path else None
    areas = rows_of(cases)
    lines = header(sessions, ends, cases, fuzz, fuzz_path, command or shlex.join(
        ["python", *argv]), argv)  # fmt: skip
    for area in [*AREAS, *(a for a in areas if a not in AREAS)]:
        if area != "Shard fuzzer":
            lines += section(area, areas.get(area, {}))
    first = sessions[0] if sessions else {}
    cores = f"{first['cores']} cores" if first else "this machine"
    fuzz_date = ""
    if fuzz_path:
        stamp = dt.datetime.fromtimestamp(Path(fuzz_path).stat().st_mtime, dt.timezone.utc)
        fuzz_date = stamp.astimezone().strftime("%Y-%m-%d")
    lines += fuzzer_section(fuzz, fuzz_date, cores, areas.get("Shard fuzzer", {}))
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--log", required=True, help="the JSON lines of pytest --fault-log")
    ap.add_argument("--fuzz", help="the JSON summary of fuzz_shards.py --out")
    ap.add_argument("--out", required=True, help="the page to write (docs/reliability.md)")
    ap.add_argument("--command", help="the command named as the page's source "
                                      "(default: this one)")  # fmt: skip
    args = ap.parse_args(argv)
    shown = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    page = render(args.log, args.fuzz, args.command, shown)
    tmp = Path(args.out).with_name(Path(args.out).name + ".tmp")
    tmp.write_text(page)
    os.replace(tmp, args.out)
    cases = read_log(args.log)[2]
    n = totals(cases)
    print(f"{args.out}: {n['run']} cases run, {n['passed']} passed, {n['failed']} failed, "
          f"{n['skipped'] + n['xfailed']} skipped, {n['deselected']} not run")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
