"""Budgets and top-k selection against a plain reference, plus properties and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner import Budget, Schedule, UniprunerError, topk
from unipruner.select import knee_count, r_schedule


def naive_topk(scores: np.ndarray, k: int, valid: np.ndarray, prot: np.ndarray) -> list[int]:
    """One row, written plainly: protected first, then best valid scores, ties to lower index."""
    n = len(scores)
    chosen = [i for i in range(n) if prot[i] and valid[i]]
    k = max(k, len(chosen))
    rest = sorted((i for i in range(n) if valid[i] and not prot[i]), key=lambda i: (-scores[i], i))
    chosen += rest[: k - len(chosen)]
    return sorted(chosen)


def naive_count(budget: Budget, row: np.ndarray, valid: np.ndarray) -> int:
    nv = int(valid.sum())
    if budget.ratio is not None:
        return min(nv, math.floor(nv * budget.ratio + 0.5))
    if budget.keep is not None:
        return min(nv, budget.keep)
    return int(((row >= budget.threshold) & valid).sum())


def random_mask(b: int, n: int, g: torch.Generator) -> torch.Tensor:
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    left = torch.rand(b, generator=g) < 0.5
    pos = torch.arange(n)
    right_pad = pos.unsqueeze(0) < lengths.unsqueeze(1)
    left_pad = pos.unsqueeze(0) >= (n - lengths).unsqueeze(1)
    return torch.where(left.unsqueeze(1), left_pad, right_pad)


@pytest.mark.parametrize("b,n", [(1, 7), (3, 16), (5, 64)])
@pytest.mark.parametrize(
    "budget", [Budget(ratio=0.25), Budget(ratio=0.5), Budget(keep=5), Budget(threshold=0.3)]
)
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("protected", [0, 2])
def test_topk_matches_naive(b: int, n: int, budget: Budget, masked: bool, protected: int) -> None:
    g = torch.Generator().manual_seed(b * 100 + n)
    scores = torch.rand(b, n, generator=g)
    mask = random_mask(b, n, g) if masked else None
    if budget.keep is not None and budget.keep > n:
        pytest.fail("bad test parameters")
    got = topk(scores, budget, mask=mask, protected=protected)
    valid = np.ones((b, n), bool) if mask is None else mask.numpy()
    for i in range(b):
        prot = np.zeros(n, bool)
        prot[:protected] = True
        k = naive_count(budget, scores[i].numpy(), valid[i])
        want = naive_topk(scores[i].numpy(), k, valid[i], prot)
        row = [int(x) for x in got[i] if x >= 0]
        assert row == want
        assert all(int(x) == -1 for x in got[i][len(row):])


def test_topk_protected_mask_tensor() -> None:
    scores = torch.tensor([[0.9, 0.1, 0.8, 0.2, 0.7]])
    prot = torch.tensor([False, True, False, True, False])
    assert topk(scores, 2, protected=prot).tolist() == [[1, 3]]
    assert topk(scores, 3, protected=prot).tolist() == [[0, 1, 3]]


def test_topk_ties_go_to_lower_index() -> None:
    assert topk(torch.zeros(1, 6), 3).tolist() == [[0, 1, 2]]


def test_topk_per_row_budget_tensor() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.5], [0.3, 0.2, 0.1]])
    assert topk(scores, torch.tensor([1, 2])).tolist() == [[1, -1], [0, 1]]


@settings(max_examples=60, deadline=None)
@given(
    b=st.integers(1, 4),
    n=st.integers(1, 40),
    ratio=st.floats(0.0, 1.0),
    protected=st.integers(0, 3),
    seed=st.integers(0, 10_000),
    masked=st.booleans(),
)
def test_topk_properties(b: int, n: int, ratio: float, protected: int, seed: int, masked: bool) -> None:
    protected = min(protected, n)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, n, generator=g)
    mask = random_mask(b, n, g) if masked else None
    idx = topk(scores, Budget(ratio=ratio), mask=mask, protected=protected)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    for i in range(b):
        row = idx[i][idx[i] >= 0]
        assert torch.all(row[1:] > row[:-1]), "sorted and unique"
        assert torch.all((row >= 0) & (row < n)), "in range"
        assert bool(valid[i, row].all()), "never masked"
        prot = [j for j in range(protected) if valid[i, j]]
        assert set(prot) <= set(row.tolist()), "protected kept"
        nv = int(valid[i].sum())
        want = max(min(nv, math.floor(nv * ratio + 0.5)), len(prot))
        assert len(row) == want, "budget honoured exactly"
        # batched == per-sample
        single = topk(scores[i : i + 1], Budget(ratio=ratio),
                      mask=None if mask is None else mask[i : i + 1], protected=protected)
        assert single[0][single[0] >= 0].tolist() == row.tolist()


def test_budget_validation() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        Budget()
    with pytest.raises(ValueError, match="exactly one"):
        Budget(ratio=0.5, keep=3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Budget(ratio=1.5)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        Budget(ratio=-0.1)
    with pytest.raises(ValueError, match="non-negative"):
        Budget(keep=-1)
    with pytest.raises(ValueError, match="more tokens than the sequence"):
        topk(torch.rand(2, 5), Budget(keep=6))
    with pytest.raises(ValueError, match="per-row budgets"):
        topk(torch.rand(2, 5), torch.tensor([1, 7]))


def test_topk_bad_input() -> None:
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        topk(torch.rand(5), 2)
    with pytest.raises(ValueError, match="NaN"):
        topk(torch.tensor([[0.1, float("nan")]]), 1)
    with pytest.raises(ValueError, match="mask must have shape"):
        topk(torch.rand(2, 5), 2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="protected"):
        topk(torch.rand(2, 5), 2, protected=6)
    with pytest.raises(ValueError, match="protected"):
        topk(torch.rand(2, 5), 2, protected=-1)
    with pytest.raises(ValueError, match="no budget"):
        topk(torch.rand(2, 5), None)  # type: ignore[arg-type]


def test_empty_sequence_keeps_nothing() -> None:
    assert topk(torch.rand(2, 0), Budget(ratio=0.5)).shape == (2, 0)


def naive_knee(scores: list[float]) -> int:
    s = sorted(scores, reverse=True)
    n = len(s)
    if n <= 2:
        return n
    best, arg = -math.inf, 0
    for i, v in enumerate(s):
        x = i / (n - 1)
        y = (s[0] - v) / max(s[0] - s[-1], 1e-300)
        if x - y > best + 1e-15:
            best, arg = x - y, i
    return arg + 1


@pytest.mark.parametrize("seed", range(8))
def test_knee_matches_naive(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(3, 30, generator=g) ** 4  # a skewed curve with a knee
    got = knee_count(scores)
    for i in range(3):
        assert int(got[i]) == naive_knee(scores[i].tolist())
    idx = topk(scores, Budget.auto())
    assert [(r >= 0).sum().item() for r in idx] == got.tolist()


def test_knee_on_an_obvious_curve() -> None:
    scores = torch.tensor([[5.0, 4.9, 4.8, 4.7, 0.2, 0.15, 0.1, 0.05, 0.0, 0.0]])
    assert knee_count(scores).tolist() == [4]


def test_schedules() -> None:
    s = Schedule([0.5, Budget(keep=3), None])
    assert s[0] == Budget(ratio=0.5) and s[1] == Budget(keep=3) and s[2] is None
    assert len(Schedule.constant(0.5, 4)) == 4
    with pytest.raises(ValueError, match="outside"):
        s[5]
    assert r_schedule(16, 4) == [16] * 4
    rs = r_schedule((8, 1.0), 5)
    assert rs[0] < rs[-1] and sum(rs) == 40
    assert r_schedule((8, -1.0), 5)[0] > r_schedule((8, -1.0), 5)[-1]
    with pytest.raises(ValueError, match="non-negative"):
        r_schedule([1, 2], 3)
    with pytest.raises(UniprunerError):
        r_schedule((8, 2.0), 3)


def test_schedule_constructors_resolve_per_model() -> None:
    geo = Schedule.geometric(final=0.15)
    assert geo.kind == "geometric" and geo == Schedule.geometric(0.15) and hash(geo) == hash(Schedule.geometric(0.15))
    # 64 patches + CLS over 4 layers: 40, 25, 15, 10 patches left (each layer keeps 0.15 ** (1/4))
    assert geo.counts(65, 4, protected=1) == [(65, 41), (41, 26), (26, 16), (16, 11)]
    assert Schedule.geometric(final=1.0).removals(17, 3, protected=1) == [0, 0, 0]
    assert Schedule.geometric(final=0.01).counts(16, 2) == [(16, 2), (2, 1)]  # no protected token: one stays
    rem = Schedule.remove(4, inflection=-1)
    assert rem == Schedule.remove(4, inflection=-1.0) and rem.kind == "remove"
    assert rem.removals(17, 3, protected=1, limit="bipartite") == r_schedule((4, -1.0), 3) == [8, 4, 0]
    assert Schedule.remove([1, 2, 3]).counts(17, 3, protected=1) == [(17, 16), (16, 14), (14, 11)]
    assert repr(rem) == "Schedule.remove(4, inflection=-1.0)" and repr(geo) == "Schedule.geometric(final=0.15)"
    assert repr(Schedule.constant(0.5, 3)) == "Schedule.constant(Budget(ratio=0.5), 3)"
    assert bool(geo)
    with pytest.raises(UniprunerError, match=r"depends on the model.*removals\(n0, n_layers\)"):
        len(geo)
    with pytest.raises(UniprunerError, match="depends on the model"):
        list(rem)


def test_schedule_caps_follow_the_reduction() -> None:
    assert Schedule.max_removal(17, protected=1, limit="bipartite")[0] == 8
    assert Schedule.max_removal(17, protected=1, limit="fuse")[0] == 15
    assert Schedule.max_removal(17, protected=0, limit="protected")[0] == 16
    assert Schedule.max_removal(3, protected=4)[0] == 0
    # ToMe caps later layers silently at half of the unprotected tokens ...
    assert Schedule.remove(8).counts(17, 3, protected=1, limit="bipartite") == [(17, 9), (9, 5), (5, 3)]
    # ... but a first reduction that cannot be met is an error (also when earlier layers remove nothing)
    with pytest.raises(UniprunerError, match=r"layer 0 to remove 9 of its 17 tokens.*'tome' can remove at most 8"):
        Schedule.remove(9).removals(17, 3, protected=1, limit="bipartite", who="'tome'")
    with pytest.raises(UniprunerError, match=r"layer 1 to remove 9 of its 17"):
        Schedule.remove([0, 9, 1]).removals(17, 3, protected=1, limit="bipartite")
    # a budget schedule is checked at every layer; a geometric one is capped silently
    sched = Schedule([0.5, None, Budget(keep=2)])
    assert sched.counts(17, 3, protected=1) == [(17, 9), (9, 9), (9, 3)]
    with pytest.raises(UniprunerError, match=r"layer 2 to remove 6 of its 9 tokens.*at most 4.*bipartite"):
        sched.removals(17, 3, protected=1, limit="bipartite")
    assert Schedule([Budget(keep=4), None]).counts(17, 2, protected=1, limit="fuse") == [(17, 5), (5, 5)]
    assert Schedule.geometric(final=0.1).counts(17, 2, protected=1, limit="bipartite") == [(17, 9), (9, 5)]
    assert Schedule([0.0, 0.0]).counts(8, 2) == [(8, 1), (1, 1)]  # nothing protected: one token stays


def test_schedule_constructor_errors() -> None:
    for bad in (0.0, 1.5, True, "0.5"):
        with pytest.raises(UniprunerError, match=r"final is the fraction of the tokens left.*\(0, 1\]"):
            Schedule.geometric(bad)  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="r must be >= 0"):
        Schedule.remove(-1)
    with pytest.raises(UniprunerError, match="inflection in"):
        Schedule.remove(4, inflection=2.0)
    with pytest.raises(UniprunerError, match="constant r"):
        Schedule.remove([1, 2], inflection=0.5)
    with pytest.raises(UniprunerError, match="list of ints"):
        Schedule.remove([1.5, 2])  # type: ignore[list-item]
    with pytest.raises(UniprunerError, match="empty"):
        Schedule.remove([])
    with pytest.raises(UniprunerError, match="non-negative"):
        Schedule.remove([1, 2]).removals(17, 3)
    with pytest.raises(UniprunerError, match="one entry per layer"):
        Schedule([0.5]).removals(17, 3)
    with pytest.raises(UniprunerError, match="limit must be"):
        Schedule.max_removal(17, limit="halve")
    with pytest.raises(UniprunerError, match="protected must lie"):
        Schedule.remove(1).removals(3, 2, protected=4)
