"""The KV adapter's eviction / selection policies, without a model: against plainly written references."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner import Budget
from unipruner.adapters.kv_cache._policies import (
    accumulate,
    compact,
    compaction_shift,
    evict_keep,
    gather_slots,
    kept_scores,
    layout,
    prefill_keep,
    prefill_rerotation,
    to_heads,
)


def _case(seed: int, b: int = 2, h: int = 2, s: int = 9, p_valid: float = 0.75
          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validity [B, H, S] (at least one valid slot per row/head), scores with a few +inf, budgets [B, H]."""
    g = torch.Generator().manual_seed(seed)
    valid = torch.rand(b, h, s, generator=g) < p_valid
    valid[..., -1] = True
    scores = torch.randn(b, h, s, generator=g)
    scores[torch.rand(b, h, s, generator=g) < 0.1] = math.inf
    counts = valid.sum(-1)
    budget = torch.randint(1, s + 1, (b, h), generator=g).minimum(counts + 1)
    return valid, scores, budget


def _naive_evict(valid: torch.Tensor, scores: torch.Tensor, budget: torch.Tensor, n_protected: int,
                 recent: torch.Tensor | None) -> torch.Tensor | None:
    b, h, s = valid.shape
    keep = valid.clone()
    any_evicted = False
    for r in range(b):
        for k in range(h):
            idx = [j for j in range(s) if valid[r, k, j]]
            n_evict = max(0, len(idx) - int(budget[r, k]))
            any_evicted |= n_evict > 0
            prot = set(idx[:n_protected])
            if recent is not None and int(recent[r, k]):
                prot |= set(idx[-int(recent[r, k]):])
            cand = [j for j in idx if j not in prot and scores[r, k, j] != math.inf]
            cand.sort(key=lambda j: (float(scores[r, k, j]), j))  # lowest first, earliest on ties
            for j in cand[:n_evict]:
                keep[r, k, j] = False
    return keep if any_evicted else None


def test_evict_keep_equals_a_naive_eviction() -> None:
    for seed in range(12):
        valid, scores, budget = _case(seed)
        scores[0, 0, :3] = 0.5  # ties: the earliest goes first
        for n_protected in (0, 2):
            for recent in (None, torch.full_like(budget, 2)):
                got = evict_keep(valid, scores, budget, n_protected=n_protected, recent=recent)
                want = _naive_evict(valid, scores, budget, n_protected, recent)
                if want is None:
                    assert got is None
                else:
                    assert got is not None and torch.equal(got, want), (seed, n_protected, recent)


def test_compact_and_shift_equal_naive_ones() -> None:
    for seed in range(8):
        valid, scores, budget = _case(seed)
        keepmask = evict_keep(valid, scores, budget) if evict_keep(valid, scores, budget) is not None else valid
        order, new_valid = compact(keepmask)
        delta = compaction_shift(valid, order, new_valid)
        b, h, _ = valid.shape
        width = int(keepmask.sum(-1).max())
        assert order.shape == new_valid.shape == delta.shape == (b, h, width)
        for r in range(b):
            for k in range(h):
                kept = [j for j in range(valid.shape[-1]) if keepmask[r, k, j]]
                rank = {j: i for i, j in enumerate(j for j in range(valid.shape[-1]) if valid[r, k, j])}
                assert order[r, k, : len(kept)].tolist() == kept
                assert new_valid[r, k].tolist() == [i < len(kept) for i in range(width)]
                assert delta[r, k, : len(kept)].tolist() == [i - rank[j] for i, j in enumerate(kept)]
                assert delta[r, k, len(kept):].tolist() == [0] * (width - len(kept))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 10_000), s=st.integers(1, 12), n_protected=st.integers(0, 3),
       recent=st.integers(0, 3))
def test_eviction_properties(seed: int, s: int, n_protected: int, recent: int) -> None:
    """Kept = valid minus the evicted; sinks / recent / +inf always stay; no evicted slot outscores a kept
    evictable one; each row shrinks to its budget unless protected slots forbid it; compaction keeps order."""
    valid, scores, budget = _case(seed, s=s)
    rec = torch.full_like(budget, recent)
    keep = evict_keep(valid, scores, budget, n_protected=n_protected, recent=rec)
    if keep is None:
        assert bool((valid.sum(-1) <= budget).all())
        return
    assert bool((keep <= valid).all())
    b, h, _ = valid.shape
    for r in range(b):
        for k in range(h):
            idx = [j for j in range(s) if valid[r, k, j]]
            forced = set(idx[:n_protected]) | set(idx[max(len(idx) - recent, 0):] if recent else [])
            forced |= {j for j in idx if scores[r, k, j] == math.inf}
            assert all(keep[r, k, j] for j in forced)
            evicted = [float(scores[r, k, j]) for j in idx if not keep[r, k, j]]
            others = [float(scores[r, k, j]) for j in idx if keep[r, k, j] and j not in forced]
            if evicted and others:
                assert max(evicted) <= min(others)
            assert int(keep[r, k].sum()) == max(int(budget[r, k]), len(forced)) or len(idx) <= int(budget[r, k])
    order, new_valid = compact(keep)
    packed = order.masked_fill(~new_valid, -1)
    for r in range(b):
        for k in range(h):
            got = [j for j in packed[r, k].tolist() if j >= 0]
            assert got == sorted(got) == [j for j in range(s) if keep[r, k, j]]


