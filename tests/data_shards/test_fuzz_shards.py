"""The shard fuzzer (issue 16, item 2) in the test run, the tests that show it can fail, and the
bugs it found, each pinned by its own regression test."""

from __future__ import annotations

import json
import shutil
import time

import pytest
from fuzz_kinds import KINDS
from fuzz_mutations import KEYS, build_pristine, pack
from fuzz_shards import FINE, run_fuzz, table
from test_bad_input import members, rehash

from data_shards.manifest import MAX_SHARD_SAMPLES, Manifest, ManifestError
from data_shards.read import ErrorBudgetExceeded, ReaderConfig, ReaderError, ShardReader
from data_shards.stages import BatchSizes, Plan
from data_shards.verify import verify
from data_shards.write import WriterConfig

AREA = "Shard fuzzer"  # of docs/reliability.md (tests/faultlog.py)


def _report(summary: dict, out) -> str:
    lines = [table(summary), f"{summary['count']} mutations in {summary['seconds']} s "
             f"({summary['jobs']} processes); summary: {out}"]  # fmt: skip
    lines += [f"FAIL {f['id']} {f['kind']} / {f['variant']} [{f['rehash']}] {f['detail']}: "
              f"{'; '.join(f['why'])[:500]}" for f in summary["failures"][:20]]  # fmt: skip
    return "\n".join(lines)


def _check(summary: dict, count: int) -> None:
    assert summary["count"] == count
    assert not summary["failures"], "\n".join(
        f"{f['kind']} / {f['variant']} [{f['rehash']}] {f['detail']}: {f['why']}"
        for f in summary["failures"][:10])  # fmt: skip
    assert set(summary["kinds"]) == set(KINDS)  # every kind was tried ...
    assert set(summary["outcomes"]) <= set(FINE)
    for outcome in ("intact", "intact, verify flags", "counted", "refused", "repeated"):
        assert summary["outcomes"].get(outcome, 0) > 0, outcome  # ... and every outcome seen
    cuts = summary["kinds"]["truncate at a 512-byte boundary"]
    assert sum(cuts.values()) == 3 * 60  # every boundary of the 3 shards of 30720 bytes
    undetectable = sum(c.get("changed (undetectable)", 0) for k, c in summary["kinds"].items()
                       if k != "payload bit flip, manifest rehashed")  # fmt: skip
    assert undetectable == 0


@pytest.mark.timeout(600)
def test_1000_mutations_of_real_shards(tmp_path):
    """Every mutation is read intact, counted or refused in one line, by the reader and verify
    alike; nothing crashes, hangs, unpickles or hands out a wrong sample (~40-90 s)."""
    out = tmp_path / "fuzz-1000.json"
    summary = run_fuzz(1000, seed=0, out=out, jobs=2)
    print(_report(summary, out))
    _check(summary, 1000)


@pytest.mark.slow
@pytest.mark.timeout(3600)
def test_20000_mutations_of_real_shards(tmp_path):
    out = tmp_path / "fuzz-20000.json"
    summary = run_fuzz(20_000, seed=1, out=out, jobs=2)
    print(_report(summary, out))
    _check(summary, 20_000)


@pytest.mark.fault(AREA, "the code under test broken on purpose inside the fuzzer's child: no "
                   "hash check, verify unpickling, a hang, a segfault",
                   injected="fuzz_shards --weaken hash,unpickle,hang,segv on 30 "
                   "mutations")  # fmt: skip
@pytest.mark.timeout(300)
def test_the_fuzzer_fails_a_broken_reader_and_a_hang_or_crash(observed):
    """The same run with the code under test broken on purpose: no hash check in the reader
    (bit rot reaches training), verify unpickling members, a hang, a segfault."""
    summary = run_fuzz(30, seed=2, jobs=1, timeout_s=4,
                       kinds={"payload bit flip", "pickle member"},
                       weaken="hash,unpickle,hang,segv")  # fmt: skip
    why = {f["id"]: " ".join(f["why"]) for f in summary["failures"]}
    assert why[0].startswith("hang: no answer in 4 s")
    assert why[1].startswith("child died: exit -11")
    assert any("differ from the written ones" in w for w in why.values())
    assert any("marker file created" in w for w in why.values())
    assert summary["count"] == 30  # the children that hung or died were replaced
    kinds = sorted({w.split(":")[0] for w in why.values()})
    observed(f"{len(why)} of {summary['count']} mutations failed: " + "; ".join(kinds))


# ------------------------------------------------------------- bugs the fuzzer found


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    return build_pristine(tmp_path_factory.mktemp("fuzzed"))  # 3 shards of 2 samples


@pytest.fixture
def split(pristine, tmp_path):
    return shutil.copytree(pristine, tmp_path / "train")


def _manifest(split, edit):
    d = json.loads((split / "manifest.json").read_text())
    edit(d)
    (split / "manifest.json").write_text(json.dumps(d))


def _read(split, **kw):
    cfg = ReaderConfig(str(split), **{"shuffle": False, "drop_last": False, **kw})
    reader = ShardReader(cfg, 0, 1)
    return [k for b in reader for k in b["keys"]], reader


def _lower_count(d, i=2):
    d["shards"][i]["samples"], d["shards"][i]["actions"] = 1, {"walk": 1}
    d["samples"] -= 1


@pytest.mark.fault(AREA, "a manifest listing fewer samples than the last shard holds, read with "
                   "no shuffle buffer (evaluation)", injected="shard 2 listed with 1 of its 2 "
                   "samples; batches of 1 or 2, 0 or 2 workers")  # fmt: skip
