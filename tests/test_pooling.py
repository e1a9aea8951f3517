"""Ward / k-means clustering, token pooling and token recycling (unipruner._pooling)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.cluster.hierarchy import fcluster, linkage

from unipruner._pooling import kmeans_labels, pool, pool_plan, recycle, ward_labels
from unipruner.reduce import kmeans_labels as reexported_kmeans
from unipruner.reduce import pool as reexported_pool
from unipruner.reduce import recycle as reexported_recycle
from unipruner.reduce import ward_labels as reexported_ward

# ----------------------------------------------------------------------------------------------
# references written plainly
# ----------------------------------------------------------------------------------------------


def partition(labels: list[int] | np.ndarray) -> list[tuple[int, ...]]:
    """The clusters as sorted tuples of positions (label numbers do not matter; -1 ignored)."""
    groups: dict[int, list[int]] = {}
    for pos, lab in enumerate(list(labels)):
        if int(lab) >= 0:
            groups.setdefault(int(lab), []).append(pos)
    return sorted(tuple(g) for g in groups.values())


def naive_ward(points: np.ndarray, k: int) -> list[tuple[int, ...]]:
    """Plain O(N^3) Ward: merge the pair whose union raises the within-cluster SSE least."""
    clusters = [[i] for i in range(len(points))]
    while len(clusters) > k:
        best = None
        for a in range(len(clusters)):
            for b in range(a + 1, len(clusters)):
                ca, cb = points[clusters[a]], points[clusters[b]]
                na, nb = len(ca), len(cb)
                diff = ca.mean(axis=0) - cb.mean(axis=0)
                cost = na * nb / (na + nb) * float(diff @ diff)
                if best is None or cost < best[0]:
                    best = (cost, a, b)
        _, a, b = best  # type: ignore[misc]
        clusters[a] = clusters[a] + clusters[b]
        del clusters[b]
    return sorted(tuple(sorted(c)) for c in clusters)


def scipy_ward(points: np.ndarray, k: int) -> list[tuple[int, ...]]:
    if len(points) == 1:
        return [(0,)]
    return partition(fcluster(linkage(points, method="ward"), k, criterion="maxclust") - 1)


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def first_member_order_ok(labels: list[int]) -> bool:
    seen: list[int] = []
    for lab in labels:
        if lab >= 0 and lab not in seen:
            seen.append(lab)
    return seen == list(range(len(seen)))


def random_mask(rng: np.random.Generator, b: int, n: int, p: float = 0.7) -> torch.Tensor:
    m = rng.random((b, n)) < p
    m[np.arange(b), rng.integers(0, n, b)] = True  # at least one valid token per row
    return torch.from_numpy(m)


# ----------------------------------------------------------------------------------------------
# Ward
# ----------------------------------------------------------------------------------------------


def test_reduce_reexports() -> None:
    assert reexported_ward is ward_labels and reexported_kmeans is kmeans_labels
    assert reexported_pool is pool and reexported_recycle is recycle


@pytest.mark.parametrize(("b", "n", "d", "k"), [(1, 2, 3, 1), (3, 9, 4, 3), (4, 17, 8, 5),
                                                (2, 30, 5, 1), (5, 24, 16, 20)])
def test_ward_matches_scipy_and_naive(b: int, n: int, d: int, k: int) -> None:
    rng = np.random.default_rng(n * 100 + k)
    x = rng.standard_normal((b, n, d))
    labels = ward_labels(torch.from_numpy(x), k)
    for row in range(b):
        pts = unit(x[row])
        got = partition(labels[row].numpy())
        assert got == scipy_ward(pts, k) == naive_ward(pts, k)
        assert first_member_order_ok(labels[row].tolist())
        assert labels[row].max().item() == k - 1


def test_ward_ragged_masks_and_per_row_k() -> None:
    rng = np.random.default_rng(1)
    for trial in range(6):
        b, n, d = 5, int(rng.integers(3, 26)), int(rng.integers(2, 10))
        x = rng.standard_normal((b, n, d))
        mask = random_mask(rng, b, n)
        k = torch.from_numpy(rng.integers(1, n + 1, b))
        labels = ward_labels(torch.from_numpy(x), k, mask=mask)
        for row in range(b):
            idx = np.flatnonzero(mask[row].numpy())
            kb = min(int(k[row]), len(idx))
            got = labels[row].numpy()
            assert (got[~mask[row].numpy()] == -1).all()
            assert first_member_order_ok(got.tolist())
            sub = partition(got[idx])  # positions relative to the valid tokens
            pts = unit(x[row, idx])
            assert sub == scipy_ward(pts, kb), (trial, row)
            if len(idx) <= 12:
                assert sub == naive_ward(pts, kb)


def test_ward_float32_chunks_and_unnormalized() -> None:
    rng = np.random.default_rng(2)
    x = rng.standard_normal((7, 40, 32)).astype(np.float32)
    mask = random_mask(rng, 7, 40, p=0.8)
    full = ward_labels(torch.from_numpy(x), 10, mask=mask)
    chunked = ward_labels(torch.from_numpy(x), 10, mask=mask, chunk_size=2)
    assert torch.equal(full, chunked)
    agree = 0
    for row in range(7):
        idx = np.flatnonzero(mask[row].numpy())
        agree += partition(full[row].numpy()[idx]) == scipy_ward(unit(x[row, idx].astype(np.float64)),
                                                               min(10, len(idx)))
    assert agree == 7  # random data has no near-ties at float32 resolution
    raw = ward_labels(torch.from_numpy(x.astype(np.float64)), 6, normalize=False)
    for row in range(7):
        assert partition(raw[row].numpy()) == scipy_ward(x[row].astype(np.float64), 6)


def test_ward_batched_equals_per_row_and_empty_row() -> None:
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.standard_normal((4, 12, 5)))
    mask = random_mask(rng, 4, 12)
    mask[2] = False
    k = torch.tensor([3, 1, 4, 12])
    labels = ward_labels(x, k, mask=mask)
    assert (labels[2] == -1).all()
    for row in (0, 1, 3):
        one = ward_labels(x[row:row + 1], k[row:row + 1], mask=mask[row:row + 1])
        assert torch.equal(one[0], labels[row])


def test_ward_bad_input() -> None:
    x = torch.rand(2, 5, 3)
    with pytest.raises(ValueError, match="n_clusters"):
        ward_labels(x, 0)
    with pytest.raises(ValueError, match="n_clusters"):
        ward_labels(x, 6)
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        ward_labels(x, torch.tensor([1, 2, 3]))
    with pytest.raises(ValueError, match="NaN"):
        ward_labels(torch.full((1, 3, 2), math.nan), 1)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        ward_labels(torch.rand(5, 3), 2)
    with pytest.raises(ValueError, match="mask"):
        ward_labels(x, 2, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="chunk_size"):
        ward_labels(x, 2, chunk_size=0)


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 4), st.integers(1, 14), st.integers(1, 14), st.integers(0, 2**31 - 1))
def test_ward_properties(b: int, n: int, k: int, seed: int) -> None:
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, n, 3, generator=g, dtype=torch.float64)
    mask = torch.rand(b, n, generator=g) < 0.75
    labels = ward_labels(x, k, mask=mask)
    for row in range(b):
        nv = int(mask[row].sum())
        lab = labels[row].tolist()
        assert all(v == -1 for v, m in zip(lab, mask[row].tolist(), strict=True) if not m)
        assert first_member_order_ok(lab)
        assert len(set(v for v in lab if v >= 0)) == min(k, nv)


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------


def test_kmeans_deterministic_valid_and_locally_optimal() -> None:
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.standard_normal((6, 30, 4)))
    mask = random_mask(rng, 6, 30)
    k = torch.tensor([1, 2, 5, 8, 30, 3])
    a = kmeans_labels(x, k, mask=mask, seed=7, n_iter=200)
    b = kmeans_labels(x, k, mask=mask, seed=7, n_iter=200)
    assert torch.equal(a, b)
    xn = unit(x.numpy())
    for row in range(6):
        m = mask[row].numpy()
        lab = a[row].numpy()
        kb = min(int(k[row]), int(m.sum()))
        assert (lab[~m] == -1).all()
        assert sorted(set(lab[m].tolist())) == list(range(kb))  # every cluster non-empty
        assert first_member_order_ok(lab.tolist())
        pts = xn[row][m]
        cents = np.stack([pts[lab[m] == c].mean(axis=0) for c in range(kb)])
        dist = ((pts[:, None, :] - cents[None]) ** 2).sum(-1)
        own = dist[np.arange(len(pts)), lab[m]]
        assert (own <= dist.min(axis=1) + 1e-9).all()  # Lloyd fixed point


def test_kmeans_seed_changes_and_duplicates() -> None:
    x = torch.zeros(1, 6, 2, dtype=torch.float64)
    x[0, :, 0] = 1.0  # six identical points
    lab = kmeans_labels(x, 3)
    assert sorted(set(lab[0].tolist())) == [0, 1, 2]
    rng = np.random.default_rng(5)
    y = torch.from_numpy(rng.standard_normal((8, 40, 8)))
    outs = {tuple(kmeans_labels(y, 6, seed=s, n_iter=1).flatten().tolist()) for s in range(4)}
    assert len(outs) > 1  # the seed drives the k-means++ draws


def test_kmeans_batched_equals_per_row() -> None:
    rng = np.random.default_rng(10)
    x = torch.from_numpy(rng.standard_normal((5, 16, 3)))
    mask = random_mask(rng, 5, 16)
    k = torch.tensor([4, 2, 6, 1, 3])
    labels = kmeans_labels(x, k, mask=mask, seed=3)
    for row in range(5):
        one = kmeans_labels(x[row:row + 1], k[row:row + 1], mask=mask[row:row + 1], seed=3)
        assert torch.equal(one[0], labels[row])


def test_kmeans_bad_input() -> None:
    with pytest.raises(ValueError, match="n_iter"):
        kmeans_labels(torch.rand(1, 4, 2), 2, n_iter=-1)
    with pytest.raises(ValueError, match="NaN"):
        kmeans_labels(torch.tensor([[[math.nan, 0.0]]]), 1)


# ----------------------------------------------------------------------------------------------
# pooling
# ----------------------------------------------------------------------------------------------


def naive_pool(doc: np.ndarray, labels: np.ndarray, protected: int) -> np.ndarray:
    rest = labels[protected:]
    if rest.size == 0:
        return doc[:protected]
    means = [doc[protected:][rest == c].mean(axis=0) for c in range(rest.max() + 1)]
    return np.concatenate([doc[:protected], np.stack(means)]) if means else doc[:protected]


@pytest.mark.parametrize("method", ["ward", "kmeans"])
@pytest.mark.parametrize(("factor", "protected"), [(2.0, 0), (3.0, 1), (1.5, 2), (4, 3)])
def test_pool_counts_protected_and_means(method: str, factor: float, protected: int) -> None:
    rng = np.random.default_rng(int(factor * 10) + protected)
    docs = [torch.from_numpy(rng.standard_normal((int(n), 6))) for n in rng.integers(1, 25, 7)]
    out = pool(docs, factor=factor, method=method, protected=protected)
    assert isinstance(out, list) and len(out) == len(docs)
    padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones(len(d), dtype=torch.bool) for d in docs],
                                           batch_first=True)
    plan = pool_plan(padded, factor=factor, method=method, protected=protected, mask=mask)
    for i, (doc, pooled) in enumerate(zip(docs, out, strict=True)):
        n_rest = max(len(doc) - protected, 0)
        expect = min(protected, len(doc)) + (max(int(n_rest // factor), 1) if n_rest else 0)
        assert pooled.shape == (expect, 6)
        assert torch.equal(pooled[:protected], doc[:protected])  # protected tokens untouched
        p = min(protected, len(doc))
        dst = plan.dst[i, : len(doc)].numpy()
        assert (dst[:p] == np.arange(p)).all()
        labels = np.concatenate([np.arange(p), dst[p:] - p])
        ref = naive_pool(doc.numpy(), labels, p)
        np.testing.assert_allclose(pooled.numpy(), ref, rtol=1e-12, atol=1e-12)


def test_pool_ward_labels_are_scipys() -> None:
    rng = np.random.default_rng(6)
    docs = [torch.from_numpy(rng.standard_normal((int(n), 8))) for n in (5, 16, 23)]
    padded = torch.nn.utils.rnn.pad_sequence(docs, batch_first=True)
    mask = torch.arange(padded.shape[1]) < torch.tensor([5, 16, 23]).unsqueeze(1)
    plan = pool_plan(padded, factor=2.0, protected=1, mask=mask)
    for i, doc in enumerate(docs):
        dst = plan.dst[i, 1: len(doc)].numpy()
        assert partition(dst) == scipy_ward(unit(doc[1:].numpy()), (len(doc) - 1) // 2)


def test_pool_containers_agree() -> None:
    rng = np.random.default_rng(7)
    x = torch.from_numpy(rng.standard_normal((3, 10, 4))).float()
    batched = pool(x, factor=2.0, protected=1)
    assert isinstance(batched, torch.Tensor) and batched.shape == (3, 1 + 4, 4)
    as_list = pool(list(x), factor=2.0, protected=1)
    single = [pool(doc, factor=2.0, protected=1) for doc in x]
    for row in range(3):
        assert torch.equal(batched[row], as_list[row]) and torch.equal(batched[row], single[row])
    # masked batch (left padding) == list of the unpadded documents
    lengths = [10, 7, 3]
    mask = torch.arange(10).flip(0).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    pooled, omask = pool(x, factor=2.0, protected=1, mask=mask)
    docs = pool([x[i, 10 - n:] for i, n in enumerate(lengths)], factor=2.0, protected=1)
    for row, doc in enumerate(docs):
        assert int(omask[row].sum()) == len(doc)
        assert bool(omask[row, : len(doc)].all())
        assert torch.equal(pooled[row, : len(doc)], doc)
        assert (pooled[row, len(doc):] == 0).all()


def test_pool_factor_one_is_identity_and_renormalize() -> None:
    rng = np.random.default_rng(8)
    docs = [torch.from_numpy(rng.standard_normal((n, 5))).float() for n in (1, 4, 9)]
    for method in ("ward", "kmeans"):
        out = pool(docs, factor=1.0, method=method, protected=1)
        for doc, o in zip(docs, out, strict=True):
            assert torch.equal(doc, o)
    out = pool(docs, factor=2.0, protected=1, renormalize=True)
    for doc, o in zip(docs, out, strict=True):
        assert torch.equal(o[0], doc[0])
        if len(o) > 1:
            torch.testing.assert_close(o[1:].norm(dim=-1), torch.ones(len(o) - 1))


def test_pool_plan_sizes_and_global_budget() -> None:
    x = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(0))
    plan = pool_plan(x, n_clusters=torch.tensor([2, 5]), protected=1)
    sizes = plan.merge(torch.ones_like(x[..., :1]), "sum")[..., 0]
    assert plan.out_mask is not None and plan.out_mask.sum(dim=1).tolist() == [3, 6]
    assert sizes.sum(dim=1).tolist() == [12.0, 12.0]
    assert sizes[:, 0].tolist() == [1.0, 1.0]


def test_pool_bad_input() -> None:
    x = torch.rand(2, 6, 3)
    with pytest.raises(ValueError, match="factor"):
        pool(x, factor=0.5)
    with pytest.raises(ValueError, match="factor"):
        pool(x, factor=math.nan)
    with pytest.raises(ValueError, match="method"):
        pool(x, method="average")
    with pytest.raises(ValueError, match="protected"):
        pool(x, protected=-1)
    with pytest.raises(ValueError, match="NaN"):
        pool(torch.full((4, 3), math.nan))
    with pytest.raises(ValueError, match=r"\[N, D\]"):
        pool(torch.rand(2, 3, 4, 5))
    with pytest.raises(ValueError, match="same dimension"):
        pool([torch.rand(3, 4), torch.rand(3, 5)])
    with pytest.raises(ValueError, match="no tokens"):
        pool([torch.rand(3, 4), torch.rand(0, 4)])
    with pytest.raises(ValueError, match="empty list"):
        pool([])
    with pytest.raises(ValueError, match="mask"):
        pool(torch.rand(6, 3), mask=torch.ones(1, 6, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# recycling
# ----------------------------------------------------------------------------------------------


def test_recycle_shapes_masks_sizes() -> None:
    rng = np.random.default_rng(9)
    b, n, d = 4, 20, 5
    x = torch.from_numpy(rng.standard_normal((b, n, d))).float()
    mask = random_mask(rng, b, n, p=0.8)
    scores = torch.from_numpy(rng.standard_normal((b, n))).float()
    keep = torch.full((b, 6), -1)
    for row, cnt in enumerate([6, 3, 0, 5]):
        valid = torch.nonzero(mask[row]).squeeze(1)
        pick = valid[torch.randperm(len(valid), generator=torch.Generator().manual_seed(row))][:cnt]
        keep[row, : len(pick)] = torch.sort(pick).values
    size = torch.from_numpy(rng.integers(1, 4, (b, n, 1))).float()
    out, omask, osz = recycle(x, keep, 3, size=size, mask=mask)
    assert out.shape == (b, 9, d) and omask.shape == (b, 9) and osz.shape == (b, 9, 1)
    for row in range(b):
        kept = [int(i) for i in keep[row] if i >= 0]
        pruned = [i for i in range(n) if mask[row, i] and i not in kept]
        n_agg = min(3, len(pruned))
        assert omask[row].tolist() == [True] * (len(kept) + n_agg) + [False] * (9 - len(kept) - n_agg)
        assert torch.equal(out[row, : len(kept)], x[row, kept])  # kept tokens unchanged
        assert torch.equal(osz[row, : len(kept), 0], size[row, kept, 0])
        agg_sizes = osz[row, len(kept): len(kept) + n_agg, 0]
        assert float(agg_sizes.sum()) == float(size[row, pruned, 0].sum())
        assert (out[row, len(kept) + n_agg:] == 0).all() and (osz[row, len(kept) + n_agg:] == 0).all()
        # aggregates are size-weighted means of the pruned tokens: totals are preserved
        tot = (out[row, len(kept): len(kept) + n_agg] * agg_sizes.unsqueeze(1)).sum(0)
        torch.testing.assert_close(tot, (x[row, pruned] * size[row, pruned]).sum(0),
                                   rtol=1e-5, atol=1e-5)
    # unit sizes: the aggregates' sizes count the pruned tokens
    _, omask1, osz1 = recycle(x, keep, 2, mask=mask, scores=scores)
    n_pruned = mask.sum(1) - (keep >= 0).sum(1)
    assert (osz1[..., 0] * omask1).sum(1).tolist() == ((keep >= 0).sum(1) + n_pruned).tolist()


def test_recycle_ratio_and_weights() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [5.0, 5.0]]])
    keep = torch.tensor([[0]])
    scores = torch.tensor([[0.0, 0.1, 0.9, 0.8, 0.2]])
    out, omask, osz = recycle(x, keep, 1, scores=scores, recycle_ratio=0.5)
    assert omask[0].tolist() == [True, True]
    assert osz[0, :, 0].tolist() == [1.0, 2.0]  # ceil(0.5 * 4) = 2 best pruned tokens
    torch.testing.assert_close(out[0, 1], torch.tensor([1.0, 1.5]))
    w = torch.tensor([[0.0, 0.0, 1.0, 3.0, 0.0]])
    out_w, _, osz_w = recycle(x, keep, 1, weights=w)
    torch.testing.assert_close(out_w[0, 1], torch.tensor([0.5, 2.25]))
    assert osz_w[0, 1, 0].item() == 4.0


def test_recycle_bad_input() -> None:
    x = torch.rand(1, 5, 2)
    with pytest.raises(ValueError, match="right-padded"):
        recycle(x, torch.tensor([[-1, 2]]), 1)
    with pytest.raises(ValueError, match="masked"):
        recycle(x, torch.tensor([[1]]), 1, mask=torch.tensor([[1, 0, 1, 1, 1]]).bool())
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        recycle(x, torch.tensor([[5]]), 1)
    with pytest.raises(ValueError, match="n_aggregate"):
        recycle(x, torch.tensor([[1]]), -1)
    with pytest.raises(ValueError, match="scores"):
        recycle(x, torch.tensor([[1]]), 1, recycle_ratio=0.5)
    with pytest.raises(ValueError, match="weights"):
        recycle(x, torch.tensor([[1]]), 1, weights=-torch.ones(1, 5))
