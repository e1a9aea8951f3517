"""LangChain plugin: :class:`UniprunerCompressor`, a ``BaseDocumentCompressor``.

Use it in ``ContextualCompressionRetriever(base_compressor=UniprunerCompressor(...),
base_retriever=...)`` or as a step of any runnable chain. Each input ``Document`` stays one
output ``Document`` (documents with nothing kept are dropped), with its ``id``, its metadata
copied and unipruner's scores added under ``metadata["unipruner"]``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ...models import require

require("langchain_core", "langchain")

from langchain_core.callbacks import Callbacks  # noqa: E402
from langchain_core.documents import Document  # noqa: E402
from langchain_core.documents.compressor import BaseDocumentCompressor  # noqa: E402
from pydantic import ConfigDict, Field, PrivateAttr  # noqa: E402

from ._plugin import annotate, make_pruner  # noqa: E402
from ._pruner import ContextPruner  # noqa: E402

__all__ = ["UniprunerCompressor"]


class UniprunerCompressor(BaseDocumentCompressor):
    """Prune retrieved LangChain documents to a token budget (unipruner's ContextPruner).

    Query-aware context pruning as in Provence (Chirkova et al., ICLR 2025) and AttentionRAG
    (Fang et al., 2025), without losing document boundaries, metadata or scores (LangChain's
    LLMLingua compressor joins everything into one document).

    Parameters
    ----------
    scorer : str
        ``embedding`` | ``hybrid`` | ``focal_attention`` | ``self_information`` | ``bm25`` | ``random``.
    ratio, keep, threshold : budget (one of them; default ratio 0.25)
    granularity, scope, diversity, keep_order, force_keep, strict, context_weight, feedback :
        As for :class:`~unipruner.adapters.rag.ContextPruner`.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    scorer: str = "embedding"
    ratio: float | None = None
    keep: int | None = None
    threshold: float | None = None
    granularity: str = "sentence"
    scope: str = "global"
    diversity: float | None = None
    keep_order: bool = True
    force_keep: list[str] = Field(default_factory=list)
    strict: bool = True
    context_weight: float | None = None
    feedback: int = 0
    _pruner: ContextPruner = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        """Build (and validate) the pruner once."""
        self._pruner = make_pruner(self.model_dump())

    @property
    def pruner(self) -> ContextPruner:
        """The underlying :class:`ContextPruner`."""
        return self._pruner

    def compress_documents(self, documents: Sequence[Document], query: str,
                           callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Prune ``documents`` for ``query``; see the class docstring."""
        if not documents:
            return []
        items = [{"text": d.page_content, "metadata": d.metadata} for d in documents]
        result = self._pruner.prune(query, items)
        out = []
        for p in result.documents:
            src = documents[p.index]
            score = src.metadata.get("score") if isinstance(src.metadata.get("score"), (int, float)) else None
            out.append(Document(page_content=p.text, id=src.id,
                                metadata=annotate(src.metadata, p, result.stats, score)))
        return out

    async def acompress_documents(self, documents: Sequence[Document], query: str,
                                  callbacks: Callbacks | None = None) -> Sequence[Document]:
        """Async variant: runs the (CPU-bound) pruning in a worker thread."""
        import asyncio

        return await asyncio.to_thread(self.compress_documents, documents, query, callbacks)