@pytest.mark.timeout(120)
@pytest.mark.parametrize("batch_size,workers", [(1, 0), (2, 0), (1, 2)])
def test_a_count_below_the_last_shards_is_counted_without_a_shuffle(split, caplog, batch_size,
                                                                   workers,
                                                                   observed):  # fmt: skip
    """Was: without a shuffle buffer (evaluation) the consumer stopped pulling after its planned
    samples, so the check after the last sample of a worker's last shard never ran and the
    sample past the count was dropped with no error."""
    _manifest(split, _lower_count)
    keys, reader = _read(split, batch_size=batch_size, num_workers=workers,
                         start_method="fork")  # fmt: skip
    assert sorted(keys) == KEYS[:5] and reader.errors["bad_shards"] == 1
    assert reader.errors["lost_samples"] == 0
    if workers == 0:
        assert "more samples than the manifest's 1" in caplog.text
    said = [r.getMessage() for r in caplog.records if r.name.startswith("data_shards")]
    observed(f"{len(keys)} delivered, bad_shards={reader.errors['bad_shards']}"
             + (f": {said[0]}" if said else ""))  # fmt: skip


@pytest.mark.fault(AREA, "a sample key holding a newline and terminal escapes",
                   injected="a member named 'k0002\\nFAKE\\x1b[2J.meta.json' in shard "
                   "1")  # fmt: skip
def test_reader_warnings_are_one_line_whatever_a_key_holds(split, caplog, observed):
    """Was: the reader logged a tar's key verbatim, so a member named ``k\\n...`` or with
    terminal escapes forged or hid log lines (verify already made its lines printable)."""
    path = split / "shard-000001.tar"
    items = members(path)
    items.insert(3, ("k0002\nFAKE\x1b[2J.meta.json", b"{}"))
    path.write_bytes(pack(items))
    rehash(split)
    keys, reader = _read(split)
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("data_shards")]
    assert lines and reader.errors["bad_samples"] + reader.errors["bad_shards"] >= 1
    for line in lines:
        assert "\n" not in line and "\x1b" not in line and "shard-000001.tar" in line
    observed(f"{len(lines)} warning line(s): {lines[0]}")


@pytest.mark.fault(AREA, "a shard listed with 0 samples, or with more than 65,536 (10^12)",
                   injected="shards[1].samples of the manifest set to each")  # fmt: skip
@pytest.mark.parametrize("count", [0, MAX_SHARD_SAMPLES + 1, 10**12])
def test_a_shard_count_of_0_or_past_the_limit_is_refused_naming_the_field(split, count,
                                                                         observed):  # fmt: skip
    """Was: a shard listed with 0 samples was never opened (its samples silently missing from
    every epoch); one listed with 10**12 made the reader allocate its batch plan (MemoryError,
    or the OOM killer without a memory limit)."""

    def lie(d):
        d["shards"][1]["samples"] = count
        del d["shards"][1]["actions"], d["samples"]

    _manifest(split, lie)
    with pytest.raises(ManifestError, match=r"manifest.json: shards\[1\].samples: expected") as e:
        _read(split)
    (p,) = verify(split, progress=False)
    assert p.shard == "manifest.json" and "shards[1].samples" in p.what
    with pytest.raises(ValueError, match="max_samples") as writer:
        WriterConfig(max_samples=MAX_SHARD_SAMPLES + 1)
    observed(f"reader: {e.value}; verify: {p}; writer: {writer.value}")


@pytest.mark.fault(AREA, "a manifest listing 20,000 missing shards of 65,536 samples each",
                   injected="a manifest written by hand, no shard file present")  # fmt: skip
@pytest.mark.timeout(120)
def test_the_epoch_plan_costs_nothing_per_claimed_batch(tmp_path, observed):
    """Many shards at the most samples each (all missing): the reader starts at once, and the
    error budget stops the epoch after the first unreadable ones."""
    assert len(Plan(10**15, 1, 0, 1, 1, False).batch_sizes(0)) == 10**15
    sizes = BatchSizes(4, 3, 2)
    assert list(sizes) == [4, 4, 4, 2] and list(sizes[1:]) == [4, 4, 2] and sizes[-1] == 2
    assert list(sizes[4:]) == [] and sizes == [4, 4, 4, 2] and not BatchSizes(4, 0, 0)
    split = tmp_path / "train"
    split.mkdir()
    d = json.loads((build_pristine(tmp_path / "real") / "manifest.json").read_text())
    shard = d["shards"][0]
    d["shards"] = [{**shard, "name": f"gone-{i:06d}.tar", "samples": MAX_SHARD_SAMPLES,
                    "first_key": f"g{i:06d}", "actions": {"walk": MAX_SHARD_SAMPLES}}
                   for i in range(20_000)]  # fmt: skip
    d["samples"] = 20_000 * MAX_SHARD_SAMPLES
    (split / "manifest.json").write_text(json.dumps(d))
    start = time.monotonic()
    reader = ShardReader(ReaderConfig(str(split), batch_size=1, shuffle=False), 0, 1)
    took = time.monotonic() - start
    assert len(reader) == 20_000 * MAX_SHARD_SAMPLES and took < 30
    with pytest.raises(ErrorBudgetExceeded, match="error_budget=10") as err:
        list(reader)
    observed(f"reader of {len(reader):,} samples made in {took:.2f} s; {err.value}")
    assert Manifest.load(split).samples == 20_000 * MAX_SHARD_SAMPLES


@pytest.mark.fault(AREA, "a manifest with no shards", injected="shards: [] in the manifest")
def test_too_few_samples_names_the_split(split, observed):
    """Was: "0 samples are too few ..." without saying for which split."""
    _manifest(split, lambda d: (d.__setitem__("shards", []), d.pop("samples")))
    with pytest.raises(ReaderError, match=f"^{split}: 0 samples are too few") as err:
        _read(split)
    observed(f"{type(err.value).__name__}: {err.value}")

