"""RAG context pruning: splitter, scorers against naive references, budgets, bad input."""

from __future__ import annotations

import importlib
import itertools
import math
import re
import sys

import pytest
import torch

from unipruner import Budget
from unipruner.adapters.rag import (
    BM25Scorer,
    ContextPruner,
    EmbeddingScorer,
    FocalAttentionScorer,
    HybridScorer,
    RandomScorer,
    SelfInformationScorer,
    TokenCounter,
    aggregate_spans,
    rrf,
    split_sentences,
    split_units,
    unit_spans,
)
from unipruner.errors import MissingDependencyError, UniprunerError

DOCS = [
    {"text": "Paris is the capital of France. It lies on the Seine. The city has many museums.",
     "metadata": {"source": "a", "score": 0.9}},
    {"text": "Bananas are yellow fruit. Monkeys like bananas a lot. Bananas grow in warm places.",
     "metadata": {"source": "b"}},
    {"text": "The Eiffel Tower stands in Paris. It was built in 1889 for a world fair.",
     "metadata": {"source": "c"}},
]
QUERY = "When was the Eiffel Tower in Paris built?"


# ----------------------------------------------------------------------------- splitting


def test_split_sentences_keeps_every_character_and_skips_abbreviations() -> None:
    text = ('Dr. Smith met Mr. Jones in the U.S. in 1945. "Really?" he asked!  Yes. '
            "It was written by F. Hugh Herbert. e.g. this stays. 3 apples fell.")
    sents = split_sentences(text)
    assert "".join(sents) == text
    assert [s.strip() for s in sents] == [
        "Dr. Smith met Mr. Jones in the U.S. in 1945.", '"Really?" he asked!', "Yes.",
        "It was written by F. Hugh Herbert. e.g. this stays.", "3 apples fell.",
    ]


@pytest.mark.parametrize("granularity", ["sentence", "token", "chunk"])
def test_units_tile_the_text(granularity: str) -> None:
    text = "  First para. Second sentence here.\n\nNew paragraph, with words.  \n\n\nLast one"
    spans = unit_spans(text, granularity)
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(spans))
    assert all(text[s:e].strip() for s, e in spans)
    if granularity == "token":
        assert [text[s:e].strip() for s, e in spans] == text.split()
    if granularity == "chunk":
        assert len(spans) == 3
    assert "".join(split_units(text, granularity)) == text


# ----------------------------------------------------------------------------- scorers vs references


def test_aggregate_spans_matches_naive_loop() -> None:
    g = torch.Generator().manual_seed(0)
    units = torch.tensor([[0, 10], [10, 25], [25, 26], [26, 60]])
    starts = torch.sort(torch.randint(0, 60, (40,), generator=g)).values
    tok = torch.stack([starts, starts + 1], 1)
    tok[3] = tok[3, :1].repeat(2)  # an empty span is ignored
    vals = torch.rand(40, generator=g)
    for reduce in ("mean", "max", "sum"):
        got = aggregate_spans(vals, tok, units, reduce)
        ref = []
        for s, e in units.tolist():
            mine = [float(v) for (a, b), v in zip(tok.tolist(), vals, strict=True) if b > a and s <= a < e]
            agg = {"mean": sum(mine) / max(len(mine), 1), "max": max(mine, default=0.0), "sum": sum(mine)}
            ref.append(agg[reduce] if mine else None)
        fill = min(r for r in ref if r is not None)
        assert torch.allclose(got, torch.tensor([fill if r is None else r for r in ref]), atol=1e-6)


