"""RAG context pruning (``unipruner.rag``): prune retrieved documents to a token budget.

Usage::

    from unipruner import Budget
    from unipruner.adapters.rag import ContextPruner

    pruner = ContextPruner("embedding", Budget(ratio=0.25))
    result = pruner.prune(question, [{"text": t, "metadata": m} for t, m in hits])
    print(result.text(), result.stats.ratio)

* :class:`ContextPruner` — sentence / token / chunk units, global or per-document budgets,
  MMR diversity, forced units, exact ratios; returns :class:`PruneResult`
  (:class:`PrunedDocument` list + :class:`PruneStats`).
* Scorers: :class:`EmbeddingScorer` (all-MiniLM-L6-v2), :class:`FocalAttentionScorer`
  (AttentionRAG, SmolLM2), :class:`SelfInformationScorer` (LLMLingua / Selective Context,
  SmolLM2), :class:`BM25Scorer`, :class:`RandomScorer`.
* :func:`split_sentences` — offline regex sentence splitter.
* Framework plugins, imported lazily from their submodules:
  ``unipruner.adapters.rag.langchain.UniprunerCompressor`` (LangChain),
  ``unipruner.adapters.rag.llamaindex.UniprunerPostprocessor`` (LlamaIndex),
  ``unipruner.adapters.rag.haystack.UniprunerContextPruner`` (Haystack 2.x).
* :func:`demo_section` — the ``unipruner demo`` RAG section.
"""

from __future__ import annotations

from ._demo import demo_section
from ._pruner import ContextPruner, PrunedDocument, PruneResult, PruneStats, ScoredContext, TokenCounter
from ._scorers import (
    BM25Scorer,
    EmbeddingScorer,
    FocalAttentionScorer,
    HybridScorer,
    RandomScorer,
    Scorer,
    SelfInformationScorer,
    aggregate_spans,
    make_scorer,
    rrf,
)
from ._split import split_sentences, split_units, unit_spans

__all__ = [
    "BM25Scorer",
    "ContextPruner",
    "EmbeddingScorer",
    "FocalAttentionScorer",
    "HybridScorer",
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
