"""The LangChain, LlamaIndex and Haystack plugins inside real pipelines of their frameworks."""

from __future__ import annotations

import asyncio

import pytest

from unipruner.errors import UniprunerError

TEXTS = [
    ("The Eiffel Tower stands in Paris. It was built in 1889 for a world fair. Bananas are yellow.",
     {"source": "eiffel", "year": 1889}),
    ("Monkeys like bananas a lot. Bananas grow in warm places. They are rich in potassium.",
     {"source": "bananas"}),
    ("Paris is the capital of France. The city lies on the river Seine.", {"source": "paris"}),
]
QUERY = "When was the Eiffel Tower built?"


# ----------------------------------------------------------------------------- LangChain


def _lc_retriever():  # type: ignore[no-untyped-def]
    from langchain_core.documents import Document
    from langchain_core.embeddings import DeterministicFakeEmbedding
    from langchain_core.vectorstores import InMemoryVectorStore

    store = InMemoryVectorStore(DeterministicFakeEmbedding(size=16))
    store.add_documents([Document(page_content=t, metadata=m, id=m["source"]) for t, m in TEXTS])
    return store.as_retriever(search_kwargs={"k": 3})


def test_langchain_contextual_compression_retriever_and_chain() -> None:
    from langchain_classic.retrievers import ContextualCompressionRetriever
    from langchain_core.documents.compressor import BaseDocumentCompressor
    from langchain_core.language_models.fake import FakeListLLM
    from langchain_core.prompts import PromptTemplate
    from langchain_core.runnables import RunnableLambda, RunnablePassthrough

    from unipruner.adapters.rag.langchain import UniprunerCompressor

    comp = UniprunerCompressor(scorer="bm25", ratio=0.3)
    assert isinstance(comp, BaseDocumentCompressor)
    retriever = ContextualCompressionRetriever(base_compressor=comp, base_retriever=_lc_retriever())
    docs = retriever.invoke(QUERY)
    by_id = {d.id: d for d in docs}
    assert "eiffel" in by_id and "bananas" not in by_id  # a document can go whole under the global budget
    eiffel = by_id["eiffel"]
    assert "1889" in eiffel.page_content and "Bananas" not in eiffel.page_content
    assert eiffel.metadata["source"] == "eiffel" and eiffel.metadata["year"] == 1889
    rec = eiffel.metadata["unipruner"]
    assert rec["tokens_after"] < rec["tokens_before"] and len(rec["unit_scores"]) == 3
    assert abs(rec["query_ratio"] - 0.3) < 0.02

    seen: list[str] = []

    def fmt(ds: list) -> str:  # type: ignore[type-arg]
        seen.append("\n\n".join(d.page_content for d in ds))
        return seen[-1]

    llm = FakeListLLM(responses=["1889"])
    prompt = PromptTemplate.from_template("Context:\n{context}\n\nQuestion: {question}\nAnswer:")
    chain = {"context": retriever | RunnableLambda(fmt), "question": RunnablePassthrough()} | prompt | llm
    assert chain.invoke(QUERY) == "1889"
    assert "1889" in seen[0] and "potassium" not in seen[0]

    adocs = asyncio.run(retriever.ainvoke(QUERY))
    assert [d.page_content for d in adocs] == [d.page_content for d in docs]
    assert comp.compress_documents([], QUERY) == []


def test_langchain_bad_settings() -> None:
    from unipruner.adapters.rag.langchain import UniprunerCompressor

    # pydantic wraps our UniprunerError (a ValueError) into its ValidationError (also a ValueError)
    with pytest.raises(ValueError, match="granularity must be one of"):
        UniprunerCompressor(granularity="page")
    with pytest.raises(ValueError, match="give one of ratio"):
        UniprunerCompressor(ratio=0.5, keep=3)


# ----------------------------------------------------------------------------- LlamaIndex