def test_bm25_matches_textbook_formula() -> None:
    texts = [d["text"] for d in DOCS]
    spans = [unit_spans(t) for t in texts]
    got = torch.cat(BM25Scorer(k1=1.2, b=0.75).score(QUERY, texts, spans))
    units = [re.findall(r"\w+", t[s:e].lower()) for t, sp in zip(texts, spans, strict=True) for s, e in sp]
    q = set(re.findall(r"\w+", QUERY.lower()))
    avg = sum(map(len, units)) / len(units)
    n = len(units)
    ref = []
    for u in units:
        s = 0.0
        for t in q:
            df = sum(t in v for v in units)
            tf = u.count(t)
            w = math.log((n - df + 0.5) / (df + 0.5) + 1)
            s += w * tf * 2.2 / (tf + 1.2 * (1 - 0.75 + 0.75 * len(u) / avg))
        ref.append(s)
    assert torch.allclose(got, torch.tensor(ref), atol=1e-5)
    assert int(got.argmax()) == 6  # lexical match wins over the pronoun sentence that holds the answer
    assert units[6][:3] == ["the", "eiffel", "tower"]


@pytest.fixture(scope="module")
def minilm() -> EmbeddingScorer:
    return EmbeddingScorer()


def test_embedding_scorer_is_cosine_of_sentence_embeddings(minilm: EmbeddingScorer) -> None:
    texts = [d["text"] for d in DOCS]
    spans = [unit_spans(t) for t in texts]
    got = torch.cat(minilm.score(QUERY, texts, spans))
    units = [t[s:e].strip() for t, sp in zip(texts, spans, strict=True) for s, e in sp]
    emb = torch.as_tensor(minilm.model.encode([QUERY, *units]))
    ref = torch.nn.functional.cosine_similarity(emb[1:], emb[:1])
    assert torch.allclose(got, ref, atol=1e-5)
    assert units[int(got.argmax())].startswith("The Eiffel Tower")


def test_embedding_scorer_token_granularity(minilm: EmbeddingScorer) -> None:
    text = "Bananas grow slowly while the Eiffel Tower rises above Paris."
    spans = unit_spans(text, "token")
    sc = minilm.score("Eiffel Tower", [text], [spans])[0]
    words = [text[s:e].strip() for s, e in spans]
    assert sc.shape == (len(words),)
    best = {words[i] for i in torch.topk(sc, 2).indices.tolist()}
    assert best == {"Eiffel", "Tower"}


def test_embedding_prune_is_one_batched_forward(minilm: EmbeddingScorer, monkeypatch: pytest.MonkeyPatch) -> None:
    """Units, documents and the query of one prune go through one encode call; a feedback
    round on the same documents encodes only the expanded query (token states are cached)."""
    calls: list[int] = []
    real = EmbeddingScorer.encode_tokens

    def counting(self: EmbeddingScorer, texts: list[str]) -> object:
        calls.append(len(texts))
        return real(self, texts)

    monkeypatch.setattr(EmbeddingScorer, "encode_tokens", counting)
    n_units = sum(len(unit_spans(d["text"])) for d in DOCS)
    for pooling, n_texts in (("sentence", 1 + n_units), ("late", 1 + len(DOCS))):
        scorer = EmbeddingScorer(model=minilm._model(), pooling=pooling)
        calls.clear()
        ContextPruner(scorer, Budget(ratio=0.5)).prune(QUERY, DOCS)
        assert calls == [n_texts]
        calls.clear()
        ContextPruner(scorer, Budget(ratio=0.5), feedback=1).prune("Who built it?", DOCS)
        assert calls == [1, 1]  # cached texts: the query, then the expanded query


def test_embedding_document_scores_and_late_pooling(minilm: EmbeddingScorer) -> None:
    texts = [d["text"] for d in DOCS]
    spans = [unit_spans(t) for t in texts]
    units, docs = minilm.score_with_documents(QUERY, texts, spans)
    assert docs.shape == (len(texts),) and int(docs.argmax()) == 2
    # a document's embedding is the token-weighted mean of its units' token states
    m = minilm._model()
    enc = [m.encode([t[s:e].strip() for s, e in sp], output_value="token_embeddings") for t, sp in zip(texts, spans,
                                                                                                   strict=True)]
    q = torch.as_tensor(m.encode([QUERY]))
    ref = torch.stack([torch.cat([torch.as_tensor(x) for x in e]).mean(0) for e in enc])
    assert torch.allclose(docs, torch.nn.functional.cosine_similarity(ref, q), atol=1e-4)
    late = EmbeddingScorer(model=m, pooling="late")
    got = torch.cat(late.score(QUERY, texts, spans))
    assert got.shape == torch.cat(units).shape
    assert [t[s:e] for t, sp in zip(texts, spans, strict=True) for s, e in sp][int(got.argmax())].startswith(
        "The Eiffel Tower")
    # a document longer than the model's window is encoded in windows, every unit gets a score
    long = " ".join(f"Sentence number {i} talks about topic {i}." for i in range(120))
    sp = unit_spans(long)
    sc = late.score("topic 7", [long], [sp])[0]
    assert sc.shape == (len(sp),) and torch.isfinite(sc).all()
    with pytest.raises(UniprunerError, match="pooling"):
        EmbeddingScorer(pooling="max")


