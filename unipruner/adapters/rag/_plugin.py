"""What the three framework plugins share: building a pruner from plain settings and
writing unipruner's scores next to the framework's own metadata."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...errors import UniprunerError
from ...select import Budget
from ._pruner import ContextPruner, PrunedDocument, PruneStats

META_KEY = "unipruner"


def budget_from(ratio: float | None, keep: int | None, threshold: float | None = None) -> Budget:
    """One budget from plugin fields (ratio defaults to 0.25 when none is given)."""
    given = [x for x in (ratio, keep, threshold) if x is not None]
    if len(given) > 1:
        raise UniprunerError("give one of ratio=, keep= or threshold=")
    if keep is not None:
        return Budget(keep=keep)
    if threshold is not None:
        return Budget(threshold=threshold)
    return Budget(ratio=0.25 if ratio is None else ratio)


def make_pruner(settings: Mapping[str, Any], scorer: Any = None) -> ContextPruner:
    """A ContextPruner from the plugins' serialisable settings."""
    return ContextPruner(
        scorer if scorer is not None else settings.get("scorer", "embedding"),
        budget_from(settings.get("ratio"), settings.get("keep"), settings.get("threshold")),
        granularity=settings.get("granularity", "sentence"), scope=settings.get("scope", "global"),
        diversity=settings.get("diversity"), keep_order=settings.get("keep_order", True),
        force_keep=list(settings.get("force_keep") or ()), strict=settings.get("strict", True),
        context_weight=settings.get("context_weight"), feedback=settings.get("feedback", 0),
    )


def annotate(metadata: Mapping[str, Any], doc: PrunedDocument, stats: PruneStats,
             original_score: float | None) -> dict[str, Any]:
    """A copy of ``metadata`` with unipruner's per-document record under ``"unipruner"``."""
    out = dict(metadata)
    out[META_KEY] = {
        "score": doc.score,
        "unit_scores": doc.unit_scores,
        "kept_units": doc.kept_units,
        "tokens_before": doc.tokens_before,
        "tokens_after": doc.tokens_after,
        "retriever_score": original_score,
        "query_ratio": stats.ratio,
        "scorer": stats.scorer,
        "notes": list(stats.notes),
    }
    return out
