"""The RAG methods of the registry and the scorer that runs each: :data:`SCORERS`, :func:`make_scorer`.

Its own module so that it can import every scorer module (``_scorers``, ``_multihop``) without a circle.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

from ...errors import UniprunerError
from ...methods import Method
from ...methods import method as make_method
from ._multihop import MultihopScorer
from ._scorers import (
    BM25Scorer,
    EmbeddingScorer,
    FocalAttentionScorer,
    HybridScorer,
    IDFScorer,
    RandomScorer,
    Scorer,
    SelfInformationScorer,
)

__all__ = ["SCORERS", "make_scorer"]


def _embedding(m: Method) -> Scorer:
    return EmbeddingScorer()


#: fields every registry method has (budget, protected, reduction): the pruner's business, not the scorer's
_BASE_FIELDS = frozenset(f.name for f in dataclasses.fields(Method))


def _with_params(cls: Callable[..., Scorer]) -> Callable[[Any], Scorer]:
    """A factory passing the method's own parameters to the scorer of the same parameters."""

    def build(m: Any) -> Scorer:
        return cls(**{f.name: getattr(m, f.name) for f in dataclasses.fields(m) if f.name not in _BASE_FIELDS})

    return build


#: The registry methods ``unipruner.rag`` runs, by name, each with the scorer that implements it here
#: (``unipruner methods --domain rag`` lists exactly these; ``mmr`` is ``query_similarity`` scores
#: with MMR selection, see :class:`~unipruner.adapters.rag.ContextPruner`'s ``diversity``).
SCORERS: Mapping[str, Callable[[Any], Scorer]] = MappingProxyType({
    "query_similarity": _embedding,
    "mmr": _embedding,
    "bm25": _with_params(BM25Scorer),
    "idf": lambda m: IDFScorer(),
    "hybrid": _with_params(HybridScorer),
    "focal_attention": lambda m: FocalAttentionScorer(
        layers=None if m.layers is None else list(m.layers), answer_prefix=m.answer_prefix),
    "self_information": lambda m: SelfInformationScorer(),
    "random": _with_params(RandomScorer),
    "multihop": _with_params(MultihopScorer),
})

#: Names this adapter used before the one registry (a clear error says the new name).
_RENAMED = {"embedding": "query_similarity"}


def make_scorer(scorer: str | Method | Scorer) -> Scorer:
    """The scorer for a registry method (name or instance) of the ``rag`` domain, or a scorer object.

    Names: ``query_similarity`` (all-MiniLM-L6-v2 embeddings), ``bm25``, ``idf``, ``hybrid``,
    ``focal_attention``, ``self_information`` (SmolLM2), ``mmr``, ``random`` — the methods of
    ``unipruner.methods(domain="rag")``.

    >>> make_scorer("bm25").name
    'bm25'
    >>> import unipruner
    >>> make_scorer(unipruner.method("bm25", k1=1.2)).k1
    1.2
    """
    if isinstance(scorer, str):
        if scorer in _RENAMED:
            raise UniprunerError(f"the RAG scorer {scorer!r} is now {_RENAMED[scorer]!r} (its registry name)")
        if scorer not in SCORERS:
            raise UniprunerError(
                f"unknown scorer {scorer!r} (not a RAG method); choose one of {sorted(SCORERS)} "
                "(`unipruner methods --domain rag`) or pass a Scorer")
        scorer = make_method(scorer)
    if isinstance(scorer, Method):
        if scorer.name not in SCORERS:
            raise UniprunerError(
                f"method {scorer.name!r} does not run on RAG contexts; choose one of {sorted(SCORERS)}")
        return SCORERS[scorer.name](scorer)
    if not isinstance(scorer, Scorer):
        raise UniprunerError(
            "scorer must be a registry method (name or instance) or an object with .name and "
            f".score(query, texts, spans), got {type(scorer).__name__}"
        )
    return scorer
