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
from pydantic import ConfigDict, PrivateAttr, create_model  # noqa: E402

from ._plugin import PrunerSettings, annotate, make_pruner, pydantic_fields  # noqa: E402
from ._pruner import ContextPruner  # noqa: E402

__all__ = ["UniprunerCompressor"]


class _CompressorBase(BaseDocumentCompressor):
    """Prune retrieved LangChain documents to a token budget (unipruner's ContextPruner).

    Query-aware context pruning as in Provence (Chirkova et al., ICLR 2025) and AttentionRAG
    (Fang et al., 2025), without losing document boundaries, metadata or scores (LangChain's
    LLMLingua compressor joins everything into one document).

    Fields: those of :class:`~unipruner.adapters.rag._plugin.PrunerSettings` (``scorer`` — a
    registry method of the ``rag`` domain —, ``ratio`` / ``keep`` / ``threshold`` (default ratio
    0.25), ``granularity``, ``scope``, ``diversity``, ``keep_order``, ``force_keep``, ``strict``,
    ``context_weight``, ``feedback``, ``lead_weight``, ``tokenizer``), shared by all three plugins.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)
    _pruner: ContextPruner = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        """Build (and validate) the pruner once."""
        self._pruner = make_pruner(self.settings)

    @property
    def settings(self) -> PrunerSettings:
        """The plugin's settings as one value."""
        return PrunerSettings.from_mapping({name: getattr(self, name) for name in pydantic_fields()})

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


UniprunerCompressor = create_model(  # fields generated from the one settings definition
    "UniprunerCompressor", __base__=_CompressorBase, __module__=__name__, __doc__=_CompressorBase.__doc__,
    **pydantic_fields(),
)
