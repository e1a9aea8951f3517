"""The ``multihop`` RAG scorer: title hops, lead entities, whole-document packing, bad input."""

from __future__ import annotations

import re

import pytest
import torch

import unipruner
from unipruner.adapters.rag import BM25Scorer, ContextPruner, make_scorer
from unipruner.adapters.rag._multihop import MultihopScorer, lead_entity, normalise_title, title_match
from unipruner.adapters.rag._split import unit_spans
from unipruner.errors import UniprunerError

QUESTION = "What government position was held by the woman who starred in the film Kiss and Tell?"
DOCS = [  # a two-hop question: the answer is in the bridge document, which shares few words with the question
    {"text": "Meet Corliss Archer is a radio show. The woman in the film was not in it. It ran on CBS.",
     "metadata": {"title": "Meet Corliss Archer"}},
    {"text": "Shirley Temple Black was an American actress. She was born in 1928. "
             "She later held the position of Chief of Protocol.", "metadata": {"title": "Shirley Temple"}},
    {"text": "Radio dramas had roles for a woman. Some held a government position after the war.",
     "metadata": {"title": "Radio drama"}},
    {"text": "Kiss and Tell is a 1945 film. It starred Shirley Temple as Corliss Archer. It was a hit.",
     "metadata": {"title": "Kiss and Tell (1945 film)"}},
]


def _no_titles(docs: list[dict]) -> list[str]:
    return [d["text"] for d in docs]


def test_titles_and_lead_entities() -> None:
    assert normalise_title("Kiss_and_Tell (1945 film)") == ["kiss", "and", "tell"]
    assert lead_entity("Shirley Temple Black (born 1928) was an actress.") == "Shirley Temple Black"
    assert lead_entity("The Bank of England is a bank.") == "The Bank of England"
    assert lead_entity("Kiss and Tell. Kiss and Tell is a film.") == "Kiss and Tell"
    assert lead_entity("in 1928 it rained.") == ""
    words = "who starred in kiss and tell".split()
    assert title_match(["kiss", "and", "tell"], words, set(words)) == 1.0
    assert title_match(["the", "of"], words, set(words)) == 0.0  # only stop words: never a match
    assert title_match(["kiss", "tell"], words, set(words)) == 0.9  # every word, not as a phrase
    assert title_match(["kiss", "me", "now", "please"], words, set(words)) == 0.25 ** 2


def test_hop_one_then_bridge_with_titles() -> None:
    s = MultihopScorer()
    titles = [d["metadata"]["title"] for d in DOCS]
    d = s.document_scores(QUESTION, _no_titles(DOCS), titles)
    order = d.argsort(descending=True).tolist()
    # hop 1: "Kiss and Tell" is in the question; hop 2: "Shirley Temple" is in the Kiss and Tell text,
    # ahead of the lexical distractor that repeats the question's words
    assert order[:2] == [3, 1]
    bm25 = torch.cat(BM25Scorer().score(QUESTION, _no_titles(DOCS), [[(0, len(t))] for t in _no_titles(DOCS)]))
    assert float(bm25[2]) > float(bm25[1])  # which BM25 alone would rank above the bridge


def test_without_titles_the_lead_entity_is_the_title() -> None:
    s = MultihopScorer()
    d = s.document_scores(QUESTION, _no_titles(DOCS))  # leads: Meet Corliss Archer, Shirley Temple Black, ...
    assert d.argsort(descending=True).tolist()[:2] == [3, 1]
    # through ContextPruner: dicts without a title and plain strings give the same scores
    p = ContextPruner("multihop", 0.25)
    a = p.score(QUESTION, _no_titles(DOCS)).scores
    b = p.score(QUESTION, [{"text": t, "metadata": {}} for t in _no_titles(DOCS)]).scores
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def _naive(query: str, texts: list[str], titles: list[str], s: MultihopScorer) -> list[list[float]]:
    """The documented formula, in plain Python (BM25 from the package's scorer)."""
    def z(xs: list[float]) -> list[float]:
        m = sum(xs) / len(xs)
        sd = (sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) ** 0.5
        return [(x - m) / max(sd, 1e-9) for x in xs]

    def words(t: str) -> list[str]:
        return re.findall(r"\w+", t.lower())

    def match(title: list[str], text: list[str]) -> float:
        content = [w for w in title if w not in {"the", "of", "and", "a", "in", "is"}]
        if not content:
            return 0.0
        if " ".join(title) in " ".join(text) and any(text[i:i + len(title)] == title for i in range(len(text))):
            return 1.0
        f = sum(w in text for w in content) / len(content)
        return 0.9 if f == 1 else f * f

    tw = [normalise_title(t) for t in titles]
    base = [float(x) for x in torch.cat(BM25Scorer().score(query, texts, [[(0, len(t))] for t in texts]))]
    hop1 = [match(t, words(query)) for t in tw]
    first = list(hop1)
    best = max(range(len(texts)), key=lambda i: (base[i], -i))
    first[best] = min(first[best] + 0.5, 1.0)
    hop2 = [max([first[h] * match(tw[d], words(texts[h])) for h in range(len(texts)) if h != d] + [0.0])
            for d in range(len(texts))]
    doc = z([b + s.hop_weight * x + s.bridge_weight * y for b, x, y in zip(z(base), hop1, hop2, strict=True)])
    spans = [unit_spans(t, "sentence") for t in texts]
    unit = z([float(x) for x in torch.cat(BM25Scorer().score(query, texts, spans))])
    out, k = [], 0
    for d, sp in enumerate(spans):
        row = []
        for j in range(len(sp)):
            row.append(s.doc_weight * doc[d] + unit[k] + s.lead_bonus * (j == 0))
            k += 1
        out.append(row)
    return out


