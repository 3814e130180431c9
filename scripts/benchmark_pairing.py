#!/usr/bin/env python
"""Time the pair-mining stages on N random unit vectors with planted near-duplicates.

    python scripts/benchmark_pairing.py                       # N = 1,000,000, D = 768
    python scripts/benchmark_pairing.py --n 20000 --json

A fraction ``--dup-fraction`` of the vectors is rewritten into groups of ``--group-size``
noisy copies of one vector (cosine about 1 / (1 + noise^2) between copies), so turn 1
has edges; the rest are independent Gaussian directions. Turn 2 uses the feature cosine
(there are no images). Prints the seconds of each stage, the counts, the share of
planted pairs found and the peak resident memory (``ru_maxrss``), or all of it as JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time

import numpy as np

from ace.data.collect.pairing import PairingConfig, pair_images


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    from ace.cli import HelpFormatter, OneLineParser

    p = OneLineParser(
        prog="benchmark_pairing.py",
        description=__doc__,
        formatter_class=HelpFormatter,
    )
    p.add_argument("--n", type=int, default=1_000_000, help="vectors (default 1,000,000)")
    p.add_argument("--dim", type=int, default=768, help="dimension (default 768)")
    p.add_argument("--clusters", type=int, default=None, help="k-means K (default n / 1000)")
    p.add_argument("--dup-fraction", type=float, default=0.1, help="share of planted vectors")
    p.add_argument("--group-size", type=int, default=4, help="vectors per planted group")
    p.add_argument("--noise", type=float, default=0.2, help="relative noise of the copies")
    p.add_argument("--t1", type=float, default=0.9)
    p.add_argument("--t2", type=float, default=0.5)
    p.add_argument("--niter", type=int, default=20, help="k-means iterations")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    args = p.parse_args(argv)
    # each was a traceback (a reshape, a division by zero, numpy's negative dimensions)
    for flag, ok, rule in [
        ("--n", args.n >= 1, ">= 1"),
        ("--dim", args.dim >= 1, ">= 1"),
        ("--group-size", args.group_size >= 2, ">= 2"),
        ("--dup-fraction", 0 <= args.dup_fraction <= 1, "in [0, 1]"),
        ("--noise", args.noise >= 0, ">= 0"),
        ("--niter", args.niter >= 1, ">= 1"),
        ("--seed", args.seed >= 0, ">= 0"),
        ("--clusters", args.clusters is None or args.clusters >= 1, ">= 1"),
        ("--t1", 0 <= args.t1 <= 1, "in [0, 1]"),
        ("--t2", 0 <= args.t2 <= 1, "in [0, 1]"),
    ]:
        if not ok:
            p.error(f"{flag} must be {rule}, got {getattr(args, flag[2:].replace('-', '_'))}")
    return args


def make_vectors(args: argparse.Namespace) -> tuple[np.ndarray, np.ndarray]:
    """(N, D) float32 unit rows and (G, group_size) indices of the planted groups."""
    rng = np.random.default_rng(args.seed)
    x = np.empty((args.n, args.dim), np.float32)
    for s in range(0, args.n, 65536):  # chunks: no (N, D) temporary
        chunk = rng.standard_normal((min(65536, args.n - s), args.dim), np.float32)
        x[s : s + 65536] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    n_groups = int(args.n * args.dup_fraction) // args.group_size
    groups = rng.permutation(args.n)[: n_groups * args.group_size].reshape(
        n_groups, args.group_size
    )
    base = x[groups[:, 0]]  # (G, D)
    for k in range(1, args.group_size):
        noise = rng.standard_normal(base.shape, np.float32) * (args.noise / np.sqrt(args.dim))
        copy = base + noise  # (G, D)
        x[groups[:, k]] = copy / np.linalg.norm(copy, axis=1, keepdims=True)
    return x, groups


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    t0 = time.perf_counter()
    x, groups = make_vectors(args)
    make_s = time.perf_counter() - t0
    cfg = PairingConfig(
        clusters=args.clusters or max(1, args.n // 1000),
        t1=args.t1,
        t2=args.t2,
        niter=args.niter,
        seed=args.seed,
    )
    ids = [str(i) for i in range(args.n)]
    t0 = time.perf_counter()
    result = pair_images(ids, x, cfg, copy=False, progress=False)
    total = time.perf_counter() - t0
    found = {tuple(p) for p in result.pairs.tolist()}
    planted = [
        tuple(sorted((int(g[i]), int(g[j]))))
        for g in groups
        for i in range(len(g))
        for j in range(i + 1, len(g))
    ]
    recall = sum(p in found for p in planted) / max(len(planted), 1)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (
        1 << 20 if platform.system() == "Darwin" else 1 << 10
    )
    try:  # k-means' threads and GPUs; a one-cluster run needs no faiss
        import faiss
    except ImportError:
        faiss = None
    report = {
        "n": args.n,
        "dim": args.dim,
        "clusters": cfg.clusters,
        "seconds": {"make_vectors": make_s, **result.seconds, "total_pairing": total},
        "counts": result.counts,
        "planted_pairs": len(planted),
        "planted_recall": recall,
        "peak_rss_mib": peak_mib,
        "threads": faiss.omp_get_max_threads() if faiss else None,
        "faiss_gpus": faiss.get_num_gpus() if faiss else None,
    }
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"pairing {args.n} x {args.dim} vectors into {cfg.clusters} clusters "
          f"({report['threads']} threads, {report['faiss_gpus']} GPUs for faiss)")  # fmt: skip
    for name, s in report["seconds"].items():
        print(f"  {name:<16} {s:9.2f} s")
    for name, c in result.counts.items():
        print(f"  {name:<28} {c}")
    print(f"planted pairs found: {recall:.3f} of {len(planted)}")
    print(f"peak memory (ru_maxrss): {peak_mib:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
