"""Haystack 2.x plugin: :class:`UniprunerContextPruner`, a ``@component``.

``run(query, documents)`` returns ``{"documents": [...]}``: one output ``Document`` per
surviving input document, with its id, score and metadata, pruned content, and unipruner's
scores under ``meta["unipruner"]``. Models load in ``warm_up()``; ``to_dict`` / ``from_dict``
round-trip the settings.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from ...models import require

require("haystack", "haystack")

from haystack import Document, component, default_from_dict, default_to_dict  # noqa: E402

from ._plugin import PrunerSettings, annotate, make_pruner  # noqa: E402
from ._pruner import ContextPruner  # noqa: E402

__all__ = ["UniprunerContextPruner"]


@component
class UniprunerContextPruner:
    """Prune retrieved Haystack documents to a token budget (unipruner's ContextPruner).

    Query-aware context pruning as in Provence (Chirkova et al., ICLR 2025) and AttentionRAG
    (Fang et al., 2025), preserving document boundaries, metadata and scores.

    Parameters
    ----------
    **settings
        The fields of :class:`~unipruner.adapters.rag._plugin.PrunerSettings` (``scorer``,
        ``ratio`` / ``keep`` / ``threshold``, ``granularity``, ``scope``, ``diversity``,
        ``keep_order``, ``force_keep``, ``strict``, ``context_weight``, ``feedback``,
        ``lead_weight``, ``tokenizer``), shared by all three plugins; unknown names are an error.
    """

    def __init__(self, **settings: Any) -> None:
        self.settings: dict[str, Any] = PrunerSettings.from_mapping(settings).to_dict()
        self.pruner: ContextPruner = make_pruner(self.settings)  # validates now; models load lazily
        self._warm = False

    def warm_up(self) -> None:
        """Load the scorer's model (a tiny dummy prune)."""
        if not self._warm:
            self.pruner.prune("warm up", ["Warm up the model."], 1.0)
            self._warm = True

    def to_dict(self) -> dict[str, Any]:
        """Serialise the settings."""
        return default_to_dict(self, **self.settings)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UniprunerContextPruner:
        """Rebuild from :meth:`to_dict`'s output."""
        return default_from_dict(cls, data)

    @component.output_types(documents=list[Document])
    def run(self, query: str, documents: list[Document]) -> dict[str, list[Document]]:
        """Prune ``documents`` for ``query``; see the class docstring."""
        if not documents:
            return {"documents": []}
        items = [{"text": d.content or "", "metadata": d.meta} for d in documents]
        result = self.pruner.prune(query, items)
        out = []
        for p in result.documents:
            src = documents[p.index]
            out.append(replace(src, content=p.text, meta=annotate(src.meta, p, result.stats, src.score)))
        return {"documents": out}

    @component.output_types(documents=list[Document])
    async def run_async(self, query: str, documents: list[Document]) -> dict[str, list[Document]]:
        """Async variant of :meth:`run` (the pruning runs in a worker thread)."""
        import asyncio

        return await asyncio.to_thread(self.run, query, documents)
