"""ColBERT reducers are registry methods: the adapter accepts exactly the "colbert" domain, and every new core
method (ward_cosine_pool, sequential_pool, kmeans_pool's faiss backend, first, duplicates, centroid, stopwords)
matches a plainly written per-document reference on ragged [B, N, D] batches with protected tokens."""

from __future__ import annotations

import itertools
import math
import re

import numpy as np
import pytest
import torch
from scipy.cluster.hierarchy import fcluster, linkage
from typer.testing import CliRunner

import unipruner
from unipruner import Budget, UniprunerError
from unipruner.adapters.colbert import _methods as M
from unipruner.adapters.colbert._methods import ReduceSpec, TokenTable, reduce_chunk
from unipruner.adapters.colbert.formats import Chunk
from unipruner.cli import app
from unipruner.methods import REGISTRY, MergingMethod, ScoringMethod
from unipruner.scorers.importance import idf_table

B, N, D, P = 5, 23, 12, 1


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, N, D, generator=g)
    lens = torch.tensor([23, 17, 2, 9, 1])
    mask = torch.arange(N).unsqueeze(0) < lens.unsqueeze(1)
    return x, mask


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(dim=-1, keepdim=True).clamp(min=1e-12)


def _token_table(lens: list[int], vocab: int = 30, seed: int = 0) -> TokenTable:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (sum(lens),), generator=g)
    offsets = np.concatenate([[0], np.cumsum(lens)])
    df, n_docs = idf_table([ids[offsets[i]:offsets[i + 1]] for i in range(len(lens))], vocab)
    return TokenTable(ids.numpy(), offsets, df.numpy(), int(n_docs), np.array([1, 2, 3, 4, 5]))


# ----------------------------------------------------------------------------------------------
# the registry is the adapter's method list, both ways
# ----------------------------------------------------------------------------------------------


def test_adapter_accepts_exactly_the_colbert_domain() -> None:
    colbert_names = {m.name for m in unipruner.methods(domain="colbert")}
    assert set(M.accepted_methods()) == colbert_names
    assert colbert_names >= {"ward_pool", "ward_cosine_pool", "kmeans_pool", "sequential_pool", "first",
                             "hidden_norm", "duplicates", "divprune", "centroid", "idf", "stopwords"}
    accepted = set()
    for name in REGISTRY:
        try:
            ReduceSpec(name, ratio=0.5)
        except UniprunerError as err:
            assert "does not apply to multi-vector indexes" in str(err), (name, err)
            continue
        accepted.add(name)
    assert accepted == colbert_names
    # and every one of them runs through the adapter (the signals it needs are ones the adapter supplies)
    lens = [1, 2, 7, 30, 12]
    g = torch.Generator().manual_seed(0)
    chunk = Chunk(0, 0, np.array(lens), torch.randn(sum(lens), 16, generator=g))
    table = _token_table(lens)
    for name in sorted(colbert_names):
        assert set(REGISTRY[name].requires) <= M.TOKEN_SIGNALS, name
        out = reduce_chunk(chunk, ReduceSpec(name, factor=2, protected=1), tokens=table)
        ref = M.target_counts(np.array(lens), ReduceSpec(name, factor=2, protected=1))
        assert out.doclens.tolist() == ref.tolist() == [1, 2, 4, 15, 6], name


def test_cli_lists_the_colbert_methods() -> None:
    res = CliRunner().invoke(app, ["methods", "--domain", "colbert"], env={"COLUMNS": "200"})
    assert res.exit_code == 0, res.output
    first_cells = {m.group(1) for m in re.finditer(r"^\s*([a-z_0-9]+)\s", res.output, flags=re.M)}
    listed = first_cells & set(REGISTRY)
    assert listed == set(M.accepted_methods())


@pytest.mark.parametrize("old, new", sorted(M.RENAMED.items()))
def test_old_colbert_names_say_the_new_one(old: str, new: str) -> None:
    with pytest.raises(UniprunerError, match=f"ColBERT method '{old}' is now '{new}'"):
        ReduceSpec(old, factor=2)
    assert new in REGISTRY and "colbert" in REGISTRY[new].domains


