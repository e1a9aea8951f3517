"""Prune retrieved context in a LangChain RAG chain with unipruner (offline, CPU).

    python examples/rag_langchain.py

An in-memory retriever over three documents, ``ContextualCompressionRetriever`` with
:class:`unipruner.adapters.rag.langchain.UniprunerCompressor` (all-MiniLM-L6-v2 embedding
scorer, about half the tokens kept across the documents, whole sentences), and the pruned context per document with
its metadata and scores.
"""

from __future__ import annotations

from langchain_classic.retrievers import ContextualCompressionRetriever
from langchain_core.documents import Document
from langchain_core.embeddings import DeterministicFakeEmbedding
from langchain_core.vectorstores import InMemoryVectorStore

from unipruner.adapters.rag.langchain import UniprunerCompressor

DOCS = [
    Document("The Eiffel Tower stands in Paris. It was completed in 1889 for the World's Fair. "
             "Its iron lattice was designed by Gustave Eiffel's company.", metadata={"source": "tower.txt"}),
    Document("Bananas are yellow fruit. They grow in warm places and are rich in potassium.",
             metadata={"source": "fruit.txt"}),
    Document("Paris is the capital of France. The city lies on the river Seine and has about two million "
             "inhabitants.", metadata={"source": "paris.txt"}),
]


def main() -> None:
    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=32))
    store.add_documents(DOCS)
    retriever = ContextualCompressionRetriever(
        base_compressor=UniprunerCompressor(scorer="query_similarity", ratio=0.5, strict=False),
        base_retriever=store.as_retriever(search_kwargs={"k": 3}),
    )
    question = "When was the Eiffel Tower completed?"
    for doc in retriever.invoke(question):
        rec = doc.metadata["unipruner"]
        print(f"[{doc.metadata['source']}] {rec['tokens_after']}/{rec['tokens_before']} tokens, "
              f"score {rec['score']:.2f}: {doc.page_content}")


if __name__ == "__main__":
    main()