def test_embedding_threads_and_bf16(minilm: EmbeddingScorer) -> None:
    texts = [d["text"] for d in DOCS]
    spans = [unit_spans(t) for t in texts]
    ref = torch.cat(minilm.score(QUERY, texts, spans))
    before = torch.get_num_threads()
    fast = EmbeddingScorer(model=minilm._model(), threads=1, dtype="bfloat16")
    got = torch.cat(fast.score(QUERY, texts, spans))
    assert torch.get_num_threads() == before  # restored after the forward
    assert torch.allclose(got, ref, atol=0.05) and int(got.argmax()) == int(ref.argmax())
    with pytest.raises(UniprunerError, match="dtype"):
        EmbeddingScorer(dtype="int8")


def test_rrf_matches_hand_computation() -> None:
    a = torch.tensor([0.3, 0.9, 0.1, 0.5])  # ranks 3, 1, 4, 2
    b = torch.tensor([2.0, 1.0, 3.0, 0.0])  # ranks 2, 3, 1, 4
    ref = torch.tensor([1 / 63 + 1 / 62, 1 / 61 + 1 / 63, 1 / 64 + 1 / 61, 1 / 62 + 1 / 64])
    assert torch.allclose(rrf([a, b]), ref, atol=1e-7)
    assert torch.allclose(rrf([a, b], k=0.0), torch.tensor([1 / 3 + 1 / 2, 1 + 1 / 3, 1 / 4 + 1, 1 / 2 + 1 / 4]))
    with pytest.raises(UniprunerError, match="same length"):
        rrf([a, b[:2]])


def test_hybrid_scorer_fuses_bm25_and_embedding_ranks(minilm: EmbeddingScorer) -> None:
    texts = [d["text"] for d in DOCS]
    spans = [unit_spans(t) for t in texts]
    hyb = HybridScorer(dense=minilm)
    got = torch.cat(hyb.score(QUERY, texts, spans))
    lex = torch.cat(BM25Scorer().score(QUERY, texts, spans))
    den = torch.cat(minilm.score(QUERY, texts, spans))
    assert torch.allclose(got, rrf([lex, den]))
    units, docs = hyb.score_with_documents(QUERY, texts, spans)
    assert torch.allclose(torch.cat(units), got)
    ld = torch.cat(BM25Scorer().score(QUERY, texts, [[(0, len(t))] for t in texts]))
    assert torch.allclose(docs, rrf([ld, minilm.score_with_documents(QUERY, texts, spans)[1]]))
    r = ContextPruner("hybrid", Budget(ratio=0.3)).prune(QUERY, DOCS)
    assert "1889" in r.text() and r.stats.scorer == "hybrid"


def test_context_weight_default_depends_on_the_scorer() -> None:
    assert ContextPruner("bm25").context_weight == 0.5
    assert ContextPruner("query_similarity").context_weight == 0.25
    assert ContextPruner("query_similarity", context_weight=0.5).context_weight == 0.5


