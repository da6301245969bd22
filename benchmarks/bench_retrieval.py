"""Retrieval search: FAISS flat beside plain numpy and torch brute force, in the same run.

    .venv/bin/python benchmarks/bench_retrieval.py [--n 20000,100000] [--d 256] [--k 5]
        [--device cpu|cuda] [--threads 2] [--brute-queries 10000] [--repeats 1]

For each N: N queries against N gallery vectors (float32, standard normal, seeded), top-k by
squared L2 distance (top-1 is the first column of the same search):
- FAISS: the project's index and search (:func:`finetune.evaluation.retrieval.build_index`
  flat L2 on the CPU, :func:`finetune.evaluation.retrieval.search` in query chunks of 8,192);
  and its approximate IVF-PQ
  index (``--index ivfpq``, default cells / sub-quantizers) with its recall of the exact
  nearest neighbour (R1@1: ranked first; R1@k: among the k);
- numpy: chunked ``|g|^2 - 2 q g^T`` (one BLAS sgemm per chunk), argpartition, sort;
- torch: the same with ``torch.mm`` and ``topk``.
All three run with the same thread count (``--threads``; FAISS's OpenMP, torch's intra-op pool
and numpy's OpenBLAS are set and read back). Brute force costs N^2 d: at large N it is timed
on the first ``--brute-queries`` queries (against the whole gallery) and scaled linearly to N
queries (exact in principle: every query costs the same), which the table marks. Results are
checked on the queries every method searched: identical ids, or, where float rounding orders
two near-equal distances differently, distances within 1e-4 relative.

``--device cuda`` times torch brute force on the GPU instead (faiss-gpu may be unavailable;
the goal there is 1M x 1M x 256 top-1 in under 30 s). Prints a markdown table for
docs/benchmarks.md and the raw numbers as JSON.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import time

import faiss
import numpy as np
import torch

from finetune.evaluation.retrieval import build_index, search


def _openblas() -> ctypes.CDLL | None:
    """numpy's OpenBLAS (scipy-openblas64 in numpy wheels), found among the loaded libraries."""
    with open("/proc/self/maps") as maps:
        libs = {line.split()[-1] for line in maps if "scipy_openblas" in line}
    return ctypes.CDLL(sorted(libs)[0]) if libs else None


def set_threads(n: int) -> dict[str, int | None]:
    """The same intra-op thread count for FAISS, torch and numpy; returns what each reports."""
    faiss.omp_set_num_threads(n)
    torch.set_num_threads(n)
    blas = _openblas()
    if blas is not None:
        blas.scipy_openblas_set_num_threads64_(n)
    return dict(faiss=faiss.omp_get_max_threads(), torch=torch.get_num_threads(),
                numpy=blas.scipy_openblas_get_num_threads64_() if blas else None)  # fmt: skip


def faiss_topk(gallery: np.ndarray, queries: np.ndarray, k: int,
               kind: str = "flat") -> tuple[np.ndarray, dict]:  # fmt: skip
    """The project's index (``flat``, or the approximate ``ivfpq``): build, then search."""
    t0 = time.perf_counter()
    index = build_index(gallery, kind, "l2", gpu=False)
    t1 = time.perf_counter()
    _, ids = search(index, queries, k)
    t2 = time.perf_counter()
    return ids, dict(build_s=t1 - t0, search_s=t2 - t1)


def recall(ids: np.ndarray, exact: np.ndarray) -> tuple[float, float]:
    """R1@1 (the exact nearest neighbour ranked first) and R1@k (it is among the k)."""
    first = exact[:, 0]
    return float((ids[:, 0] == first).mean()), float((ids == first[:, None]).any(1).mean())


def numpy_topk(gallery: np.ndarray, queries: np.ndarray, k: int,
               chunk: int = 1024) -> np.ndarray:  # fmt: skip
    """Exact top-k by L2 (|q|^2 is the same for every gallery row of a query: left out)."""
    g2 = (gallery.astype(np.float64) ** 2).sum(1).astype(np.float32)  # (N,)
    out = np.empty((len(queries), k), dtype=np.int64)
    for s in range(0, len(queries), chunk):
        dist = g2 - 2.0 * (queries[s : s + chunk] @ gallery.T)  # (c, N)
        part = np.argpartition(dist, k - 1, axis=1)[:, :k]  # (c, k) unordered
        order = np.argsort(np.take_along_axis(dist, part, 1), axis=1, kind="stable")
        out[s : s + chunk] = np.take_along_axis(part, order, 1)
    return out


def torch_topk(gallery: np.ndarray, queries: np.ndarray, k: int, device: str = "cpu",
               chunk: int = 1024) -> np.ndarray:  # fmt: skip
    g = torch.from_numpy(gallery).to(device)
    g2 = (g.double() ** 2).sum(1).float()  # (N,)
    out = []
    with torch.no_grad():
        for s in range(0, len(queries), chunk):
            q = torch.from_numpy(queries[s : s + chunk]).to(device)
            dist = torch.addmm(g2, q, g.T, alpha=-2.0)  # (c, N) = |g|^2 - 2 q g^T
            out.append(dist.topk(k, dim=1, largest=False).indices.cpu())
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return torch.cat(out).numpy()


