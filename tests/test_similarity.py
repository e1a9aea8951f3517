"""ToMe, ToMeSD and DART against plain per-sample references, plus properties and bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner import Budget, UniprunerError
from unipruner._merge import MergeFn, MergePlan
from unipruner.reduce import merge_wavg
from unipruner.scorers.similarity import bipartite_soft_matching, dart, stride_matching_2d

# ----------------------------------------------------------------------------- plain helpers


def cos(u: np.ndarray, v: np.ndarray) -> float:
    nu = max(float(np.linalg.norm(u)), 1e-12)
    nv = max(float(np.linalg.norm(v)), 1e-12)
    return float(np.dot(u, v)) / (nu * nv)


def plan_of(merge: MergeFn) -> MergePlan:
    return MergePlan.from_fn(merge)


def random_mask(b: int, n: int, g: torch.Generator, kind: str = "mixed") -> torch.Tensor:
    """Right, left or scattered padding; every row keeps at least one real token."""
    rows = []
    for i in range(b):
        length = int(torch.randint(1, n + 1, (1,), generator=g))
        style = kind if kind != "mixed" else ("right", "left", "scatter")[i % 3]
        row = torch.zeros(n, dtype=torch.bool)
        if style == "right":
            row[:length] = True
        elif style == "left":
            row[n - length:] = True
        else:
            row[torch.randperm(n, generator=g)[:length]] = True
        rows.append(row)
    return torch.stack(rows)


def groups_of(plan: MergePlan, row: int) -> list[list[int]]:
    """Members of every output slot of one row, read off the plan."""
    dst = plan.dst[row].tolist()
    return [sorted(i for i, d in enumerate(dst) if d == s) for s in range(plan.n_out)]


def reduce_groups(x: np.ndarray, groups: list[list[int]], mode: str) -> np.ndarray:
    out = np.zeros((len(groups), x.shape[1]))
    for s, members in enumerate(groups):
        if members:
            vals = x[members]
            out[s] = {"mean": vals.mean(0), "sum": vals.sum(0), "amax": vals.max(0)}[mode]
    return out


# ----------------------------------------------------------------------------- ToMe reference


def naive_tome_cap(n: int, r: int, p: int, valid: np.ndarray | None) -> int:
    """r after the documented caps, for the whole batch."""
    r = min(r, (n - p) // 2)
    if valid is None:
        return r
    for row in valid:
        pad_a = sum(1 for a in range(0, n, 2) if a >= p and not row[a])
        real_a = sum(1 for a in range(0, n, 2) if a >= p and row[a])
        has_dst = any(row[j] for j in range(1, n, 2) if j >= p)
        r = min(r, pad_a + (real_a if has_dst else 0))
    return r


def naive_tome(x: np.ndarray, r: int, p: int, valid: np.ndarray,
               keep_order: bool) -> tuple[list[list[int]], list[bool]]:
    """One row of bipartite soft matching, plainly: (members of each output slot, slot real?)."""
    n = len(x)
    if r == 0:
        return [[i] for i in range(n)], [bool(v) for v in valid]
    a_set = list(range(0, n, 2))
    b_set = list(range(1, n, 2))
    dests = [j for j in b_set if j >= p and valid[j]]
    score, match = {}, {}
    for a in a_set:
        if a < p:
            score[a] = -math.inf
        elif not valid[a]:
            score[a] = math.inf
        elif dests:
            sims = [cos(x[a], x[j]) for j in dests]
            best = int(np.argmax(sims))
            score[a], match[a] = sims[best], dests[best]
        else:
            score[a] = -math.inf
    ranked = sorted(a_set, key=lambda a: (-score[a], a))
    removed = set(ranked[:r])
    if keep_order:
        slots = [i for i in range(n) if i not in removed]
    else:
        slots = [a for a in a_set if a not in removed] + b_set
    groups = []
    for s in slots:
        members = [s] + [a for a in removed if valid[a] and match[a] == s]
        groups.append(sorted(members))
    return groups, [bool(valid[s]) for s in slots]


@pytest.mark.parametrize("b,n,c", [(1, 7, 4), (3, 16, 8), (4, 33, 5)])
@pytest.mark.parametrize("r", [0, 1, 5, 100])
@pytest.mark.parametrize("protected", [0, 1, 2])
@pytest.mark.parametrize("keep_order", [True, False])
def test_tome_matches_naive(b: int, n: int, c: int, r: int, protected: int,
                            keep_order: bool) -> None:
    g = torch.Generator().manual_seed(n * 31 + r + protected)
    x = torch.randn(b, n, c, generator=g, dtype=torch.float64)
    merge, unmerge = bipartite_soft_matching(x, r, protected=protected, keep_order=keep_order)
    plan = MergePlan.from_fn(merge)
    r_eff = naive_tome_cap(n, r, protected, None)
    assert plan.n_out == n - r_eff
    assert plan.out_mask is None
    xn = x.numpy()
    for mode in ("mean", "sum", "amax"):
        y = merge(x, mode=mode)
        assert y.shape == (b, n - r_eff, c)
        for i in range(b):
            groups, _ = naive_tome(xn[i], r_eff, protected, np.ones(n, bool), keep_order)
            assert groups_of(plan, i) == groups
            np.testing.assert_allclose(y[i].numpy(), reduce_groups(xn[i], groups, mode))
    assert unmerge(merge(x)).shape == (b, n, c)


@pytest.mark.parametrize("b,n", [(3, 12), (6, 25)])
@pytest.mark.parametrize("r", [1, 3, 6])
@pytest.mark.parametrize("protected", [0, 1])
@pytest.mark.parametrize("keep_order", [True, False])
@pytest.mark.parametrize("kind", ["right", "left", "scatter"])
def test_tome_ragged_matches_naive(b: int, n: int, r: int, protected: int, keep_order: bool,
                                   kind: str) -> None:
    g = torch.Generator().manual_seed(7 * n + r)
    x = torch.randn(b, n, 6, generator=g, dtype=torch.float64)
    mask = random_mask(b, n, g, kind)
    merge, _ = bipartite_soft_matching(x, r, protected=protected, mask=mask,
                                       keep_order=keep_order)
    plan = MergePlan.from_fn(merge)
    valid = mask.numpy()
    r_eff = naive_tome_cap(n, r, protected, valid)
    assert plan.n_out == n - r_eff
    out_mask = plan.out_mask
    if out_mask is None:
        out_mask = torch.ones(b, plan.n_out, dtype=torch.bool)
    y = merge(x, mode="mean")
    for i in range(b):
        groups, real = naive_tome(x[i].numpy(), r_eff, protected, valid[i], keep_order)
        assert groups_of(plan, i) == groups
        assert out_mask[i].tolist() == real
        np.testing.assert_allclose(y[i].numpy(), reduce_groups(x[i].numpy(), groups, "mean"))
        # padding never shares a slot with a real token
        for members in groups:
            assert len({bool(valid[i][m]) for m in members}) <= 1


def test_tome_padded_a_tokens_go_first_and_padding_is_never_a_destination() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 10, 4, generator=g)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 6:] = False  # padded A tokens 6, 8; padded B tokens 7, 9
    merge, _ = bipartite_soft_matching(x, 2, mask=mask)
    dst = plan_of(merge).dst
    assert dst[0, 6] == -1 and dst[0, 8] == -1  # row 0 spends r on its padding
    assert int((dst[0] >= 0).sum()) == 8
    assert bool((dst[1] >= 0).all())  # row 1 has no padding: it merges two real tokens
    assert len(set(dst[1].tolist())) == 8
    slots_of_padding_b = {int(dst[0, 7]), int(dst[0, 9])}
    real_slots = {int(dst[0, i]) for i in range(6)}
    assert not slots_of_padding_b & real_slots
    out_mask = plan_of(merge).out_mask
    assert out_mask is not None
    assert out_mask[0].sum() == 6 and out_mask[1].all()


def test_tome_cap_with_mask_rows_without_destination() -> None:
    x = torch.randn(2, 6, 3, generator=torch.Generator().manual_seed(1))
    mask = torch.tensor([[True, False, False, False, False, False], [True] * 6])
    # row 0: real A token 0 has no real B to go to; only the padded A tokens 2, 4 can go
    merge, _ = bipartite_soft_matching(x, 3, mask=mask)
    assert plan_of(merge).n_out == 4
    assert plan_of(merge).dst[0, 0] >= 0


@pytest.mark.parametrize("protected", [0, 1, 2, 5])
def test_tome_sizes_sources_and_protected(protected: int) -> None:
    g = torch.Generator().manual_seed(protected)
    b, n = 3, 21
    x = torch.randn(b, n, 8, generator=g)
    size, cur = None, x
    owner = torch.arange(n).expand(b, n)  # output slot of every original token (ToMe's source tracking)
    for r in (5, 4, 3):
        merge, unmerge = bipartite_soft_matching(cur, r, protected=protected)
        owner = MergePlan.from_fn(merge).dst.gather(1, owner)
        nxt, size = merge_wavg(merge, cur, size)
        assert unmerge(nxt).shape == cur.shape
        cur = nxt
    assert size is not None
    assert torch.allclose(size.sum(dim=1), torch.full((b, 1), float(n)))
    # every original token is covered by exactly one output token, and the sizes count them
    assert bool((owner >= 0).all())
    covered = torch.zeros(b, cur.shape[1]).scatter_add_(1, owner, torch.ones(b, n))
    assert torch.equal(covered, size.squeeze(-1))
    # protected tokens untouched, at the front, alone
    assert torch.equal(cur[:, :protected], x[:, :protected])
    assert torch.equal(size[:, :protected], torch.ones(b, protected, 1))
    for i in range(protected):  # protected token i is slot i and covers only itself
        assert torch.equal(owner[:, i], torch.full((b,), i))
        assert torch.equal((owner == i).sum(dim=1), torch.ones(b, dtype=torch.long))


def test_tome_r_zero_is_identity() -> None:
    x = torch.randn(2, 9, 4, generator=torch.Generator().manual_seed(2))
    for kwargs in ({}, {"keep_order": False}, {"protected": 3}):
        merge, unmerge = bipartite_soft_matching(x, 0, **kwargs)
        assert torch.equal(merge(x), x)
        assert torch.equal(unmerge(x), x)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 5:] = False
    merge, _ = bipartite_soft_matching(x, 0, mask=mask)
    assert torch.equal(merge(x), x)
    out_mask = plan_of(merge).out_mask
    assert out_mask is not None and torch.equal(out_mask, mask)
    # everything protected: nothing can merge
    merge, _ = bipartite_soft_matching(x, 4, protected=8)
    assert torch.equal(merge(x), x)


def test_tome_batched_equals_per_sample() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 18, 6, generator=g)
    mask = torch.ones(5, 18, dtype=torch.bool)
    mask[2, 12:] = False
    mask[4, :3] = False
    for keep_order in (True, False):
        merge, _ = bipartite_soft_matching(x, 6, protected=1, mask=mask, keep_order=keep_order)
        for i in range(5):
            one, _ = bipartite_soft_matching(x[i:i + 1], 6, protected=1, mask=mask[i:i + 1],
                                             keep_order=keep_order)
            assert torch.equal(plan_of(one).dst[0], plan_of(merge).dst[i])
            assert torch.equal(one(x[i:i + 1]), merge(x)[i:i + 1])


def test_tome_keep_order_false_is_tome_layout() -> None:
    x = torch.randn(2, 12, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    m_ord, _ = bipartite_soft_matching(x, 4, protected=1)
    m_tome, _ = bipartite_soft_matching(x, 4, protected=1, keep_order=False)
    y_ord, y_tome = m_ord(x), m_tome(x)
    for i in range(2):  # the same merges, laid out differently
        assert sorted(groups_of(plan_of(m_ord), i)) == sorted(groups_of(plan_of(m_tome), i))
    # ToMe's layout ends with all six B tokens in order; order-keeping puts them in place
    b_slots = plan_of(m_ord).dst[:, 1::2]
    assert torch.equal(y_tome[:, -6:], torch.stack([y_ord[i, b_slots[i]] for i in range(2)]))
    assert torch.equal(y_tome[:, 0], x[:, 0])  # CLS first in both layouts
    assert torch.equal(y_ord[:, 0], x[:, 0])


def test_tome_gradients_flow_through_merge() -> None:
    x = torch.randn(2, 10, 4, generator=torch.Generator().manual_seed(5), requires_grad=True)
    merge, unmerge = bipartite_soft_matching(x, 3)
    unmerge(merge(x)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 24),
    r=st.integers(0, 14),
    protected=st.integers(0, 4),
    keep_order=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_tome_properties(n: int, r: int, protected: int, keep_order: bool, masked: bool,
                         seed: int) -> None:
    protected = min(protected, n)
    g = torch.Generator().manual_seed(seed)
    b = 3
    x = torch.randn(b, n, 4, generator=g)
    mask = random_mask(b, n, g) if masked else None
    merge, unmerge = bipartite_soft_matching(x, r, protected=protected, mask=mask,
                                             keep_order=keep_order)
    plan = MergePlan.from_fn(merge)
    r_eff = naive_tome_cap(n, r, protected, None if mask is None else mask.numpy())
    assert plan.n_out == n - r_eff
    size = torch.ones(b, n, 1) if mask is None else mask.unsqueeze(-1).float()
    y, s = merge_wavg(merge, x, size)
    assert y.shape == (b, n - r_eff, 4) and unmerge(y).shape == x.shape
    assert torch.allclose(s.sum(dim=1), size.sum(dim=1))
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    assert bool((plan.dst[valid] >= 0).all()) and int(plan.dst.max()) < plan.n_out  # one slot per real token
    # protected tokens are alone in their slot, at the front when order is kept
    prot_slots = plan.dst[:, :protected]
    for i in range(b):
        for j, slot in enumerate(prot_slots[i].tolist()):
            if slot >= 0:
                assert (plan.dst[i] == slot).sum() == 1
                if keep_order:
                    assert slot == j
    if r_eff == 0:
        assert torch.equal(merge(x), x)


# ----------------------------------------------------------------------------- ToMeSD reference


def naive_destinations(w: int, h: int, sx: int, sy: int,
                       draws: list[list[int]] | None) -> list[int]:
    """One destination per window (partial edge windows included), row-major positions."""
    out = []
    for i in range(-(-h // sy)):
        for j in range(-(-w // sx)):
            rows = min(sy, h - i * sy)
            cols = min(sx, w - j * sx)
            k = 0 if draws is None else draws[i][j]
            dy, dx = (k // sx) % rows, (k % sx) % cols
            out.append((i * sy + dy) * w + j * sx + dx)
    return sorted(out)


def naive_stride(x: np.ndarray, dests: list[int], r: int) -> list[list[int]]:
    n = len(x)
    r = min(r, n - len(dests))
    if r == 0:
        return [[i] for i in range(n)]
    sources = [i for i in range(n) if i not in dests]
    score, match = {}, {}
    for s in sources:
        sims = [cos(x[s], x[d]) for d in dests]
        best = int(np.argmax(sims))
        score[s], match[s] = sims[best], dests[best]
    removed = set(sorted(sources, key=lambda s: (-score[s], s))[:r])
    kept = [i for i in range(n) if i not in removed]
    return [sorted([k] + [s for s in removed if match[s] == k]) for k in kept]


@pytest.mark.parametrize("w,h,sx,sy", [(4, 4, 2, 2), (6, 4, 2, 2), (5, 7, 2, 2), (6, 6, 3, 2),
                                       (3, 1, 2, 2), (1, 1, 1, 1)])
@pytest.mark.parametrize("r", [0, 1, 4, 1000])
@pytest.mark.parametrize("b", [1, 3])
def test_stride_fixed_matches_naive(w: int, h: int, sx: int, sy: int, r: int, b: int) -> None:
    g = torch.Generator().manual_seed(w * 10 + h + r)
    n = w * h
    x = torch.randn(b, n, 5, generator=g, dtype=torch.float64)
    merge, unmerge = stride_matching_2d(x, w, h, sx, sy, r, random_dst=False)
    plan = MergePlan.from_fn(merge)
    dests = naive_destinations(w, h, sx, sy, None)
    r_eff = min(r, n - len(dests))
    assert plan.n_out == n - r_eff
    y = merge(x)
    for i in range(b):
        groups = naive_stride(x[i].numpy(), dests, r)
        assert groups_of(plan, i) == groups
        np.testing.assert_allclose(y[i].numpy(), reduce_groups(x[i].numpy(), groups, "mean"))
        # unmerge copies each slot's value back to all its members
        back = unmerge(y)[i].numpy()
        for s, members in enumerate(groups):
            for m in members:
                np.testing.assert_allclose(back[m], y[i, s].numpy())


@pytest.mark.parametrize("w,h,sx,sy", [(4, 4, 2, 2), (8, 6, 2, 2), (5, 7, 2, 3), (9, 9, 4, 4)])
def test_stride_random_matches_naive_and_is_seeded(w: int, h: int, sx: int, sy: int) -> None:
    n = w * h
    x = torch.randn(2, n, 6, generator=torch.Generator().manual_seed(n), dtype=torch.float64)
    r = n // 3
    merge, _ = stride_matching_2d(x, w, h, sx, sy, r, generator=torch.Generator().manual_seed(7))
    again, _ = stride_matching_2d(x, w, h, sx, sy, r, generator=torch.Generator().manual_seed(7))
    assert torch.equal(plan_of(merge).dst, plan_of(again).dst)
    draw = torch.randint(sx * sy, (-(-h // sy), -(-w // sx), 1),
                         generator=torch.Generator().manual_seed(7))
    dests = naive_destinations(w, h, sx, sy, draw[..., 0].tolist())
    for i in range(2):
        assert groups_of(plan_of(merge), i) == naive_stride(x[i].numpy(), dests, r)


def destinations_of(w: int, h: int, sx: int, sy: int, random_dst: bool, seed: int) -> list[int]:
    """Read the destinations off two plans whose sources all go to the last / first destination.

    Token i is e_i plus a_i on an extra axis: with a_i increasing in i every source's most
    similar destination is the last one, with a_i decreasing the first one; the singleton slots
    of the two rows then name every destination.
    """
    n = w * h
    a = torch.linspace(0.5, 2.0, n, dtype=torch.float64)
    up = torch.cat([torch.eye(n, dtype=torch.float64), a.unsqueeze(1)], dim=1)
    down = torch.cat([torch.eye(n, dtype=torch.float64), a.flip(0).unsqueeze(1)], dim=1)
    merge, _ = stride_matching_2d(torch.stack([up, down]), w, h, sx, sy, n,
                                  random_dst=random_dst,
                                  generator=torch.Generator().manual_seed(seed))
    found = {gr[0] for i in range(2) for gr in groups_of(plan_of(merge), i) if len(gr) == 1}
    assert len(found) == plan_of(merge).n_out
    return sorted(found)


@pytest.mark.parametrize("w,h,sx,sy", [(4, 4, 2, 2), (8, 6, 2, 2), (5, 7, 2, 2), (7, 3, 3, 2)])
@pytest.mark.parametrize("random_dst", [True, False])
def test_stride_one_destination_per_window(w: int, h: int, sx: int, sy: int,
                                           random_dst: bool) -> None:
    n_win = -(-h // sy) * -(-w // sx)
    seen = set()
    for seed in range(5):
        dests = destinations_of(w, h, sx, sy, random_dst, seed)
        windows = {((d // w) // sy, (d % w) // sx) for d in dests}
        assert len(dests) == n_win == len(windows)  # r capped: survivors = destinations
        draw = torch.randint(sx * sy, (-(-h // sy), -(-w // sx), 1),
                             generator=torch.Generator().manual_seed(seed))
        want = naive_destinations(w, h, sx, sy, draw[..., 0].tolist() if random_dst else None)
        assert dests == want
        seen.add(tuple(dests))
    assert (len(seen) > 1) == random_dst


def test_stride_destinations_match_tomesd_draw() -> None:
    """On a divisible grid the window offsets are exactly ToMeSD's ``randint`` draw."""
    w, h, sx, sy = 6, 4, 2, 2
    draw = torch.randint(sy * sx, size=(h // sy, w // sx, 1),
                         generator=torch.Generator().manual_seed(11))
    want = sorted((i * sy + int(k) // sx) * w + j * sx + int(k) % sx
                  for (i, j), k in np.ndenumerate(draw[..., 0].numpy()))
    assert destinations_of(w, h, sx, sy, True, 11) == want


def test_stride_r_zero_identity_and_unmerge_restores_shape() -> None:
    x = torch.randn(2, 12, 3, generator=torch.Generator().manual_seed(0))
    merge, unmerge = stride_matching_2d(x, 4, 3, 2, 2, 0)
    assert torch.equal(merge(x), x) and torch.equal(unmerge(x), x)
    merge, unmerge = stride_matching_2d(x, 4, 3, 2, 2, 5, random_dst=False)
    y = merge(x)
    assert y.shape == (2, 7, 3)
    assert unmerge(torch.nn.functional.gelu(y)).shape == x.shape
    _, size = merge_wavg(merge, x)
    assert torch.equal(size.sum(dim=1), torch.full((2, 1), 12.0))


# ----------------------------------------------------------------------------- DART reference


def naive_budget(budget: int | float, nv: int) -> int:
    if isinstance(budget, int):
        return min(nv, budget)
    return min(nv, math.floor(nv * budget + 0.5))


def naive_dart(x: np.ndarray, budget: int | float, keys: np.ndarray | None, n_pivots: int,
               extra: np.ndarray | None, valid: np.ndarray, prot: np.ndarray) -> list[int]:
    n = len(x)
    keep = [i for i in range(n) if prot[i] and valid[i]]
    k = max(naive_budget(budget, int(valid.sum())), len(keep))
    pool = [i for i in range(n) if valid[i] and i not in keep]
    ranker = x if keys is None else keys
    by_norm = sorted(pool, key=lambda i: (-float(np.abs(ranker[i]).sum()), i))
    pivots = by_norm[: min(n_pivots, k - len(keep))]
    keep += pivots
    pool = [i for i in pool if i not in pivots]
    vectors = [x[i] for i in pivots] + ([] if extra is None else list(extra))
    m = k - len(keep)
    for t, v in enumerate(vectors):
        q = m // len(vectors) + (1 if t < m % len(vectors) else 0)
        picked = sorted(pool, key=lambda i: (cos(v, x[i]), i))[:q]
        keep += picked
        pool = [i for i in pool if i not in picked]
    assert len(keep) == k
    return sorted(keep)


@pytest.mark.parametrize("b,n,d", [(1, 9, 4), (3, 24, 8), (4, 50, 6)])
@pytest.mark.parametrize("budget", [0, 3, 11, 0.3, 1.0])
@pytest.mark.parametrize("n_pivots", [1, 4])
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("protected", [None, 2])
def test_dart_matches_naive(b: int, n: int, d: int, budget: int | float, n_pivots: int,
                            masked: bool, protected: int | None) -> None:
    if isinstance(budget, int):
        budget = min(budget, n)
    g = torch.Generator().manual_seed(n + n_pivots + int(masked))
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    keys = torch.randn(b, n, 5, generator=g, dtype=torch.float64)
    mask = random_mask(b, n, g) if masked else None
    valid = np.ones((b, n), bool) if mask is None else mask.numpy()
    prot = np.zeros(n, bool)
    prot[: protected or 0] = True
    for use_keys in (False, True):
        got = dart(x, budget, keys=keys if use_keys else None, n_pivots=n_pivots, mask=mask,
                   protected=protected)
        for i in range(b):
            want = naive_dart(x[i].numpy(), budget, keys[i].numpy() if use_keys else None,
                              n_pivots, None, valid[i], prot)
            row = [int(v) for v in got[i] if v >= 0]
            assert row == want
            assert all(int(v) == -1 for v in got[i][len(row):])


@pytest.mark.parametrize("n_pivots", [0, 2])
@pytest.mark.parametrize("p", [1, 3])
def test_dart_extra_pivots_match_naive(n_pivots: int, p: int) -> None:
    g = torch.Generator().manual_seed(p)
    b, n, d = 3, 30, 7
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    text = torch.randn(b, p, d, generator=g, dtype=torch.float64)
    mask = random_mask(b, n, g)
    got = dart(x, 0.5, n_pivots=n_pivots, pivot_tokens=text, mask=mask, protected=1)
    prot = np.zeros(n, bool)
    prot[0] = True
    for i in range(b):
        want = naive_dart(x[i].numpy(), 0.5, None, n_pivots, text[i].numpy(), mask[i].numpy(),
                          prot)
        assert [int(v) for v in got[i] if v >= 0] == want


def test_dart_budget_object_and_protected_tensor() -> None:
    x = torch.randn(2, 12, 4, generator=torch.Generator().manual_seed(9))
    prot = torch.zeros(12, dtype=torch.bool)
    prot[[3, 7]] = True
    out = dart(x, Budget(keep=5), n_pivots=2, protected=prot)
    assert out.shape == (2, 5)
    assert all({3, 7} <= set(row) for row in out.tolist())
    # more protected tokens than the budget: K grows to cover them
    assert dart(x, 1, protected=prot).shape == (2, 2)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 20),
    budget=st.one_of(st.integers(0, 20), st.floats(0.0, 1.0)),
    n_pivots=st.integers(1, 6),
    n_extra=st.integers(0, 3),
    protected=st.integers(0, 4),
    masked=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_dart_properties(n: int, budget: int | float, n_pivots: int, n_extra: int,
                         protected: int, masked: bool, seed: int) -> None:
    if isinstance(budget, int):
        budget = min(budget, n)
    protected = min(protected, n)
    g = torch.Generator().manual_seed(seed)
    b = 3
    x = torch.randn(b, n, 5, generator=g)
    extra = torch.randn(b, n_extra, 5, generator=g) if n_extra else None
    mask = random_mask(b, n, g) if masked else None
    out = dart(x, budget, n_pivots=n_pivots, pivot_tokens=extra, mask=mask, protected=protected)
    valid = torch.ones(b, n, dtype=torch.bool) if mask is None else mask
    for i in range(b):
        row = [int(v) for v in out[i] if v >= 0]
        assert row == sorted(set(row))
        assert all(0 <= v < n and bool(valid[i, v]) for v in row)
        prot = [j for j in range(protected) if valid[i, j]]
        assert set(prot) <= set(row)
        nv = int(valid[i].sum())
        assert len(row) == max(naive_budget(budget, nv), len(prot))
        one = dart(x[i:i + 1], budget, n_pivots=n_pivots,
                   pivot_tokens=None if extra is None else extra[i:i + 1],
                   mask=None if mask is None else mask[i:i + 1], protected=protected)
        assert [int(v) for v in one[0] if v >= 0] == row


# ----------------------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors() -> None:
    x = torch.randn(2, 8, 4)
    with pytest.raises(UniprunerError, match=r"r .*>= 0"):
        bipartite_soft_matching(x, -1)
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        bipartite_soft_matching(x[0], 2)
    with pytest.raises(UniprunerError, match="mask must have shape"):
        bipartite_soft_matching(x, 2, mask=torch.ones(2, 7, dtype=torch.bool))
    with pytest.raises(UniprunerError, match="protected"):
        bipartite_soft_matching(x, 2, protected=9)
    with pytest.raises(UniprunerError, match="must be an int"):
        bipartite_soft_matching(x, 2.5)  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="NaN"):
        bipartite_soft_matching(torch.full((1, 4, 2), math.nan), 1)
    with pytest.raises(UniprunerError, match="w \\* h"):
        stride_matching_2d(x, 3, 3, 2, 2, 2)
    with pytest.raises(UniprunerError, match=r"r .*>= 0"):
        stride_matching_2d(x, 4, 2, 2, 2, -3)
    with pytest.raises(UniprunerError, match="sx"):
        stride_matching_2d(x, 4, 2, 0, 2, 1)
    with pytest.raises(UniprunerError, match=r"\[B, N, D\]"):
        stride_matching_2d(x[0], 4, 2, 2, 2, 1)
    with pytest.raises(UniprunerError, match="mask must have shape"):
        dart(x, 3, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(UniprunerError, match="keys must have shape"):
        dart(x, 3, keys=torch.randn(2, 7, 4))
    with pytest.raises(UniprunerError, match="pivot_tokens must have shape"):
        dart(x, 3, pivot_tokens=torch.randn(2, 2, 5))
    with pytest.raises(UniprunerError, match="at least one pivot"):
        dart(x, 3, n_pivots=0)
    with pytest.raises(UniprunerError, match="ratio or keep"):
        dart(x, Budget(threshold=0.5))
    with pytest.raises(UniprunerError, match="more tokens than the sequence"):
        dart(x, 9)
    with pytest.raises(UniprunerError, match="ratio"):
        dart(x, 1.5)
    with pytest.raises(UniprunerError, match="n_pivots"):
        dart(x, 3, n_pivots=-1)
