"""bench/dedup: exact all-pairs near-duplicate search among N 64-bit hashes with planted near-duplicates.

Run: .venv/bin/python bench/dedup.py [--sizes 10000 100000] [--thresholds 8 10]   (writes "Dedup" in docs/benchmarks.md)
Each (N, threshold) runs in a fresh child process so its peak memory is its own.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from bench.common import machine, peak_rss_mib, write_section  # noqa: E402


def make_hashes(n: int, seed: int = 0) -> tuple[np.ndarray, set[tuple[int, int]]]:
    """n random 64-bit hashes; 1% of them replaced by near-copies (0-10 bits flipped) of others."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, n, dtype=np.int64).view(np.uint64) << np.uint64(1)
    hashes |= rng.integers(0, 2, n, dtype=np.uint64)
    planted = set()
    for k in range(n // 100):
        src, dst = k, n // 2 + k
        bits = rng.choice(64, size=int(rng.integers(0, 11)), replace=False)
        hashes[dst] = hashes[src] ^ np.uint64(sum(1 << int(b) for b in bits))
        planted.add((src, dst, len(bits)))
    return hashes, planted


def brute_force(hashes: np.ndarray, threshold: int, chunk: int = 2048) -> int:
    pairs = 0
    for start in range(0, len(hashes), chunk):
        block = hashes[start:start + chunk]
        distance = np.bitwise_count(block[:, None] ^ hashes[None, :])
        pairs += int((distance <= threshold).sum())
    return (pairs - len(hashes)) // 2


def multi_index(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    from fastclass.ingest.hashsearch import find_pairs

    return find_pairs(hashes, hashes, threshold)


def bk_tree(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    import pybktree

    values = [int(v) for v in hashes]
    tree = pybktree.BKTree(lambda x, y: (x[0] ^ y[0]).bit_count(), list(zip(values, range(len(values)))))
    a, b = [], []
    for position, value in enumerate(values):
        for _, (_, other) in tree.find((value, position), threshold):
            a.append(position)
            b.append(other)
    return np.array(a), np.array(b)


def faiss_multi_hash(hashes: np.ndarray, threshold: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    codes = np.ascontiguousarray(hashes.view(np.uint8).reshape(-1, 8))
    index = faiss.IndexBinaryMultiHash(64, 3, 21)
    index.nflip = threshold // 3  # probing every chunk within floor(t/3) bits makes it exact
    index.add(codes)
    limits, _, found = index.range_search(codes, threshold + 1)
    return np.repeat(np.arange(len(hashes)), np.diff(limits).astype(np.int64)), found


PAIR_FINDERS = {"multi-index": multi_index, "BK-tree (pybktree)": bk_tree, "faiss IndexBinaryMultiHash": faiss_multi_hash}
OPTIONAL = {"BK-tree (pybktree)": "pybktree", "faiss IndexBinaryMultiHash": "faiss"}


def child(n: int, threshold: int, method: str) -> None:
    hashes, planted = make_hashes(n)
    if method == "lookup":
        from fastclass.ingest.hashsearch import HashIndex

        started = time.perf_counter()
        index = HashIndex(hashes, threshold)
        built = time.perf_counter() - started
        rng = np.random.default_rng(1)
        probes = hashes[rng.integers(0, n, 2000)] ^ np.uint64(0b101)
        started = time.perf_counter()
        found = sum(len(index.search(probes[k:k + 1])[0]) for k in range(len(probes)))
        seconds = time.perf_counter() - started
        print(json.dumps({"seconds": built, "lookups_per_s": len(probes) / seconds, "found": found,
                          "rss": peak_rss_mib()}))
        return
    started = time.perf_counter()
    if method == "numpy brute force":
        pairs, recall = brute_force(hashes, threshold), 1.0
    else:
        a, b = PAIR_FINDERS[method](hashes, threshold)
        found = {(int(x), int(y)) for x, y in zip(a, b) if x < y}
        recall = sum((s, d) in found for s, d, bits in planted if bits <= threshold) / \
            max(1, sum(bits <= threshold for _, _, bits in planted))
        pairs = len(found)
    print(json.dumps({"seconds": time.perf_counter() - started, "pairs": pairs, "recall": recall,
                      "rss": peak_rss_mib()}))


def _targets(timings: dict[tuple[int, int], dict]) -> str:
    parts = []
    for threshold, limit in ((8, 30), (10, 60)):
        r = timings.get((1_000_000, threshold))
        if r is None:
            parts.append(f"threshold {threshold} in <= {limit} s (not run)")
        else:
            verdict = "met" if r["seconds"] <= limit and r["rss"] < 2048 else "**not met**"
            parts.append(f"threshold {threshold} in <= {limit} s ({verdict}: {r['seconds']:.1f} s, {r['rss']:.0f} MiB)")
    return "Targets (issue 4), 1M hashes under 2 GB: " + "; ".join(parts) + "."


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--thresholds", type=int, nargs="+", default=[8, 10])
    parser.add_argument("--brute-max", type=int, default=100_000, help="largest N for the brute-force comparison")
    parser.add_argument("--timeout", type=int, default=300)
    parser.add_argument("--other-timeout", type=int, default=120, help="limit for the comparison methods")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(int(args.child[0]), int(args.child[1]), args.child[2])
        return
    timings: dict[tuple[int, int], dict] = {}
    lines = ["| N | threshold | method | seconds | pairs found | recall of planted pairs | peak memory |",
             "|---|---|---|---|---|---|---|"]
    for n in args.sizes:
        for threshold in args.thresholds:
            for method in ("multi-index", "numpy brute force", "faiss IndexBinaryMultiHash", "BK-tree (pybktree)"):
                if method == "numpy brute force" and n > args.brute_max:
                    continue
                if method in OPTIONAL and importlib.util.find_spec(OPTIONAL[method]) is None:
                    lines.append(f"| {n:,} | {threshold} | {method} | not installed (pip install -e '.[bench]') | | | |")
                    continue
                limit = args.timeout if method == "multi-index" else args.other_timeout
                try:
                    out = subprocess.run([sys.executable, __file__, "--child", str(n), str(threshold), method],
                                         capture_output=True, text=True, check=True, timeout=limit).stdout
                    r = json.loads(out)
                    if method == "multi-index":
                        timings[(n, threshold)] = r
                    lines.append(f"| {n:,} | {threshold} | {method} | {r['seconds']:.2f} | {r['pairs']:,} | "
                                 f"{r['recall']:.0%} | {r['rss']:.0f} MiB |")
                except subprocess.TimeoutExpired:
                    lines.append(f"| {n:,} | {threshold} | {method} | > {limit} (stopped) | | | |")
                print(lines[-1], flush=True)
    lookups = []
    for threshold in args.thresholds:
        n = max(args.sizes)
        out = subprocess.run([sys.executable, __file__, "--child", str(n), str(threshold), "lookup"],
                             capture_output=True, text=True, check=True, timeout=args.timeout).stdout
        r = json.loads(out)
        lookups.append(f"| {n:,} | {threshold} | {r['seconds']:.1f} | {r['lookups_per_s']:,.0f} | {r['rss']:.0f} MiB |")
        print(lookups[-1], flush=True)
    body = (f"`bench/dedup.py` ({time.strftime('%Y-%m-%d')}), machine: {machine()}.\n\n"
            "Random 64-bit hashes, 1% replaced by near-copies of others (0-10 bits flipped). `multi-index` is\n"
            "`fastclass.ingest.hashsearch.find_pairs` (exact; chunk count chosen per search, 3 chunks of 21-22 bits at 1M); brute force is chunked\n"
            "NumPy all-pairs; faiss is `IndexBinaryMultiHash(64, nhash=3, b=21)` with `nflip = t // 3` (exact) and\n"
            "range_search; the BK-tree is pybktree with a popcount distance, one query per hash. The comparisons are\n"
            "optional packages (the `[bench]` extra, which `make bench` installs), stopped after 120 s.\n\n"
            + "\n".join(lines) + "\n\n" + _targets(timings) + "\n\n"
            "Checking one new image at a time against the catalog (`fastclass.ingest.hashsearch.HashIndex`, built once; "
            "each lookup a separate call, one process, so per core; target >= 5,000 lookups/s per core):\n\n"
            "| index size | threshold | build seconds | lookups/s | peak memory |\n|---|---|---|---|---|\n"
            + "\n".join(lookups))
    write_section("Dedup", body)


if __name__ == "__main__":
    main()