@pytest.mark.parametrize("params", [{}, {"doc_weight": 0.5, "lead_bonus": 0.0}, {"hop_weight": 4.0,
                                                                                  "bridge_weight": 0.2}])
def test_scores_match_a_naive_reference(params: dict) -> None:
    s = MultihopScorer(**params)
    texts = _no_titles(DOCS)
    titles = [d["metadata"]["title"] for d in DOCS]
    got = s.score(QUESTION, texts, [unit_spans(t, "sentence") for t in texts], titles=titles)
    want = _naive(QUESTION, texts, titles, s)
    for g, w in zip(got, want, strict=True):
        assert torch.allclose(g, torch.tensor(w), atol=1e-4)


def test_packing_keeps_few_whole_documents() -> None:
    assert "Chief of Protocol" in ContextPruner("multihop", 0.5).prune(QUESTION, DOCS).text()  # in the bridge
    whole = MultihopScorer(doc_weight=10.0)  # the document score decides: whole documents in document order
    r = ContextPruner(whole, 0.5, strict=False).prune(QUESTION, DOCS)
    assert "Chief of Protocol" in r.text()
    assert [d.index for d in r.documents] == [1, 3]  # two whole documents, not slivers of four
    assert all(len(d.kept_units) == len(d.units) for d in r.documents)
    strict = ContextPruner(whole, 0.5).prune(QUESTION, DOCS)  # exactly the budget: the bridge's last unit is cut
    assert [d.index for d in strict.documents] == [1, 3] and strict.stats.tokens_after == strict.stats.target_tokens
    assert ContextPruner("multihop").context_weight == 0.0


def test_single_hop_and_no_titles_still_work() -> None:
    docs = ["Paris is the capital of France. It is on the Seine.",
            "Bananas are yellow. They grow in the tropics.",
            "the capital of a country is a city. capitals hold governments."]
    r = ContextPruner("multihop", 0.4).prune("What is the capital of France?", docs)
    assert r.text().startswith("Paris is the capital of France.")


def test_registry_entry_reaches_the_scorer() -> None:
    s = make_scorer(unipruner.method("multihop", hop_weight=1.0, bridge_weight=0.5, doc_weight=2.0,
                                     lead_bonus=0.0, k1=1.2, b=0.5, dense_weight=0.5))
    assert isinstance(s, MultihopScorer)
    assert (s.hop_weight, s.bridge_weight, s.doc_weight, s.lead_bonus, s.k1, s.b, s.dense_weight) == (
        1.0, 0.5, 2.0, 0.0, 1.2, 0.5, 0.5)
    assert "multihop" in {m.name for m in unipruner.methods(domain="rag")}


def test_bad_input() -> None:
    s = MultihopScorer()
    with pytest.raises(UniprunerError, match="non-empty string"):
        s.score("  ", ["a b"], [[(0, 3)]])
    with pytest.raises(UniprunerError, match="non-empty string"):
        ContextPruner("multihop").prune("", ["a b"])
    with pytest.raises(UniprunerError, match="no documents"):
        ContextPruner("multihop").prune("q?", [])
    with pytest.raises(UniprunerError, match="empty"):
        ContextPruner("multihop").prune("q?", ["fine text.", "   "])
    with pytest.raises(UniprunerError, match="text must be a str"):
        ContextPruner("multihop").prune("q?", [{"text": 3}])
    with pytest.raises(UniprunerError, match="titles"):
        s.score("q?", ["a b"], [[(0, 3)]], titles=["x", "y"])
    with pytest.raises(UniprunerError, match="title must be a str"):
        s.score("q?", ["a b"], [[(0, 3)]], titles=[5])  # type: ignore[list-item]
    assert s.score("q?", [], []) == []  # no documents: nothing to score
    empty = s.score("q?", ["", "x y"], [[], [(0, 3)]])  # a document without units scores none
    assert [e.shape for e in empty] == [(0,), (1,)]
    # a non-string title in metadata is ignored by the pruner (lead entity instead), never a crash
    ContextPruner("multihop").prune("q?", [{"text": "Some text here.", "metadata": {"title": 3}}])


def test_multihop_is_the_default_everywhere() -> None:
    from unipruner.adapters.rag._plugin import PrunerSettings, make_pruner

    assert ContextPruner().scorer.name == "multihop"
    assert PrunerSettings().scorer == "multihop" and make_pruner({}).scorer.name == "multihop"
    r = ContextPruner(budget=0.5).prune(QUESTION, DOCS)  # titles from metadata reach the default scorer
    assert "Chief of Protocol" in r.text() and r.stats.scorer == "multihop"


