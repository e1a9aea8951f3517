"""The core pieces of the diffusion methods: ToDo's grid downsampling, AT-EDM's G-WPR and copy
recovery (with DSAP), CAT's cross-step scores, each against a plain reference written here."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import unipruner
from unipruner import Budget, UniprunerError
from unipruner.methods import ATEDM, CAT, ToDo
from unipruner.reduce import GRID_MODES, copy_recover, downsample_grid, grid_indices
from unipruner.scorers.graph import gwpr, pagerank
from unipruner.scorers.temporal import cat_scores, cluster_ids
from unipruner.select import topk

# ----------------------------------------------------------------------------------------------
# references
# ----------------------------------------------------------------------------------------------


def ref_nearest(x: torch.Tensor, hw: tuple[int, int], size: tuple[int, int], exact: bool = False) -> torch.Tensor:
    """torch's nearest rules, one output cell at a time: floor(i * in/out) or floor((i + 0.5) * in/out)."""
    (h, w), (h2, w2) = hw, size
    sh, sw = np.float32(h) / np.float32(h2), np.float32(w) / np.float32(w2)
    g = x.reshape(x.shape[0], h, w, -1)
    out = torch.empty(x.shape[0], h2, w2, x.shape[2], dtype=x.dtype)
    off = np.float32(0.5) if exact else np.float32(0.0)
    for i in range(h2):
        r = min(int(np.floor((np.float32(i) + off) * sh)), h - 1)
        for j in range(w2):
            c = min(int(np.floor((np.float32(j) + off) * sw)), w - 1)
            out[:, i, j] = g[:, r, c]
    return out.reshape(x.shape[0], h2 * w2, -1)


