"""What the three framework plugins share: ONE definition of their settings
(:class:`PrunerSettings`), building a pruner from it, and writing unipruner's scores next to the
framework's own metadata.

LangChain's and LlamaIndex's plugins are pydantic models whose fields are generated from
:class:`PrunerSettings` (:func:`pydantic_fields`); Haystack's component takes the same keywords.
A setting added here reaches all three.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...errors import UniprunerError
from ...select import Budget
from ._pruner import ContextPruner, PrunedDocument, PruneStats

META_KEY = "unipruner"

__all__ = ["META_KEY", "PrunerSettings", "annotate", "budget_from", "make_pruner", "pydantic_fields"]


@dataclass(frozen=True)
class PrunerSettings:
    """The serialisable settings of every framework plugin (see :class:`ContextPruner` for each).

    Attributes
    ----------
    scorer : str
        A registry method of the ``rag`` domain (``unipruner methods --domain rag``); default
        ``"multihop"``, as :class:`~unipruner.adapters.rag.ContextPruner`.
    ratio, keep, threshold : budget, one of them (default ``ratio=0.25``)
    granularity, scope, diversity, keep_order, force_keep, strict, context_weight, feedback, lead_weight :
        As for :class:`~unipruner.adapters.rag.ContextPruner`.
    tokenizer : str, optional
        A local Hugging Face tokenizer directory used to count tokens (loaded offline with
        ``AutoTokenizer.from_pretrained(path, local_files_only=True)``); default words and punctuation.
    scorer_options : dict, optional
        Parameters of the scorer's registry method, e.g. ``{"doc_weight": 3.0}`` for ``multihop``
        (``unipruner.method(scorer, **scorer_options)``; an unknown name is an error listing the
        known ones).

    Examples
    --------
    >>> PrunerSettings(scorer="bm25", ratio=0.5).budget()
    Budget(ratio=0.5)
    """

    scorer: str = "multihop"
    ratio: float | None = None
    keep: int | None = None
    threshold: float | None = None
    granularity: str = "sentence"
    scope: str = "global"
    diversity: float | None = None
    keep_order: bool = True
    force_keep: tuple[str, ...] = ()
    strict: bool = True
    context_weight: float | None = None
    feedback: int = 0
    lead_weight: float = 0.0
    tokenizer: str | None = None
    scorer_options: dict[str, Any] | None = None

    @classmethod
    def from_mapping(cls, values: Mapping[str, Any]) -> PrunerSettings:
        """Settings from plugin fields; unknown names are an error naming the known ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - names)
        if unknown:
            raise UniprunerError(f"unknown plugin setting(s) {unknown}; the settings are {sorted(names)}")
        data = dict(values)
        if data.get("force_keep") is not None:
            fk = data["force_keep"]
            data["force_keep"] = (fk,) if isinstance(fk, str) else tuple(fk)
        else:
            data.pop("force_keep", None)
        if data.get("scorer_options") is not None:
            opts = data["scorer_options"]
            if not isinstance(opts, Mapping):
                raise UniprunerError(f"scorer_options must be a mapping, got {type(opts).__name__}")
            data["scorer_options"] = dict(opts)
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for JSON / YAML serialisation."""
        out = dataclasses.asdict(self)
        out["force_keep"] = list(self.force_keep)
        return out

    def budget(self) -> Budget:
        """The pruning budget (:func:`budget_from`)."""
        return budget_from(self.ratio, self.keep, self.threshold)


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


def _tokenizer(path: str | None) -> Any:
    if path is None:
        return None
    from ...models import require

    require("transformers", "llm")
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise UniprunerError(f"tokenizer={path!r} is not a local tokenizer directory: {err}") from err


def make_pruner(settings: PrunerSettings | Mapping[str, Any], scorer: Any = None) -> ContextPruner:
    """A ContextPruner from the plugins' serialisable settings."""
    s = settings if isinstance(settings, PrunerSettings) else PrunerSettings.from_mapping(settings)
    if scorer is None and s.scorer_options:
        from ...methods import method

        scorer = method(s.scorer, **s.scorer_options)
    return ContextPruner(
        scorer if scorer is not None else s.scorer, s.budget(),
        granularity=s.granularity, scope=s.scope, diversity=s.diversity, keep_order=s.keep_order,
        force_keep=list(s.force_keep), strict=s.strict, tokenizer=_tokenizer(s.tokenizer),
        context_weight=s.context_weight, feedback=s.feedback, lead_weight=s.lead_weight,
    )


def pydantic_fields() -> dict[str, Any]:
    """``{name: (type, default)}`` of :class:`PrunerSettings`, for ``pydantic.create_model``."""
    hints = typing.get_type_hints(PrunerSettings)
    return {f.name: (hints[f.name], f.default) for f in dataclasses.fields(PrunerSettings)}


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
