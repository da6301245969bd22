"""SIGKILL while the embedding cache is written: a rerun reads a verified file or rebuilds.

A child process runs :func:`finetune.evaluation.cache.embed_split_cached` with an embedder whose
rows are wide (a ~20 MB cache file, so a kill lands inside the write) and is SIGKILLed, either by
itself just before its n-th fsync / rename (every step of the two atomic writes of
``save_verified``, deterministic) or by the test at seeded random moments. After every kill: a
cache file that has its checksum must verify and equal an uninterrupted run; one without is a
miss. A rerun then returns exactly the uninterrupted result, rebuilding or reading as the files
say.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import make_sample

from data_shards.write import write_split
from finetune.evaluation.cache import embed_split_cached
from finetune.evaluation.embed import Embeddings
from finetune.evaluation.store import is_complete, open_verified

ROOT = Path(__file__).resolve().parents[2]
AREA = "Evaluation cache: SIGKILL and several ranks"  # of docs/reliability.md

WIDE = '''
import torch
import torch.nn.functional as F

class Wide:
    """Pooled pixels tiled to ``width`` columns: a large, deterministic cache file."""

    fingerprint = "wide-test-v1"

    def __init__(self, width=1 << 17):
        self.width = width

    def __call__(self, frames, masks):
        B, V, T, C, H, W = frames.shape
        x = F.adaptive_avg_pool2d(frames.reshape(B * V * T, C, H, W).float(), 4).flatten(1)
        reps = -(-self.width // x.shape[1])
        x = x.repeat(1, reps)[:, : self.width] + torch.arange(self.width) * 1e-3
        return x.view(B, V, T, -1)
'''

CHILD = (
    WIDE
    + """
import os, signal, sys, time
mode, split, cache, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
if mode == "hook":  # SIGKILL ourselves just before the n-th durable step (fsync or rename)
    calls = [0]
    def killing(real):
        def step(*args):
            calls[0] += 1
            if calls[0] == n:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args)
        return step
    os.fsync, os.replace = killing(os.fsync), killing(os.replace)
from finetune.evaluation.cache import embed_split_cached
print("ready", flush=True)
t0 = time.perf_counter()
embed_split_cached(Wide(), split, cache, progress=False)
print(f"done {time.perf_counter() - t0:.3f}", flush=True)
"""
)


def _wide():
    namespace: dict = {}
    exec(WIDE, namespace)  # the same class the child runs
    return namespace["Wide"]()


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    samples = [make_sample(key=f"k{i}", views=2, frames=4, size=(32, 32), seed=i)
               for i in range(5)]  # fmt: skip
    write_split(root, "train", samples, {}, {})
    return root / "train"


def _child(tmp_path: Path, mode: str, split: Path, cache: Path, n: int = 0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), mode, str(split), str(cache), str(n)],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True)  # fmt: skip


def _check_after_kill(cache: Path, clean: Embeddings) -> bool:
    """The invariant: a file with a checksum verifies and is the clean result. True if one."""
    (path,) = list(cache.glob("*/embeddings-l2norm.npz")) or [None]
    if path is None or not is_complete(path):
        return False
    open_verified(path)  # raises ChecksumError on a half-written file passed off as complete
    np.testing.assert_array_equal(Embeddings.load(path).vectors, clean.vectors)
    return True


def _rerun_equals_clean(split: Path, cache: Path, clean: Embeddings) -> None:
    for _ in range(2):  # the first may rebuild, the second reads the cache
        emb, _ = embed_split_cached(_wide(), split, cache, progress=False)
        for name, x in clean.columns().items():
            np.testing.assert_array_equal(getattr(emb, name), x, err_msg=name)


@pytest.fixture(scope="module")
def clean(split, tmp_path_factory):
    cache = tmp_path_factory.mktemp("clean")
    emb, _ = embed_split_cached(_wide(), split, cache, progress=False)
    assert emb.vectors.nbytes > 20e6  # large enough for a kill to land inside the write
    return emb


# Durable steps of the two save_verified calls (embeddings, then info.json), 6 each:
# (fsync temp, rename, fsync folder) for the data file, then the same for its checksum.
# Steps 2, 5, 6 (data renamed, checksum renamed, checksum durable) run by default; all of
# them under -m slow.
STEPS = [(2, 5, 6), pytest.param((1, 3, 4, 7, 12), marks=pytest.mark.slow)]


@pytest.mark.fault(
    AREA,
    "SIGKILL just before a durable step of the cache write (fsync or rename of the data file, of "
    "its .sha256, of info.json)",
    injected="the child SIGKILLs itself at its n-th os.fsync / os.replace call",
)  # fmt: skip
@pytest.mark.parametrize("steps", STEPS)
def test_sigkill_at_each_step_of_the_cache_write(split, clean, tmp_path, steps, observed):
    children = {n: _child(tmp_path, "hook", split, tmp_path / f"cache{n}", n) for n in steps}
    for p in children.values():  # all at once: the cost is the children's imports
        p.communicate(timeout=120)
    for n, p in children.items():
        assert p.returncode == -signal.SIGKILL, n
        complete = _check_after_kill(tmp_path / f"cache{n}", clean)
        assert complete == (n > 5), n  # the checksum's rename is step 5: durable from step 6
        _rerun_equals_clean(split, tmp_path / f"cache{n}", clean)
        observed(f"killed before step {n}: exit {p.returncode}, a verified file left: {complete}")


@pytest.mark.fault(
    AREA,
    "SIGKILL at 6 seeded random moments within 1.2x an uninterrupted embed and write",
    injected="os.kill(child, SIGKILL) after a delay drawn with seed 0, on the same cache folder",
)  # fmt: skip
@pytest.mark.slow  # 7 child processes one after the other: ~30 s on 2 cores
def test_sigkill_at_random_moments_then_rerun(split, clean, tmp_path, observed):
    cache = tmp_path / "cache"
    p = _child(tmp_path, "time", split, tmp_path / "timing")
    out, _ = p.communicate(timeout=60)
    work_s = float(out.split()[-1])  # an uninterrupted run, imports excluded
    rng = np.random.default_rng(0)
    outcomes = []
    for delay in rng.uniform(0.0, 1.2 * work_s, size=6):
        p = _child(tmp_path, "time", split, cache)
        assert p.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(p.pid, signal.SIGKILL)
        p.communicate(timeout=30)
        outcomes.append((round(float(delay), 3), p.returncode, _check_after_kill(cache, clean)))
        if outcomes[-1][2]:  # complete: start the next trial from scratch to kill more writes
            for f in cache.glob("*/*"):
                f.unlink()
    print("delay s, return code, complete file after the kill:", outcomes)
    _rerun_equals_clean(split, cache, clean)
    observed(f"(delay s, exit, verified file left): {outcomes}")