def _naive_prefill(scores: torch.Tensor, mask: torch.Tensor, k: torch.Tensor, n_protected: int,
                   recent: float) -> list[list[int]]:
    out = []
    for r in range(scores.shape[0]):
        idx = [j for j in range(scores.shape[1]) if mask[r, j]]
        forced = set(idx[:n_protected])
        n_recent = math.floor(int(k[r]) * recent)
        if n_recent:
            forced |= set(idx[-n_recent:])
        rest = sorted((j for j in idx if j not in forced), key=lambda j: -float(scores[r, j]))
        out.append(sorted(forced | set(rest[: int(k[r]) - len(forced)])))
    return out


def test_prefill_keep_equals_a_naive_top_k_with_sinks_and_recent_window() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 16, generator=g)
    mask = torch.ones(4, 16, dtype=torch.bool)
    mask[1, :5] = False  # left padding
    mask[3, :9] = False
    for budget in (Budget(ratio=0.5), Budget(keep=6)):
        k = budget.counts(mask.sum(-1), n_max=16)
        for n_protected, recent in ((0, 0.0), (2, 0.0), (0, 0.5), (3, 0.34)):
            keep = prefill_keep(scores, budget, mask, n_protected=n_protected, recent=recent)
            got = [[j for j in row if j >= 0] for row in keep.tolist()]
            assert got == _naive_prefill(scores, mask, k, n_protected, recent), (budget, n_protected, recent)
    every = prefill_keep(scores, Budget(ratio=1.0), None)
    assert torch.equal(every, torch.arange(16).expand(4, 16))


def test_prefill_rerotation_equals_naive_positions() -> None:
    positions = torch.tensor([[0, 0, 0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5, 6, 7]])
    row_valid = torch.tensor([[False, False, True, True, True, True, True, True], [True] * 8])
    keep = torch.tensor([[[2, 3, 6, 7], [2, 5, 6, 7]], [[0, 1, 6, 7], [0, 4, 5, 7]]])
    kept = keep >= 0
    delta, offset = prefill_rerotation(positions, row_valid, kept, keep.clamp(min=0))
    for r in range(2):
        for h in range(2):
            assert delta[r, h].tolist() == [i - int(positions[r, j]) for i, j in enumerate(keep[r, h].tolist())]
    assert offset.tolist() == [5 + 1 - 4, 7 + 1 - 4]


def test_layouts_per_head_and_shared() -> None:
    g = torch.Generator().manual_seed(1)
    b, hkv, hq, s, d = 2, 2, 4, 5, 3
    keys, values = torch.randn(b, hkv, s, d, generator=g), torch.randn(b, hkv, s, d, generator=g)
    attn = torch.rand(b, hq, 2, s, generator=g)
    valid = torch.rand(b, hkv, s, generator=g) > 0.3
    tokens, mask, sig = layout(keys, values, attn, valid, hkv, per_head=True)
    assert mask is not None
    for r in range(b):
        for h in range(hkv):
            i = r * hkv + h
            assert torch.equal(tokens[i], keys[r, h]) and torch.equal(sig["values"][i], values[r, h])
            assert torch.equal(mask[i], valid[r, h])
            torch.testing.assert_close(sig["attn"][i], attn[r, 2 * h: 2 * h + 2].mean(0))
    tokens, mask, sig = layout(keys, values, attn, valid, hkv, per_head=False)
    assert mask is not None and torch.equal(mask, valid[:, 0]) and sig["attn"] is attn
    for r in range(b):
        for j in range(s):
            assert torch.equal(tokens[r, j], torch.cat([keys[r, h, j] for h in range(hkv)]))
    x = torch.arange(b * hkv * 3).reshape(b * hkv, 3)
    assert torch.equal(to_heads(x, b, hkv, True)[1, 0], x[2])
    shared = to_heads(x[:b], b, hkv, False)
    assert torch.equal(shared[1, 0], x[1]) and torch.equal(shared[1, 1], x[1])
    idx = torch.tensor([[[4, 0], [1, 2]], [[3, 3], [0, 4]]])
    k2, v2 = gather_slots(keys, values, idx)
    assert torch.equal(k2[1, 1, 1], keys[1, 1, 4]) and torch.equal(v2[0, 0, 0], values[0, 0, 4])


def test_h2o_score_buffers() -> None:
    scores = torch.tensor([[[1.0, math.inf, 3.0, -math.inf]]])
    idx = torch.tensor([[[1, 2, 0]]])
    kept = torch.tensor([[[True, True, False]]])
    assert kept_scores(scores, idx, kept).tolist() == [[[0.0, 3.0, 0.0]]]
    valid = torch.tensor([[[True, True, False, True]]])
    total = accumulate(None, scores, valid)
    assert total.tolist() == [[[1.0, 0.0, 0.0, 0.0]]]
    assert accumulate(total, torch.ones(1, 1, 4), valid).tolist() == [[[2.0, 1.0, 0.0, 1.0]]]
