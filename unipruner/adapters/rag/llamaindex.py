"""LlamaIndex plugin: :class:`UniprunerPostprocessor`, a ``BaseNodePostprocessor``.

Use it as ``index.as_query_engine(node_postprocessors=[UniprunerPostprocessor(...)])`` or call
``postprocess_nodes(nodes, query_str=...)``. Every node stays its own node (with its id,
relationships and own metadata, unlike LlamaIndex's LLMLingua postprocessor that joins all
nodes into one and copies every node's metadata onto it); its retriever score is kept and
unipruner's scores go under ``metadata["unipruner"]``.
"""

from __future__ import annotations

from typing import Any

from ...errors import UniprunerError
from ...models import require

require("llama_index.core", "llamaindex")

from llama_index.core.bridge.pydantic import PrivateAttr, create_model  # noqa: E402
from llama_index.core.postprocessor.types import BaseNodePostprocessor  # noqa: E402
from llama_index.core.schema import NodeWithScore, QueryBundle, TextNode  # noqa: E402

from ._plugin import META_KEY, PrunerSettings, annotate, make_pruner, pydantic_fields  # noqa: E402
from ._pruner import ContextPruner  # noqa: E402

__all__ = ["UniprunerPostprocessor"]


class _PostprocessorBase(BaseNodePostprocessor):
    """Prune retrieved LlamaIndex nodes to a token budget (unipruner's ContextPruner).

    Query-aware context pruning as in Provence (Chirkova et al., ICLR 2025) and AttentionRAG
    (Fang et al., 2025), preserving node boundaries, metadata and scores.

    Fields: those of :class:`~unipruner.adapters.rag._plugin.PrunerSettings`, shared by all three
    plugins (see :class:`unipruner.adapters.rag.langchain.UniprunerCompressor`).
    """

    _pruner: ContextPruner = PrivateAttr()

    def model_post_init(self, context: Any, /) -> None:
        """Build (and validate) the pruner once."""
        self._pruner = make_pruner(self.settings)

    @property
    def settings(self) -> PrunerSettings:
        """The plugin's settings as one value."""
        return PrunerSettings.from_mapping({name: getattr(self, name) for name in pydantic_fields()})

    @classmethod
    def class_name(cls) -> str:
        """LlamaIndex's serialisation name."""
        return "UniprunerPostprocessor"

    @property
    def pruner(self) -> ContextPruner:
        """The underlying :class:`ContextPruner`."""
        return self._pruner

    def _postprocess_nodes(self, nodes: list[NodeWithScore],
                           query_bundle: QueryBundle | None = None) -> list[NodeWithScore]:
        if query_bundle is None:
            raise UniprunerError("UniprunerPostprocessor needs the query: pass query_bundle= or query_str=")
        if not nodes:
            return []
        items = [{"text": n.node.get_content(), "metadata": n.node.metadata} for n in nodes]
        result = self._pruner.prune(query_bundle.query_str, items)
        out = []
        for p in result.documents:
            src = nodes[p.index]
            node = src.node.model_copy(deep=True)
            if not isinstance(node, TextNode):
                raise UniprunerError(f"node {p.index} is a {type(node).__name__}; only text nodes can be pruned")
            node.set_content(p.text)
            node.metadata = annotate(src.node.metadata, p, result.stats, src.score)
            for keys in (node.excluded_llm_metadata_keys, node.excluded_embed_metadata_keys):
                if META_KEY not in keys:
                    keys.append(META_KEY)  # the scores must not leak into the prompt or embeddings
            out.append(NodeWithScore(node=node, score=src.score))
        return out


UniprunerPostprocessor = create_model(  # fields generated from the one settings definition
    "UniprunerPostprocessor", __base__=_PostprocessorBase, __module__=__name__,
    __doc__=_PostprocessorBase.__doc__, **pydantic_fields(),
)
