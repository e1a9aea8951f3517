"""Core selectors vs naive per-sample references at the shapes real models use.

    python benchmarks/core.py            # full run (a few minutes on 2 cores)
    python benchmarks/core.py --quick    # smaller batches and documents, for a smoke run

For every selector and shape it prints the median time of the batched, vectorised core and of
the naive reference (plain Python loops over tokens, one sample at a time, as the papers'
pseudo-code reads), and their ratio. The naive reference runs on ONE sample and is multiplied
by the batch size (it is a per-sample loop, so that is exact up to noise); the core always runs
the whole batch. Ward pooling of many ColBERT documents is compared with scipy's
``linkage(method="ward")`` + ``fcluster`` called per document.

Targets (issue #2): every vectorised path >= 10x faster than the naive reference; Ward pooling
of 10,000 documents of 180 tokens >= 5x faster than scipy per document.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import naive
from _harness import Report, timeit

from unipruner import topk
from unipruner.reduce import pool
from unipruner.scorers import diversity, graph, similarity

# name, N, D, B, keep
SHAPES = [
    ("LLaVA visual tokens", 576, 4096, 4, 64),
    ("ViT-B/16", 197, 768, 8, 98),
    ("SD latent 64x64", 4096, 320, 2, 1024),
    ("ColBERT document", 180, 128, 32, 90),
]


def _attn(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, n, n, generator=g).softmax(-1)


def _cases(x: torch.Tensor, scores: torch.Tensor, q: torch.Tensor, keep: int, g: torch.Generator,
           with_pagerank: bool) -> list[tuple[str, Callable[[], Any], Callable[[], Any]]]:
    b, n, _ = x.shape
    xs = x[0].double().numpy()
    qs = q[0].double().numpy()
    r = min(n - keep, n // 2)

    def tome_core() -> Any:
        merge, _ = similarity.bipartite_soft_matching(x, r)
        return merge(x)

    cases: list[tuple[str, Callable[[], Any], Callable[[], Any]]] = [
        ("top-k (importance)", lambda: topk(scores, keep), lambda: naive.topk(scores[0].tolist(), keep)),
        ("divprune", lambda: diversity.divprune(x, keep), lambda: naive.divprune(xs, keep)),
        ("kcenter", lambda: diversity.kcenter(x, keep), lambda: naive.kcenter(xs, keep)),
        ("mmr", lambda: diversity.mmr(x, q, keep), lambda: naive.mmr(xs, qs, keep)),
        ("dart", lambda: similarity.dart(x, keep), lambda: naive.dart(xs, keep)),
        ("tome (match + merge)", tome_core, lambda: naive.tome(xs, r)),
    ]
    if with_pagerank:
        attn = _attn(b, n, g)
        attn_np = attn[0].double().numpy()
        cases.append(("pagerank (zero-tprune)", lambda: graph.pagerank(attn), lambda: naive.pagerank(attn_np)))
    return cases


def run(quick: bool) -> Report:
    torch.manual_seed(0)
    report = Report("core", ["shape", "method", "B", "N", "D", "keep", "core ms", "naive ms", "speed-up"])
    for label, n, d, b, keep in SHAPES:
        if quick:
            b = max(1, b // 4)
        g = torch.Generator().manual_seed(n)
        cases = _cases(torch.randn(b, n, d, generator=g), torch.rand(b, n, generator=g),
                       torch.randn(b, d, generator=g), keep, g, with_pagerank=n <= 1024 or not quick)
        for name, core_fn, naive_fn in cases:
            core_t, _ = timeit(core_fn, repeat=5, warmup=1)
            naive_t, _ = timeit(naive_fn, repeat=1 if n >= 1024 else 3, warmup=0)
            naive_t *= b
            report.add(**{"shape": label, "method": name, "B": b, "N": n, "D": d, "keep": keep,
                          "core ms": core_t * 1e3, "naive ms": naive_t * 1e3,
                          "speed-up": naive_t / core_t})
    _ward_rows(report, quick)
    return report


def _ward_rows(report: Report, quick: bool) -> None:
    from scipy.cluster.hierarchy import fcluster, linkage

    n_docs = 1000 if quick else 10_000
    n_scipy = 200 if quick else 1000
    g = torch.Generator().manual_seed(7)
    docs = torch.nn.functional.normalize(torch.randn(n_docs, 180, 128, generator=g), dim=-1)

    def ours() -> Any:
        return pool(docs, factor=2, method="ward")

    def scipy_per_doc() -> Any:
        out = []
        for doc in docs[:n_scipy].double().numpy():
            labels = fcluster(linkage(doc, method="ward"), t=90, criterion="maxclust")
            out.append(np.stack([doc[labels == c].mean(0) for c in np.unique(labels)]))
        return out

    core_t, _ = timeit(ours, repeat=3 if not quick else 1, warmup=1 if not quick else 0)
    sc_t, _ = timeit(scipy_per_doc, repeat=1, warmup=0)
    sc_t *= n_docs / n_scipy
    report.add(**{"shape": "ColBERT corpus", "method": f"ward pool x{n_docs} docs (vs scipy)",
                  "B": n_docs, "N": 180, "D": 128, "keep": 90, "core ms": core_t * 1e3,
                  "naive ms": sc_t * 1e3, "speed-up": sc_t / core_t})
    report.notes.append(
        f"scipy Ward ran on {n_scipy} documents and is scaled to {n_docs} (it is a per-document loop)."
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller batches, for a smoke run")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    report = run(args.quick)
    report.notes.append("naive = plain Python loop over tokens on one sample, times B; "
                        "core = the batched unipruner call on the whole batch.")
    report.print()
    cmd = "python benchmarks/core.py" + (" --quick" if args.quick else "")
    print(f"saved {report.save(cmd)}")


if __name__ == "__main__":
    main()