def test_spec_from_a_method_instance() -> None:
    m = unipruner.method("ward_cosine_pool", budget=Budget.pool_factor(3), protected=1)
    spec = ReduceSpec(m)
    assert spec.reducer is m and spec.name == "ward_cosine_pool" and spec.protected == 1
    assert spec.budget == Budget.pool_factor(3)
    assert ReduceSpec("ward_cosine_pool", factor=3, protected=1).reducer == m
    with pytest.raises(UniprunerError, match="carries its own budget"):
        ReduceSpec(m, factor=2)
    with pytest.raises(UniprunerError, match="pool-factor, ratio or keep"):
        ReduceSpec(unipruner.method("hidden_norm", budget=Budget.auto()))
    with pytest.raises(UniprunerError, match="does not apply"):
        ReduceSpec(unipruner.method("tome", ratio=0.5))
    assert ReduceSpec("kmeans_pool", factor=2, seed=7).reducer.seed == 7  # type: ignore[attr-defined]


def test_global_scope_is_a_property_of_the_method() -> None:
    glob = {m.name for m in unipruner.methods(domain="colbert") if m.cls.global_scope}
    assert glob == {"hidden_norm", "duplicates", "centroid", "idf", "stopwords"}
    for name in glob:
        assert issubclass(REGISTRY[name], ScoringMethod)
        ReduceSpec(name, ratio=0.5, scope="global")
    with pytest.raises(UniprunerError, match="per document only"):
        ReduceSpec("first", ratio=0.5, scope="global")


# ----------------------------------------------------------------------------------------------
# naive per-document references for the new core methods (select / reduce on [B, N, D] + mask)
# ----------------------------------------------------------------------------------------------


def _naive_pool(doc: torch.Tensor, labels: list[int], p: int) -> torch.Tensor:
    """Protected tokens, then the means of the clusters of the rest in first-member order."""
    order: list[int] = []
    for lab in labels:
        if lab not in order:
            order.append(lab)
    rest = doc[p:]
    means = [rest[[i for i, lab in enumerate(labels) if lab == c]].mean(0) for c in order]
    return torch.stack([*doc[:p], *means])


