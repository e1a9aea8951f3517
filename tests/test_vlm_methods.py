"""The vision-tower VLM methods of the core: VisionZip, PruMerge / PruMerge+ and HoloV.

Each is compared with a plain per-sample reference written here from the papers' descriptions
(Python loops over tokens and crops), then checked for the registry contract: counts, order,
sizes, masks, ragged batches equal to each row alone, keep-all identity and clear errors.
"""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unipruner
from unipruner import UniprunerError
from unipruner.methods import PruMerge
from unipruner.reduce import contextual_merge, knn_merge, uniform_picks
from unipruner.scorers.importance import iqr_outliers, received_attention
from unipruner.select import topk

D = 6

# ----------------------------------------------------------------------------------------------
# plain references (one sample at a time)
# ----------------------------------------------------------------------------------------------


def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b) / max(float(a.norm()) * float(b.norm()), 1e-12)


def _top(scores: torch.Tensor, among: list[int], k: int) -> list[int]:
    """The k best of ``among`` by score, ties to the lower index."""
    return sorted(sorted(among, key=lambda i: (-float(scores[i]), i))[:k])


def _uniform(rest: list[int], c: int) -> list[int]:
    if c <= 0 or not rest:
        return []
    step = max(1, len(rest) // min(c, len(rest)))
    return [rest[r] for r in range(0, len(rest), step)][: min(c, len(rest))]


def _half_up(x: float) -> int:
    return math.floor(x + 0.5)


def ref_scores(attn: torch.Tensor, cls_index: int | None) -> torch.Tensor:
    """attn of one row: [H, Q, n] or [n]."""
    if attn.ndim == 1:
        return attn
    if cls_index is None:
        return attn.mean(dim=0).mean(dim=0)
    return attn[:, cls_index].mean(dim=0)


def ref_visionzip(x: torch.Tensor, s: torch.Tensor, keys: torch.Tensor, total: int, contextual: float | int,
                  protected: int = 0) -> tuple[torch.Tensor, list[int], list[float]]:
    n = x.shape[0]
    total = max(total, protected)
    if total >= n:
        return x.clone(), list(range(n)), [1.0] * n
    c = _half_up(total * contextual) if isinstance(contextual, float) else contextual
    c = min(c, total - protected)
    dominant = sorted(list(range(protected)) + _top(s, list(range(protected, n)), total - c - protected))
    rest = [i for i in range(n) if i not in dominant]
    targets = _uniform(rest, c)
    groups: dict[int, list[int]] = {t: [t] for t in targets}
    for i in rest:
        if i in targets or not targets:
            continue
        sims = [_cos(keys[i], keys[t]) for t in targets]
        groups[targets[sims.index(max(sims))]].append(i)
    rows = [x[i] for i in dominant] + [x[groups[t]].mean(dim=0) for t in targets]
    return torch.stack(rows), dominant + targets, [1.0] * len(dominant) + [float(len(groups[t])) for t in targets]


def ref_prumerge(x: torch.Tensor, s: torch.Tensor, keys: torch.Tensor, *, total: int | None, adaptive: bool,
                 k: int = 32, protected: int = 0, spatial: float | None = None, neighbours: str = "pruned",
                 extra: bool = False) -> tuple[torch.Tensor, list[int], list[float]]:
    n = x.shape[0]
    cand = list(range(protected, n))
    cap = len(cand) if total is None else max(total, protected) - protected
    want = cap
    if adaptive:
        vals = s[cand].double()
        q1, q3 = torch.quantile(vals, 0.25), torch.quantile(vals, 0.75)
        m = sum(1 for i in cand if float(s[i]) > float(q3 + 1.5 * (q3 - q1))) if len(cand) >= 2 else 0
        m = max(m, 1)
        want = m if spatial is None else m + _half_up(m * spatial)
        want = min(want, cap)
    want = min(want, len(cand))
    if spatial is None:
        picks = _top(s, cand, want)
    else:
        u = _half_up(want * spatial / (1 + spatial))
        o = max(want - u, min(want, 1))
        top = _top(s, cand, o)
        picks = sorted(top + _uniform([i for i in cand if i not in top], want - o))
    kept = sorted(list(range(protected)) + picks)
    pruned = [j for j in cand if j not in kept]
    pool = pruned if neighbours == "pruned" else cand
    rows = []
    for p in kept:
        if p < protected:
            rows.append(x[p].clone())
            continue
        near = sorted((j for j in pool if j != p), key=lambda j: (-_cos(keys[p], keys[j]), j))[:k]
        rows.append(x[p] + sum((s[j] * x[j] for j in near), torch.zeros_like(x[p])))
    sizes = [1.0] * len(kept)
    if extra and pruned:
        rows.append(sum((s[j] * x[j] for j in pruned), torch.zeros_like(x[0])))
        sizes.append(float(len(pruned)))
        return torch.stack(rows), [*kept, -1], sizes
    for j in pruned:
        sims = [_cos(keys[j], keys[t]) for t in kept]
        sizes[sims.index(max(sims))] += 1.0
    return torch.stack(rows), kept, sizes


def _ref_allocate(picks: int, weights: list[float], cap: list[int]) -> list[int]:
    alloc = [0] * len(cap)
    left = picks
    while left > 0:
        room = [cap[c] - alloc[c] for c in range(len(cap))]
        open_ = [c for c in range(len(cap)) if room[c] > 0]
        wsum = sum(weights[c] for c in open_)
        for c in open_:
            frac = weights[c] / wsum if wsum > 0 else room[c] / sum(room[o] for o in open_)
            alloc[c] += min(math.floor(frac * left), room[c])
        left = picks - sum(alloc)
        open_ = sorted((c for c in range(len(cap)) if alloc[c] < cap[c]), key=lambda c: (-weights[c], c))
        for c in open_[: min(left, len(open_))]:
            alloc[c] += 1
        left = picks - sum(alloc)
    return alloc


def ref_holov(x: torch.Tensor, a: torch.Tensor, total: int, *, hw: tuple[int, int] | None = None,
              crops: tuple[int, int] = (4, 4), alpha: float = 1.0, beta: float = 0.09, temperature: float = 1.0,
              protected: int = 0) -> list[int]:
    n = x.shape[0]
    ch, cw = crops
    nc = ch * cw
    cand = list(range(protected, n))
    crop_of: dict[int, int] = {}
    if hw is None:
        q, r = divmod(len(cand), nc)
        sizes = [q + (1 if c < r else 0) for c in range(nc)]
        it = iter(cand)
        for c, size in enumerate(sizes):
            for _ in range(size):
                crop_of[next(it)] = c
    else:
        h, w = hw
        lead = n - h * w
        for i in cand:
            g = i - lead
            crop_of[i] = (g // w * ch // h) * cw + (g % w) * cw // w
    members = {c: [i for i in cand if crop_of[i] == c] for c in range(nc)}
    var = {}
    for mem in members.values():
        for i in mem:
            sims = [_cos(x[i], x[j]) for j in mem if j != i]
            mean = sum(sims) / len(sims) if sims else 0.0
            var[i] = sum((v - mean) ** 2 for v in sims) / len(sims) if sims else 0.0
    token, crop_score = {}, []
    for mem in members.values():
        ma = sum(float(a[i]) for i in mem) / max(len(mem), 1)
        mv = sum(var[i] for i in mem) / max(len(mem), 1)
        scale = ma / mv if mv > 0 else 0.0
        for i in mem:
            token[i] = alpha * float(a[i]) + beta * var[i] * scale
        crop_score.append(sum(token[i] for i in mem) / len(mem) if mem else 0.0)
    powered = [v ** (1.0 / temperature) if v > 0 else 0.0 for v in crop_score]
    weights = [v / sum(powered) for v in powered] if sum(powered) > 0 else [0.0] * nc
    picks = max(total, protected) - protected
    alloc = _ref_allocate(picks, weights, [len(members[c]) for c in range(nc)])
    kept = list(range(protected))
    for c, mem in members.items():
        kept += sorted(mem, key=lambda i: (-token[i], i))[: alloc[c]]
    return sorted(kept)


# ----------------------------------------------------------------------------------------------
# inputs: ragged rows, right-padded (attention over each row's own keys; junk in the padding)
# ----------------------------------------------------------------------------------------------


def ragged(lengths: list[int], seed: int, *, heads: int = 2, dtype: torch.dtype = torch.float64
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    b, n = len(lengths), max(lengths)
    x = torch.randn(b, n, D, generator=g, dtype=dtype)
    keys = torch.randn(b, n, D, generator=g, dtype=dtype)
    attn = torch.zeros(b, heads, n, n, dtype=dtype)
    mask = torch.zeros(b, n, dtype=torch.bool)
    for i, m in enumerate(lengths):
        attn[i, :, :m, :m] = (2.0 * torch.randn(heads, m, m, generator=g, dtype=dtype)).softmax(-1)
        mask[i, :m] = True
        x[i, m:] = 1e6  # padding must never leak into the outputs
        keys[i, m:] = -1e6
    return x, keys, attn, mask


def _dst(red: unipruner.Reduced) -> torch.Tensor:
    assert red.plan is not None, "a merging method returns its plan"
    return red.plan.dst


def _prumerge(name: str, **kw: Any) -> PruMerge:
    m = unipruner.method(name, **kw)
    assert isinstance(m, PruMerge)
    return m


def _valid(red: unipruner.Reduced, i: int) -> torch.Tensor:
    return torch.ones(red.tokens.shape[1], dtype=torch.bool) if red.mask is None else red.mask[i]


# ----------------------------------------------------------------------------------------------
# scorers and building blocks
# ----------------------------------------------------------------------------------------------


def test_received_attention_rows_maps_and_vectors() -> None:
    _, _, attn, mask = ragged([9, 6], 0)
    s = received_attention(attn, mask=mask)
    assert torch.equal(s[0], attn[0, :, 0, :].mean(0))
    mean = received_attention(attn, cls_index=None, mask=mask)
    for i, m in enumerate([9, 6]):
        torch.testing.assert_close(mean[i, :m], ref_scores(attn[i, :, :m, :m], None))
        assert bool(torch.isinf(mean[i, m:]).all())
    # the CLS row alone ([B, H, 1, N]) gives the same as the full map's row 0
    torch.testing.assert_close(received_attention(attn[:, :, :1], mask=mask), s)
    vec = torch.rand(2, 9, dtype=torch.float64)
    assert torch.equal(received_attention(vec), vec)


def test_iqr_outliers_match_torch_quantile_per_row() -> None:
    g = torch.Generator().manual_seed(1)
    s = torch.rand(4, 40, generator=g) ** 4
    mask = torch.rand(4, 40, generator=g) > 0.3
    out = iqr_outliers(s, mask=mask)
    for i in range(4):
        v = s[i][mask[i]].double()
        q1, q3 = torch.quantile(v, 0.25), torch.quantile(v, 0.75)
        assert torch.equal(out[i], mask[i] & (s[i].double() > q3 + 1.5 * (q3 - q1)))
    assert not bool(iqr_outliers(torch.ones(1, 8)).any()), "no spread, no outlier"


def test_uniform_picks_follow_visionzip_spacing() -> None:
    cand = torch.tensor([[True, False, True, True, True, False, True, True, True, True]])
    picked = uniform_picks(cand, torch.tensor([3]))
    rest = [i for i in range(10) if cand[0, i]]
    assert picked.nonzero()[:, 1].tolist() == _uniform(rest, 3) == [0, 3, 6]
    assert not bool(uniform_picks(cand, torch.tensor([0])).any())
    assert torch.equal(uniform_picks(cand, torch.tensor([99])), cand)


# ----------------------------------------------------------------------------------------------
# VisionZip
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "contextual", "protected", "cls_index"),
                         [(8, 10 / 64, 0, 0), (10, 0.3, 1, 0), (6, 2, 0, None), (13, 0.0, 0, 0)])
def test_visionzip_matches_the_reference(keep: int, contextual: float | int, protected: int,
                                         cls_index: int | None) -> None:
    lengths = [24, 17, 20]
    x, keys, attn, mask = ragged(lengths, 2)
    m = unipruner.method("visionzip", keep=keep, contextual=contextual, protected=protected, cls_index=cls_index)
    red = m.reduce(x, mask=mask, attn=attn, keys=keys)
    sel = m.select(x, mask=mask, attn=attn, keys=keys)
    for i, n in enumerate(lengths):
        s = ref_scores(attn[i, :, :n, :n], cls_index)
        want, idx, sizes = ref_visionzip(x[i, :n], s, keys[i, :n], keep, contextual, protected)
        ok = _valid(red, i)
        assert red.indices[i][ok].tolist() == idx
        torch.testing.assert_close(red.tokens[i][ok], want)
        assert red.sizes[i][ok, 0].tolist() == sizes
        assert sel[i][sel[i] >= 0].tolist() == sorted(idx)
        # the row alone gives the same
        alone = m.reduce(x[i:i + 1, :n], attn=attn[i:i + 1, :, :n, :n], keys=keys[i:i + 1, :n])
        torch.testing.assert_close(alone.tokens[0], red.tokens[i][ok])
    assert bool((_dst(red)[~mask] == -1).all()), "padding belongs to no slot"


def test_visionzip_default_split_is_the_papers() -> None:
    x = torch.randn(1, 576, 4)
    attn = torch.rand(1, 1, 1, 576).softmax(-1)
    for keep, ctx in ((64, 10), (128, 20), (192, 30)):
        red = unipruner.method("visionzip", keep=keep).reduce(x, attn=attn)
        assert red.tokens.shape[1] == keep
        assert bool((red.sizes[0, : keep - ctx] == 1).all()), "dominant tokens stand for themselves"
        assert float(red.sizes[0, keep - ctx:].sum()) == 576 - (keep - ctx), "the rest is in the contextual ones"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 28), frac=st.floats(0.02, 1.0), ctx=st.sampled_from([0.0, 0.2, 10 / 64, 3]),
       protected=st.integers(0, 2), seed=st.integers(0, 10_000))
