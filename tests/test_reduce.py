"""Drop, merge plans, size-weighted merging, source tracking and unmerging."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner.reduce import (
    MergePlan,
    drop,
    merge_pruned,
    merge_wavg,
    plan_from_labels,
)


def test_drop_gathers_and_pads() -> None:
    x = torch.arange(24.0).reshape(2, 4, 3)
    idx = torch.tensor([[0, 2], [3, -1]])
    out, mask = drop(x, idx)
    assert torch.equal(out[0], x[0, [0, 2]])
    assert torch.equal(out[1, 0], x[1, 3]) and torch.equal(out[1, 1], torch.zeros(3))
    assert mask is not None and mask.tolist() == [[True, True], [True, False]]
    out2, mask2 = drop(x, torch.tensor([[1], [2]]))
    assert mask2 is None and torch.equal(out2[:, 0], torch.stack([x[0, 1], x[1, 2]]))


def test_drop_rejects_bad_indices() -> None:
    x = torch.rand(2, 4, 3)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        drop(x, torch.tensor([[0, 4], [1, 2]]))
    with pytest.raises(ValueError, match="long tensor"):
        drop(x, torch.tensor([[0.0, 1.0], [1.0, 2.0]]))
    with pytest.raises(ValueError, match="masked"):
        drop(x, torch.tensor([[0, 1], [1, 2]]), mask=torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1]]).bool())


def naive_merge(x: np.ndarray, dst: np.ndarray, n_out: int, size: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    b, n, d = x.shape
    out = np.zeros((b, n_out, d))
    tot = np.zeros((b, n_out, 1))
    for i in range(b):
        for j in range(n):
            if dst[i, j] >= 0:
                out[i, dst[i, j]] += x[i, j] * size[i, j]
                tot[i, dst[i, j]] += size[i, j]
    return out / np.maximum(tot, 1e-300), tot


@pytest.mark.parametrize("b,n,k", [(1, 5, 2), (3, 12, 4), (2, 30, 29)])
def test_merge_wavg_matches_naive(b: int, n: int, k: int) -> None:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(b, n, 6, generator=g, dtype=torch.float64)
    size = torch.randint(1, 4, (b, n, 1), generator=g).double()
    labels = torch.randint(0, k, (b, n), generator=g)
    labels[:, :k] = torch.arange(k)  # every slot occupied
    plan = plan_from_labels(labels)
    merged, sizes = merge_wavg(plan, x, size)
    want, want_sizes = naive_merge(x.numpy(), labels.numpy(), k, size.numpy())
    np.testing.assert_allclose(merged.numpy(), want, rtol=1e-10)
    np.testing.assert_allclose(sizes.numpy(), want_sizes)
    assert torch.allclose(sizes.sum(1), size.sum(1))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 3), n=st.integers(2, 30), seed=st.integers(0, 1000))
def test_merge_unmerge_and_sources(b: int, n: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    k = int(torch.randint(1, n + 1, (1,), generator=g))
    labels = torch.randint(0, k, (b, n), generator=g)
    labels[:, :k] = torch.arange(k)
    plan = MergePlan(labels, k)
    x = torch.randn(b, n, 4, generator=g)
    merge, unmerge = plan.closures()
    y = merge(x)
    assert y.shape == (b, k, 4)
    back = unmerge(y)
    assert back.shape == x.shape
    assert torch.allclose(back, y.gather(1, labels.unsqueeze(-1).expand(-1, -1, 4)))
    assert bool((plan.dst >= 0).all()) and int(plan.dst.max()) < k, "every original token has one owner slot"
    counts = torch.zeros(b, k, dtype=torch.long).scatter_add_(1, plan.dst, torch.ones_like(plan.dst))
    assert bool((counts >= 1).all()), "every slot stands for at least one original token"
    _, sizes = merge_wavg(merge, x)
    assert torch.all(sizes.sum(1).squeeze(-1) == n)
    assert MergePlan.from_fn(merge) is plan


def test_discarded_tokens_do_not_count() -> None:
    plan = MergePlan(torch.tensor([[0, -1, 1, 1]]), 2)
    x = torch.tensor([[[1.0], [100.0], [2.0], [4.0]]])
    merged, _ = merge_wavg(plan, x)
    assert merged.flatten().tolist() == [1.0, 3.0]
    assert plan.unmerge(merged).flatten().tolist() == [1.0, 0.0, 3.0, 3.0]


def naive_merge_pruned(x: np.ndarray, keep: list[int]) -> np.ndarray:
    n = x.shape[0]
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    groups: dict[int, list[int]] = {k: [k] for k in keep}
    for j in range(n):
        if j in groups:
            continue
        best = max(keep, key=lambda k: (float(xn[j] @ xn[k]), -k))
        groups[best].append(j)
    return np.stack([x[groups[k]].mean(0) for k in keep])


@pytest.mark.parametrize("seed", range(4))
def test_merge_pruned_matches_naive(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 20, 5, generator=g, dtype=torch.float64)
    keep = torch.sort(torch.stack([torch.randperm(20, generator=g)[:6] for _ in range(2)]), 1).values
    merged, sizes, _ = merge_pruned(x, keep)
    for i in range(2):
        want = naive_merge_pruned(x[i].numpy(), keep[i].tolist())
        np.testing.assert_allclose(merged[i].numpy(), want, rtol=1e-10)
    assert torch.all(sizes.sum(1) == 20)


def test_merge_pruned_ragged() -> None:
    x = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]).bool()
    keep = torch.tensor([[0, 3, 5], [1, 2, -1]])
    _, sizes, plan = merge_pruned(x, keep, mask=mask)
    assert sizes[0].sum() == 6 and sizes[1].sum() == 4
    assert plan.out_mask is not None and plan.out_mask.tolist() == [[True] * 3, [True, True, False]]