def agreement(ids: np.ndarray, ref: np.ndarray, gallery: np.ndarray,
              queries: np.ndarray) -> tuple[float, bool]:  # fmt: skip
    """Share of equal (query, rank) ids; and whether every mismatch is a near-tie (the two
    gallery vectors are within 1e-4 relative of the same distance to the query)."""
    same = ids == ref
    rows, cols = np.nonzero(~same)
    q = queries[rows].astype(np.float64)
    d_a = ((gallery[ids[rows, cols]] - q) ** 2).sum(1)
    d_b = ((gallery[ref[rows, cols]] - q) ** 2).sum(1)
    return float(same.mean()), bool(np.all(np.abs(d_a - d_b) <= 1e-4 * np.abs(d_b)))


def timed(fn, repeats: int):
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return out, best


def bench(n: int, d: int, k: int, device: str, brute_queries: int, repeats: int) -> dict:
    rng = np.random.default_rng(n)
    gallery = rng.standard_normal((n, d), dtype=np.float32)
    queries = rng.standard_normal((n, d), dtype=np.float32)
    m = min(n, brute_queries)  # brute force timed on the first m queries, scaled to n
    row: dict = dict(n=n, d=d, k=k, device=device, brute_queries=m)
    if device == "cpu":
        (ids_f, parts), row["faiss_s"] = timed(lambda: faiss_topk(gallery, queries, k), repeats)
        row.update(faiss_build_s=parts["build_s"], faiss_search_s=parts["search_s"])
        ivfpq = lambda: faiss_topk(gallery, queries, k, "ivfpq")  # noqa: E731
        (ids_q, parts), row["ivfpq_s"] = timed(ivfpq, repeats)
        row.update(ivfpq_build_s=parts["build_s"], ivfpq_search_s=parts["search_s"])
        row["ivfpq_r1_at_1"], row["ivfpq_r1_at_k"] = recall(ids_q, ids_f)
        ids_n, t = timed(lambda: numpy_topk(gallery, queries[:m], k), repeats)
        row["numpy_s"] = t * n / m
    ids_t, t = timed(lambda: torch_topk(gallery, queries[:m], k, device), repeats)
    row["torch_s"] = t * n / m
    if device == "cpu":
        for name, ids in (("numpy", ids_n), ("torch", ids_t)):
            for kk in (1, k):
                share, ties = agreement(ids[:, :kk], ids_f[:m, :kk], gallery, queries[:m])
                row[f"{name}_top{kk}_equal"], row[f"{name}_top{kk}_ties_only"] = share, ties
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", default="20000,100000", help="comma-separated N (queries = gallery)")
    p.add_argument("--d", type=int, default=256)
    p.add_argument("--k", type=int, default=5)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--brute-queries", type=int, default=20000,
                   help="brute force is timed on this many queries and scaled to N")  # fmt: skip
    p.add_argument("--repeats", type=int, default=1, help="best of R runs")
    args = p.parse_args()
    threads = set_threads(args.threads)
    rows = [bench(int(n), args.d, args.k, args.device, args.brute_queries, args.repeats)
            for n in args.n.split(",")]  # fmt: skip
    gpu = torch.cuda.get_device_name() if args.device == "cuda" else "none"
    print(f"machine: {platform.node()}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, GPU {gpu}; faiss {faiss.__version__}, torch "
          f"{torch.__version__}, numpy {np.__version__}; threads {threads}")  # fmt: skip
    if args.device == "cuda":
        print("\n| N x N | d | top-k | torch (GPU) s |\n|---|---|---|---|")
        for r in rows:
            print(f"| {r['n']:,} | {r['d']} | {r['k']} | {r['torch_s']:.2f} |")
    else:
        print(
            "\n| N x N | d | top-k | FAISS flat s (build + search) | numpy s | torch s | "
            "numpy / FAISS | torch / FAISS | ids equal top-1 / top-k (numpy, torch) | "
            "FAISS IVF-PQ s (build + search) | numpy / IVF-PQ | IVF-PQ R1@1 / R1@k |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            scaled = "" if r["brute_queries"] == r["n"] else f" (*{r['brute_queries']:,} q)"
            k = r["k"]
            eq = ", ".join(f"{r[m + '_top1_equal']:.4%} / {r[f'{m}_top{k}_equal']:.4%}"
                           for m in ("numpy", "torch"))  # fmt: skip
            print(f"| {r['n']:,} | {r['d']} | {r['k']} | {r['faiss_s']:.1f} "
                  f"({r['faiss_build_s']:.2f} + {r['faiss_search_s']:.1f}) | "
                  f"{r['numpy_s']:.1f}{scaled} | {r['torch_s']:.1f}{scaled} | "
                  f"{r['numpy_s'] / r['faiss_s']:.2f}x | {r['torch_s'] / r['faiss_s']:.2f}x | "
                  f"{eq} | {r['ivfpq_s']:.1f} ({r['ivfpq_build_s']:.1f} + "
                  f"{r['ivfpq_search_s']:.1f}) | {r['numpy_s'] / r['ivfpq_s']:.1f}x | "
                  f"{r['ivfpq_r1_at_1']:.1%} / {r['ivfpq_r1_at_k']:.1%} |")  # fmt: skip
        print(
            "\n(*m q): brute force timed on the first m queries against the whole gallery "
            "and scaled by N / m; ids are compared on those m queries."
        )
    print("\n" + json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