def test_visionzip_properties(n: int, frac: float, ctx: float | int, protected: int, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    lengths = [n, max(1, n - 1 - seed % max(n - 1, 1))]
    x, keys, attn, mask = ragged(lengths, seed, dtype=torch.float32)
    mask &= torch.rand(mask.shape, generator=g) > 0.15
    mask[:, 0] = True
    m = unipruner.method("visionzip", ratio=frac, contextual=ctx, protected=protected)
    red = m.reduce(x, mask=mask, attn=attn, keys=keys)
    for i in range(2):
        nv = int(mask[i].sum())
        n_prot = int(mask[i, :protected].sum())
        total = max(math.floor(nv * frac + 0.5), n_prot)
        ok = _valid(red, i)
        idx = red.indices[i][ok]
        assert int(ok.sum()) == total, "the budget counts dominant + contextual tokens"
        assert bool(mask[i, idx].all()) and len(set(idx.tolist())) == len(idx)
        assert set(range(protected)) & set(mask[i].nonzero().flatten().tolist()) <= set(idx.tolist())
        c = _half_up(total * ctx) if isinstance(ctx, float) else ctx
        c = 0 if total >= nv else min(c, total - n_prot)
        dom = idx[: total - c]
        assert bool(torch.all(dom[1:] > dom[:-1])), "dominant tokens keep their order"
        assert float(red.sizes[i][ok].sum()) == (nv if c > 0 or total == nv else total)
        assert bool((_dst(red)[i][~mask[i]] == -1).all())
        assert bool((red.tokens[i][ok].abs() < 1e5).all()), "padding never leaks"


def test_visionzip_keep_all_is_the_identity() -> None:
    x, keys, attn, _ = ragged([12, 12], 3, dtype=torch.float32)
    red = unipruner.method("visionzip", ratio=1.0).reduce(x, attn=attn, keys=keys)
    assert torch.equal(red.tokens, x) and red.indices.tolist() == [list(range(12))] * 2 and red.mask is None


# ----------------------------------------------------------------------------------------------
# PruMerge / PruMerge+
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["prumerge", "prumerge_plus"])
@pytest.mark.parametrize(("budget", "adaptive", "protected", "neighbours", "extra", "k"), [
    ({}, None, 0, "pruned", False, 32),
    ({}, None, 1, "all", False, 4),
    ({"keep": 9}, None, 0, "pruned", True, 3),
    ({"keep": 3}, True, 1, "all", False, 5),
    ({"ratio": 0.4}, None, 1, "pruned", False, 2),
])
def test_prumerge_matches_the_reference(name: str, budget: dict[str, Any], adaptive: bool | None, protected: int,
                                        neighbours: str, extra: bool, k: int) -> None:
    lengths = [24, 15, 20]
    x, keys, attn, mask = ragged(lengths, 4)
    m = _prumerge(name, **budget, adaptive=adaptive, protected=protected, neighbours=neighbours,
                         extra_token=extra, k=k)
    red = m.reduce(x, mask=mask, attn=attn, keys=keys)
    sel = m.select(x, mask=mask, attn=attn, keys=keys)
    counts = []
    for i, n in enumerate(lengths):
        s = ref_scores(attn[i, :, :n, :n], 0)
        total = None
        if "keep" in budget:
            total = int(budget["keep"])
        elif "ratio" in budget:
            total = math.floor(n * budget["ratio"] + 0.5)
        want, idx, sizes = ref_prumerge(
            x[i, :n], s, keys[i, :n], total=total, adaptive=m.is_adaptive, k=k, protected=protected,
            spatial=3.0 if name == "prumerge_plus" else None, neighbours=neighbours, extra=extra)
        ok = _valid(red, i)
        assert red.indices[i][ok].tolist() == idx
        torch.testing.assert_close(red.tokens[i][ok], want)
        assert red.sizes[i][ok, 0].tolist() == sizes and sum(sizes) == n
        assert sel[i][sel[i] >= 0].tolist() == [j for j in idx if j >= 0]
        counts.append(int(ok.sum()))
        alone = m.reduce(x[i:i + 1, :n], attn=attn[i:i + 1, :, :n, :n], keys=keys[i:i + 1, :n])
        torch.testing.assert_close(alone.tokens[0][_valid(alone, 0)], red.tokens[i][ok])
    if m.is_adaptive and not budget:
        assert red.mask is not None or len(set(counts)) == 1, "adaptive counts are ragged, padded with a mask"