def ref_area(x: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Mean over each cell of an evenly divided grid."""
    (h, w), (h2, w2) = hw, size
    fh, fw = h // h2, w // w2
    g = x.reshape(x.shape[0], h, w, -1)
    out = torch.empty(x.shape[0], h2, w2, x.shape[2], dtype=x.dtype)
    for i in range(h2):
        for j in range(w2):
            out[:, i, j] = g[:, i * fh:(i + 1) * fh, j * fw:(j + 1) * fw].mean(dim=(1, 2))
    return out.reshape(x.shape[0], h2 * w2, -1)


def ref_bilinear(x: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
    """Half-pixel bilinear resampling (align_corners=False), one output cell at a time."""
    (h, w), (h2, w2) = hw, size
    g = x.double().reshape(x.shape[0], h, w, -1)
    out = torch.empty(x.shape[0], h2, w2, x.shape[2], dtype=torch.float64)

    def taps(i: int, n_in: int, n_out: int) -> tuple[int, int, float]:
        src = max((i + 0.5) * n_in / n_out - 0.5, 0.0)
        i0 = min(math.floor(src), n_in - 1)
        return i0, min(i0 + 1, n_in - 1), src - i0

    for i in range(h2):
        r0, r1, a = taps(i, h, h2)
        for j in range(w2):
            c0, c1, b = taps(j, w, w2)
            out[:, i, j] = ((1 - a) * ((1 - b) * g[:, r0, c0] + b * g[:, r0, c1])
                            + a * ((1 - b) * g[:, r1, c0] + b * g[:, r1, c1]))
    return out.reshape(x.shape[0], h2 * w2, -1)


def ref_todo_grid(hw: tuple[int, int], target: int) -> tuple[int, int]:
    """Every (h2, w2): closest count, then closest aspect ratio, then the smaller h2."""
    h, w = hw
    best = None
    for h2 in range(1, h + 1):
        for w2 in range(1, w + 1):
            aspect = Fraction(h2 * w, w2 * h)
            key = (abs(h2 * w2 - target), max(aspect, 1 / aspect), h2)
            if best is None or key < best[0]:
                best = (key, (h2, w2))
    assert best is not None
    return best[1]


def ref_gwpr(attn: torch.Tensor, damping: float, max_iter: int, tol: float, heads: str,
             mask: torch.Tensor | None = None) -> np.ndarray:
    """Power iteration on every head's valid sub-graph, one (sample, head) at a time, then pooled."""
    a = attn.double().numpy()
    b, nh, n, _ = a.shape
    valid = np.ones((b, n), dtype=bool) if mask is None else mask.numpy()
    out = np.full((b, n), -np.inf)
    for i in range(b):
        idx = np.flatnonzero(valid[i])
        per_head = []
        for hh in range(nh):
            g = a[i, hh][np.ix_(idx, idx)]
            rows = g.sum(1, keepdims=True)
            g = np.where(rows > 0, g / np.where(rows > 0, rows, 1), 1.0 / len(idx))
            s = np.full(len(idx), 1.0 / len(idx))
            for _ in range(max_iter):
                new = (1 - damping) / len(idx) + damping * s @ g
                delta = np.abs(new - s).sum()
                s = new
                if delta < tol:
                    break
            per_head.append(s)
        stacked = np.stack(per_head)
        out[i, idx] = stacked.mean(0) if heads == "mean" else stacked.max(0)
    return out


def ref_copy_recover(kept: torch.Tensor, keep: torch.Tensor, features: torch.Tensor,
                     base: torch.Tensor | None = None) -> torch.Tensor:
    """Each token: its own output if kept, else the most cosine-similar kept token's (update)."""
    b, n = features.shape[:2]
    out = torch.empty(b, n, kept.shape[2], dtype=kept.dtype)
    for i in range(b):
        slots = [k for k in range(keep.shape[1]) if int(keep[i, k]) >= 0]
        pos = {int(keep[i, k]): k for k in slots}
        for j in range(n):
            if j in pos:
                out[i, j] = kept[i, pos[j]]
                continue
            f = features[i, j] / features[i, j].norm().clamp(min=1e-12)
            sims = [float(f @ (features[i, int(keep[i, k])] / features[i, int(keep[i, k])].norm().clamp(min=1e-12)))
                    for k in slots]
            m = slots[int(np.argmax(sims))]
            if base is None:
                out[i, j] = kept[i, m]
            else:
                out[i, j] = base[i, j] + kept[i, m] - base[i, int(keep[i, m])]
    return out


def ref_cat(cur: torch.Tensor, prev: torch.Tensor, z: torch.Tensor | None, hw: tuple[int, int] | None,
            w_z: float, cluster: int, balance: float, mask: torch.Tensor | None = None,
            eps: float = 1e-6) -> np.ndarray:
    """CAT scores one token at a time (float64)."""
    c, p = cur.double().numpy(), prev.double().numpy()
    b, n, _ = c.shape
    valid = np.ones((b, n), dtype=bool) if mask is None else mask.numpy()
    out = np.full((b, n), -np.inf)
    for i in range(b):
        idx = [j for j in range(n) if valid[i, j]]
        change = {j: np.linalg.norm(c[i, j] - p[i, j]) / (np.linalg.norm(p[i, j]) + eps) for j in idx}
        mean = sum(change.values()) / len(idx)
        s = {j: (change[j] / mean if mean > 0 else 0.0) + (0.0 if z is None else w_z * float(z[i, j])) for j in idx}
        if hw is None:
            win = {j: j // (cluster * cluster) for j in idx}
        else:
            win = {j: (j // hw[1] // cluster, j % hw[1] // cluster) for j in idx}
        m = sum(s.values()) / len(idx)
        for j in idx:
            members = [k for k in idx if win[k] == win[j]]
            mk = sum(s[k] for k in members) / len(members)
            out[i, j] = s[j] * ((m / mk) ** balance if mk > 0 and balance > 0 else 1.0)
    return out


def _grid_tokens(seed: int, b: int, h: int, w: int, c: int = 3) -> torch.Tensor:
    return torch.randn(b, h * w, c, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------------------
# ToDo: downsample_grid / grid_indices / the method
# ----------------------------------------------------------------------------------------------

sides = st.integers(1, 9)


@settings(max_examples=40, deadline=None)
@given(h=sides, w=sides, h2=sides, w2=sides, seed=st.integers(0, 99), exact=st.booleans())
def test_nearest_downsampling_matches_reference_and_indices(h: int, w: int, h2: int, w2: int, seed: int,
                                                          exact: bool) -> None:
    h2, w2 = min(h2, h), min(w2, w)
    x = _grid_tokens(seed, 2, h, w)
    mode = "nearest-exact" if exact else "nearest"
    got = downsample_grid(x, (h, w), (h2, w2), mode)
    assert torch.equal(got, ref_nearest(x, (h, w), (h2, w2), exact))
    idx = grid_indices((h, w), (h2, w2), mode)
    assert torch.equal(got, x[:, idx])
    assert bool((idx[1:] > idx[:-1]).all()), "strictly increasing: the picks are in row-major order"


@pytest.mark.parametrize(("hw", "size"), [((4, 4), (2, 2)), ((6, 9), (3, 3)), ((8, 4), (2, 1)), ((5, 5), (5, 1))])
def test_area_and_bilinear_match_references(hw: tuple[int, int], size: tuple[int, int]) -> None:
    x = _grid_tokens(1, 2, *hw, c=4).double()
    assert torch.allclose(downsample_grid(x, hw, size, "area"), ref_area(x, hw, size), atol=1e-12)
    assert torch.allclose(downsample_grid(x, hw, size, "bilinear"), ref_bilinear(x, hw, size), atol=1e-12)


@pytest.mark.parametrize("mode", GRID_MODES)
def test_downsampling_identity_linearity_and_no_mutation(mode: str) -> None:
    x = _grid_tokens(2, 3, 6, 8, c=5)
    before = x.clone()
    same = downsample_grid(x, (6, 8), (6, 8), mode)
    assert torch.equal(same, x) and same.data_ptr() != x.data_ptr()
    # resampling commutes with a per-token affine map (the K/V projections, bias included)
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(5, 7, generator=g, dtype=torch.float64), torch.randn(7, generator=g,
                                                                                    dtype=torch.float64)
    xd = x.double()
    lhs = downsample_grid(xd @ weight + bias, (6, 8), (3, 4), mode)
    rhs = downsample_grid(xd, (6, 8), (3, 4), mode) @ weight + bias
    assert torch.allclose(lhs, rhs, atol=1e-10)
    assert downsample_grid(x, (6, 8), (3, 4), mode).shape == (3, 12, 5)
    assert torch.equal(x, before)


def test_downsample_grid_bad_input() -> None:
    x = torch.randn(1, 12, 2)
    with pytest.raises(UniprunerError, match="describes 16 tokens"):
        downsample_grid(x, (4, 4), (2, 2))
    with pytest.raises(UniprunerError, match="between"):
        downsample_grid(x, (3, 4), (4, 2))
    with pytest.raises(UniprunerError, match="mode must be one of"):
        downsample_grid(x, (3, 4), (1, 2), "lanczos")
    with pytest.raises(UniprunerError, match="pair of positive ints"):
        downsample_grid(x, (3, 4), (0, 2))
    with pytest.raises(UniprunerError, match="pair of positive ints"):
        downsample_grid(x, 12, (1, 2))  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match=r"\[B, N, D\]"):
        downsample_grid(torch.randn(12, 2), (3, 4), (1, 2))
    with pytest.raises(UniprunerError, match="'nearest' or 'nearest-exact'"):
        grid_indices((3, 4), (1, 2), "area")


@settings(max_examples=40, deadline=None)
@given(h=st.integers(1, 12), w=st.integers(1, 12), ratio=st.floats(0.01, 1.0))
def test_todo_grid_is_the_closest_count(h: int, w: int, ratio: float) -> None:
    m = ToDo(budget=ratio)
    target = max(1, Budget(ratio=ratio).count(h * w))
    want = ref_todo_grid((h, w), target)
    got = m.grid((h, w))
    assert abs(got[0] * got[1] - target) == abs(want[0] * want[1] - target)
    assert got == want


def test_todo_factor_keep_and_method_surface() -> None:
    assert ToDo(factor=2).grid((64, 64)) == (32, 32)
    assert ToDo(factor=2).grid((5, 7)) == (3, 4), "sides round up"
    assert ToDo(factor=3, budget=0.9).grid((6, 6)) == (2, 2), "factor overrides the budget"
    assert ToDo(budget=Budget(keep=12)).grid((8, 8)) == (3, 4)
    assert ToDo(budget=1.0).grid((8, 6)) == (8, 6)
    x = _grid_tokens(4, 2, 8, 6)
    for mode in GRID_MODES:
        m = unipruner.method("todo", ratio=0.25, mode=mode)
        kv, size = m.kv_tokens(x, (8, 6))
        assert size == m.grid((8, 6)) == (4, 3)
        assert torch.equal(kv, downsample_grid(x, (8, 6), size, mode))
        keep = m.select(x, hw=(8, 6))
        rule = mode if mode.startswith("nearest") else "nearest-exact"
        assert keep.shape == (2, 12) and torch.equal(keep[1], grid_indices((8, 6), size, rule))
        red = m.reduce(x, hw=(8, 6))
        assert torch.equal(red.tokens, kv) and torch.equal(red.indices, keep) and red.mask is None
        assert red.sizes.shape == (2, 12, 1) and bool((red.sizes == 1).all())
    full = ToDo(budget=1.0)
    assert torch.equal(full.kv_tokens(x, (8, 6))[0], x), "keep-all is the identity"


def test_todo_bad_input() -> None:
    with pytest.raises(UniprunerError, match="mode must be one of"):
        ToDo(mode="lanczos")
    with pytest.raises(UniprunerError, match="factor must be an int"):
        ToDo(factor=0)
    with pytest.raises(UniprunerError, match="factor must be an int"):
        ToDo(factor=2.0)  # type: ignore[arg-type]
    with pytest.raises(UniprunerError, match="reduction must be 'drop'"):
        ToDo(reduction="merge")
    with pytest.raises(UniprunerError, match="ratio or keep budget"):
        ToDo(budget=Budget(threshold=0.5))
    x = torch.randn(1, 16, 4)
    with pytest.raises(UniprunerError, match="needs the signal hw"):
        ToDo().select(x)
    with pytest.raises(UniprunerError, match="masks are not supported"):
        ToDo().select(x, hw=(4, 4), mask=torch.arange(16).lt(10).unsqueeze(0))
    with pytest.raises(UniprunerError, match="describes 12 tokens"):
        ToDo().kv_tokens(x, (3, 4))


# ----------------------------------------------------------------------------------------------
# AT-EDM: gwpr, copy_recover, DSAP, the method
# ----------------------------------------------------------------------------------------------


def _attn(seed: int, b: int, h: int, n: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, n, n, generator=g, dtype=torch.float64) * 2).softmax(-1)


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 999), heads=st.sampled_from(["mean", "max"]), damping=st.sampled_from([1.0, 0.85]),
       n=st.integers(1, 9), masked=st.booleans())
def test_gwpr_matches_reference(seed: int, heads: str, damping: float, n: int, masked: bool) -> None:
    attn = _attn(seed, 2, 3, n)
    mask = None
    if masked:
        mask = torch.rand(2, n, generator=torch.Generator().manual_seed(seed)) < 0.6
        mask[:, 0] = True
    got = gwpr(attn, damping=damping, max_iter=20, tol=1e-9, heads=heads, mask=mask)
    want = ref_gwpr(attn, damping, 20, 1e-9, heads, mask)
    assert np.allclose(got.numpy(), want, atol=1e-10, equal_nan=False)
    if heads == "mean":
        valid = got.isfinite()
        assert torch.allclose((got * valid).nan_to_num(0.0, neginf=0.0).sum(1), torch.ones(2, dtype=got.dtype))


def test_gwpr_one_head_is_pagerank_and_heads_differ_from_averaging() -> None:
    attn = _attn(5, 2, 1, 10)
    assert torch.equal(gwpr(attn, damping=0.85, max_iter=50), pagerank(attn, damping=0.85, max_iter=50))
    multi = _attn(6, 2, 4, 10)
    assert not torch.allclose(gwpr(multi), pagerank(multi, damping=1.0, max_iter=30))
    assert gwpr(multi[:, 0]).shape == (2, 10), "[B, N, N] is one head"
    before = multi.clone()
    gwpr(multi, heads="max")
    assert torch.equal(multi, before)


def test_gwpr_bad_input() -> None:
    with pytest.raises(UniprunerError, match="heads must be one of"):
        gwpr(_attn(0, 1, 2, 4), heads="median")
    with pytest.raises(UniprunerError, match="non-negative"):
        gwpr(torch.randn(1, 2, 4, 4))
    with pytest.raises(UniprunerError, match="weights must be a tensor"):
        gwpr(_attn(0, 1, 2, 4), weights=torch.ones(4))
    with pytest.raises(UniprunerError, match="damping"):
        gwpr(_attn(0, 1, 2, 4), damping=0.0)


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), n=st.integers(2, 12), k=st.integers(1, 12), residual=st.booleans())
def test_copy_recover_matches_reference(seed: int, n: int, k: int, residual: bool) -> None:
    k = min(k, n)
    g = torch.Generator().manual_seed(seed)
    feats = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    keep = torch.sort(torch.rand(2, n, generator=g).argsort(1)[:, :k], dim=1).values
    kept = torch.randn(2, k, 4, generator=g, dtype=torch.float64)
    base = torch.randn(2, n, 4, generator=g, dtype=torch.float64) if residual else None
    snapshot = [t.clone() for t in (feats, keep, kept)]
    got = copy_recover(kept, keep, feats, base=base)
    assert torch.allclose(got, ref_copy_recover(kept, keep, feats, base), atol=1e-12)
    assert torch.equal(got.gather(1, keep.unsqueeze(-1).expand(-1, -1, 4)), kept), "kept positions are exact"
    assert all(torch.equal(a, b) for a, b in zip(snapshot, (feats, keep, kept), strict=True))


