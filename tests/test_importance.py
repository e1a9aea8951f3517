"""Importance scorers against plain-loop references (unipruner.scorers.importance)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from unipruner.errors import UniprunerError
from unipruner.scorers.importance import (
    accumulated_attention,
    cls_attention,
    group_heads,
    hidden_norm,
    idf,
    idf_table,
    key_norm,
    positional,
    query_attention,
    query_similarity,
    random_scores,
    snapkv,
    stopword_mask,
    token_transition,
    value_aware,
    window_attention,
)
from unipruner.select import topk

NEG = -math.inf

# ----------------------------------------------------------------------------- data helpers


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def rand_attn(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """Random attention probabilities (rows sum to 1), float64."""
    return torch.softmax(torch.randn(*shape, generator=gen(seed), dtype=torch.float64) * 2, dim=-1)


def ragged_mask(b: int, n: int, seed: int, *, last_valid: bool = False) -> torch.Tensor:
    """A [B, N] mask mixing left padding, right padding and holes; >= 2 valid per row.

    With ``last_valid`` the last position of every row is valid (no right padding).
    """
    rng = np.random.default_rng(seed)
    m = np.ones((b, n), dtype=bool)
    for r in range(b):
        kind = rng.integers(0, 4) if not last_valid else rng.choice([0, 2, 3])
        pad = int(rng.integers(0, max(1, n - 2)))
        if kind == 0:  # left padding
            m[r, :pad] = False
        elif kind == 1:  # right padding
            m[r, n - pad:] = False
        elif kind == 2:  # holes
            holes = rng.random(n) < 0.3
            holes[-1] = False
            holes[0] = False
            m[r, holes] = False
        # kind 3: full row
    return torch.from_numpy(m)


def to_np(x: torch.Tensor) -> np.ndarray:
    return x.detach().double().numpy()


def assert_scores(got: torch.Tensor, want: np.ndarray) -> None:
    want_t = torch.from_numpy(np.asarray(want, dtype=np.float64))
    assert got.shape == want_t.shape, (got.shape, want_t.shape)
    g = got.double()
    assert torch.equal(torch.isposinf(g), torch.isposinf(want_t)), (g, want_t)
    assert torch.equal(torch.isneginf(g), torch.isneginf(want_t)), (g, want_t)
    fin = torch.isfinite(want_t)
    assert torch.allclose(g[fin], want_t[fin], atol=1e-6, rtol=1e-5), (g, want_t)


# ----------------------------------------------------------------------------- cls_attention


def ref_cls(a: np.ndarray, c: int, mask: np.ndarray | None) -> np.ndarray:
    b, h, n, _ = a.shape
    out = np.zeros((b, n))
    for bi in range(b):
        for j in range(n):
            if mask is not None and not mask[bi, j]:
                out[bi, j] = NEG
                continue
            out[bi, j] = sum(a[bi, hi, c, j] for hi in range(h)) / h
    return out


@pytest.mark.parametrize("b,h,n", [(1, 1, 5), (3, 4, 9), (2, 2, 7)])
@pytest.mark.parametrize("cls_index", [0, 2, -1])
@pytest.mark.parametrize("masked", [False, True])
def test_cls_attention_matches_reference(b, h, n, cls_index, masked):
    a = rand_attn((b, h, n, n), seed=b * 100 + h * 10 + n)
    mask = ragged_mask(b, n, seed=n) if masked else None
    got = cls_attention(a, cls_index=cls_index, mask=mask)
    assert_scores(got, ref_cls(to_np(a), cls_index, None if mask is None else mask.numpy()))


def test_cls_attention_three_dim_input():
    a = rand_attn((2, 6, 6), seed=1)
    assert_scores(cls_attention(a), ref_cls(to_np(a.unsqueeze(1)), 0, None))


# ----------------------------------------------------------------------------- query_attention


def ref_query(a: np.ndarray, queries, mask: np.ndarray | None) -> np.ndarray | None:
    b, h, q, n = a.shape
    out = np.zeros((b, n))
    for bi in range(b):
        valid_rows = [i for i in range(q) if mask is None or mask[bi, n - q + i]]
        if queries is None:
            rows = valid_rows[-1:]
        elif isinstance(queries, int):
            rows = valid_rows[-queries:]
        elif queries.dtype == torch.bool:
            qm = queries if queries.ndim == 2 else queries.unsqueeze(0).expand(b, -1)
            rows = [i for i in valid_rows if bool(qm[bi, i])]
        else:
            idx = queries if queries.ndim == 1 else queries[bi]
            chosen = {int(i) % q for i in idx}
            rows = [i for i in valid_rows if i in chosen]
        if not rows:
            return None  # the scorer must refuse: no valid query row selected
        for j in range(n):
            if mask is not None and not mask[bi, j]:
                out[bi, j] = NEG
                continue
            total = 0.0
            for hi in range(h):
                for i in rows:
                    total += a[bi, hi, i, j]
            out[bi, j] = total / (h * len(rows))
    return out


def _queries_variants(b: int, q: int, seed: int):
    rng = np.random.default_rng(seed)
    yield None
    yield 1
    yield min(3, q)
    yield torch.tensor([0, q - 1])
    yield torch.tensor([-1, 0])
    yield torch.from_numpy(rng.integers(0, q, size=(b, 2)))
    bm = torch.from_numpy(rng.random((b, q)) < 0.5)
    bm[:, -1] = True
    yield bm
    yield torch.ones(q, dtype=torch.bool)


@pytest.mark.parametrize("b,h,q,n", [(1, 1, 1, 5), (2, 3, 4, 8), (4, 2, 7, 7), (3, 1, 3, 10)])
@pytest.mark.parametrize("masked", [False, True])
def test_query_attention_matches_reference(b, h, q, n, masked):
    a = rand_attn((b, h, q, n), seed=b + 7 * q + 13 * n)
    mask = ragged_mask(b, n, seed=q * n, last_valid=True) if masked else None
    np_mask = None if mask is None else mask.numpy()
    n_checked = 0
    for queries in _queries_variants(b, q, seed=n):
        want = ref_query(to_np(a), queries, np_mask)
        if want is None:
            with pytest.raises(ValueError, match="no \\(valid\\) query row"):
                query_attention(a, queries=queries, mask=mask)
            continue
        assert_scores(query_attention(a, queries=queries, mask=mask), want)
        n_checked += 1
    assert n_checked >= 5


def test_query_attention_right_padding_uses_last_real_row():
    # full map (Q = N) with right padding: "the last row" is the last valid token's row
    b, h, n = 3, 2, 8
    a = rand_attn((b, h, n, n), seed=3)
    mask = torch.ones(b, n, dtype=torch.bool)
    mask[0, 5:] = False
    mask[2, 7:] = False
    got = query_attention(a, mask=mask)
    want = ref_query(to_np(a), None, mask.numpy())
    assert want is not None
    assert_scores(got, want)
    assert torch.allclose(got[0, :5], a[0, :, 4, :5].mean(0))


# ----------------------------------------------------------------------------- accumulated


def ref_accumulated(a: np.ndarray, normalize: bool, mask: np.ndarray | None) -> np.ndarray:
    b, h, q, n = a.shape
    out = np.zeros((b, n))
    for bi in range(b):
        rows = [i for i in range(q) if mask is None or mask[bi, n - q + i]]
        for j in range(n):
            if mask is not None and not mask[bi, j]:
                out[bi, j] = NEG
                continue
            total = sum(a[bi, hi, i, j] for hi in range(h) for i in rows) / h
            if normalize:
                count = 0
                for i in rows:
                    if n - q + i >= j:
                        count += 1
                total = total / max(count, 1)
            out[bi, j] = total
    return out


def causal_attn(b: int, h: int, q: int, n: int, seed: int) -> torch.Tensor:
    logits = torch.randn(b, h, q, n, generator=gen(seed), dtype=torch.float64)
    pos = torch.arange(n - q, n).unsqueeze(1)
    logits = logits.masked_fill(torch.arange(n).unsqueeze(0) > pos, -math.inf)
    return torch.softmax(logits, dim=-1)


@pytest.mark.parametrize("b,h,q,n", [(1, 1, 6, 6), (2, 4, 9, 9), (3, 2, 4, 10), (5, 1, 1, 4)])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("masked", [False, True])
def test_accumulated_attention_matches_reference(b, h, q, n, normalize, masked):
    a = causal_attn(b, h, q, n, seed=b * q + n)
    mask = ragged_mask(b, n, seed=b + n) if masked else None
    got = accumulated_attention(a, normalize=normalize, mask=mask)
    assert_scores(got, ref_accumulated(to_np(a), normalize, None if mask is None else mask.numpy()))


def test_accumulated_normalize_full_map_is_n_minus_j():
    n = 7
    a = causal_attn(2, 3, n, n, seed=4)
    plain = accumulated_attention(a)
    norm = accumulated_attention(a, normalize=True)
    assert torch.allclose(norm, plain / (n - torch.arange(n)).double())


# ----------------------------------------------------------------------------- snapkv


def ref_snapkv(a: np.ndarray, window: int, kernel: int, pool: str, reduce: str,
               mask: np.ndarray | None) -> np.ndarray:
    lead = a.shape[:-2]
    q, n = a.shape[-2:]
    out = np.zeros((*lead, n))
    for idx in np.ndindex(*lead) if lead else [()]:
        mat = a[idx]
        key_ok = [True] * n if mask is None else [bool(mask[idx[0], j]) for j in range(n)]
        w = min(q, window)
        votes = []
        for j in range(n):
            s = 0.0
            for i in range(q - w, q):
                s += mat[i, j]
            if reduce == "mean":
                s /= w
            votes.append(s if key_ok[j] else 0.0)
        m = n - w
        r = kernel // 2
        for j in range(n):
            if not key_ok[j]:
                out[(*idx, j)] = NEG
            elif j >= m:
                out[(*idx, j)] = math.inf
            else:
                neigh = [votes[t] for t in range(j - r, j + r + 1) if 0 <= t < m]
                out[(*idx, j)] = sum(neigh) / kernel if pool == "avg" else max(neigh)
    return out


@pytest.mark.parametrize("shape", [(6, 12), (2, 5, 11), (3, 2, 4, 9), (1, 3, 8, 8),
                                   (2, 2, 2, 3, 10)])
@pytest.mark.parametrize("window,kernel", [(32, 5), (3, 3), (2, 1), (4, 7)])
@pytest.mark.parametrize("pool", ["avg", "max"])
@pytest.mark.parametrize("reduce", ["sum", "mean"])
def test_snapkv_matches_reference(shape, window, kernel, pool, reduce):
    a = rand_attn(shape, seed=sum(shape) + window + kernel)
    got = snapkv(a, window=window, kernel=kernel, pool=pool, reduce=reduce)
    assert_scores(got, ref_snapkv(to_np(a), window, kernel, pool, reduce, None))


@pytest.mark.parametrize("shape", [(3, 4, 12), (2, 2, 3, 9), (4, 1, 5, 8)])
@pytest.mark.parametrize("pool", ["avg", "max"])
def test_snapkv_with_mask_matches_reference(shape, pool):
    a = rand_attn(shape, seed=sum(shape))
    mask = ragged_mask(shape[0], shape[-1], seed=shape[-1], last_valid=True)
    got = snapkv(a, window=3, kernel=3, pool=pool, mask=mask)
    assert_scores(got, ref_snapkv(to_np(a), 3, 3, pool, "sum", mask.numpy()))
    if len(shape) == 4:  # a full [..., N] mask means the same thing
        full = mask.reshape(shape[0], 1, shape[-1]).expand(shape[0], shape[1], shape[-1])
        assert torch.equal(snapkv(a, window=3, kernel=3, pool=pool, mask=full), got)


@settings(max_examples=40, deadline=None)
@given(
    b=st.integers(1, 4),
    q=st.integers(1, 6),
    extra=st.integers(0, 12),
    window=st.integers(1, 8),
    kernel=st.sampled_from([1, 3, 5, 7]),
    pool=st.sampled_from(["avg", "max"]),
    frac=st.floats(0.0, 1.0),
    seed=st.integers(0, 10_000),
)
def test_topk_of_snapkv_keeps_the_window(b, q, extra, window, kernel, pool, frac, seed):
    n = q + extra
    a = rand_attn((b, q, n), seed=seed)
    scores = snapkv(a, window=window, kernel=kernel, pool=pool)
    w = min(q, window)
    k = w + round(frac * (n - w))
    idx = topk(scores, k)
    assert idx.shape == (b, k)
    for row in idx.tolist():
        assert set(range(n - w, n)) <= set(row)
        assert row == sorted(row)


def test_snapkv_per_kv_head_with_group_heads():
    b, h, hkv, q, n = 2, 6, 2, 3, 10
    a = rand_attn((b, h, q, n), seed=5)
    got = snapkv(group_heads(a, hkv), window=q, kernel=3)
    assert got.shape == (b, hkv, n)
    grouped = to_np(a).reshape(b, hkv, h // hkv, q, n).mean(axis=2)
    assert_scores(got, ref_snapkv(grouped, q, 3, "avg", "sum", None))


# ----------------------------------------------------------------------------- group_heads


@pytest.mark.parametrize("h,hkv", [(1, 1), (4, 2), (6, 3), (8, 1), (4, 4)])
def test_group_heads_matches_reference(h, hkv):
    b, q, n = 2, 3, 5
    a = rand_attn((b, h, q, n), seed=h)
    got = group_heads(a, hkv)
    an = to_np(a)
    want = np.zeros((b, hkv, q, n))
    r = h // hkv
    for bi in range(b):
        for hq in range(h):
            want[bi, hq // r] += an[bi, hq] / r
    assert torch.allclose(got, torch.from_numpy(want))


# ----------------------------------------------------------------------------- window_attention


def naive_eager_attention(q: np.ndarray, k: np.ndarray, scale: float, causal: bool,
                          key_mask: np.ndarray | None) -> np.ndarray:
    """Full attention of all N queries [B, H, N, D] over keys [B, Hkv, N, D], plain loops."""
    b, h, n, _ = q.shape
    hkv = k.shape[1]
    rep = h // hkv
    out = np.zeros((b, h, n, n))
    for bi in range(b):
        for hi in range(h):
            kh = hi // rep
            for i in range(n):
                logits = {}
                for j in range(n):
                    if causal and j > i:
                        continue
                    if key_mask is not None and not key_mask[bi, j]:
                        continue
                    logits[j] = float(np.dot(q[bi, hi, i], k[bi, kh, j])) * scale
                if not logits:
                    continue
                mx = max(logits.values())
                z = sum(math.exp(v - mx) for v in logits.values())
                for j, v in logits.items():
                    out[bi, hi, i, j] = math.exp(v - mx) / z
    return out


@pytest.mark.parametrize("b,h,hkv,n,nq,d", [(1, 1, 1, 6, 6, 4), (2, 4, 2, 9, 3, 8),
                                            (3, 6, 1, 7, 1, 4), (2, 2, 2, 5, 4, 16)])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [False, True])
def test_window_attention_equals_eager_rows(b, h, hkv, n, nq, d, causal, masked):
    g = gen(b * h + n)
    q_full = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, hkv, n, d, generator=g, dtype=torch.float64)
    mask = ragged_mask(b, n, seed=n + d) if masked else None
    scale = 1.0 / math.sqrt(d)
    want = naive_eager_attention(to_np(q_full), to_np(k), scale, causal,
                                 None if mask is None else mask.numpy())
    got = window_attention(q_full[:, :, n - nq:], k, causal=causal, key_mask=mask)
    assert got.shape == (b, h, nq, n)
    assert torch.allclose(got, torch.from_numpy(want[:, :, n - nq:]), atol=1e-10)


def test_window_attention_scale_float32_and_three_dim():
    g = gen(11)
    q = torch.randn(2, 3, 4, generator=g)  # [B, Q, D] without heads
    k = torch.randn(2, 5, 4, generator=g)
    got = window_attention(q, k, scale=0.3)
    want = naive_eager_attention(to_np(torch.cat([k[:, :2] * 0, q], 1).unsqueeze(1)),
                                 to_np(k.unsqueeze(1)), 0.3, True, None)
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), torch.from_numpy(want[:, 0, 2:]), atol=1e-5)


def test_window_attention_feeds_query_attention_like_eager():
    b, h, n, d = 2, 4, 8, 8
    g = gen(2)
    q = torch.randn(b, h, n, d, generator=g, dtype=torch.float64)
    k = torch.randn(b, 2, n, d, generator=g, dtype=torch.float64)
    full = torch.from_numpy(naive_eager_attention(to_np(q), to_np(k), d ** -0.5, True, None))
    rows = window_attention(q[:, :, -3:], k)
    assert torch.allclose(query_attention(rows, queries=3), query_attention(full, queries=3))
    assert torch.allclose(accumulated_attention(rows), accumulated_attention(full[:, :, -3:]))


# ----------------------------------------------------------------------------- value_aware


@pytest.mark.parametrize("lead", [(1,), (3,), (2, 3)])
@pytest.mark.parametrize("p", [1, 2])
def test_value_aware_matches_reference(lead, p):
    n, d = 6, 5
    g = gen(len(lead) + p)
    s = torch.rand(*lead, n, generator=g, dtype=torch.float64)
    s[..., 0] = -math.inf
    s[..., -1] = math.inf
    v = torch.randn(*lead, n, d, generator=g, dtype=torch.float64)
    v[..., -1, :] = 0.0  # inf * 0 must stay inf
    got = value_aware(s, v, p=p)
    sn, vn = to_np(s), to_np(v)
    want = np.zeros(sn.shape)
    for idx in np.ndindex(*sn.shape):
        if math.isinf(sn[idx]):
            want[idx] = sn[idx]
        else:
            want[idx] = sn[idx] * sum(abs(x) ** p for x in vn[idx]) ** (1.0 / p)
    assert_scores(got, want)


# ----------------------------------------------------------------------------- norms


@pytest.mark.parametrize("shape", [(1, 4, 3), (3, 7, 5), (2, 2, 6, 4)])
@pytest.mark.parametrize("masked", [False, True])
def test_key_norm_matches_reference(shape, masked):
    k = torch.randn(*shape, generator=gen(sum(shape)), dtype=torch.float64)
    mask = ragged_mask(shape[0], shape[-2], seed=3) if masked else None
    got = key_norm(k, mask=mask)
    kn = to_np(k)
    want = np.zeros(shape[:-1])
    for idx in np.ndindex(*shape[:-1]):
        if mask is not None and not bool(mask[idx[0], idx[-1]]):
            want[idx] = NEG
        else:
            want[idx] = -math.sqrt(sum(x * x for x in kn[idx]))
    assert_scores(got, want)


@pytest.mark.parametrize("b,n,d", [(1, 3, 2), (4, 9, 6)])
@pytest.mark.parametrize("masked", [False, True])
def test_hidden_norm_matches_reference(b, n, d, masked):
    x = torch.randn(b, n, d, generator=gen(n), dtype=torch.float64)
    mask = ragged_mask(b, n, seed=d) if masked else None
    xn = to_np(x)
    want = np.array([[math.sqrt(sum(v * v for v in xn[i, j])) for j in range(n)] for i in range(b)])
    if mask is not None:
        want[~mask.numpy()] = NEG
    assert_scores(hidden_norm(x, mask=mask), want)


@pytest.mark.parametrize("mode", ["magnitude", "direction", "both"])
@pytest.mark.parametrize("b,n,d", [(1, 4, 3), (3, 8, 5)])
@pytest.mark.parametrize("masked", [False, True])
def test_token_transition_matches_reference(mode, b, n, d, masked):
    g = gen(b + n + d)
    h0 = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    h1 = h0 + 0.5 * torch.randn(b, n, d, generator=g, dtype=torch.float64)
    mask = ragged_mask(b, n, seed=n) if masked else None
    a, c = to_np(h0), to_np(h1)
    want = np.zeros((b, n))
    for i in range(b):
        for j in range(n):
            diff = math.sqrt(sum((c[i, j, t] - a[i, j, t]) ** 2 for t in range(d)))
            na = math.sqrt(sum(x * x for x in a[i, j]))
            nc = math.sqrt(sum(x * x for x in c[i, j]))
            mag = diff / na
            cos = sum(a[i, j, t] * c[i, j, t] for t in range(d)) / (na * nc)
            want[i, j] = {"magnitude": mag, "direction": 1 - cos, "both": mag * (1 - cos)}[mode]
            if mask is not None and not mask[i, j]:
                want[i, j] = NEG
    assert_scores(token_transition(h0, h1, mode=mode, mask=mask), want)


# ----------------------------------------------------------------------------- positional


def ref_positional(b: int, n: int, n_sink: int, mask: np.ndarray | None) -> np.ndarray:
    out = np.zeros((b, n))
    for i in range(b):
        rank = 0
        for j in range(n):
            if mask is not None and not mask[i, j]:
                out[i, j] = NEG
                continue
            out[i, j] = math.inf if rank < n_sink else rank
            rank += 1
    return out


@pytest.mark.parametrize("b,n", [(1, 5), (3, 12), (4, 7)])
@pytest.mark.parametrize("n_sink", [0, 1, 4])
@pytest.mark.parametrize("masked", [False, True])
def test_positional_matches_reference(b, n, n_sink, masked):
    mask = ragged_mask(b, n, seed=b * n) if masked else None
    got = positional(b, n, n_sink=n_sink, mask=mask)
    assert got.shape == (b, n)
    assert_scores(got, ref_positional(b, n, n_sink, None if mask is None else mask.numpy()))


@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 4), n=st.integers(2, 16), n_sink=st.integers(0, 5),
       keep=st.integers(0, 16), seed=st.integers(0, 1000))
def test_topk_positional_keeps_sinks_and_recent(b, n, n_sink, keep, seed):
    keep = min(keep, n)
    mask = ragged_mask(b, n, seed=seed)
    idx = topk(positional(b, n, n_sink=n_sink, mask=mask), keep, mask=mask)
    for i in range(b):
        valid = [j for j in range(n) if mask[i, j]]
        k = min(keep, len(valid))
        sinks = valid[: min(n_sink, k)]
        recent_needed = k - len(sinks)
        rest = valid[len(sinks):]
        recent = rest[len(rest) - recent_needed:] if recent_needed else []
        row = [j for j in idx[i].tolist() if j >= 0]
        assert row == sinks + recent


# ----------------------------------------------------------------------------- idf / stopwords


def test_idf_table_and_idf_match_reference():
    rng = np.random.default_rng(0)
    v = 20
    docs = [list(rng.integers(0, v, size=int(rng.integers(0, 12)))) for _ in range(15)]
    docs_mixed = [torch.tensor(d, dtype=torch.long) if i % 2 else [int(x) for x in d]
                  for i, d in enumerate(docs)]
    df, n_docs = idf_table(docs_mixed, v)
    assert n_docs == 15 and df.dtype == torch.long and df.shape == (v,)
    want_df = [sum(1 for d in docs if t in {int(x) for x in d}) for t in range(v)]
    assert df.tolist() == want_df

    b, n = 3, 9
    ids = torch.from_numpy(rng.integers(0, v, size=(b, n)))
    mask = ragged_mask(b, n, seed=1)
    ids_padded = ids.masked_fill(~mask, -1)  # padding ids are ignored under the mask
    for m, token_ids in ((None, ids), (mask, ids_padded)):
        got = idf(token_ids, df, n_docs, mask=m)
        want = np.zeros((b, n))
        for i in range(b):
            for j in range(n):
                if m is not None and not m[i, j]:
                    want[i, j] = NEG
                    continue
                f = want_df[int(ids[i, j])]
                want[i, j] = math.log((n_docs - f + 0.5) / (f + 0.5) + 1)
        assert_scores(got, want)
        assert bool((got[torch.isfinite(got)] >= 0).all())


def test_stopword_mask_matches_reference():
    ids = torch.tensor([[1, 5, 9, 2], [7, 7, 0, 3]])
    stop = [5, 7, 3]
    got = stopword_mask(ids, stop)
    want = [[x in stop for x in row] for row in ids.tolist()]
    assert got.dtype == torch.bool and got.tolist() == want
    assert torch.equal(stopword_mask(ids, torch.tensor(stop)), got)


# ----------------------------------------------------------------------------- query_similarity


def _cos(u: np.ndarray, w: np.ndarray) -> float:
    return float(np.dot(u, w) / (np.linalg.norm(u) * np.linalg.norm(w)))


@pytest.mark.parametrize("b,n,m,d", [(1, 4, 0, 3), (3, 7, 0, 5), (2, 6, 3, 4), (4, 5, 1, 8)])
@pytest.mark.parametrize("masked", [False, True])
def test_query_similarity_matches_reference(b, n, m, d, masked):
    g = gen(b + n + m + d)
    x = torch.randn(b, n, d, generator=g, dtype=torch.float64)
    q = torch.randn(b, d, generator=g, dtype=torch.float64) if m == 0 else torch.randn(
        b, m, d, generator=g, dtype=torch.float64)
    mask = ragged_mask(b, n, seed=m) if masked else None
    qmask = None
    if m > 1:
        qmask = torch.ones(b, m, dtype=torch.bool)
        qmask[0, -1] = False
    got = query_similarity(x, q, mask=mask, query_mask=qmask)
    xn, qn = to_np(x), to_np(q)
    want = np.zeros((b, n))
    for i in range(b):
        for j in range(n):
            if mask is not None and not mask[i, j]:
                want[i, j] = NEG
            elif m == 0:
                want[i, j] = _cos(xn[i, j], qn[i])
            else:
                want[i, j] = max(_cos(xn[i, j], qn[i, t]) for t in range(m)
                                 if qmask is None or qmask[i, t])
    assert_scores(got, want)


# ----------------------------------------------------------------------------- random


def test_random_scores_seeded_and_masked():
    a = random_scores(3, 5, generator=gen(0))
    b = random_scores(3, 5, generator=gen(0))
    c = random_scores(3, 5, generator=gen(1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (3, 5) and bool(((a >= 0) & (a < 1)).all())
    mask = ragged_mask(3, 5, seed=2)
    got = random_scores(3, 5, generator=gen(0), mask=mask)
    assert torch.equal(got[mask], a[mask]) and bool(torch.isneginf(got[~mask]).all())


# ------------------------------------------------------------------------ batched == per-sample


@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 4), h=st.integers(1, 3), q=st.integers(1, 6), extra=st.integers(0, 6),
       seed=st.integers(0, 10_000))
def test_batched_equals_per_sample(b, h, q, extra, seed):
    n = q + extra
    a = causal_attn(b, h, q, n, seed=seed)
    mask = ragged_mask(b, n, seed=seed, last_valid=True)
    outs = {
        "query": query_attention(a, queries=min(2, q), mask=mask),
        "acc": accumulated_attention(a, normalize=True, mask=mask),
        "snap": snapkv(a, window=3, kernel=3, mask=mask),
    }
    for i in range(b):
        ai, mi = a[i: i + 1], mask[i: i + 1]
        assert torch.equal(outs["query"][i: i + 1],
                           query_attention(ai, queries=min(2, q), mask=mi))
        assert torch.allclose(outs["acc"][i: i + 1],
                              accumulated_attention(ai, normalize=True, mask=mi))
        assert torch.equal(outs["snap"][i: i + 1], snapkv(ai, window=3, kernel=3, mask=mi))


# ----------------------------------------------------------------------------- dtypes


def test_half_precision_inputs_are_accumulated_in_float32():
    a = causal_attn(2, 2, 6, 6, seed=0)
    got = accumulated_attention(a.half())
    assert got.dtype == torch.float32
    assert torch.allclose(got.double(), accumulated_attention(a), atol=1e-2)
    assert snapkv(a.bfloat16(), window=2).dtype == torch.float32


# ----------------------------------------------------------------------------- bad inputs


def test_bad_attention_inputs():
    a = rand_attn((2, 2, 5, 5), seed=0)
    with pytest.raises(ValueError, match="B, H, Q, N"):
        cls_attention(torch.rand(5, 5))
    with pytest.raises(ValueError, match="square"):
        cls_attention(a[:, :, :3])
    with pytest.raises(ValueError, match="cls_index"):
        cls_attention(a, cls_index=5)
    with pytest.raises(ValueError, match="mask must have shape"):
        cls_attention(a, mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="NaN"):
        bad = a.clone()
        bad[0, 0, 0, 1] = float("nan")
        cls_attention(bad)
    with pytest.raises(UniprunerError, match=r"torch\.Tensor"):
        query_attention([[0.5, 0.5]])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="at most N"):
        query_attention(rand_attn((1, 1, 6, 5), seed=0))
    with pytest.raises(ValueError, match="last 6 query rows"):
        query_attention(a, queries=6)
    with pytest.raises(ValueError, match="last 0 query rows"):
        query_attention(a, queries=0)
    with pytest.raises(ValueError, match="must lie in"):
        query_attention(a, queries=torch.tensor([7]))
    with pytest.raises(ValueError, match="boolean queries mask"):
        query_attention(a, queries=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="no \\(valid\\) query row"):
        query_attention(a, queries=torch.zeros(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="queries must be"):
        query_attention(a, queries=torch.tensor([0.5]))
    with pytest.raises(ValueError, match="queries must be"):
        query_attention(a, queries="last")  # type: ignore[arg-type]
    right_pad = torch.tensor([[True, True, True, False, False]] * 2)
    with pytest.raises(ValueError, match="no \\(valid\\) query row"):
        query_attention(a[:, :, 3:], mask=right_pad)  # the two rows are both padding
    with pytest.raises(ValueError, match="at most N"):
        accumulated_attention(rand_attn((1, 1, 6, 5), seed=0))
    with pytest.raises(ValueError, match="boolean"):
        accumulated_attention(a, mask=torch.full((2, 5), 0.5))


def test_bad_snapkv_and_window_inputs():
    a = rand_attn((2, 3, 8), seed=0)
    with pytest.raises(ValueError, match="kernel must be odd"):
        snapkv(a, kernel=4)
    with pytest.raises(ValueError, match="window must be >= 1"):
        snapkv(a, window=0)
    with pytest.raises(ValueError, match="pool must be"):
        snapkv(a, pool="median")
    with pytest.raises(ValueError, match="reduce must be"):
        snapkv(a, reduce="max")
    with pytest.raises(ValueError, match="at most N"):
        snapkv(rand_attn((9, 8), seed=0))
    with pytest.raises(ValueError, match=r"\[\.\.\., Q, N\]"):
        snapkv(torch.rand(8))
    with pytest.raises(ValueError, match="mask must have shape"):
        snapkv(a, mask=torch.ones(3, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match="divide"):
        group_heads(rand_attn((1, 6, 2, 4), seed=0), 4)
    with pytest.raises(ValueError, match="n_kv_heads must be >= 1"):
        group_heads(rand_attn((1, 6, 2, 4), seed=0), 0)
    q, k = torch.randn(1, 4, 2, 8), torch.randn(1, 3, 5, 8)
    with pytest.raises(ValueError, match="multiple of the number of KV heads"):
        window_attention(q, k)
    with pytest.raises(ValueError, match="head dim"):
        window_attention(torch.randn(1, 3, 2, 4), k)
    with pytest.raises(ValueError, match="only 5 keys"):
        window_attention(torch.randn(1, 3, 6, 8), k)
    with pytest.raises(ValueError, match="same number of dims"):
        window_attention(torch.randn(3, 2, 8), k)
    with pytest.raises(ValueError, match="scale"):
        window_attention(torch.randn(1, 3, 2, 8), k, scale=-1.0)
    with pytest.raises(ValueError, match="key_mask must have shape"):
        window_attention(torch.randn(1, 3, 2, 8), k, key_mask=torch.ones(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="incompatible leading dims"):
        window_attention(torch.randn(2, 3, 2, 8), torch.randn(3, 3, 5, 8))
    with pytest.raises(ValueError, match="floating-point"):
        window_attention(torch.ones(1, 3, 2, 8, dtype=torch.long), k)


def test_bad_other_inputs():
    with pytest.raises(ValueError, match="plus a feature dim"):
        value_aware(torch.rand(2, 5), torch.rand(2, 4, 3))
    with pytest.raises(ValueError, match="p must be >= 1"):
        value_aware(torch.rand(2, 5), torch.rand(2, 5, 3), p=0)
    with pytest.raises(ValueError, match="NaN"):
        value_aware(torch.tensor([float("nan")]), torch.rand(1, 3))
    with pytest.raises(ValueError, match=r"\[\.\.\., N, D\]"):
        key_norm(torch.rand(5))
    with pytest.raises(ValueError, match="B, N, D"):
        hidden_norm(torch.rand(4, 3))
    with pytest.raises(ValueError, match="NaN"):
        hidden_norm(torch.full((1, 2, 3), float("nan")))
    with pytest.raises(ValueError, match="same shape"):
        token_transition(torch.rand(1, 3, 4), torch.rand(1, 3, 5))
    with pytest.raises(ValueError, match="mode must be"):
        token_transition(torch.rand(1, 3, 4), torch.rand(1, 3, 4), mode="angle")
    with pytest.raises(ValueError, match="n_sink must be >= 0"):
        positional(1, 4, n_sink=-1)
    with pytest.raises(ValueError, match="n must be >= 1"):
        positional(1, 0)
    with pytest.raises(ValueError, match="mask must have shape"):
        positional(2, 4, mask=torch.ones(2, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="at least one document"):
        idf_table([], 10)
    with pytest.raises(ValueError, match="vocab_size"):
        idf_table([[1, 2, 12]], 10)
    with pytest.raises(ValueError, match="document 0"):
        idf_table([torch.rand(3)], 10)
    df, nd = idf_table([[1, 2], [2]], 4)
    with pytest.raises(ValueError, match="doc_freq table's vocabulary"):
        idf(torch.tensor([[1, 4]]), df, nd)
    with pytest.raises(ValueError, match="doc_freq must lie"):
        idf(torch.tensor([[1, 2]]), df, 1)
    with pytest.raises(ValueError, match="integer token ids"):
        idf(torch.tensor([[1.0, 2.0]]), df, nd)
    with pytest.raises(ValueError, match=r"\[B, N\]"):
        stopword_mask(torch.tensor([1, 2]), [1])
    with pytest.raises(ValueError, match="query must have shape"):
        query_similarity(torch.rand(2, 3, 4), torch.rand(2, 5))
    with pytest.raises(ValueError, match="query_mask leaves a row"):
        query_similarity(torch.rand(1, 3, 4), torch.rand(1, 2, 4),
                         query_mask=torch.zeros(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="generator must be"):
        random_scores(2, 3, generator=0)  # type: ignore[arg-type]
