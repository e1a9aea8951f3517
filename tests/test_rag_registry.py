"""The RAG adapter runs exactly the registry's ``rag`` methods, and its plugins share one settings definition."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

import unipruner
from unipruner.adapters.rag import SCORERS, ContextPruner, IDFScorer, make_scorer
from unipruner.adapters.rag._plugin import PrunerSettings, make_pruner
from unipruner.errors import UniprunerError
from unipruner.models import model_path


def test_rag_accepts_exactly_the_registry_rag_methods() -> None:
    listed = {m.name for m in unipruner.methods(domain="rag")}
    assert listed == set(SCORERS)
    for name in listed:  # every listed method builds a scorer, by name and by instance
        assert make_scorer(name).score is not None
        assert make_scorer(unipruner.method(name)).score is not None
    for m in unipruner.methods():  # and nothing else is accepted
        if "rag" not in m.domains:
            with pytest.raises(UniprunerError, match=r"not a RAG method|does not run on RAG"):
                make_scorer(m.name)


def test_method_parameters_reach_the_scorer() -> None:
    s = make_scorer(unipruner.method("bm25", k1=0.9, b=0.3))
    assert (s.k1, s.b) == (0.9, 0.3)
    assert make_scorer(unipruner.method("hybrid", k=10.0)).k == 10.0
    assert make_scorer(unipruner.method("random", seed=3)).seed == 3
    focal = make_scorer(unipruner.method("focal_attention", layers=(2, 3), answer_prefix="A:"))
    assert (focal.layers, focal.answer_prefix) == ([2, 3], "A:")


def test_registry_defaults_are_the_scorers_defaults() -> None:
    """A scorer built from its registry method equals the scorer built with its own defaults."""
    from unipruner.adapters.rag import BM25Scorer, HybridScorer, MultihopScorer, RandomScorer

    for name, cls in (("bm25", BM25Scorer), ("random", RandomScorer), ("multihop", MultihopScorer)):
        assert make_scorer(name) == cls(), name
    assert make_scorer("hybrid").k == HybridScorer(lexical=object(), dense=object()).k


def test_old_name_and_tensor_use_say_what_to_do() -> None:
    with pytest.raises(UniprunerError, match="now 'query_similarity'"):
        ContextPruner("embedding")
    with pytest.raises(UniprunerError, match=r"unipruner\.rag\.ContextPruner"):
        unipruner.method("bm25").select(torch.randn(1, 4, 2))


def test_mmr_is_query_similarity_with_mmr_selection() -> None:
    p = ContextPruner("mmr")
    assert p.scorer.name == "query_similarity" and p.diversity == 0.5
    assert ContextPruner(unipruner.method("mmr", lambda_=0.7)).diversity == 0.7
    assert ContextPruner("mmr", diversity=0.2).diversity == 0.2


def _naive_idf(units: list[str]) -> list[float]:
    """Mean BM25 idf of each unit's words, the units being the collection (plain Python)."""
    import re

    words = [re.findall(r"\w+", u.lower()) for u in units]
    n = len(units)
    out = []
    for ws in words:
        if not ws:
            out.append(0.0)
            continue
        vals = []
        for w in ws:
            df = sum(w in set(other) for other in words)
            vals.append(math.log(1 + (n - df + 0.5) / (df + 0.5)))
        out.append(sum(vals) / len(vals))
    return out


def test_idf_scorer_matches_a_naive_reference() -> None:
    texts = ["The cat sat. The dog sat too.", "A zebra! The cat.", "..."]
    spans = [[(0, 12), (12, 29)], [(0, 8), (8, 17)], [(0, 3)]]
    got = torch.cat(IDFScorer().score("q", texts, spans))
    units = [t[s:e] for t, sp in zip(texts, spans, strict=True) for s, e in sp]
    torch.testing.assert_close(got, torch.tensor(_naive_idf(units)), rtol=1e-5, atol=1e-6)


def test_plugins_share_one_settings_definition() -> None:
    from unipruner.adapters.rag.haystack import UniprunerContextPruner
    from unipruner.adapters.rag.langchain import UniprunerCompressor
    from unipruner.adapters.rag.llamaindex import UniprunerPostprocessor

    names = {f.name for f in dataclasses.fields(PrunerSettings)}
    assert {"lead_weight", "tokenizer"} <= names
    assert names <= set(UniprunerCompressor.model_fields)
    assert names <= set(UniprunerPostprocessor.model_fields)
    tok = str(model_path("all-minilm-l6-v2"))
    for make in (UniprunerCompressor, UniprunerPostprocessor, UniprunerContextPruner):
        plugin = make(scorer="bm25", ratio=0.5, lead_weight=0.5, tokenizer=tok)
        pruner = plugin.pruner
        assert pruner.lead_weight == 0.5
        assert pruner.counter.tokenizer is not None  # the local tokenizer was loaded
    with pytest.raises(UniprunerError, match="unknown plugin setting"):
        UniprunerContextPruner(scorer="bm25", leadweight=0.5)
    with pytest.raises(UniprunerError, match="not a local tokenizer"):
        make_pruner({"scorer": "bm25", "tokenizer": "/nonexistent/tokenizer"})