def test_prumerge_adaptive_count_is_the_iqr_rule() -> None:
    g = torch.Generator().manual_seed(5)
    attn = torch.full((2, 1, 1, 64), 1.0)
    attn[0, 0, 0, [3, 17, 40]] = 30.0  # three clear outliers in row 0, five in row 1
    attn[1, 0, 0, [1, 2, 9, 33, 60]] = 25.0
    attn = attn / attn.sum(-1, keepdim=True)
    x = torch.randn(2, 64, 8, generator=g)
    sel = unipruner.method("prumerge").select(x, attn=attn)
    assert sel[0][sel[0] >= 0].tolist() == [3, 17, 40] and sel[1].tolist() == [1, 2, 9, 33, 60]
    plus = unipruner.method("prumerge_plus").select(x, attn=attn)
    assert [int((r >= 0).sum()) for r in plus] == [12, 20], "PruMerge+ keeps m + 3m tokens"
    assert {3, 17, 40} <= set(plus[0].tolist())
    capped = unipruner.method("prumerge", keep=4, adaptive=True).select(x, attn=attn)
    assert [int((r >= 0).sum()) for r in capped] == [3, 4]
    fixed = unipruner.method("prumerge", keep=4).select(x, attn=attn)
    assert fixed.shape == (2, 4) and bool((fixed >= 0).all())
    flat = unipruner.method("prumerge").select(x, attn=torch.full((2, 1, 1, 64), 1 / 64))
    assert flat.shape == (2, 1), "a row without outliers still keeps one token"


