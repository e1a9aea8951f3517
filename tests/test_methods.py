"""Every registered method through the common interface: a parametrised matrix."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import unipruner
from unipruner import Budget, UniprunerError
from unipruner.methods import REGISTRY, MergingMethod, ScoringMethod, TextMethod

B, N, D, H = 3, 24, 16, 2


def make_signals(g: torch.Generator, n: int = N) -> dict[str, object]:
    logits = torch.randn(B, H, n, n, generator=g)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    attn = logits.masked_fill(~causal, -torch.inf).softmax(-1)
    ids = torch.randint(0, 50, (B, n), generator=g)
    return {
        "attn": attn,
        "query": torch.randn(B, D, generator=g),
        "keys": torch.randn(B, n, D, generator=g),
        "values": torch.randn(B, n, D, generator=g),
        "previous": torch.randn(B, n, D, generator=g),
        "text_queries": torch.tensor([10, 11, 12]),
        "token_ids": ids,
        "doc_freq": torch.randint(1, 20, (50,), generator=g),
        "n_docs": 40,
        "stop_ids": torch.tensor([1, 2, 3]),
        "hw": (4, n // 4),
    }


def build(name: str, **kw: object) -> unipruner.Method:
    return unipruner.method(name, **kw)


ALL = sorted(REGISTRY)
#: methods that run on tensors (TextMethods score text units through unipruner.rag, see test_text_methods)
TENSOR = [n for n in ALL if not issubclass(REGISTRY[n], TextMethod)]


def test_registry_is_complete() -> None:
    infos = unipruner.methods()
    assert len(infos) >= 20
    assert {m.family for m in infos} == {"importance", "similarity", "graph", "diversity"}
    for m in infos:
        assert m.paper and m.summary and m.domains, m.name
    assert {m.name for m in unipruner.methods(domain="kv")} >= {"snapkv", "h2o", "streamingllm", "knorm"}
    assert all(m.family == "graph" for m in unipruner.methods(family="graph"))


@pytest.mark.parametrize("name", ALL)
def test_method_is_frozen_and_stateless(name: str) -> None:
    m = build(name, ratio=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        m.budget = Budget(ratio=0.1)  # type: ignore[misc]
    assert build(name, ratio=0.5) == m or name == "idf"
    assert m.budget == Budget(ratio=0.5)


@pytest.mark.parametrize("name", [n for n in ALL if issubclass(REGISTRY[n], TextMethod)])
def test_text_methods_refuse_tensors_and_run_through_rag(name: str) -> None:
    from unipruner.adapters.rag import make_scorer

    m = build(name)
    assert "rag" in m.domains and m.domains == ("rag",)
    with pytest.raises(UniprunerError, match="scores text units"):
        m.select(torch.randn(B, N, D))
    assert make_scorer(m).name == name


@pytest.mark.parametrize("name", TENSOR)
def test_select_and_reduce(name: str) -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(B, N, D, generator=g)
    m = build(name, ratio=0.5)
    sig = make_signals(g)
    idx = m.select(x, **sig)
    assert idx.dtype == torch.long and idx.shape[0] == B
    for row in idx:
        row = row[row >= 0]
        assert torch.all(row[1:] > row[:-1]) and int(row.min()) >= 0 and int(row.max()) < N
    red = m.reduce(x, **sig)
    assert red.tokens.shape[0] == B and red.tokens.shape[-1] == D
    n_out = red.tokens.shape[1] if red.mask is None else int(red.mask[0].sum())
    assert n_out == 12, (name, n_out)
    total = red.sizes.sum(1).squeeze(-1)
    if isinstance(m, MergingMethod):
        assert torch.allclose(total, torch.full((B,), float(N))), "merging keeps the mass"
    else:
        assert torch.allclose(total, torch.full((B,), 12.0))
    # batched == per-sample
    single_sig = {k: (v[:1] if isinstance(v, torch.Tensor) and v.ndim >= 2 else v) for k, v in sig.items()}
    single = m.select(x[:1], **single_sig)
    assert single[0].tolist() == idx[0].tolist()


@pytest.mark.parametrize("name", [n for n in TENSOR if issubclass(REGISTRY[n], ScoringMethod)])
def test_scoring_methods_respect_masks(name: str) -> None:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(B, N, D, generator=g)
    mask = torch.ones(B, N, dtype=torch.bool)
    mask[1, 18:] = False
    mask[2, :5] = False
    m = build(name, ratio=0.5)
    idx = m.select(x, mask=mask, **make_signals(g))
    for i in range(B):
        row = idx[i][idx[i] >= 0]
        assert bool(mask[i, row].all())
        n_prot = int(mask[i, : m.protected].sum())
        assert len(row) == max(math.floor(int(mask[i].sum()) * 0.5 + 0.5), n_prot)


@pytest.mark.parametrize("reduction", ["drop", "merge", "fuse"])
def test_reductions(reduction: str) -> None:
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, N, D, generator=g)
    m = build("evit", keep=8, reduction=reduction)
    red = m.reduce(x, **make_signals(g))
    k = 8 + (1 if reduction == "fuse" else 0)
    assert red.tokens.shape == (B, k, D)
    if reduction != "drop":
        assert torch.allclose(red.sizes.sum(1).squeeze(-1), torch.full((B,), float(N)))
    assert red.indices[:, 0].tolist() == [0] * B, "CLS is protected"


def test_tome_match_closures() -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 17, 8, generator=g)
    m = build("tome", protected=1)
    merge, unmerge = m.match(x, 5)
    y = merge(x)
    assert y.shape == (2, 12, 8)
    assert unmerge(y).shape == x.shape
    assert torch.equal(y[:, 0], x[:, 0]), "the protected CLS token stays first and untouched"


def test_method_errors() -> None:
    with pytest.raises(UniprunerError, match="unknown method"):
        unipruner.method("nope")
    with pytest.raises(UniprunerError, match="no parameter"):
        unipruner.method("divprune", window=3)
    with pytest.raises(UniprunerError, match="needs the signal attn"):
        unipruner.method("evit", ratio=0.5).select(torch.randn(1, 8, 4))
    with pytest.raises(UniprunerError, match="reduction"):
        unipruner.method("evit", reduction="explode")
    with pytest.raises(ValueError, match=r"\[B, N, D\]"):
        unipruner.method("divprune", keep=2).reduce(torch.randn(8, 4))
    with pytest.raises(UniprunerError, match="at most"):
        unipruner.method("tomesd", ratio=0.1).reduce(torch.randn(1, 16, 4), hw=(4, 4))


def test_method_accepts_budget_forms() -> None:
    assert unipruner.method("dart", keep=128) == unipruner.method("dart", budget=Budget(keep=128))
    assert unipruner.method("dart", budget=0.25).budget == Budget(ratio=0.25)
    assert unipruner.method("dart").budget == Budget(ratio=0.5)


def test_pooling_has_no_matching_round() -> None:
    with pytest.raises(UniprunerError, match="no pairwise matching"):
        unipruner.method("ward_pool", ratio=0.5).match(torch.randn(1, 8, 4), 2)


def test_evit_fuse_is_attention_weighted() -> None:
    g = torch.Generator().manual_seed(4)
    x = torch.randn(2, 10, 4, generator=g)
    attn = torch.randn(2, 1, 10, 10, generator=g).softmax(-1)
    m = build("evit", keep=4, reduction="fuse")
    red = m.reduce(x, attn=attn)
    keep = m.select(x, attn=attn)
    w = attn[:, 0, 0, :]
    for i in range(2):
        pruned = [j for j in range(10) if j not in keep[i].tolist()]
        want = (x[i, pruned] * w[i, pruned, None]).sum(0) / w[i, pruned].sum()
        assert torch.allclose(red.tokens[i, -1], want, atol=1e-5)
        assert red.sizes[i, -1, 0] == len(pruned)
