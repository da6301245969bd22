"""Shard fuzzer (issue 16): a real split written by the project's writer, damaged in seeded ways
(:mod:`fuzz_kinds`), each damaged copy read by the reader pretraining and evaluation use
(:class:`data_shards.read.ShardReader`) and by :func:`data_shards.verify.verify` (``posebert
shards verify``), in child processes with a memory limit and a per-mutation timeout.

Each mutation must end in one of these outcomes:

- ``intact``: every sample delivered, equal to the written one, nothing counted; verify passes;
- ``intact, verify flags``: the same, and verify names what no reader reads (a pickle member);
- ``counted``: what the reader could not deliver is counted (bad samples / shards, lost
  samples), every sample it delivered equals the written one, verify names the problem;
- ``refused``: a one-line ManifestError / ReaderError; verify names the problem;
- ``repeated``: a sample listed twice by a manifest that was rewritten to match is delivered
  twice, equal to the written one; verify names the repeated key;
- ``changed (undetectable)``: only for a payload byte flipped under a manifest whose hash was
  rewritten to match (a faulty writer): no reader can tell; the other samples are intact.

Anything else fails: an uncaught exception, a MemoryError or RecursionError anywhere (counted
or not), death by a signal, a hang, the pickle payload's marker file, a file created by the
reading, a delivered sample that differs from the written one, samples lost without a count,
verify passing where the reader loses or refuses something, a message of several lines.

    python tests/data_shards/fuzz_shards.py --count 1000 --out /tmp/fuzz.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
READERS = ({"batch_size": 1, "shuffle": False},
           {"batch_size": 2, "shuffle": True, "shuffle_buffer": 3})  # fmt: skip
"""Reader settings, alternating by mutation id (always drop_last=False: every sample once)."""
PARTS = ("frames", "masks", "pose3d", "pose2d", "K", "Rt", "det2d")
COUNTED = ("bad_samples", "bad_shards", "lost_samples")
ESCAPE = Path("/tmp/posebert-fuzz-escape")  # where the absolute member names point
FINE = ("intact", "intact, verify flags", "counted", "refused", "repeated",
        "changed (undetectable)")  # fmt: skip


# ----------------------------------------------------------------------- in the child


def _error(e: BaseException) -> str:
    where = traceback.extract_tb(e.__traceback__)[-1:] if e.__traceback__ else []
    at = f" at {Path(where[0].filename).name}:{where[0].lineno}" if where else ""
    return f"{type(e).__name__}: {e}{at}"


def _same(batch: dict, b: int, ref: dict) -> bool:
    import torch

    for name in PARTS:
        if (name in batch) != (name in ref):
            return False
        if name in ref and not torch.equal(batch[name][b], ref[name]):
            return False
    return batch["meta"][b] == ref["meta"]


def read(split: Path, config: dict, ref: dict | None) -> dict:
    """Everything ``ShardReader`` delivers from ``split``, compared with ``ref`` (key -> parts)."""
    from data_shards.manifest import ManifestError
    from data_shards.read import ReaderConfig, ReaderError, ShardReader

    out = {"status": "ok", "keys": [], "differ": [], "unknown": [], "errors": {}, "error": ""}
    try:
        cfg = ReaderConfig(str(split), drop_last=False, error_budget=10**6, **config)
        reader = ShardReader(cfg, 0, 1)
        for batch in reader:
            for b, key in enumerate(batch["keys"]):
                out["keys"].append(key)
                if ref is None:
                    continue
                if key not in ref:
                    out["unknown"].append(key)
                elif not _same(batch, b, ref[key]):
                    out["differ"].append(key)
        out["errors"] = {k: v for k, v in reader.errors.items() if v}
    except (ManifestError, ReaderError) as e:
        out["status"], out["error"] = "refused", f"{type(e).__name__}: {e}"
    except Exception as e:  # MemoryError, RecursionError, anything else: a crash
        out["status"], out["error"] = "crash", _error(e)
    return out


def reference(split: Path) -> dict:
    """key -> parts and meta of every sample, read from the pristine split."""
    from data_shards.read import ReaderConfig, ShardReader

    ref = {}
    for batch in ShardReader(ReaderConfig(str(split), batch_size=1, shuffle=False), 0, 1):
        ref[batch["keys"][0]] = {n: batch[n][0].clone() for n in PARTS if n in batch}
        ref[batch["keys"][0]]["meta"] = batch["meta"][0]
    return ref


def run_verify(split: Path) -> dict:
    from data_shards.manifest import ManifestError
    from data_shards.verify import verify

    try:
        return {"status": "ok", "problems": [str(p) for p in verify(split, progress=False)],
                "error": ""}  # fmt: skip
    except ManifestError as e:
        return {"status": "refused", "problems": [], "error": f"ManifestError: {e}"}
    except Exception as e:
        return {"status": "crash", "problems": [], "error": _error(e)}


def judge(r: dict, v: dict, warnings: list[str], keys: set[str], weak: set[str], split: Path
          ) -> tuple[str, list[str]]:  # fmt: skip
    """(outcome, why it fails) of one mutation; see the module docstring."""
    why = [f"{who} crashed: {res['error']}" for who, res in (("reader", r), ("verify", v))
           if res["status"] == "crash"]  # fmt: skip
    why += [f"{who} refused without naming the split or a file: {res['error'][:200]}"
            for who, res in (("reader", r), ("verify", v)) if res["status"] == "refused"
            and not any(name in res["error"] for name in (str(split), "manifest.json"))]
    lines = [r["error"], v["error"], *v["problems"], *warnings]
    why += ["hit MemoryError / RecursionError: " + t[:200] for t in lines
            if "MemoryError" in t or "RecursionError" in t]  # fmt: skip
    why += ["a message of several lines: " + repr(t[:200]) for t in lines if "\n" in t]
    counted = sum(r["errors"].get(k, 0) for k in COUNTED)
    missing = sorted(keys - set(r["keys"]))
    if missing:  # a shard the manifest does not list: the reader names the file and counts it
        counted += r["errors"].get("unlisted_shards", 0)
    repeats = sorted(k for k, n in Counter(r["keys"]).items() if n > 1)
    wrong = sorted(set(r["differ"]) - weak)
    if r["unknown"]:
        why.append(f"reader delivered samples the split never held: {r['unknown']}")
    if wrong:
        why.append(f"reader delivered samples that differ from the written ones: {wrong}")
    if r["status"] == "ok" and missing and not counted:
        why.append(f"reader lost samples without counting them: {missing}")
    if repeats and not any("key repeated" in p for p in v["problems"]):
        why.append(f"reader delivered {repeats} twice; verify did not name it")
    verify_clean = v["status"] == "ok" and not v["problems"]
    intact = r["status"] == "ok" and not (counted or missing or repeats or wrong or r["unknown"])
    if verify_clean and not intact:
        why.append(f"verify passes but the reader does not ({r['status']}, {r['errors']})")
    if why:
        return "FAIL", why
    if r["status"] == "refused":
        return "refused", why
    if counted:
        return "counted", why
    if repeats:
        return "repeated", why
    if r["differ"]:
        return "changed (undetectable)", why
    return ("intact" if verify_clean else "intact, verify flags"), why


def _tree(root: Path) -> set[str]:
    return {os.path.join(d, n) for d, dirs, files in os.walk(root) for n in dirs + files}


def limit_memory(gib: float) -> int:
    """Cap the address space at what the process maps now (torch's imports map gigabytes of
    it) plus ``gib``; returns the cap in bytes."""
    status = Path("/proc/self/status").read_text()
    now = int(next(line.split()[1] for line in status.splitlines()
                   if line.startswith("VmSize:"))) * 1024  # fmt: skip
    cap = now + int(gib * 1024**3)
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    return cap


def child(args: argparse.Namespace) -> None:
    import logging
    import pickle

    import torch

    torch.set_num_threads(1)
    from fuzz_kinds import apply
    from fuzz_mutations import Pristine, payload

    import data_shards.read
    import data_shards.verify  # noqa: F401  (imported before the memory cap)

    weaken = set(filter(None, args.weaken.split(",")))
    _weaken(weaken)
    cap = limit_memory(args.mem_gib)
    warnings: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            warnings.append(record.getMessage())

    log = logging.getLogger("data_shards")
    log.addHandler(Collect())
    log.propagate = False
    p, scratch = Pristine(args.pristine), Path(args.scratch)
    split, marker = scratch / "train", scratch / "MARKER"
    probe = scratch / "probe"
    pickle.loads(payload(str(probe))).close()  # the payload works when unpickled ...
    assert probe.exists(), "the pickle payload does not create its marker"
    probe.unlink()
    ref = reference(p.split)
    assert sorted(ref) == sorted(r["__key__"] for r in _raw_keys(p)), "reference read failed"
    specs = json.loads(Path(args.specs).read_text())
    with open(args.results, "a") as out:
        out.write(json.dumps({"child": os.getpid(), "memory_cap": cap}) + "\n")
        for spec in specs:
            out.write(json.dumps({"start": spec["id"]}) + "\n")
            out.flush()
            started = time.perf_counter()
            p.restore(split)
            detail, weak = apply(spec, p, split, str(marker))
            before = _tree(scratch)
            warnings.clear()
            if "hang" in weaken and spec["id"] == 0:
                time.sleep(3600)
            if "segv" in weaken and spec["id"] == 1:
                os.kill(os.getpid(), signal.SIGSEGV)
            r = read(split, READERS[spec["id"] % len(READERS)], ref)
            v = run_verify(split)
            outcome, why = judge(r, v, list(warnings), set(ref), weak, split)
            if marker.exists():  # ... but nothing here may unpickle it
                why.append("the pickle payload ran: marker file created")
                marker.unlink()
            created = sorted(_tree(scratch) - before)
            if created or ESCAPE.exists():
                why.append(f"reading created files: {created or [str(ESCAPE)]}")
            record = {**spec, "detail": detail, "outcome": "FAIL" if why else outcome,
                      "why": why, "seconds": round(time.perf_counter() - started, 4),
                      "reader": {"status": r["status"], "delivered": len(r["keys"]),
                                 "errors": r["errors"], "error": r["error"][:300],
                                 "warning": warnings[0][:300] if warnings else ""},
                      "verify": {"status": v["status"], "problems": len(v["problems"]),
                                 "first": (v["problems"] or [v["error"]])[0][:300]}}  # fmt: skip
            out.write(json.dumps(record) + "\n")
            out.flush()


def _weaken(weaken: set[str]) -> None:
    """Break the code under test on purpose (the tests that show the fuzzer can fail): "hash"
    skips the reader's sha256 check, "unpickle" makes verify unpickle .pyd/.pickle/.pkl
    members; "hang" and "segv" (in the loop above) stall or kill the child."""
    if "hash" in weaken:
        import data_shards.tario as tario

        check = tario.check_shard_file
        tario.check_shard_file = lambda path, sha256=None: check(path)
    if "unpickle" in weaken:
        import pickle

        import data_shards.verify as verify_module

        decode = verify_module._decode

        def unpickling(raw: dict, manifest):
            for ext in ("pyd", "pickle", "pkl"):
                if ext in raw:
                    try:
                        pickle.loads(raw[ext])
                    except Exception:  # the payload ran, or the bytes were no pickle
                        pass
            return decode(raw, manifest)

        verify_module._decode = unpickling


def _raw_keys(p) -> list[dict]:
    from data_shards.tario import iter_tar_samples

    return [r for name in p.names for r in iter_tar_samples(p.split / name)]


# ---------------------------------------------------------------------- in the parent


class _Child:
    """One child process working through a list of specs; its results file is read as it
    grows (a "start" line before each mutation says which one a hang or a death belongs to)."""

    def __init__(self, specs: list[dict], work: Path, n: int, args: list[str]):
        self.specs, self.current, self.pos, self.started = specs, None, 0, False
        (work / f"specs{n}.json").write_text(json.dumps(specs))
        self.results, self.log = work / f"results{n}.jsonl", work / f"child{n}.log"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
            [str(HERE), str(REPO), os.environ.get("PYTHONPATH", "")])}  # fmt: skip
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(
                [sys.executable, str(HERE / "fuzz_shards.py"), "--child", "--specs",
                 str(work / f"specs{n}.json"), "--results", str(self.results), *args],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=REPO)  # fmt: skip
        self.t = time.monotonic()

    def collect(self, results: dict, caps: set) -> None:
        if not self.results.exists():
            return
        with open(self.results) as f:
            f.seek(self.pos)
            while (line := f.readline()).endswith("\n"):
                self.pos += len(line.encode())
                rec = json.loads(line)
                if "memory_cap" in rec:
                    caps.add(rec["memory_cap"])
                elif "start" in rec:
                    self.current, self.started, self.t = rec["start"], True, time.monotonic()
                else:
                    results[rec["id"]], self.current, self.t = rec, None, time.monotonic()

    def tail(self) -> str:
        return " | ".join(self.log.read_text(errors="replace").strip().splitlines()[-3:])[-400:]


def run_fuzz(count: int = 1000, seed: int = 0, out: str | os.PathLike | None = None,
             jobs: int = 2, timeout_s: float = 30.0, mem_gib: float = 2.0,
             kinds: set[str] | None = None, weaken: str = "", startup_s: float = 300.0,
             keep: bool = False) -> dict:  # fmt: skip
    """Fuzz ``count`` mutations in ``jobs`` child processes; the summary (also written to
    ``out`` as JSON): outcome counts per kind and variant, every failure, timings."""
    from fuzz_kinds import make_specs
    from fuzz_mutations import Pristine, build_pristine

    start = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="posebert-fuzz-"))
    pristine = build_pristine(work / "pristine")
    specs = make_specs(Pristine(pristine), count, seed, kinds)
    results: dict[int, dict] = {}
    caps: set[int] = set()
    n, children = 0, []

    def spawn(chunk: list[dict]) -> None:
        nonlocal n
        n += 1
        scratch = work / f"scratch{n}"
        scratch.mkdir()
        args = ["--pristine", str(pristine), "--scratch", str(scratch), "--mem-gib",
                str(mem_gib), "--weaken", weaken]  # fmt: skip
        children.append(_Child(chunk, work, n, args))

    for i in range(jobs):
        if specs[i::jobs]:
            spawn(specs[i::jobs])
    while children:
        time.sleep(0.05)
        for c in list(children):
            c.collect(results, caps)
            rc = c.proc.poll()
            limit = timeout_s if c.started else startup_s
            hung = rc is None and time.monotonic() - c.t > limit
            if rc is None and not hung:
                continue
            if hung:
                c.proc.kill()
            rc = c.proc.wait()
            c.collect(results, caps)
            children.remove(c)
            left = [s for s in c.specs if s["id"] not in results]
            if not left:
                continue
            if c.current is None:  # died between mutations or before the first: our bug
                raise RuntimeError(f"fuzz child exited {rc} outside a mutation: {c.tail()}")
            spec = next(s for s in c.specs if s["id"] == c.current)
            what = f"hang: no answer in {limit:g} s" if hung else f"child died: exit {rc}"
            results[spec["id"]] = {**spec, "outcome": "FAIL", "why": [f"{what}: {c.tail()}"],
                                   "detail": "", "reader": {}, "verify": {}}  # fmt: skip
            if left := [s for s in left if s["id"] != spec["id"]]:
                spawn(left)
    summary = summarize([results[s["id"]] for s in specs], time.monotonic() - start)
    summary.update(seed=seed, jobs=jobs, timeout_s=timeout_s, memory_cap_bytes=sorted(caps),
                   memory_headroom_gib=mem_gib, weaken=weaken)  # fmt: skip
    if out is not None:
        Path(out).write_text(json.dumps(summary, indent=1) + "\n")
    if keep:
        summary["workdir"] = str(work)
    else:
        shutil.rmtree(work, ignore_errors=True)
    return summary


def summarize(records: list[dict], seconds: float) -> dict:
    by_kind: dict[str, Counter] = {}
    by_variant: dict[str, dict[str, Counter]] = {}
    examples: dict[str, dict] = {}
    for rec in records:
        kind, variant, outcome = rec["kind"], rec["variant"] or "-", rec["outcome"]
        by_kind.setdefault(kind, Counter())[outcome] += 1
        by_variant.setdefault(kind, {}).setdefault(variant, Counter())[outcome] += 1
        examples.setdefault(f"{kind} / {outcome}", {
            k: rec.get(k) for k in ("id", "variant", "rehash", "detail", "reader", "verify")})
    mutation_s = sorted(rec.get("seconds", 0) for rec in records)
    return {
        "count": len(records), "seconds": round(seconds, 1),
        "median_mutation_s": mutation_s[len(mutation_s) // 2] if mutation_s else 0,
        "outcomes": dict(Counter(rec["outcome"] for rec in records).most_common()),
        "kinds": {k: dict(c.most_common()) for k, c in by_kind.items()},
        "variants": {k: {v: dict(c) for v, c in vs.items()} for k, vs in by_variant.items()},
        "failures": [rec for rec in records if rec["outcome"] == "FAIL"],
        "examples": examples,
    }  # fmt: skip


def table(summary: dict) -> str:
    """Outcome counts per kind, as a Markdown table."""
    cols = [c for c in (*FINE, "FAIL") if c in summary["outcomes"]]
    lines = ["| kind | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for kind, c in summary["kinds"].items():
        lines.append(f"| {kind} | " + " | ".join(str(c.get(o, 0)) for o in cols) + " |")
    total = summary["outcomes"]
    lines.append("| **all** | " + " | ".join(f"**{total.get(o, 0)}**" for o in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--count", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", help="summary JSON")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=30.0, help="seconds per mutation")
    ap.add_argument("--mem-gib", type=float, default=2.0, help="address space over the imports")
    ap.add_argument("--weaken", default="", help=argparse.SUPPRESS)
    for hidden in ("--child", "--specs", "--results", "--pristine", "--scratch"):
        ap.add_argument(hidden, action="store_true" if hidden == "--child" else None,
                        help=argparse.SUPPRESS)  # fmt: skip
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    summary = run_fuzz(args.count, args.seed, args.out, args.jobs, args.timeout, args.mem_gib)
    print(table(summary))
    print(f"{summary['count']} mutations in {summary['seconds']} s; "
          f"{len(summary['failures'])} failures")  # fmt: skip
    for rec in summary["failures"][:20]:
        print(f"FAIL {rec['id']} {rec['kind']} / {rec['variant']} [{rec['rehash']}] "
              f"{rec['detail']}: {'; '.join(rec['why'])}")  # fmt: skip
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.path[:0] = [str(HERE), str(REPO)]
    sys.exit(main())
