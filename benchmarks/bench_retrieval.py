"""Index build and query throughput of lipsim.retrieval at scale (synthetic embeddings).

N unit-norm embeddings of dimension D (default 100,000 × 1025, the size of a 1024-feature
LipSim with the appended constant) drawn around 1,000 random cluster centres (so that nearest
neighbours are meaningful and HNSW recall is measurable), stored as an index directory and
memory-mapped back. Measured:

* exact: FAISS IndexFlatIP build from the memory map, raw FAISS search (batched and one query
  at a time), and ``Index.search`` with the certificate (float64 re-scoring of the candidates);
* approximate: HNSW (inner product) build, raw search, recall@1/@10 against exact, and
  ``Index.search(rerank=R)`` (certified among the candidates only);
* incremental add of 1,000 embeddings to the loaded index.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_retrieval.py
    .venv/bin/python benchmarks/bench_retrieval.py --n 20000 --queries 200      # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
from machine import cpu_model  # benchmarks/machine.py


def clustered(n: int, dim: int, seed: int, block: int = 10_000, n_centres: int = 1000) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(n_centres, dim)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((n, dim), np.float32)
    for s in range(0, n, block):
        m = min(block, n - s)
        x = centres[rng.integers(0, n_centres, m)] + rng.normal(
            scale=0.7 / np.sqrt(dim), size=(m, dim)
        ).astype(np.float32)
        out[s : s + m] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def timed(fn):
    t0 = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - t0


def main(argv=None) -> int:
    import faiss

    from lipsim.retrieval import Index

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=1025)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--certify-k", type=int, default=32)
    parser.add_argument("--rerank", type=int, default=100)
    parser.add_argument("--hnsw-m", type=int, default=32)
    parser.add_argument("--ef-construction", type=int, default=80)
    parser.add_argument("--ef-search", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where to write the temporary index (default: /tmp)")
    args = parser.parse_args(argv)

    threads = faiss.omp_get_max_threads()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs, FAISS threads {threads}, "
        f"faiss {faiss.__version__}, numpy {np.__version__}, GPUs seen by FAISS: {faiss.get_num_gpus()}"
    )
    print(
        f"data: {args.n} x {args.dim} clustered unit-norm float32 embeddings "
        f"({args.n * args.dim * 4 / 2**20:.0f} MiB), {args.queries} queries, k={args.k}"
    )
    rows: list[tuple[str, str, str]] = []

    data, t = timed(lambda: clustered(args.n, args.dim, args.seed))
    extra = clustered(1000, args.dim, args.seed + 1)
    rng = np.random.default_rng(args.seed + 2)
    pick = rng.integers(0, args.n, args.queries)
    q = data[pick] + rng.normal(scale=0.3 / np.sqrt(args.dim), size=(args.queries, args.dim)).astype(
        np.float32
    )
    q /= np.linalg.norm(q, axis=1, keepdims=True)

    work = Path(tempfile.mkdtemp(prefix="bench_retrieval_", dir=args.workdir))
    try:

        def build_and_save():
            index = Index(dim=args.dim)
            for s in range(0, args.n, 50_000):
                index.add(data[s : s + 50_000], [f"img{i:07d}" for i in range(s, min(s + 50_000, args.n))])
            index.save(work / "exact")

        _, t = timed(build_and_save)
        rows.append(("store: add + save index directory", f"{t:.2f} s", f"{args.n / t:,.0f} emb/s"))
        index, t = timed(lambda: Index.load(work / "exact"))
        rows.append(("load (memory-mapped)", f"{t * 1000:.1f} ms", "embeddings not read yet"))
        flat, t = timed(index._ensure_flat)
        rows.append(("exact: IndexFlatIP build", f"{t:.2f} s", f"{args.n / t:,.0f} emb/s"))
        (ip, ids), t = timed(lambda: flat.search(q, args.k))
        rows.append(("exact: FAISS search, batch", f"{t:.2f} s", f"{args.queries / t:,.0f} q/s"))
        one = q[: min(100, args.queries)]
        _, t = timed(lambda: [flat.search(one[i : i + 1], args.k) for i in range(len(one))])
        rows.append(
            (
                "exact: FAISS search, one at a time",
                f"{t / len(one) * 1000:.1f} ms/q",
                f"{len(one) / t:,.0f} q/s",
            )
        )
        res, t = timed(lambda: index.search(q, k=args.k, certify_k=args.certify_k))
        radii = np.array([r.certified_radius for r in res])
        rows.append(
            (
                f"exact + certificate (certify_k={args.certify_k})",
                f"{t:.2f} s",
                f"{args.queries / t:,.0f} q/s; median radius {np.median(radii):.4f}",
            )
        )
        top1 = ids[:, 0]

        approx = Index.load(work / "exact")
        approx.approximate = "hnsw"
        approx.hnsw_m, approx.ef_construction, approx.ef_search = (
            args.hnsw_m,
            args.ef_construction,
            args.ef_search,
        )
        hnsw, t = timed(approx._ensure_hnsw)
        rows.append(
            (
                f"approx: HNSW build (M={args.hnsw_m}, efC={args.ef_construction})",
                f"{t:.1f} s",
                f"{args.n / t:,.0f} emb/s",
            )
        )
        hnsw.hnsw.efSearch = args.ef_search
        (_, h_ids), t = timed(lambda: hnsw.search(q, args.k))
        r1 = float(np.mean(h_ids[:, 0] == top1))
        r10 = float(np.mean([len(set(a) & set(b)) / args.k for a, b in zip(h_ids, ids, strict=True)]))
        rows.append(
            (
                f"approx: HNSW search, batch (efSearch={args.ef_search})",
                f"{t:.2f} s",
                f"{args.queries / t:,.0f} q/s; recall@1 {r1:.3f}, @{args.k} {r10:.3f}",
            )
        )
        _, t = timed(lambda: [hnsw.search(one[i : i + 1], args.k) for i in range(len(one))])
        rows.append(
            (
                "approx: HNSW search, one at a time",
                f"{t / len(one) * 1000:.2f} ms/q",
                f"{len(one) / t:,.0f} q/s",
            )
        )
        res, t = timed(lambda: approx.search(q, k=args.k, rerank=args.rerank))
        same = float(np.mean([r.ids[0] == a for r, a in zip(res, top1, strict=True)]))
        rows.append(
            (
                f"approx + exact re-rank of {args.rerank} (candidates only)",
                f"{t:.2f} s",
                f"{args.queries / t:,.0f} q/s; top-1 = exact {same:.3f}",
            )
        )

        _, t = timed(lambda: index.add(extra, [f"new{i}" for i in range(len(extra))]))
        rows.append(
            ("incremental add of 1,000 (exact index)", f"{t * 1000:.0f} ms", f"now {len(index):,} items")
        )
        _, t = timed(lambda: index._ensure_flat().search(q[:100], args.k))
        rows.append(("exact: FAISS search after the add, 100 q", f"{t:.2f} s", f"{100 / t:,.0f} q/s"))
        _, t = timed(lambda: index.search(q[:100], k=args.k, certify_k=args.certify_k))
        rows.append(("exact + certificate after the add, 100 q", f"{t:.2f} s", f"{100 / t:,.0f} q/s"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    width = max(len(r[0]) for r in rows)
    print(f"\n| {'step':<{width}} | time | throughput |\n|{'-' * (width + 2)}|------|------------|")
    for name, time_s, rate in rows:
        print(f"| {name:<{width}} | {time_s} | {rate} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
