"""RAG context pruning (``unipruner.rag``): prune retrieved documents to a token budget.

Usage::

    from unipruner import Budget
    from unipruner.adapters.rag import ContextPruner

    pruner = ContextPruner(budget=Budget(ratio=0.25))      # the default scorer: "multihop"
    result = pruner.prune(question, [{"text": t, "metadata": m} for t, m in hits])
    print(result.text(), result.stats.ratio)

* :class:`ContextPruner` — sentence / token / chunk units, global or per-document budgets,
  MMR diversity, forced units, exact ratios; returns :class:`PruneResult`
  (:class:`PrunedDocument` list + :class:`PruneStats`).
* Methods: the registry's ``rag`` methods (``unipruner methods --domain rag``; :data:`SCORERS`),
  by name or instance, each run by a scorer here: ``multihop`` (:class:`MultihopScorer`, the
  default: question-title and bridge-title document hops, then BM25 units; no model; optional
  MiniLM reranking of its shortlist, ``rerank="onnx"``, :class:`MiniLMEncoder`),
  ``query_similarity`` (:class:`EmbeddingScorer`,
  all-MiniLM-L6-v2), ``focal_attention`` (:class:`FocalAttentionScorer`, AttentionRAG, SmolLM2),
  ``self_information`` (:class:`SelfInformationScorer`, LLMLingua / Selective Context, SmolLM2),
  ``bm25``, ``idf``, ``hybrid``, ``mmr``, ``random``.
* :func:`split_sentences` — offline regex sentence splitter.
* Framework plugins, imported lazily from their submodules:
  ``unipruner.adapters.rag.langchain.UniprunerCompressor`` (LangChain),
  ``unipruner.adapters.rag.llamaindex.UniprunerPostprocessor`` (LlamaIndex),
  ``unipruner.adapters.rag.haystack.UniprunerContextPruner`` (Haystack 2.x).
* :func:`demo_section` — the ``unipruner demo`` RAG section.
"""

from __future__ import annotations

from ._demo import demo_section
from ._multihop import MultihopScorer
from ._pruner import ContextPruner, PrunedDocument, PruneResult, PruneStats, ScoredContext, TokenCounter
from ._registry import SCORERS, make_scorer
from ._rerank import MiniLMEncoder
from ._scorers import (
    BM25Scorer,
    EmbeddingScorer,
    FocalAttentionScorer,
    HybridScorer,
    IDFScorer,
    RandomScorer,
    Scorer,
    SelfInformationScorer,
    aggregate_spans,
    rrf,
)
from ._split import split_sentences, split_units, unit_spans

__all__ = [
    "SCORERS",
    "BM25Scorer",
    "ContextPruner",
    "EmbeddingScorer",
    "FocalAttentionScorer",
    "HybridScorer",
    "IDFScorer",
    "MiniLMEncoder",
    "MultihopScorer",
    "PruneResult",
    "PruneStats",
    "PrunedDocument",
    "RandomScorer",
    "ScoredContext",
    "Scorer",
    "SelfInformationScorer",
    "TokenCounter",
    "aggregate_spans",
    "demo_section",
    "make_scorer",
    "rrf",
    "split_sentences",
    "split_units",
    "unit_spans",
]
