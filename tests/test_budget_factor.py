"""Budget.pool_factor (PyLate's count) and Budget.per_row against plainly written references."""

from __future__ import annotations

import pytest
import torch

from unipruner import UniprunerError
from unipruner.select import Budget, topk


@pytest.mark.parametrize("factor", [1, 1.5, 2, 3, 4, 7.5])
@pytest.mark.parametrize("protected", [0, 1, 3])
def test_pool_factor_count_is_pylates(factor: float, protected: int) -> None:
    n = torch.arange(0, 60)
    got = Budget.pool_factor(factor).counts(n, n_max=60, protected=protected).tolist()
    ref = []
    for x in n.tolist():
        p = min(protected, x)
        ref.append(x if x <= p else p + max(int((x - p) // factor), 1))  # PyLate: max(n // pool_factor, 1)
    assert got == ref


def test_pool_factor_is_a_ratio_and_validates() -> None:
    b = Budget.pool_factor(4)
    assert b.ratio == 0.25 and b.factor == 4 and not b.data_dependent
    assert b == Budget(factor=4) == Budget(ratio=0.25, factor=4) and b != Budget(ratio=0.25)
    assert repr(b) == "Budget.pool_factor(4)" and Budget.coerce(b) is b
    for bad in (0.5, 0, float("inf"), float("nan"), True, "2"):
        with pytest.raises(UniprunerError, match="pool factor"):
            Budget.pool_factor(bad)  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="not both"):
        Budget(ratio=0.4, factor=2)
    with pytest.raises(UniprunerError, match="exactly one"):
        Budget(keep=3, factor=2)


def test_topk_with_pool_factor_counts_the_unprotected_tokens() -> None:
    g = torch.Generator().manual_seed(0)
    s = torch.rand(4, 9, generator=g)
    mask = torch.ones(4, 9, dtype=torch.bool)
    mask[1, 5:] = False
    mask[2, 1:] = False
    idx = topk(s, Budget.pool_factor(2), mask=mask, protected=1)
    for row, n in enumerate(mask.sum(1).tolist()):
        kept = idx[row][idx[row] >= 0].tolist()
        assert len(kept) == (1 + max((n - 1) // 2, 1) if n > 1 else n)
        assert kept[0] == 0


def test_per_row_budget() -> None:
    b = Budget.per_row(torch.tensor([3, 0, 9]))
    assert b == Budget.per_row([3, 0, 9]) and b.rows == (3, 0, 9) and repr(b) == "Budget.per_row([3, 0, 9])"
    s = torch.arange(15.0).view(3, 5)
    assert topk(s, b).tolist() == [[2, 3, 4, -1, -1], [-1, -1, -1, -1, -1], [0, 1, 2, 3, 4]]
    assert topk(s, b, protected=1).tolist() == [[0, 3, 4, -1, -1], [0, -1, -1, -1, -1], [0, 1, 2, 3, 4]]
    with pytest.raises(UniprunerError, match="3 rows"):
        topk(s[:2], b)
    for bad in ([1, -1], [1.5], [True]):
        with pytest.raises(UniprunerError, match="non-negative ints"):
            Budget.per_row(bad)  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="1-D integer"):
        Budget.per_row(torch.tensor([1.0]))
