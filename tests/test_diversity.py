"""Tests for unipruner.scorers.diversity: DivPrune, k-center, MMR and saliency + diversity.

Every selector is compared, index for index, with a plain per-sample reference written here
(Python loops over the picks, numpy distances), then checked for the selector contract.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner.errors import UniprunerError
from unipruner.scorers import diversity
from unipruner.scorers.diversity import divprune, greedy_saliency_diversity, kcenter, mmr
from unipruner.select import Budget

# ----------------------------------------------------------------------------------------------
# plain references (one sample at a time)
# ----------------------------------------------------------------------------------------------


def _unit(v: np.ndarray) -> np.ndarray:
    return v / max(float(np.linalg.norm(v)), 1e-12)


def _argmax_first(keys: dict[int, float]) -> int:
    """Index with the largest key; the lowest index among equal keys."""
    best = None
    for i in sorted(keys):
        if best is None or keys[i] > keys[best]:
            best = i
    assert best is not None
    return best


def ref_divprune(x: np.ndarray, idx: list[int], chosen: list[int], k: int) -> list[int]:
    xn = {i: _unit(x[i]) for i in idx}

    def dist(i: int, j: int) -> float:
        return 1.0 - float(np.dot(xn[i], xn[j]))

    chosen = list(chosen)
    while len(chosen) < k:
        keys = {}
        for i in idx:
            if i in chosen:
                continue
            if chosen:
                keys[i] = min(dist(i, j) for j in chosen)
            else:
                keys[i] = min((dist(i, j) for j in idx if j != i), default=math.inf)
        chosen.append(_argmax_first(keys))
    return sorted(chosen)


def ref_kcenter(x: np.ndarray, idx: list[int], chosen: list[int], k: int,
                scores: np.ndarray | None) -> list[int]:
    xn = {i: _unit(x[i]) for i in idx}

    def sq(a: np.ndarray, b: np.ndarray) -> float:
        return float(np.sum((a - b) ** 2))

    chosen = list(chosen)
    while len(chosen) < k:
        cands = [i for i in idx if i not in chosen]
        if chosen:
            keys = {i: min(sq(xn[i], xn[j]) for j in chosen) for i in cands}
        elif scores is not None:
            keys = {i: float(scores[i]) for i in cands}
        else:
            mean = np.mean([xn[i] for i in idx], axis=0)
            keys = {i: -sq(xn[i], mean) for i in cands}
        chosen.append(_argmax_first(keys))
    return sorted(chosen)


def ref_mmr(x: np.ndarray, idx: list[int], chosen: list[int], k: int, rel: np.ndarray,
            lam: float) -> list[int]:
    xn = {i: _unit(x[i]) for i in idx}
    chosen = list(chosen)
    while len(chosen) < k:
        cands = [i for i in idx if i not in chosen]
        if chosen:
            keys = {i: lam * rel[i] - (1 - lam) * max(float(np.dot(xn[i], xn[j]))
                                                      for j in chosen) for i in cands}
        else:
            keys = {i: float(rel[i]) for i in cands}
        chosen.append(_argmax_first(keys))
    return sorted(chosen)


def ref_greedy(x: np.ndarray, idx: list[int], chosen: list[int], k: int, scores: np.ndarray,
               alpha: float) -> list[int]:
    xn = {i: _unit(x[i]) for i in idx}
    lo = min(scores[i] for i in idx)
    hi = max(scores[i] for i in idx)
    sal = {i: (scores[i] - lo) / (hi - lo) if hi > lo else 0.0 for i in idx}
    chosen = list(chosen)
    while len(chosen) < k:
        cands = [i for i in idx if i not in chosen]
        if chosen:
            keys = {i: alpha * sal[i] + (1 - alpha) * min(
                (1.0 - float(np.dot(xn[i], xn[j]))) / 2.0 for j in chosen) for i in cands}
        else:
            keys = {i: sal[i] for i in cands}
        chosen.append(_argmax_first(keys))
    return sorted(chosen)


def ref_count(budget: int | float, n_valid: int, n_prot: int) -> int:
    if isinstance(budget, float):
        k = min(math.floor(n_valid * budget + 0.5), n_valid)
    else:
        k = min(budget, n_valid)
    return max(k, n_prot)


def run_reference(ref: Callable[..., list[int]], x: torch.Tensor, budget: int | float,
                  mask: torch.Tensor | None, prot: torch.Tensor,
                  per_row: Callable[[int], dict] | None = None) -> torch.Tensor:
    """Apply a per-sample reference to every row and pad like the selectors do."""
    b, n, _ = x.shape
    xs = x.double().numpy()
    valid = np.ones((b, n), dtype=bool) if mask is None else mask.numpy()
    rows = []
    for bi in range(b):
        idx = [i for i in range(n) if valid[bi, i]]
        pro = [i for i in idx if bool(prot[bi, i])]
        k = ref_count(budget, len(idx), len(pro))
        extra = {} if per_row is None else per_row(bi)
        rows.append(ref(xs[bi], idx, pro, k, **extra))
    kmax = max((len(r) for r in rows), default=0)
    return torch.tensor([r + [-1] * (kmax - len(r)) for r in rows], dtype=torch.long).reshape(
        b, kmax)


# ----------------------------------------------------------------------------------------------
# random inputs
# ----------------------------------------------------------------------------------------------


def make_mask(rng: np.random.Generator, b: int, n: int, kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    m = np.zeros((b, n), dtype=bool)
    for i in range(b):
        length = n if i == 0 else int(rng.integers(1, n + 1))
        if kind == "right":
            m[i, :length] = True
        elif kind == "left":
            m[i, n - length:] = True
        else:
            m[i] = rng.random(n) < 0.6
            m[i, rng.integers(n)] = True
    return torch.from_numpy(m)


def make_protected(rng: np.random.Generator, b: int, n: int,
                   kind: str) -> tuple[int | torch.Tensor | None, torch.Tensor]:
    """(argument to pass, the [B, N] mask it means before intersecting with validity)."""
    if kind == "none":
        return None, torch.zeros(b, n, dtype=torch.bool)
    if kind == "lead":
        p = int(rng.integers(1, min(n, 3) + 1))
        full = torch.zeros(b, n, dtype=torch.bool)
        full[:, :p] = True
        return p, full
    full = torch.from_numpy(rng.random((b, n)) < 0.2)
    return full, full


def _prot_valid(prot_full: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return prot_full if mask is None else prot_full & mask


SHAPES = [(1, 6, 3), (2, 12, 5), (3, 20, 8), (4, 9, 2)]
MASKS = ["none", "right", "left", "scattered"]
PROTS = ["none", "lead", "mask"]


def _case(shape: tuple[int, int, int], mkind: str, pkind: str, salt: int):
    b, n, d = shape
    rng = np.random.default_rng(zlib.crc32(repr((shape, mkind, pkind, salt)).encode()))
    x = torch.from_numpy(rng.normal(size=(b, n, d)))
    mask = make_mask(rng, b, n, mkind)
    parg, pfull = make_protected(rng, b, n, pkind)
    return rng, x, mask, parg, _prot_valid(pfull, mask)


# ----------------------------------------------------------------------------------------------
# identical indices to the references
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mkind", MASKS)
@pytest.mark.parametrize("pkind", PROTS)
@pytest.mark.parametrize("budget", [3, 0.5, 1, 0.0])
def test_divprune_matches_reference(shape, mkind, pkind, budget) -> None:
    _, x, mask, parg, prot = _case(shape, mkind, pkind, 1)
    got = divprune(x, budget, mask=mask, protected=parg)
    want = run_reference(ref_divprune, x, budget, mask, prot)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mkind", MASKS)
@pytest.mark.parametrize("pkind", PROTS)
@pytest.mark.parametrize("with_scores", [False, True])
def test_kcenter_matches_reference(shape, mkind, pkind, with_scores) -> None:
    rng, x, mask, parg, prot = _case(shape, mkind, pkind, 2)
    scores = torch.from_numpy(rng.random(shape[:2])) if with_scores else None
    if scores is not None and mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    got = kcenter(x, 0.4, scores=scores, mask=mask, protected=parg)
    want = run_reference(ref_kcenter, x, 0.4, mask, prot,
                         lambda bi: {"scores": None if scores is None else scores[bi].numpy()})
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mkind", MASKS)
@pytest.mark.parametrize("pkind", PROTS)
@pytest.mark.parametrize("lam", [0.0, 0.3, 0.7, 1.0])
def test_mmr_matches_reference(shape, mkind, pkind, lam) -> None:
    rng, x, mask, parg, prot = _case(shape, mkind, pkind, 3)
    q = torch.from_numpy(rng.normal(size=(shape[0], shape[2])))
    got = mmr(x, q, 4, lambda_=lam, mask=mask, protected=parg)
    xs, qs = x.numpy(), q.numpy()

    def rel(bi: int) -> dict:
        r = np.array([float(np.dot(_unit(xs[bi, i]), _unit(qs[bi]))) for i in range(shape[1])])
        return {"rel": r, "lam": lam}

    want = run_reference(ref_mmr, x, 4, mask, prot, rel)
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mkind", MASKS)
@pytest.mark.parametrize("pkind", PROTS)
def test_mmr_given_relevance_matches_reference(shape, mkind, pkind) -> None:
    rng, x, mask, parg, prot = _case(shape, mkind, pkind, 4)
    relevance = torch.from_numpy(rng.normal(size=shape[:2]))
    got = mmr(x, None, 0.6, lambda_=0.6, mask=mask, protected=parg, relevance=relevance)
    want = run_reference(ref_mmr, x, 0.6, mask, prot,
                         lambda bi: {"rel": relevance[bi].numpy(), "lam": 0.6})
    assert torch.equal(got, want), (got, want)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mkind", MASKS)
@pytest.mark.parametrize("pkind", PROTS)
@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.9])
def test_greedy_saliency_diversity_matches_reference(shape, mkind, pkind, alpha) -> None:
    rng, x, mask, parg, prot = _case(shape, mkind, pkind, 5)
    scores = torch.from_numpy(rng.normal(size=shape[:2]))
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    got = greedy_saliency_diversity(x, scores, 5, alpha=alpha, mask=mask, protected=parg)
    want = run_reference(ref_greedy, x, 5, mask, prot,
                         lambda bi: {"scores": scores[bi].numpy(), "alpha": alpha})
    assert torch.equal(got, want), (got, want)


def test_greedy_alpha_one_is_topk_by_score() -> None:
    from unipruner.select import topk

    rng = np.random.default_rng(8)
    x = torch.from_numpy(rng.normal(size=(3, 15, 4)))
    s = torch.from_numpy(rng.normal(size=(3, 15)))
    assert torch.equal(greedy_saliency_diversity(x, s, 6, alpha=1.0), topk(s, 6))


def test_mmr_lambda_one_is_topk_by_relevance() -> None:
    from unipruner.select import topk

    rng = np.random.default_rng(9)
    x = torch.from_numpy(rng.normal(size=(2, 11, 4)))
    r = torch.from_numpy(rng.normal(size=(2, 11)))
    assert torch.equal(mmr(x, None, 5, lambda_=1.0, relevance=r), topk(r, 5))


def test_divprune_and_kcenter_share_farthest_first_after_the_seed() -> None:
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.normal(size=(2, 16, 6)))
    # protecting the same first token removes the only difference (the seed)
    assert torch.equal(divprune(x, 7, protected=1), kcenter(x, 7, protected=1))


# ----------------------------------------------------------------------------------------------
# contract properties
# ----------------------------------------------------------------------------------------------

SELECTORS = ["divprune", "kcenter", "kcenter_scores", "mmr", "greedy"]


def _call(name: str, x: torch.Tensor, budget, mask, protected, aux: torch.Tensor,
          q: torch.Tensor) -> torch.Tensor:
    if name == "divprune":
        return divprune(x, budget, mask=mask, protected=protected)
    if name == "kcenter":
        return kcenter(x, budget, mask=mask, protected=protected)
    if name == "kcenter_scores":
        return kcenter(x, budget, scores=aux, mask=mask, protected=protected)
    if name == "mmr":
        return mmr(x, q, budget, lambda_=0.4, mask=mask, protected=protected)
    return greedy_saliency_diversity(x, aux, budget, alpha=0.3, mask=mask, protected=protected)


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(SELECTORS),
    b=st.integers(1, 4), n=st.integers(1, 12), d=st.integers(2, 5), seed=st.integers(0, 99_999),
    mkind=st.sampled_from(MASKS), pkind=st.sampled_from(PROTS),
    budget=st.one_of(st.integers(0, 12), st.floats(0.0, 1.0)),
)
def test_selector_contract(name, b, n, d, seed, mkind, pkind, budget) -> None:
    if isinstance(budget, int):
        budget = min(budget, n)
    rng = np.random.default_rng(seed)
    x = torch.from_numpy(rng.normal(size=(b, n, d)))
    mask = make_mask(rng, b, n, mkind)
    parg, pfull = make_protected(rng, b, n, pkind)
    prot = _prot_valid(pfull, mask)
    aux = torch.from_numpy(rng.normal(size=(b, n)))
    q = torch.from_numpy(rng.normal(size=(b, d)))
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask

    idx = _call(name, x, budget, mask, parg, aux, q)
    assert idx.dtype == torch.long and idx.ndim == 2 and idx.shape[0] == b
    counts = [ref_count(budget, int(valid[i].sum()), int(prot[i].sum())) for i in range(b)]
    assert idx.shape[1] == max(counts)
    for i in range(b):
        row = idx[i].tolist()
        kept = [j for j in row if j >= 0]
        assert len(kept) == counts[i]  # budget honoured exactly
        assert row == kept + [-1] * (len(row) - len(kept))  # padding only on the right
        assert kept == sorted(set(kept))  # sorted and unique
        assert all(0 <= j < n for j in kept)
        assert all(bool(valid[i, j]) for j in kept)  # never masked
        assert set(torch.nonzero(prot[i]).flatten().tolist()) <= set(kept)  # protected kept
        # batched == per sample
        one_prot = parg if not isinstance(parg, torch.Tensor) else parg[i:i + 1]
        one = _call(name, x[i:i + 1], budget, None if mask is None else mask[i:i + 1],
                    one_prot, aux[i:i + 1], q[i:i + 1])
        assert one[0].tolist() == kept


@pytest.mark.parametrize("name", SELECTORS)
def test_ties_go_to_the_lower_index(name: str) -> None:
    x = torch.ones(2, 7, 3)
    aux = torch.zeros(2, 7)
    q = torch.ones(2, 3)
    assert torch.equal(_call(name, x, 3, None, None, aux, q), torch.tensor([[0, 1, 2]] * 2))


@pytest.mark.parametrize("name", SELECTORS)
def test_blocked_pairwise_pass_gives_the_same_answer(name: str, monkeypatch) -> None:
    rng = np.random.default_rng(12)
    x = torch.from_numpy(rng.normal(size=(3, 25, 4)))
    mask = make_mask(rng, 3, 25, "scattered")
    prot = torch.from_numpy(rng.random((3, 25)) < 0.1)
    aux = torch.from_numpy(rng.normal(size=(3, 25)))
    q = torch.from_numpy(rng.normal(size=(3, 4)))
    for p in (None, prot):
        full = _call(name, x, 0.5, mask, p, aux, q)
        monkeypatch.setattr(diversity, "_BLOCK", 7)
        blocked = _call(name, x, 0.5, mask, p, aux, q)
        monkeypatch.undo()
        assert torch.equal(full, blocked)


@pytest.mark.parametrize("name", SELECTORS)
def test_low_precision_inputs(name: str) -> None:
    x = torch.randn(2, 10, 8)
    aux = torch.randn(2, 10)
    q = torch.randn(2, 8)
    for dt in (torch.float32, torch.float16, torch.bfloat16):
        idx = _call(name, x.to(dt), 4, None, 1, aux.to(dt), q.to(dt))
        assert idx.shape == (2, 4) and bool((idx[:, 0] == 0).all())


@pytest.mark.parametrize("name", SELECTORS)
def test_protected_beyond_budget_raises_the_count(name: str) -> None:
    x = torch.randn(2, 8, 3)
    idx = _call(name, x, 2, None, 5, torch.randn(2, 8), torch.randn(2, 3))
    assert torch.equal(idx, torch.arange(5).expand(2, 5))


def test_budget_forms() -> None:
    rng = np.random.default_rng(14)
    x = torch.from_numpy(rng.normal(size=(3, 10, 4)))
    s = torch.from_numpy(rng.normal(size=(3, 10)))
    assert torch.equal(divprune(x, Budget(keep=4)), divprune(x, 4))
    assert torch.equal(divprune(x, Budget(ratio=0.4)), divprune(x, 4))
    per_row = divprune(x, torch.tensor([1, 3, 0]))
    assert per_row.shape == (3, 3)
    assert [int((r >= 0).sum()) for r in per_row] == [1, 3, 0]
    # everything kept
    assert torch.equal(kcenter(x, 1.0), torch.arange(10).expand(3, 10))
    # score-dependent budgets are resolved on the scores / relevance
    th = Budget(threshold=0.5)
    n_keep = (s >= 0.5).sum(dim=1)
    for idx in (kcenter(x, th, scores=s), greedy_saliency_diversity(x, s, th),
                mmr(x, None, th, relevance=s)):
        assert [int((r >= 0).sum()) for r in idx] == n_keep.tolist()
    assert kcenter(x, Budget.auto(), scores=s).shape[0] == 3


def test_empty_batch() -> None:
    assert divprune(torch.randn(0, 5, 3), 2).shape == (0, 0)


def test_all_masked_row_keeps_nothing() -> None:
    x = torch.randn(2, 5, 3)
    mask = torch.tensor([[True, True, False, True, True], [False] * 5])
    for name in SELECTORS:
        idx = _call(name, x, 3, mask, None, torch.randn(2, 5), torch.randn(2, 3))
        assert idx[1].tolist() == [-1, -1, -1] and bool((idx[0] != 2).all())


# ----------------------------------------------------------------------------------------------
# bad inputs
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SELECTORS)
def test_bad_common_inputs(name: str) -> None:
    x = torch.randn(2, 6, 3)
    aux, q = torch.randn(2, 6), torch.randn(2, 3)
    with pytest.raises(UniprunerError, match=r"\[B, N, D\]"):
        _call(name, torch.randn(6, 3), 2, None, None, aux, q)
    with pytest.raises(UniprunerError, match="more tokens than the sequence"):
        _call(name, x, Budget(keep=7), None, None, aux, q)
    with pytest.raises(UniprunerError, match="more tokens than the sequence"):
        _call(name, x, 9, None, None, aux, q)
    with pytest.raises(UniprunerError, match="ratio"):
        _call(name, x, 1.5, None, None, aux, q)
    with pytest.raises(UniprunerError, match="non-negative"):
        _call(name, x, -1, None, None, aux, q)
    with pytest.raises(UniprunerError, match="per-row budgets"):
        _call(name, x, torch.tensor([2, -1]), None, None, aux, q)
    with pytest.raises(UniprunerError, match=r"shape \[B\]"):
        _call(name, x, torch.tensor([2, 1, 1]), None, None, aux, q)
    bad = x.clone()
    bad[0, 1, 1] = float("nan")
    with pytest.raises(UniprunerError, match="NaN"):
        _call(name, bad, 2, None, None, aux, q)
    bad[0, 1, 1] = float("inf")
    with pytest.raises(UniprunerError, match="inf"):
        _call(name, bad, 2, None, None, aux, q)
    with pytest.raises(UniprunerError, match="mask must have shape"):
        _call(name, x, 2, torch.ones(2, 5, dtype=torch.bool), None, aux, q)
    with pytest.raises(UniprunerError, match="protected"):
        _call(name, x, 2, None, 7, aux, q)
    with pytest.raises(UniprunerError, match="at least 1"):
        _call(name, torch.randn(2, 0, 3), 0, None, None, torch.randn(2, 0), q)


def test_bad_method_specific_inputs() -> None:
    x = torch.randn(2, 6, 3)
    with pytest.raises(UniprunerError, match="no scores to resolve"):
        divprune(x, Budget(threshold=0.1))
    with pytest.raises(UniprunerError, match="pass scores="):
        kcenter(x, Budget.auto())
    with pytest.raises(UniprunerError, match="scores must be a tensor"):
        kcenter(x, 2, scores=torch.randn(2, 5))
    with pytest.raises(UniprunerError, match="NaN"):
        kcenter(x, 2, scores=torch.full((2, 6), float("nan")))
    with pytest.raises(UniprunerError, match="finite at valid"):
        greedy_saliency_diversity(x, torch.full((2, 6), math.inf), 2)
    with pytest.raises(UniprunerError, match="alpha"):
        greedy_saliency_diversity(x, torch.randn(2, 6), 2, alpha=1.2)
    with pytest.raises(UniprunerError, match="lambda_"):
        mmr(x, torch.randn(2, 3), 2, lambda_=-0.1)
    with pytest.raises(UniprunerError, match="query must have shape"):
        mmr(x, torch.randn(3, 3), 2)
    with pytest.raises(UniprunerError, match=r"query must be a tensor \[B, D\]"):
        mmr(x, torch.randn(2, 4, 3), 2)
    with pytest.raises(UniprunerError, match="NaN or inf"):
        mmr(x, torch.full((2, 3), float("nan")), 2)
    with pytest.raises(UniprunerError, match="needs a query"):
        mmr(x, None, 2)
    with pytest.raises(UniprunerError, match="relevance must be a tensor"):
        mmr(x, None, 2, relevance=torch.randn(6))


def test_mmr_shared_query_and_relevance_precedence() -> None:
    rng = np.random.default_rng(15)
    x = torch.from_numpy(rng.normal(size=(3, 9, 4)))
    q = torch.from_numpy(rng.normal(size=4))
    assert torch.equal(mmr(x, q, 3), mmr(x, q.expand(3, 4), 3))
    r = torch.from_numpy(rng.normal(size=(3, 9)))
    assert torch.equal(mmr(x, q, 3, relevance=r), mmr(x, None, 3, relevance=r))