def test_dense_weight_adds_minilm_similarity() -> None:
    from unipruner.adapters.rag import EmbeddingScorer

    def z(x: torch.Tensor) -> torch.Tensor:
        return (x - x.mean()) / x.std()

    texts, titles = _no_titles(DOCS), [d["metadata"]["title"] for d in DOCS]
    spans = [unit_spans(t, "sentence") for t in texts]
    w = 0.7
    got = torch.cat(MultihopScorer(dense_weight=w).score(QUESTION, texts, spans, titles=titles))
    du, dd = EmbeddingScorer().score_with_documents(QUESTION, texts, spans)
    doc = z(MultihopScorer().document_scores(QUESTION, texts, titles) + w * z(dd))
    unit = z(torch.cat(BM25Scorer().score(QUESTION, texts, spans))) + w * z(torch.cat(du))
    sizes = torch.tensor([len(s) for s in spans])
    lead = torch.zeros(int(sizes.sum()))
    lead[torch.cumsum(sizes, 0) - sizes] = 1.0
    assert torch.allclose(got, 2.0 * torch.repeat_interleave(doc, sizes) + unit + lead, atol=1e-5)
    whole = EmbeddingScorer().score_with_documents(QUESTION, texts, [[(0, len(t))] for t in texts])[1]
    assert torch.allclose(MultihopScorer(dense_weight=w).document_scores(QUESTION, texts, titles),  # whole texts
                          MultihopScorer().document_scores(QUESTION, texts, titles) + w * z(whole), atol=1e-5)


def test_a_heading_first_unit_passes_the_lead_bonus_on() -> None:
    texts = ["Shirley Temple. Shirley Temple was an actress. She held a post.",
             "No heading here: this first sentence is long enough. Second."]
    spans = [unit_spans(t, "sentence") for t in texts]
    with_lead = MultihopScorer(lead_bonus=1.0).score("Who was Shirley Temple?", texts, spans)
    without = MultihopScorer(lead_bonus=0.0).score("Who was Shirley Temple?", texts, spans)
    diff = [(a - b).tolist() for a, b in zip(with_lead, without, strict=True)]
    assert diff[0] == pytest.approx([1.0, 1.0, 0.0], abs=1e-5) and diff[1] == pytest.approx([1.0, 0.0], abs=1e-5)


def test_scorer_options_reach_the_scorer_from_every_plugin() -> None:
    from unipruner.adapters.rag._plugin import PrunerSettings, make_pruner
    from unipruner.adapters.rag.haystack import UniprunerContextPruner
    from unipruner.adapters.rag.langchain import UniprunerCompressor
    from unipruner.adapters.rag.llamaindex import UniprunerPostprocessor

    opts = {"doc_weight": 3.5, "lead_bonus": 0.5}
    for make in (UniprunerCompressor, UniprunerPostprocessor, UniprunerContextPruner):
        pruner = make(scorer_options=opts).pruner  # the default scorer, multihop, with these options
        assert (pruner.scorer.name, pruner.scorer.doc_weight, pruner.scorer.lead_bonus) == ("multihop", 3.5, 0.5)
    assert PrunerSettings.from_mapping({"scorer_options": opts}).to_dict()["scorer_options"] == opts
    with pytest.raises(UniprunerError, match="has no parameter"):
        make_pruner({"scorer_options": {"doc_wieght": 1.0}})
    with pytest.raises(UniprunerError, match="must be a mapping"):
        make_pruner({"scorer_options": [1, 2]})


def test_a_question_naming_two_documents_keeps_both_leads() -> None:
    """Comparison questions ("X or Y?"): the lead sentence of each named document before the rest of either."""
    texts = [
        "Edward Albee. Edward Albee was an American playwright. The playwright Edward Albee was born earlier "
        "than his rival playwright, people said. Playwright Edward Albee: was he born earlier or later?",
        "J. M. Barrie. Sir James Matthew Barrie was a Scottish novelist born in 1860. He wrote Peter Pan.",
        "Theatre. A playwright writes plays for the theatre.",
    ]
    titles = ["Edward Albee", "J. M. Barrie", "Theatre"]
    q = "Which playwright was born earlier, Edward Albee or J. M. Barrie?"
    spans = [unit_spans(t, "sentence") for t in texts]
    barrie_lead = len(spans[0]) + 1  # after its "J. M. Barrie." heading
    for bonus, first in ((5.0, True), (0.0, False)):
        sc = torch.cat(make_scorer(unipruner.method("multihop", named_lead_bonus=bonus)).score(
            q, texts, spans, titles=titles))
        albee_rest = sc[2:len(spans[0])]  # Albee's sentences after its lead
        assert bool((sc[barrie_lead] > albee_rest).all()) is first
    with pytest.raises(UniprunerError, match="named_lead_bonus"):
        make_scorer(unipruner.method("multihop", named_lead_bonus=float("inf")))