def test_copy_recover_padding_keep_all_and_errors() -> None:
    g = torch.Generator().manual_seed(7)
    feats = torch.randn(2, 6, 3, generator=g)
    keep = torch.tensor([[0, 2, 5], [1, 4, -1]])
    kept = torch.randn(2, 3, 2, generator=g)
    got = copy_recover(kept, keep, feats)
    assert torch.allclose(got, ref_copy_recover(kept, keep, feats))
    all_idx = torch.arange(6).expand(2, 6)
    y = torch.randn(2, 6, 2, generator=g)
    assert torch.equal(copy_recover(y, all_idx, feats), y)
    assert torch.equal(copy_recover(y, all_idx, feats, base=torch.randn(2, 6, 2, generator=g)), y)
    with pytest.raises(UniprunerError, match="at least one kept token"):
        copy_recover(kept[:, :1], torch.tensor([[0], [-1]]), feats)
    with pytest.raises(UniprunerError, match="must be \\[B, K, C\\]"):
        copy_recover(kept[:, :2], keep, feats)
    with pytest.raises(UniprunerError, match="base must be the block inputs"):
        copy_recover(kept, keep, feats, base=torch.randn(2, 6, 3))
    with pytest.raises(UniprunerError, match="indices must lie"):
        copy_recover(kept, torch.tensor([[0, 2, 6], [1, 4, 5]]), feats)


