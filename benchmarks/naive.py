"""Naive per-sample references for the core benchmark: plain Python loops over tokens + numpy.

These are what a user writing the paper's pseudo-code directly would get. They are the
baseline the vectorised, batched core is measured against (``benchmarks/core.py``).
"""

from __future__ import annotations

import numpy as np


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def topk(scores: np.ndarray, k: int) -> list[int]:
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    return sorted(order[:k])


def divprune(x: np.ndarray, k: int) -> list[int]:
    xn = _unit(x)
    n = len(xn)
    dist = 1.0 - xn @ xn.T
    nn = [min(dist[i, j] for j in range(n) if j != i) for i in range(n)]
    chosen = [int(np.argmax(nn))]
    taken = set(chosen)
    mind = [dist[i, chosen[0]] for i in range(n)]
    while len(chosen) < k:
        best, arg = -1.0, -1
        for i in range(n):
            if i not in taken and mind[i] > best:
                best, arg = mind[i], i
        chosen.append(arg)
        taken.add(arg)
        for i in range(n):
            mind[i] = min(mind[i], dist[i, arg])
    return sorted(chosen)


def kcenter(x: np.ndarray, k: int) -> list[int]:
    xn = _unit(x)
    n = len(xn)
    mean = xn.mean(0)
    first = min(range(n), key=lambda i: float(((xn[i] - mean) ** 2).sum()))
    chosen = [first]
    taken = {first}
    mind = [float(((xn[i] - xn[first]) ** 2).sum()) for i in range(n)]
    while len(chosen) < k:
        arg = max((i for i in range(n) if i not in taken), key=lambda i: mind[i])
        chosen.append(arg)
        taken.add(arg)
        for i in range(n):
            mind[i] = min(mind[i], float(((xn[i] - xn[arg]) ** 2).sum()))
    return sorted(chosen)


def mmr(x: np.ndarray, q: np.ndarray, k: int, lam: float = 0.5) -> list[int]:
    xn = _unit(x)
    rel = xn @ _unit(q)
    n = len(xn)
    chosen = [int(np.argmax(rel))]
    taken = set(chosen)
    red = [float(xn[i] @ xn[chosen[0]]) for i in range(n)]
    while len(chosen) < k:
        arg = max((i for i in range(n) if i not in taken),
                  key=lambda i: lam * rel[i] - (1 - lam) * red[i])
        chosen.append(arg)
        taken.add(arg)
        for i in range(n):
            red[i] = max(red[i], float(xn[i] @ xn[arg]))
    return sorted(chosen)


def dart(x: np.ndarray, k: int, n_pivots: int = 8) -> list[int]:
    n = len(x)
    norms = [float(np.abs(x[i]).sum()) for i in range(n)]
    pivots = sorted(range(n), key=lambda i: -norms[i])[:n_pivots]
    xn = _unit(x)
    chosen = list(pivots)
    per = (k - n_pivots) // n_pivots
    extra = (k - n_pivots) - per * n_pivots
    for p_i, p in enumerate(pivots):
        want = per + (1 if p_i < extra else 0)
        taken = set(chosen)
        pool = [i for i in range(n) if i not in taken]
        pool.sort(key=lambda i: float(xn[i] @ xn[p]))
        chosen += pool[:want]
    return sorted(chosen)


def tome(x: np.ndarray, r: int) -> np.ndarray:
    """Bipartite soft matching + plain mean merge, one sample: returns the merged tokens."""
    xn = _unit(x)
    a, b = list(range(0, len(x), 2)), list(range(1, len(x), 2))
    best = []
    for i in a:
        sims = [float(xn[i] @ xn[j]) for j in b]
        j = int(np.argmax(sims))
        best.append((sims[j], i, b[j]))
    best.sort(key=lambda t: -t[0])
    merged = {j: [x[j]] for j in b}
    for _, i, j in best[:r]:
        merged[j].append(x[i])
    kept_a = sorted(i for _, i, _ in best[r:])
    return np.stack([x[i] for i in kept_a] + [np.mean(merged[j], axis=0) for j in b])


def pagerank(attn: np.ndarray, damping: float = 0.85, tol: float = 1e-6, max_iter: int = 100) -> np.ndarray:
    n = attn.shape[0]
    s = np.full(n, 1.0 / n)
    for _ in range(max_iter):
        new = np.array([(1 - damping) / n + damping * float(attn[:, j] @ s) for j in range(n)])
        done = np.abs(new - s).sum() < tol
        s = new
        if done:
            break
    return s