def test_lead_weight_promotes_first_units() -> None:
    base = ContextPruner("bm25", Budget(ratio=0.5)).score(QUERY, DOCS)
    lead = ContextPruner("bm25", Budget(ratio=0.5), lead_weight=10.0).score(QUERY, DOCS)
    firsts = [float(s[0]) for s in lead.scores]
    rest = [float(x) for s in lead.scores for x in s[1:]]
    assert min(firsts) > max(rest)
    assert torch.equal(torch.argsort(-torch.cat([s[1:] for s in base.scores])),
                       torch.argsort(-torch.cat([s[1:] for s in lead.scores])))


@pytest.fixture(scope="module")
def smollm2() -> tuple[object, object]:
    from unipruner.models import load_smollm2

    return load_smollm2()


def test_focal_attention_matches_eager_attention(smollm2: tuple[object, object]) -> None:
    model, tok = smollm2
    texts = ["The tower was built in 1889. Bananas are yellow.", "Paris is in France."]
    spans = [unit_spans(t) for t in texts]
    scorer = FocalAttentionScorer(model=model, tokenizer=tok, layers=[3, 5])
    got = scorer.score("When was the tower built?", texts, spans)
    # reference: eager attention maps of the full forward, last row, heads and layers averaged
    prompt = "Context:\n" + "\n\n".join(texts) + "\n\nQuestion: When was the tower built?\nAnswer:"
    enc = tok(prompt, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor([enc["input_ids"]])
    model.set_attn_implementation("eager")  # type: ignore[attr-defined]
    try:
        with torch.inference_mode():
            att = model(input_ids=ids, output_attentions=True).attentions  # type: ignore[operator]
    finally:
        model.set_attn_implementation("sdpa")  # type: ignore[attr-defined]
    row = torch.stack([att[i][0, :, -1] for i in (3, 5)]).mean(dim=(0, 1))
    starts = [len("Context:\n"), len("Context:\n") + len(texts[0]) + 2]
    for d in range(len(texts)):
        ref = []
        for s, e in spans[d]:
            vals = [float(row[j]) for j, (a, b) in enumerate(enc["offset_mapping"])
                    if b > a and starts[d] + s <= a < starts[d] + e]
            ref.append(sum(vals) / len(vals))
        assert torch.allclose(got[d], torch.tensor(ref), rtol=1e-3, atol=1e-6), (got[d], ref)


def test_self_information_matches_naive_surprisal(smollm2: tuple[object, object]) -> None:
    model, tok = smollm2
    texts = ["The tower was built in 1889. Bananas are yellow."]
    spans = [unit_spans(t) for t in texts]
    got = SelfInformationScorer(model=model, tokenizer=tok).score("When was it built?", texts, spans)[0]
    head = "Question: When was it built?\n\nContext:\n"
    enc = tok(head + texts[0], return_offsets_mapping=True, add_special_tokens=False)
    ids = enc["input_ids"]
    with torch.inference_mode():
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # type: ignore[operator]
    surprisal = [0.0] + [float(-torch.log_softmax(logits[j - 1], -1)[ids[j]]) for j in range(1, len(ids))]
    for u, (s, e) in enumerate(spans[0]):
        vals = [surprisal[j] for j, (a, b) in enumerate(enc["offset_mapping"])
                if b > a and len(head) + s <= a < len(head) + e]
        assert got[u].item() == pytest.approx(sum(vals) / len(vals), rel=1e-4)


# ----------------------------------------------------------------------------- budgets


@pytest.mark.parametrize("ratio", [0.05, 0.1, 0.25, 0.5, 0.8])
@pytest.mark.parametrize("scope", ["global", "document"])
def test_strict_ratio_is_exact(ratio: float, scope: str) -> None:
    p = ContextPruner("bm25", Budget(ratio=ratio), scope=scope)
    res = p.prune(QUERY, DOCS)
    c = TokenCounter()
    per_doc = [c.count(d["text"]) for d in DOCS]
    if scope == "global":
        assert res.stats.tokens_after == max(1, math.floor(sum(per_doc) * ratio + 0.5))
    else:
        want = {i: max(1, math.floor(n * ratio + 0.5)) for i, n in enumerate(per_doc)}
        assert {d.index: d.tokens_after for d in res.documents} == want
    assert res.stats.tokens_after == sum(d.tokens_after for d in res.documents)
    for d in res.documents:  # what the stats count is what the text holds
        assert c.count(d.text) == d.tokens_after


def test_short_input_meets_ratio_and_never_empties() -> None:
    res = ContextPruner("bm25", Budget(ratio=0.25)).prune("who", ["Just eight small words in this sentence."])
    assert res.stats.tokens_before == 8 and res.stats.tokens_after == 2
    assert res.text() == "Just eight"
    loose = ContextPruner("bm25", Budget(ratio=0.25), strict=False).prune("who", ["Just eight small words here ok."])
    assert loose.text() == "Just eight small words here ok."
    # the budget (2 of 7 tokens) is smaller than the only unit: it is kept whole, and the result says so
    assert loose.stats.units_after == 1 and loose.stats.tokens_after == 7
    assert any("smaller than the best unit" in n for n in loose.stats.notes), loose.stats.notes


def test_whole_units_closest_to_target() -> None:
    p = ContextPruner("bm25", Budget(ratio=0.3), strict=False)
    res = p.prune(QUERY, DOCS)
    assert abs(res.stats.tokens_after - 0.3 * res.stats.tokens_before) <= max(
        len(u.split()) + 3 for d in res.documents for u in d.units)
    assert all(d.partial_unit is None for d in res.documents)


def test_global_budget_drops_documents_and_keeps_metadata() -> None:
    docs = [dict(d, metadata=dict(d["metadata"])) for d in DOCS]
    before = [dict(d["metadata"]) for d in docs]
    res = ContextPruner("bm25", Budget(ratio=0.3), context_weight=0.0).prune(QUERY, docs)
    assert 1 in res.dropped and 2 not in res.dropped  # the banana document goes whole
    assert [d.index for d in res.documents] == [i for i in range(3) if i not in res.dropped]
    assert [d.metadata for d in res.documents] == [before[d.index] for d in res.documents]
    assert [d["metadata"] for d in docs] == before  # inputs untouched
    res.documents[0].metadata["x"] = 1
    assert "x" not in docs[0]["metadata"]
    assert "1889" in res.text()
    assert res.stats.documents_after == 3 - len(res.dropped) and res.stats.documents_before == 3
    assert len(res.documents[-1].unit_scores) == len(res.documents[-1].units) == 2


def test_keep_budget_and_order() -> None:
    res = ContextPruner("bm25", Budget(keep=10), keep_order=False).prune(QUERY, DOCS)
    assert res.stats.tokens_after == 10
    assert [d.score for d in res.documents] == sorted((d.score for d in res.documents), reverse=True)
    big = ContextPruner("bm25", Budget(keep=10_000)).prune(QUERY, DOCS)
    assert big.stats.tokens_after == big.stats.tokens_before
    assert any("more than the context holds" in n for n in big.stats.notes)


def test_threshold_keeps_best_unit_when_all_below_and_says_so() -> None:
    res = ContextPruner("bm25", Budget(threshold=1e9), context_weight=0.0).prune(QUERY, DOCS)
    assert res.stats.units_after == 1
    assert res.stats.notes and "kept the best unit" in res.stats.notes[0]
    knee = ContextPruner("bm25", Budget.auto()).prune(QUERY, DOCS)
    assert 1 <= knee.stats.units_after < knee.stats.units_before


def test_force_keep_and_diversity(minilm: EmbeddingScorer) -> None:
    res = ContextPruner("bm25", Budget(ratio=0.2), force_keep=[r"[Mm]onkeys"]).prune(QUERY, DOCS)
    assert "Monkeys like bananas" in res.text()
    dup = ["The Eiffel Tower was built in 1889. The Eiffel Tower was built in 1889. Paris is in France."]
    plain = ContextPruner(minilm, Budget(ratio=0.67), strict=False, context_weight=0.0).prune(QUERY, dup)
    div = ContextPruner(minilm, Budget(ratio=0.67), strict=False, context_weight=0.0, diversity=0.3).prune(QUERY, dup)
    assert plain.documents[0].kept_units == [0, 1]
    assert div.documents[0].kept_units == [0, 2]


def test_granularities_and_random_baseline() -> None:
    for g in ("token", "chunk"):
        res = ContextPruner("bm25", Budget(ratio=0.3), granularity=g).prune(QUERY, DOCS)
        assert res.stats.granularity == g
        assert res.stats.tokens_after == round(0.3 * res.stats.tokens_before)
    words = ContextPruner("bm25", Budget(keep=3), granularity="token", context_weight=0.0).prune(QUERY, DOCS)
    assert set(words.text(" ").replace(".", "").split()) <= {"Eiffel", "Tower", "Paris", "built", "was", "When"}
    r1 = ContextPruner(RandomScorer(seed=3), 0.5).prune(QUERY, DOCS).text()
    r2 = ContextPruner(RandomScorer(seed=3), 0.5).prune(QUERY, DOCS).text()
    assert r1 == r2


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"budget": Budget(ratio=0.0)}, "empty the context"),
    ({"budget": Budget(keep=0)}, "empty the context"),
    ({"granularity": "word"}, "granularity"),
    ({"scope": "corpus"}, "scope"),
    ({"diversity": 1.5}, "diversity"),
    ({"force_keep": ["("]}, "regular expressions"),
    ({"scorer": "bert"}, "unknown scorer"),
    ({"scorer": 3}, "scorer must be"),
    ({"context_weight": 2.0}, "context_weight"),
    ({"feedback": -1}, "feedback"),
    ({"lead_weight": -1.0}, "lead_weight"),
])
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    kw = {"scorer": "bm25", **kwargs}
    with pytest.raises(UniprunerError, match=match):
        ContextPruner(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("query", "docs", "match"), [
    ("", DOCS, "query"),
    ("  ", DOCS, "query"),
    (None, DOCS, "query"),
    (QUERY, [], "no documents"),
    (QUERY, "a string", "list of strings"),
    (QUERY, ["ok", "   "], "document 1 is empty"),
    (QUERY, [3], "must be a str"),
    (QUERY, [{"metadata": {}}], "without a 'text'"),
    (QUERY, [{"text": b"bytes"}], "text must be a str"),
    (QUERY, [{"text": "ok", "metadata": [1]}], "metadata must be a mapping"),
])
def test_bad_input(query: object, docs: object, match: str) -> None:
    with pytest.raises(UniprunerError, match=match):
        ContextPruner("bm25").prune(query, docs)  # type: ignore[arg-type]