def test_atedm_select_recover_and_dsap() -> None:
    g = torch.Generator().manual_seed(8)
    x = torch.randn(2, 16, 4, generator=g)
    attn = _attn(9, 2, 2, 16).float()
    m = unipruner.method("atedm", ratio=0.25)
    assert isinstance(m, ATEDM)
    keep = m.select(x, attn=attn)
    assert torch.equal(keep, topk(gwpr(attn), Budget(ratio=0.25)))
    assert keep.shape == (2, 4)
    # DSAP: early steps keep (1 + ratio) / 2 by default, dsap_ratio when given, the budget after
    assert m.ratio_at(0.0) == m.ratio_at(0.29) == 0.625 and m.ratio_at(0.3) == m.ratio_at(1.0) == 0.25
    assert m.select(x, attn=attn, progress=0.1).shape == (2, 10)
    assert m.select(x, attn=attn, progress=0.5).shape == (2, 4)
    assert m.reduce(x, attn=attn, progress=0.0).tokens.shape == (2, 10, 4)
    assert ATEDM(budget=0.25, dsap_ratio=1.0).ratio_at(0.0) == 1.0
    assert ATEDM(budget=0.25, dsap_ratio=0.1).ratio_at(0.0) == 0.25, "DSAP never prunes more"
    assert ATEDM(budget=0.25, dsap_early=0.0).ratio_at(0.0) == 0.25
    kept = m.reduce(x, attn=attn).tokens * 2.0
    assert torch.equal(m.recover(kept, keep, x), copy_recover(kept, keep, x))
    r = ATEDM(budget=0.25, recovery="residual")
    assert torch.equal(r.recover(kept, keep, x, inputs=x), copy_recover(kept, keep, x, base=x))


