"""Tests for unipruner.scorers.graph: PageRank (Zero-TPrune) and similarity propagation (G-Prune).

Each scorer is checked against a plain per-sample numpy reference written here, plus properties.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner.errors import UniprunerError
from unipruner.scorers.graph import pagerank, similarity_propagation

# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


def _softmax_attn(rng: np.random.Generator, b: int, h: int, n: int) -> torch.Tensor:
    logits = rng.normal(size=(b, h, n, n)) * 2.0
    e = np.exp(logits - logits.max(-1, keepdims=True))
    return torch.from_numpy(e / e.sum(-1, keepdims=True))


def _ragged_mask(rng: np.random.Generator, b: int, n: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    lengths = rng.integers(1, n + 1, size=b)
    lengths[0] = n
    m = np.zeros((b, n), dtype=bool)
    for i, length in enumerate(lengths):
        if kind == "right":
            m[i, :length] = True
        elif kind == "left":
            m[i, n - length:] = True
        else:  # scattered padding, at least one valid token
            m[i] = rng.random(n) < 0.6
            m[i, rng.integers(n)] = True
    return torch.from_numpy(m)


def _valid_np(mask: torch.Tensor | None, b: int, n: int) -> np.ndarray:
    return np.ones((b, n), dtype=bool) if mask is None else mask.numpy()


def ref_pagerank(attn: torch.Tensor, damping: float, tol: float, max_iter: int,
                 mask: torch.Tensor | None = None,
                 weights: torch.Tensor | None = None) -> np.ndarray:
    """Naive power iteration, one sample at a time, on the valid sub-graph."""
    a = attn.numpy()
    if a.ndim == 3:
        a = a[:, None]
    b, _, n, _ = a.shape
    valid = _valid_np(mask, b, n)
    out = np.full((b, n), -np.inf)
    for bi in range(b):
        idx = [i for i in range(n) if valid[bi, i]]
        m = len(idx)
        if m == 0:
            continue
        avg = a[bi].mean(axis=0)
        p = np.zeros((m, m))
        for r, i in enumerate(idx):
            row = np.array([avg[i, j] for j in idx])
            p[r] = row / row.sum() if row.sum() > 0 else np.full(m, 1.0 / m)
        if weights is None:
            v = np.full(m, 1.0 / m)
        else:
            w = np.array([float(weights[bi, i]) for i in idx])
            v = w / w.sum()
        s = np.full(m, 1.0 / m)
        for _ in range(max_iter):
            new = (1 - damping) * v + damping * (p.T @ s)
            delta = np.abs(new - s).sum()
            s = new
            if delta < tol:
                break
        out[bi, idx] = s
    return out


def eig_pagerank(attn: torch.Tensor, damping: float) -> np.ndarray:
    """Stationary distribution of the Google matrix by a dense eigen-solve (no mask, uniform v)."""
    a = attn.numpy()
    if a.ndim == 3:
        a = a[:, None]
    b, _, n, _ = a.shape
    out = np.zeros((b, n))
    for bi in range(b):
        p = a[bi].mean(axis=0)
        p = p / p.sum(axis=1, keepdims=True)
        google = damping * p + (1 - damping) * np.full((n, n), 1.0 / n)
        vals, vecs = np.linalg.eig(google.T)
        top = int(np.argmin(np.abs(vals - 1.0)))
        vec = np.real(vecs[:, top])
        out[bi] = vec / vec.sum()
    return out


def ref_propagation(tokens: torch.Tensor, scores: torch.Tensor | None, k: int, alpha: float,
                    n_iter: int, mask: torch.Tensor | None = None) -> np.ndarray:
    """Naive k-NN graph + propagation, one sample at a time."""
    x = tokens.numpy()
    b, n, _ = x.shape
    valid = _valid_np(mask, b, n)
    out = np.full((b, n), -np.inf)
    for bi in range(b):
        idx = [i for i in range(n) if valid[bi, i]]
        m = len(idx)
        xs = x[bi, idx]
        xs = xs / np.maximum(np.linalg.norm(xs, axis=1, keepdims=True), 1e-12)
        c = xs @ xs.T
        w = np.zeros((m, m))
        for i in range(m):
            # most similar first; equal similarities: lower index first
            others = sorted((-c[i, j], j) for j in range(m) if j != i)
            for _, j in others[:k]:
                w[i, j] = max(c[i, j], 0.0)
            if w[i].sum() > 0:
                w[i] /= w[i].sum()
        if scores is None:
            s0 = np.full(m, 1.0 / m)
        else:
            s0 = np.array([float(scores[bi, i]) for i in idx])
        s = s0.copy()
        for _ in range(n_iter):
            s = alpha * (w.T @ s) + (1 - alpha) * s0
        out[bi, idx] = s
    return out


def _close(got: torch.Tensor, want: np.ndarray, atol: float = 1e-9) -> None:
    want_t = torch.from_numpy(want)
    assert torch.equal(torch.isinf(got), torch.isinf(want_t))
    fin = torch.isfinite(want_t)
    assert torch.allclose(got[fin].double(), want_t[fin], atol=atol, rtol=1e-7), (got, want)


# ----------------------------------------------------------------------------------------------
# pagerank
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,h,n", [(1, 1, 5), (2, 4, 9), (3, 2, 16)])
@pytest.mark.parametrize("kind", ["none", "right", "left", "scattered"])
@pytest.mark.parametrize("damping", [0.85, 0.5, 1.0])
def test_pagerank_matches_naive_loop(b: int, h: int, n: int, kind: str, damping: float) -> None:
    rng = np.random.default_rng(b * 100 + n + int(damping * 10))
    attn = _softmax_attn(rng, b, h, n)
    mask = _ragged_mask(rng, b, n, kind)
    got = pagerank(attn, damping=damping, tol=1e-8, max_iter=50, mask=mask)
    assert got.dtype == torch.float64 and got.shape == (b, n)
    _close(got, ref_pagerank(attn, damping, 1e-8, 50, mask), atol=1e-10)


@pytest.mark.parametrize("max_iter", [1, 3])
def test_pagerank_stops_at_max_iter(max_iter: int) -> None:
    rng = np.random.default_rng(7)
    attn = _softmax_attn(rng, 2, 3, 8)
    got = pagerank(attn, tol=1e-15, max_iter=max_iter)
    _close(got, ref_pagerank(attn, 0.85, 1e-15, max_iter), atol=1e-12)


@pytest.mark.parametrize("n,damping", [(6, 0.85), (12, 0.6), (20, 0.95)])
def test_pagerank_matches_dense_eigenvector(n: int, damping: float) -> None:
    rng = np.random.default_rng(n)
    attn = _softmax_attn(rng, 2, 3, n)
    got = pagerank(attn, damping=damping, tol=1e-13, max_iter=2000)
    np.testing.assert_allclose(got.numpy(), eig_pagerank(attn, damping), atol=1e-10)


def test_pagerank_3d_equals_single_head_4d_and_float32() -> None:
    rng = np.random.default_rng(3)
    attn = _softmax_attn(rng, 2, 1, 7)
    s3 = pagerank(attn[:, 0])
    s4 = pagerank(attn)
    assert torch.equal(s3, s4)
    s32 = pagerank(attn.float())
    assert s32.dtype == torch.float32
    assert torch.allclose(s32.double(), s4, atol=1e-5)
    assert pagerank(attn.half()).dtype == torch.float32


def test_pagerank_masked_is_minus_inf_and_rows_sum_to_one() -> None:
    rng = np.random.default_rng(11)
    attn = _softmax_attn(rng, 3, 2, 10)
    mask = _ragged_mask(rng, 3, 10, "scattered")
    assert mask is not None
    s = pagerank(attn, mask=mask)
    assert bool(torch.isinf(s[~mask]).all()) and bool((s[~mask] < 0).all())
    assert bool(torch.isfinite(s[mask]).all())
    sums = s.masked_fill(~mask, 0.0).sum(dim=1)
    assert torch.allclose(sums, torch.ones(3, dtype=sums.dtype), atol=1e-9)


def test_pagerank_hub_token_wins() -> None:
    n = 6
    attn = torch.full((1, n, n), 0.02, dtype=torch.float64)
    attn[0, :, 2] = 0.9  # everyone attends to token 2
    s = pagerank(attn)
    assert int(s.argmax()) == 2


def test_pagerank_dangling_row_spreads_uniformly() -> None:
    # query 0 attends only to the masked key 3: it becomes a dangling node
    attn = torch.tensor([[[0.0, 0.0, 0.0, 1.0],
                          [0.5, 0.5, 0.0, 0.0],
                          [0.2, 0.3, 0.5, 0.0],
                          [0.25, 0.25, 0.25, 0.25]]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, False]])
    s = pagerank(attn, mask=mask, tol=1e-14, max_iter=500)
    _close(s, ref_pagerank(attn, 0.85, 1e-14, 500, mask), atol=1e-12)
    assert math.isclose(float(s[0, :3].sum()), 1.0, abs_tol=1e-12)


def test_pagerank_all_masked_row_is_all_minus_inf() -> None:
    rng = np.random.default_rng(5)
    attn = _softmax_attn(rng, 2, 1, 4)
    mask = torch.tensor([[True, True, False, True], [False, False, False, False]])
    s = pagerank(attn, mask=mask)
    assert bool(torch.isinf(s[1]).all())
    assert not bool(torch.isnan(s).any())


def test_pagerank_weights_personalise() -> None:
    rng = np.random.default_rng(13)
    attn = _softmax_attn(rng, 2, 2, 8)
    mask = _ragged_mask(rng, 2, 8, "right")
    w = torch.from_numpy(rng.random((2, 8)))
    got = pagerank(attn, mask=mask, weights=w, tol=1e-12, max_iter=300)
    _close(got, ref_pagerank(attn, 0.85, 1e-12, 300, mask, w), atol=1e-10)
    # teleporting only to token 4 lifts it
    onehot = torch.zeros(2, 8, dtype=torch.float64)
    onehot[:, 4] = 1.0
    base = pagerank(attn)
    lifted = pagerank(attn, weights=onehot)
    assert bool((lifted[:, 4] > base[:, 4]).all())


def test_pagerank_weights_scale_invariant_and_ignore_masked() -> None:
    rng = np.random.default_rng(17)
    attn = _softmax_attn(rng, 1, 2, 6)
    mask = torch.tensor([[True, True, True, True, False, False]])
    w = torch.from_numpy(rng.random((1, 6)))
    w2 = w * 7.0
    w2[0, 4:] = 100.0  # masked positions do not matter
    assert torch.allclose(pagerank(attn, mask=mask, weights=w),
                          pagerank(attn, mask=mask, weights=w2), atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), h=st.integers(1, 3), n=st.integers(1, 9),
    seed=st.integers(0, 10_000), kind=st.sampled_from(["none", "right", "left", "scattered"]),
    damping=st.floats(0.05, 1.0),
)
def test_pagerank_properties(b: int, h: int, n: int, seed: int, kind: str,
                             damping: float) -> None:
    rng = np.random.default_rng(seed)
    attn = _softmax_attn(rng, b, h, n)
    mask = _ragged_mask(rng, b, n, kind)
    s = pagerank(attn, damping=damping, mask=mask)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    assert s.shape == (b, n)
    assert not bool(torch.isnan(s).any())
    assert bool(torch.isneginf(s[~valid]).all()) and bool((s[valid] >= 0).all())
    assert torch.allclose(s.masked_fill(~valid, 0).sum(1), torch.ones(b, dtype=s.dtype), atol=1e-9)
    # batched == per sample
    for i in range(b):
        one = pagerank(attn[i:i + 1], damping=damping,
                       mask=None if mask is None else mask[i:i + 1])
        assert torch.allclose(one[0], s[i], atol=1e-12)  # equal infinities count as close
    # permutation equivariance
    perm = torch.from_numpy(rng.permutation(n))
    sp = pagerank(attn[:, :, perm][:, :, :, perm], damping=damping, tol=1e-12, max_iter=400,
                  mask=None if mask is None else mask[:, perm])
    s_tight = pagerank(attn, damping=damping, tol=1e-12, max_iter=400, mask=mask)
    if damping < 0.99:  # damping 1 may oscillate; then iterates need not match after permuting
        assert torch.allclose(sp, s_tight[:, perm], atol=1e-9)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"damping": 0.0}, "damping"),
        ({"damping": 1.5}, "damping"),
        ({"damping": -0.1}, "damping"),
        ({"damping": float("nan")}, "damping"),
        ({"damping": True}, "damping"),
        ({"tol": 0.0}, "tol"),
        ({"tol": -1e-3}, "tol"),
        ({"max_iter": 0}, "max_iter"),
        ({"max_iter": 2.5}, "max_iter"),
    ],
)
def test_pagerank_bad_parameters(kwargs: dict, match: str) -> None:
    attn = torch.softmax(torch.randn(1, 2, 4, 4), dim=-1)
    with pytest.raises(UniprunerError, match=match):
        pagerank(attn, **kwargs)


def test_pagerank_bad_inputs() -> None:
    good = torch.softmax(torch.randn(2, 2, 5, 5), dim=-1)
    with pytest.raises(UniprunerError, match=r"\[B, H, Q, N\]"):
        pagerank(torch.rand(5, 5))
    with pytest.raises(UniprunerError, match=r"\[B, H, Q, N\]"):
        pagerank(torch.rand(1, 1, 1, 5, 5))
    with pytest.raises(UniprunerError, match="square"):
        pagerank(torch.rand(1, 2, 3, 5))
    with pytest.raises(UniprunerError, match="NaN"):
        bad = good.clone()
        bad[0, 0, 1, 2] = float("nan")
        pagerank(bad)
    with pytest.raises(UniprunerError, match="non-negative"):
        pagerank(good - 0.5)
    with pytest.raises(UniprunerError, match="mask must have shape"):
        pagerank(good, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(UniprunerError, match=r"torch\.Tensor"):
        pagerank(good.numpy())  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="0 tokens"):
        pagerank(torch.zeros(1, 1, 0, 0))
    with pytest.raises(UniprunerError, match="weights must be a tensor"):
        pagerank(good, weights=torch.ones(2, 4))
    with pytest.raises(UniprunerError, match="non-negative"):
        pagerank(good, weights=-torch.ones(2, 5))
    with pytest.raises(UniprunerError, match="positive mass"):
        pagerank(good, weights=torch.zeros(2, 5))
    with pytest.raises(UniprunerError, match="NaN"):
        pagerank(good, weights=torch.full((2, 5), float("nan")))
    with pytest.raises(ValueError):  # UniprunerError is a ValueError
        pagerank(good, damping=2.0)


# ----------------------------------------------------------------------------------------------
# similarity_propagation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("b,n,d", [(1, 4, 3), (2, 10, 5), (3, 17, 8)])
@pytest.mark.parametrize("kind", ["none", "right", "left", "scattered"])
@pytest.mark.parametrize("k,alpha,n_iter", [(1, 0.5, 3), (3, 0.8, 10), (8, 1.0, 5), (50, 0.3, 4)])
def test_propagation_matches_naive(b: int, n: int, d: int, kind: str, k: int, alpha: float,
                                   n_iter: int) -> None:
    rng = np.random.default_rng(b * 1000 + n * 10 + k)
    x = torch.from_numpy(rng.normal(size=(b, n, d)))
    mask = _ragged_mask(rng, b, n, kind)
    got = similarity_propagation(x, k=k, alpha=alpha, n_iter=n_iter, mask=mask)
    assert got.dtype == torch.float64 and got.shape == (b, n)
    _close(got, ref_propagation(x, None, k, alpha, n_iter, mask), atol=1e-12)


@pytest.mark.parametrize("kind", ["none", "left", "scattered"])
def test_propagation_with_scores_matches_naive(kind: str) -> None:
    rng = np.random.default_rng(21)
    b, n, d = 3, 12, 6
    x = torch.from_numpy(rng.normal(size=(b, n, d)))
    mask = _ragged_mask(rng, b, n, kind)
    scores = torch.from_numpy(rng.random((b, n)))
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)  # as another scorer would return them
    got = similarity_propagation(x, scores, k=4, alpha=0.6, n_iter=7, mask=mask)
    _close(got, ref_propagation(x, scores, 4, 0.6, 7, mask), atol=1e-12)


def test_propagation_degenerate_settings_return_s0() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.normal(size=(2, 7, 4)))
    s0 = torch.from_numpy(rng.random((2, 7)))
    assert torch.allclose(similarity_propagation(x, s0, alpha=0.0), s0)
    assert torch.allclose(similarity_propagation(x, s0, n_iter=0), s0)
    uni = similarity_propagation(x, n_iter=0)
    assert torch.allclose(uni, torch.full((2, 7), 1 / 7, dtype=torch.float64))


def test_propagation_single_token_and_float32() -> None:
    x = torch.randn(2, 1, 4)
    s = similarity_propagation(x)
    assert s.dtype == torch.float32
    # no neighbours: s = (1 - alpha) * s0 after one step, forever after
    assert torch.allclose(s, torch.full((2, 1), 0.5))
    mask = torch.tensor([[True, False, False], [False, False, False]])
    s2 = similarity_propagation(torch.randn(2, 3, 4), mask=mask)
    assert bool(torch.isneginf(s2[1]).all()) and bool(torch.isfinite(s2[0, 0]))
    assert not bool(torch.isnan(s2).any())


def test_propagation_representative_token_wins() -> None:
    rng = np.random.default_rng(4)
    centre = rng.normal(size=8)
    cluster = centre + 0.05 * rng.normal(size=(6, 8))
    cluster[0] = centre  # the exact centre is everybody's nearest neighbour
    outliers = rng.normal(size=(3, 8)) * 3
    x = torch.from_numpy(np.concatenate([outliers, cluster]))[None]
    s = similarity_propagation(x, k=2, alpha=0.9, n_iter=20)
    assert int(s.argmax()) == 3


# d >= 2: with d = 1 every cosine is +-1, so neighbours tie and the order is index-dependent
@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 3), n=st.integers(1, 10), d=st.integers(2, 5), k=st.integers(1, 6),
    seed=st.integers(0, 10_000), kind=st.sampled_from(["none", "right", "left", "scattered"]),
    alpha=st.floats(0.0, 1.0),
)
def test_propagation_properties(b: int, n: int, d: int, k: int, seed: int, kind: str,
                                alpha: float) -> None:
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(b, n, d)))
    mask = _ragged_mask(rng, b, n, kind)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    s = similarity_propagation(x, k=k, alpha=alpha, n_iter=5, mask=mask)
    assert bool(torch.isneginf(s[~valid]).all()) and bool((s[valid] >= 0).all())
    # mass never grows (rows of W sum to 1 or 0)
    assert bool((s.masked_fill(~valid, 0).sum(1) <= 1 + 1e-9).all())
    for i in range(b):
        one = similarity_propagation(x[i:i + 1], k=k, alpha=alpha, n_iter=5,
                                     mask=None if mask is None else mask[i:i + 1])
        assert torch.allclose(one[0], s[i], atol=1e-12)
    # permutation equivariance (no ties in random data)
    perm = torch.from_numpy(rng.permutation(n))
    sp = similarity_propagation(x[:, perm], k=k, alpha=alpha, n_iter=5,
                                mask=None if mask is None else mask[:, perm])
    assert torch.allclose(sp, s[:, perm], atol=1e-12)


def test_propagation_bad_inputs() -> None:
    x = torch.randn(2, 5, 3)
    with pytest.raises(UniprunerError, match=r"\[B, N, D\]"):
        similarity_propagation(torch.randn(5, 3))
    with pytest.raises(UniprunerError, match="floating-point"):
        similarity_propagation(torch.ones(1, 5, 3, dtype=torch.long))
    bad = x.clone()
    bad[1, 2, 0] = float("nan")
    with pytest.raises(UniprunerError, match="NaN"):
        similarity_propagation(bad)
    bad[1, 2, 0] = float("inf")
    with pytest.raises(UniprunerError, match="inf"):
        similarity_propagation(bad)
    with pytest.raises(UniprunerError, match="k must be"):
        similarity_propagation(x, k=0)
    with pytest.raises(UniprunerError, match="alpha"):
        similarity_propagation(x, alpha=1.5)
    with pytest.raises(UniprunerError, match="n_iter"):
        similarity_propagation(x, n_iter=-1)
    with pytest.raises(UniprunerError, match="scores must be a tensor"):
        similarity_propagation(x, torch.rand(2, 4))
    with pytest.raises(UniprunerError, match="finite at valid"):
        similarity_propagation(x, torch.full((2, 5), -math.inf))
    with pytest.raises(UniprunerError, match="NaN"):
        similarity_propagation(x, torch.full((2, 5), float("nan")))
    with pytest.raises(UniprunerError, match="mask must have shape"):
        similarity_propagation(x, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(UniprunerError, match="at least 1"):
        similarity_propagation(torch.randn(1, 0, 3))