@settings(max_examples=30, deadline=None)
@given(n=st.integers(2, 30), seed=st.integers(0, 10_000), plus=st.booleans(), protected=st.integers(0, 1),
       extra=st.booleans())
def test_prumerge_properties(n: int, seed: int, plus: bool, protected: int, extra: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    x, keys, attn, mask = ragged([n, max(1, n // 2)], seed, dtype=torch.float32)
    mask &= torch.rand(mask.shape, generator=g) > 0.2
    mask[:, 0] = True
    m = unipruner.method("prumerge_plus" if plus else "prumerge", protected=protected, extra_token=extra)
    red = m.reduce(x, mask=mask, attn=attn, keys=keys)
    sel = m.select(x, mask=mask, attn=attn, keys=keys)
    a = received_attention(attn, mask=mask)
    for i in range(2):
        cand = mask[i].clone()
        cand[:protected] = False
        m_out = max(int(iqr_outliers(a[i:i + 1], mask=cand[None])[0].sum()), 1)
        want = min(m_out + (_half_up(3.0 * m_out) if plus else 0), int(cand.sum()))
        kept = sel[i][sel[i] >= 0]
        assert len(kept) == want + int(mask[i, :protected].sum())
        assert bool(mask[i, kept].all()) and torch.all(kept[1:] > kept[:-1])
        ok = _valid(red, i)
        assert float(red.sizes[i][ok].sum()) == float(mask[i].sum()), "every valid token is accounted for"
        assert bool((_dst(red)[i][~mask[i]] == -1).all())
        assert bool((red.tokens[i][ok].abs() < 1e5).all()), "padding never leaks"


def test_prumerge_keep_all_is_the_identity() -> None:
    x, keys, attn, _ = ragged([10, 10], 6, dtype=torch.float32)
    for name in ("prumerge", "prumerge_plus"):
        red = unipruner.method(name, ratio=1.0).reduce(x, attn=attn, keys=keys)
        assert torch.equal(red.tokens, x) and red.indices.tolist() == [list(range(10))] * 2


# ----------------------------------------------------------------------------------------------
# HoloV
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("keep", "hw", "crops", "beta", "temperature", "protected"), [
    (8, (4, 6), (2, 2), 0.09, 1.0, 0),
    (10, (5, 5), (2, 3), 0.5, 0.5, 1),
    (7, None, (2, 3), 0.09, 2.0, 0),
    (20, (4, 6), (4, 4), 0.0, 1.0, 0),
    (3, None, (4, 4), 0.09, 1.0, 2),
])
def test_holov_matches_the_reference(keep: int, hw: tuple[int, int] | None, crops: tuple[int, int], beta: float,
                                     temperature: float, protected: int) -> None:
    n = protected + (hw[0] * hw[1] if hw else 23)
    x, _, attn, _ = ragged([n, n, n], 7)
    m = unipruner.method("holov", keep=keep, crops=crops, beta=beta, temperature=temperature, protected=protected)
    sel = m.select(x, attn=attn, hw=hw)
    a = received_attention(attn)
    for i in range(3):
        want = ref_holov(x[i], a[i], keep, hw=hw, crops=crops, beta=beta, temperature=temperature,
                         protected=protected)
        assert sel[i].tolist() == want
    red = m.reduce(x, attn=attn, hw=hw)
    assert torch.equal(red.tokens, torch.stack([x[i, sel[i]] for i in range(3)]))


def test_holov_with_beta_zero_is_the_released_procedure() -> None:
    """16 contiguous crops, budget in proportion to the crops' mean attention, top attention inside."""
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 100, 8, generator=g, dtype=torch.float64)
    a = (0.3 * torch.randn(2, 100, generator=g, dtype=torch.float64)).softmax(-1)
    got = unipruner.method("holov", keep=30, beta=0.0).select(x, attn=a)
    for i in range(2):
        bounds, start = [], 0
        for p in range(16):
            size = 100 // 16 + (1 if p < 100 % 16 else 0)
            bounds.append((start, start + size))
            start += size
        score = torch.stack([a[i, s:e].mean() for s, e in bounds])
        weights = score / score.sum()
        alloc = (weights * 30).floor().long()
        for c in torch.topk(weights, int(30 - alloc.sum())).indices:
            alloc[c] += 1
        want = []
        for (s, e), k in zip(bounds, alloc.tolist(), strict=True):
            want += (s + torch.topk(a[i, s:e], k).indices).tolist()
        assert got[i].tolist() == sorted(want)


def test_holov_ragged_rows_equal_each_row_alone() -> None:
    lengths = [30, 19, 25]
    x, _, attn, mask = ragged(lengths, 9)
    m = unipruner.method("holov", ratio=0.3, crops=(2, 2))
    sel = m.select(x, mask=mask, attn=attn)
    for i, n in enumerate(lengths):
        alone = m.select(x[i:i + 1, :n], attn=attn[i:i + 1, :, :n, :n])
        assert sel[i][sel[i] >= 0].tolist() == alone[0].tolist()


@settings(max_examples=30, deadline=None)
@given(h=st.integers(2, 7), w=st.integers(2, 7), ch=st.integers(1, 4), cw=st.integers(1, 4),
       frac=st.floats(0.02, 1.0), temperature=st.sampled_from([0.25, 1.0, 4.0]), seed=st.integers(0, 10_000))
def test_holov_properties(h: int, w: int, ch: int, cw: int, frac: float, temperature: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    n = 1 + h * w
    x, _, attn, mask = ragged([n, n], seed, dtype=torch.float32)
    mask[1] &= torch.rand(n, generator=g) > 0.3
    mask[:, 0] = True
    m = unipruner.method("holov", ratio=frac, crops=(ch, cw), temperature=temperature, protected=1)
    sel = m.select(x, mask=mask, attn=attn, hw=(h, w))
    for i in range(2):
        kept = sel[i][sel[i] >= 0]
        nv = int(mask[i].sum())
        assert len(kept) == max(math.floor(nv * frac + 0.5), 1), "exactly the budget"
        assert int(kept[0]) == 0 and bool(mask[i, kept].all()) and torch.all(kept[1:] > kept[:-1])


def test_holov_spreads_the_budget_over_the_image() -> None:
    """All the attention on one corner: attention top-k stays there, HoloV reaches every crop."""
    x = torch.randn(1, 64, 8, generator=torch.Generator().manual_seed(10))
    a = torch.full((1, 64), 0.2)
    a[0, :4] = 1.0
    top = topk(a, 16)[0]  # attention-first: the hot corner and its ties
    assert {(int(i) // 8 // 4) * 2 + (int(i) % 8) // 4 for i in top} == {0, 1}
    sel = unipruner.method("holov", keep=16, crops=(2, 2)).select(x, attn=a, hw=(8, 8))[0]
    per_quadrant = [sum(1 for i in sel if (int(i) // 8 // 4) * 2 + (int(i) % 8) // 4 == q) for q in range(4)]
    assert per_quadrant == [7, 3, 3, 3], "shares 0.4 / 0.2 / 0.2 / 0.2 of 16, the remainder to the first"
    sharp = unipruner.method("holov", keep=16, crops=(2, 2), temperature=0.05).select(x, attn=a, hw=(8, 8))[0]
    assert all((int(i) // 8 // 4) * 2 + (int(i) % 8) // 4 == 0 for i in sharp), "a low temperature concentrates"


# ----------------------------------------------------------------------------------------------
# registry, building blocks and bad input
# ----------------------------------------------------------------------------------------------


def test_registry_entries() -> None:
    names = {m.name for m in unipruner.methods(domain="vlm")}
    assert {"visionzip", "prumerge", "prumerge_plus", "holov"} <= names
    for name in ("visionzip", "prumerge", "prumerge_plus", "holov"):
        info = next(m for m in unipruner.methods() if m.name == name)
        assert info.domains == ("vlm",) and "attn" in info.requires and info.paper
    assert _prumerge("prumerge").budget is None and _prumerge("prumerge").is_adaptive
    assert not _prumerge("prumerge", keep=8).is_adaptive


def test_contextual_and_knn_merge_blocks() -> None:
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.1]]])
    _, _, idx, sizes, plan = contextual_merge(x, torch.tensor([[False, True, False, False]]), torch.tensor([0]))
    assert idx.tolist() == [[1]] and sizes.tolist() == [[[1.0]]] and plan.dst.tolist() == [[-1, 0, -1, -1]]
    out, _, idx, sizes, _ = knn_merge(x, torch.tensor([[0, 2]]), torch.tensor([[0.4, 0.3, 0.2, 0.1]]), k=1,
                                      extra=True)
    assert idx.tolist() == [[0, 2, -1]] and sizes[0, :, 0].tolist() == [1.0, 1.0, 2.0]
    torch.testing.assert_close(out[0, 2], 0.3 * x[0, 1] + 0.1 * x[0, 3])


def test_bad_input_is_refused_clearly() -> None:
    x, _, attn, _ = ragged([16, 16], 11, dtype=torch.float32)
    with pytest.raises(UniprunerError, match="needs the signal attn"):
        unipruner.method("visionzip", keep=4).reduce(x)
    with pytest.raises(UniprunerError, match="attn covers"):
        unipruner.method("prumerge").select(x[:, :10], attn=attn)
    with pytest.raises(UniprunerError, match="contextual"):
        unipruner.method("visionzip", contextual=1.5)
    with pytest.raises(UniprunerError, match="adaptive=False needs a budget"):
        unipruner.method("prumerge", adaptive=False)
    with pytest.raises(UniprunerError, match=r"k .neighbours"):
        unipruner.method("prumerge", k=0)
    with pytest.raises(UniprunerError, match="neighbours must be"):
        unipruner.method("prumerge_plus", neighbours="some")
    with pytest.raises(UniprunerError, match="spatial"):
        unipruner.method("prumerge_plus", spatial=-1.0)
    with pytest.raises(UniprunerError, match="cls_index"):
        unipruner.method("visionzip", keep=4, cls_index=40).select(x, attn=attn)
    with pytest.raises(UniprunerError, match="more tokens than the sequence"):
        unipruner.method("visionzip", keep=40).select(x, attn=attn)
    with pytest.raises(UniprunerError, match=r"non-negative|>= 0"):
        unipruner.method("prumerge", keep=4).reduce(x, attn=-torch.rand(2, 16))
    with pytest.raises(UniprunerError, match="crops"):
        unipruner.method("holov", crops=(0, 2))
    with pytest.raises(UniprunerError, match="temperature"):
        unipruner.method("holov", temperature=0.0)
    with pytest.raises(UniprunerError, match="grid of 25 tokens"):
        unipruner.method("holov", keep=4).select(x, attn=attn, hw=(5, 5))
    with pytest.raises(UniprunerError, match="protect them"):
        unipruner.method("holov", keep=4).select(x, attn=attn, hw=(3, 5))
    with pytest.raises(UniprunerError, match="scores must be >= 0"):
        unipruner.method("holov", keep=4).select(x, attn=-torch.rand(2, 16))
    with pytest.raises(UniprunerError, match="must be a pair"):
        unipruner.method("holov", keep=4).select(x, attn=attn, hw=(4,))