def test_atedm_bad_input() -> None:
    with pytest.raises(UniprunerError, match="dsap_early must be a number"):
        ATEDM(dsap_early=1.5)
    with pytest.raises(UniprunerError, match="dsap_ratio must be a number"):
        ATEDM(dsap_ratio=0.0)
    with pytest.raises(UniprunerError, match="heads must be one of"):
        ATEDM(heads="sum")
    with pytest.raises(UniprunerError, match="recovery must be one of"):
        ATEDM(recovery="interpolate")
    with pytest.raises(UniprunerError, match="DSAP schedules a ratio budget"):
        ATEDM(budget=Budget(keep=4)).ratio_at(0.1)
    with pytest.raises(UniprunerError, match="progress must be a number"):
        ATEDM().ratio_at(1.5)
    with pytest.raises(UniprunerError, match="needs inputs="):
        ATEDM(recovery="residual").recover(torch.randn(1, 2, 3), torch.tensor([[0, 1]]), torch.randn(1, 4, 3))
    with pytest.raises(UniprunerError, match="needs the signal attn"):
        ATEDM().select(torch.randn(1, 4, 3))


# ----------------------------------------------------------------------------------------------
# CAT: cat_scores, cluster_ids, the method
# ----------------------------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 999), h=st.integers(1, 6), w=st.integers(1, 6), cluster=st.integers(1, 4),
       balance=st.sampled_from([0.0, 0.5, 1.0]), grid=st.booleans(), stale=st.booleans(), masked=st.booleans())