def _check_pooling(name: str, budget: Budget, reference, seed: int,  # type: ignore[no-untyped-def]
                   **params: object) -> None:
    x, mask = _batch(seed)
    m = unipruner.method(name, budget=budget, protected=P, **params)
    red = m.reduce(x, mask=mask)
    assert isinstance(m, MergingMethod)
    for row in range(B):
        n = int(mask[row].sum())
        doc = x[row, :n]
        p = min(P, n)
        got = red.tokens[row][red.mask[row]] if red.mask is not None else red.tokens[row]
        if n <= p:
            torch.testing.assert_close(got, doc)
            continue
        k = p + max((n - p) // int(budget.factor or 1), 1) if budget.factor else None
        labels = reference(doc[p:], (k or 0) - p)
        torch.testing.assert_close(got, _naive_pool(doc, labels, p), atol=1e-5, rtol=1e-5)
        assert red.sizes[row].sum() == n  # every valid token is in exactly one output


def test_ward_cosine_pool_matches_scipy_on_cosine_distances() -> None:
    def ref(rest: torch.Tensor, k: int) -> list[int]:
        if rest.shape[0] == 1:
            return [0]
        u = _unit(rest.double())
        dist = (1 - u @ u.T).clamp(min=0).numpy()
        return fcluster(linkage(dist[np.triu_indices(len(dist), k=1)], "ward"), k, "maxclust").tolist()

    for f in (2, 3):
        _check_pooling("ward_cosine_pool", Budget.pool_factor(f), ref, seed=f)


def test_ward_pool_uses_pylates_pool_factor_count() -> None:
    def ref(rest: torch.Tensor, k: int) -> list[int]:
        if rest.shape[0] == 1:
            return [0]
        return fcluster(linkage(_unit(rest.double()).numpy(), "ward"), k, "maxclust").tolist()

    _check_pooling("ward_pool", Budget.pool_factor(2), ref, seed=4)


def test_sequential_pool_matches_naive_runs() -> None:
    def ref(rest: torch.Tensor, k: int) -> list[int]:
        n = rest.shape[0]
        return [i * k // n for i in range(n)]

    for f in (2, 4):
        _check_pooling("sequential_pool", Budget.pool_factor(f), ref, seed=5 + f)


def test_kmeans_pool_faiss_backend_is_faiss_per_document() -> None:
    import faiss

    def ref(rest: torch.Tensor, k: int) -> list[int]:
        pts = np.ascontiguousarray(_unit(rest).numpy())
        if k >= len(pts):
            return list(range(len(pts)))
        km = faiss.Kmeans(pts.shape[1], k, niter=20, seed=1, min_points_per_centroid=1,
                          max_points_per_centroid=1 << 30, verbose=False)
        km.train(pts)
        return km.index.search(pts, 1)[1][:, 0].tolist()

    _check_pooling("kmeans_pool", Budget.pool_factor(2), ref, seed=8, backend="faiss")
    with pytest.raises(UniprunerError, match="backend"):
        unipruner.method("kmeans_pool", backend="sklearn")


def test_kmeans_backends_share_counts_and_protected_tokens() -> None:
    x, mask = _batch(9)
    outs = [unipruner.method("kmeans_pool", budget=Budget.pool_factor(3), protected=P, backend=be)
            .reduce(x, mask=mask) for be in ("torch", "faiss")]
    for a, b in itertools.pairwise(outs):
        assert a.mask is not None and b.mask is not None
        assert a.mask.sum(1).tolist() == b.mask.sum(1).tolist()
        torch.testing.assert_close(a.tokens[:, :P], b.tokens[:, :P])
        torch.testing.assert_close(a.tokens[:, :P], x[:, :P])


def _naive_select(scores: list[float], n: int, k: int, p: int) -> list[int]:
    order = sorted(range(p, n), key=lambda i: (-scores[i], i))
    return sorted(list(range(min(p, n))) + order[: max(k - min(p, n), 0)])


def _check_scoring(name: str, score_of, seed: int, **signals: object) -> None:  # type: ignore[no-untyped-def]
    x, mask = _batch(seed)
    x[0, 7] = x[0, 2] * 1.001  # a near-duplicate
    m = unipruner.method(name, ratio=0.5, protected=P)
    idx = m.select(x, mask=mask, **signals)
    red = m.reduce(x, mask=mask, **signals)
    for row in range(B):
        n = int(mask[row].sum())
        k = max(math.floor(n * 0.5 + 0.5), min(P, n))
        ref = _naive_select(score_of(x[row, :n], row), n, k, P)
        assert idx[row][idx[row] >= 0].tolist() == ref, (name, row)
        torch.testing.assert_close(red.tokens[row][: len(ref)], x[row, ref])


def test_first_keeps_the_leading_vectors() -> None:
    _check_scoring("first", lambda d, row: [-float(i) for i in range(d.shape[0])], seed=10)


def test_duplicates_scores_one_minus_max_cos_to_earlier() -> None:
    def score(d: torch.Tensor, row: int) -> list[float]:
        u = _unit(d)
        return [2.0] + [1.0 - max(float(u[i] @ u[j]) for j in range(i)) for i in range(1, d.shape[0])]

    _check_scoring("duplicates", score, seed=11)
    x, mask = _batch(11)
    x[0, 7] = x[0, 2] * 1.001
    kept = unipruner.method("duplicates", ratio=0.5).select(x, mask=mask)[0].tolist()
    assert 7 not in kept


def test_centroid_keeps_the_most_central_vectors() -> None:
    def score(d: torch.Tensor, row: int) -> list[float]:
        u = _unit(d)
        c = _unit(u.mean(0))
        return [float(u[i] @ c) for i in range(d.shape[0])]

    _check_scoring("centroid", score, seed=12)


def test_stopwords_go_first_then_idf() -> None:
    g = torch.Generator().manual_seed(13)
    ids = torch.randint(0, 20, (B, N), generator=g)
    df = torch.randint(1, 30, (20,), generator=g)
    stop = [0, 3, 5]

    def score(d: torch.Tensor, row: int) -> list[float]:
        out = []
        for i in range(d.shape[0]):
            t = int(ids[row, i])
            idf = math.log((30 - int(df[t]) + 0.5) / (int(df[t]) + 0.5) + 1)
            out.append(idf - (1e4 if t in stop else 0.0))
        return out

    _check_scoring("stopwords", score, seed=13, token_ids=ids, doc_freq=df, n_docs=30,
                   stop_ids=torch.tensor(stop))
    with pytest.raises(UniprunerError, match="stop_ids"):
        unipruner.method("stopwords", ratio=0.5).select(torch.randn(1, 4, 3), token_ids=ids[:1, :4],
                                                         doc_freq=df, n_docs=30)