def test_llamaindex_query_engine_with_mock_llm() -> None:
    from llama_index.core import Document, MockEmbedding, VectorStoreIndex
    from llama_index.core.llms import MockLLM
    from llama_index.core.postprocessor.types import BaseNodePostprocessor

    from unipruner.adapters.rag.llamaindex import UniprunerPostprocessor

    pp = UniprunerPostprocessor(scorer="bm25", ratio=0.3)
    assert isinstance(pp, BaseNodePostprocessor)
    docs = [Document(text=t, metadata=m, doc_id=m["source"]) for t, m in TEXTS]
    index = VectorStoreIndex.from_documents(docs, embed_model=MockEmbedding(embed_dim=8))
    engine = index.as_query_engine(llm=MockLLM(max_tokens=4), node_postprocessors=[pp], similarity_top_k=3)
    resp = engine.query(QUERY)
    nodes = resp.source_nodes
    sources = [n.node.metadata["source"] for n in nodes]
    assert "eiffel" in sources and "bananas" not in sources
    eiffel = nodes[sources.index("eiffel")]
    assert "1889" in eiffel.node.get_content() and "Bananas" not in eiffel.node.get_content()
    assert eiffel.score is not None and eiffel.node.metadata["unipruner"]["retriever_score"] == eiffel.score
    assert eiffel.node.ref_doc_id == "eiffel"  # relationships kept
    # the scores do not leak into what the LLM sees, and other nodes' metadata is not copied in
    llm_text = eiffel.node.get_content(metadata_mode="llm")
    assert "unit_scores" not in llm_text and "bananas" not in llm_text and "eiffel" in llm_text

    aresp = asyncio.run(engine.aquery(QUERY))
    assert [n.node.get_content() for n in aresp.source_nodes] == [n.node.get_content() for n in nodes]
    retrieved = index.as_retriever(similarity_top_k=3).retrieve(QUERY)
    direct = pp.postprocess_nodes(retrieved, query_str=QUERY)
    assert sorted(n.node.get_content() for n in direct) == sorted(n.node.get_content() for n in nodes)
    with pytest.raises(UniprunerError, match="needs the query"):
        pp.postprocess_nodes(retrieved)


# ----------------------------------------------------------------------------- Haystack


def test_haystack_pipeline_roundtrip_and_async() -> None:
    from haystack import Document, Pipeline
    from haystack.components.retrievers.in_memory import InMemoryBM25Retriever
    from haystack.document_stores.in_memory import InMemoryDocumentStore

    from unipruner.adapters.rag.haystack import UniprunerContextPruner

    store = InMemoryDocumentStore()
    store.write_documents([Document(content=t, meta=m, id=m["source"]) for t, m in TEXTS])

    def build() -> Pipeline:
        pipe = Pipeline()
        pipe.add_component("retriever", InMemoryBM25Retriever(document_store=store, top_k=3))
        pipe.add_component("pruner", UniprunerContextPruner(scorer="bm25", ratio=0.6, force_keep=["Seine"]))
        pipe.connect("retriever.documents", "pruner.documents")
        return pipe

    pipe = build()
    inputs = {"retriever": {"query": QUERY}, "pruner": {"query": QUERY}}
    out = pipe.run(inputs)["pruner"]["documents"]
    by_id = {d.id: d for d in out}
    assert "bananas" not in by_id
    eiffel = by_id["eiffel"]
    assert "1889" in eiffel.content and eiffel.meta["year"] == 1889
    assert eiffel.score is not None and eiffel.meta["unipruner"]["retriever_score"] == eiffel.score
    assert "Seine" in by_id["paris"].content  # force_keep

    again = Pipeline.loads(pipe.dumps(), allowed_modules=["unipruner.adapters.rag.haystack"])
    assert again.get_component("pruner").settings == pipe.get_component("pruner").settings
    assert [d.content for d in again.run(inputs)["pruner"]["documents"]] == [d.content for d in out]

    aout = asyncio.run(build().run_async(inputs))["pruner"]["documents"]  # Pipeline.run_async -> our run_async
    assert [d.content for d in aout] == [d.content for d in out]
    assert pipe.get_component("pruner").run(QUERY, []) == {"documents": []}


def test_haystack_bad_settings() -> None:
    from unipruner.adapters.rag.haystack import UniprunerContextPruner

    with pytest.raises(UniprunerError, match="scope"):
        UniprunerContextPruner(scope="all")