def test_cat_scores_match_reference(seed: int, h: int, w: int, cluster: int, balance: float, grid: bool,
                                    stale: bool, masked: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    n = h * w
    prev = torch.randn(2, n, 3, generator=g, dtype=torch.float64)
    cur = prev + torch.randn(2, n, 3, generator=g, dtype=torch.float64) * torch.rand(2, n, 1, generator=g,
                                                                                     dtype=torch.float64)
    z = torch.randint(0, 5, (2, n), generator=g) if stale else None
    mask = None
    if masked:
        mask = torch.rand(2, n, generator=g) < 0.7
        mask[:, 0] = True
    hw = (h, w) if grid else None
    got = cat_scores(cur, prev, z, hw=hw, staleness_weight=0.3, cluster=cluster, balance=balance, mask=mask)
    want = ref_cat(cur, prev, z, hw, 0.3, cluster, balance, mask)
    assert np.allclose(got.numpy(), want, atol=1e-10, rtol=1e-9)


def test_cluster_ids_reference() -> None:
    for (h, w), c in (((5, 7), 2), ((4, 4), 4), ((3, 8), 3), ((1, 1), 1)):
        want = [(j // w // c) * (-(-w // c)) + (j % w) // c for j in range(h * w)]
        assert cluster_ids(h * w, (h, w), c).tolist() == want
    assert cluster_ids(10, None, 2).tolist() == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2]


def test_cat_properties() -> None:
    g = torch.Generator().manual_seed(11)
    prev = torch.randn(2, 16, 4, generator=g)
    cur = prev + torch.randn(2, 16, 4, generator=g) * torch.rand(2, 16, 1, generator=g)
    before = (cur.clone(), prev.clone())
    plain = cat_scores(cur, prev, balance=0.0)
    change = (cur - prev).norm(dim=-1) / (prev.norm(dim=-1) + 1e-6)
    assert torch.equal(plain.argsort(1), change.argsort(1)), "without balance: ranked by relative change"
    assert torch.allclose(plain.mean(1), torch.ones(2)), "normalised to the row's average change"
    assert torch.equal(cat_scores(prev, prev, balance=0.0), torch.zeros(2, 16)), "nothing changed: all zero"
    one = cat_scores(cur, prev, hw=(4, 4), cluster=1, balance=1.0)
    assert torch.allclose(one, torch.where(plain > 0, torch.ones_like(plain), plain)), "own-window balance"
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 10:] = False
    s = cat_scores(cur, prev, mask=mask)
    assert bool(s[1, 10:].isneginf().all()) and bool(s[mask].isfinite().all())
    assert torch.equal(cur, before[0]) and torch.equal(prev, before[1])
    # staleness: a long-stale unchanged token is refreshed before a mildly changed one
    p = torch.ones(1, 4, 2)
    c = p.clone()
    c[0, 1] += 0.1
    z = torch.tensor([[0.0, 0.0, 0.0, 50.0]])  # 0.1 * 50 > 4: the changed token's normalised change
    assert CAT(budget=Budget(keep=1), cluster=1).select(c, previous=p, staleness=z).tolist() == [[3]]
    assert CAT(budget=Budget(keep=1), cluster=1).select(c, previous=p).tolist() == [[1]]


def test_cat_method_and_bad_input() -> None:
    g = torch.Generator().manual_seed(12)
    prev = torch.randn(2, 16, 4, generator=g)
    cur = prev + torch.randn(2, 16, 4, generator=g)
    z = torch.randint(0, 3, (2, 16), generator=g)
    m = unipruner.method("cat", ratio=0.5, cluster=2, balance=0.25, staleness_weight=0.2)
    assert isinstance(m, CAT)
    want = cat_scores(cur, prev, z, hw=(4, 4), staleness_weight=0.2, cluster=2, balance=0.25)
    assert torch.equal(m.scores(cur, prev, z, hw=(4, 4)), want)
    assert torch.equal(m.select(cur, previous=prev, staleness=z, hw=(4, 4)), topk(want, Budget(ratio=0.5)))
    with pytest.raises(UniprunerError, match="needs the signal previous"):
        m.select(cur)
    with pytest.raises(UniprunerError, match="shape of current"):
        cat_scores(cur, prev[:, :8])
    with pytest.raises(UniprunerError, match="staleness must be a tensor"):
        cat_scores(cur, prev, torch.zeros(16))
    with pytest.raises(UniprunerError, match="non-negative step counts"):
        cat_scores(cur, prev, -torch.ones(2, 16))
    with pytest.raises(UniprunerError, match="describes 12 tokens"):
        cat_scores(cur, prev, hw=(3, 4))
    with pytest.raises(UniprunerError, match="contains NaN"):
        cat_scores(cur * float("nan"), prev)
    with pytest.raises(UniprunerError, match="balance must"):
        CAT(balance=2.0)
    with pytest.raises(UniprunerError, match="cluster must be an int"):
        CAT(cluster=0)
    with pytest.raises(UniprunerError, match="staleness_weight must be"):
        CAT(staleness_weight=-1.0)


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------


def test_diffusion_registry() -> None:
    names = {m.name for m in unipruner.methods(domain="diffusion")}
    assert names >= {"tomesd", "tome", "todo", "atedm", "cat", "random"}
    infos = {m.name: m for m in unipruner.methods()}
    assert infos["todo"].requires == ("hw",) and infos["atedm"].requires == ("attn",)
    assert infos["cat"].requires == ("previous", "staleness")
    for name in ("todo", "atedm", "cat"):
        assert infos[name].domains == ("diffusion",) and infos[name].paper and infos[name].summary