def test_select_rejects_zero_budget_and_bad_layers() -> None:
    p = ContextPruner("bm25")
    with pytest.raises(UniprunerError, match="empty the context"):
        p.select(p.score(QUERY, DOCS), Budget(ratio=0.0))
    with pytest.raises(UniprunerError, match="layers"):
        FocalAttentionScorer(model=object(), tokenizer=object(), layers=[99])._layer_ids(30)


@pytest.mark.parametrize(("module", "framework", "extra"), [
    ("langchain", "langchain_core", "langchain"),
    ("llamaindex", "llama_index.core", "llamaindex"),
    ("haystack", "haystack", "haystack"),
])
def test_missing_framework_names_the_extra(monkeypatch: pytest.MonkeyPatch, module: str, framework: str,
                                          extra: str) -> None:
    monkeypatch.setitem(sys.modules, framework, None)
    monkeypatch.delitem(sys.modules, f"unipruner.adapters.rag.{module}", raising=False)
    with pytest.raises(MissingDependencyError, match=re.escape(f"pip install 'unipruner[{extra}]'")):
        importlib.import_module(f"unipruner.adapters.rag.{module}")


def test_demo_record_is_a_hotpotqa_question_with_two_gold_paragraphs() -> None:
    from unipruner.adapters.rag._demo import demo_documents

    question, docs, answers = demo_documents()
    assert question.endswith("?") and len(docs) == 10
    assert sum(d["metadata"]["gold"] for d in docs) == 2
    assert any(answers[0] in d["text"] for d in docs if d["metadata"]["gold"])
