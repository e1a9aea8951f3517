"""The structure-aware ``multihop`` scorer: documents first (question titles, bridge titles), then units.

Multi-hop questions (HotpotQA, Yang et al., EMNLP 2018) name the first-hop entity and reach the
answer through a *bridge* document that shares few words with the question; HotpotQA's
distractors were retrieved by TF-IDF against the question, so lexical and embedding similarity
are pulled towards them. Paragraph selection that matches titles works (HGN, Fang et al., "Hierarchical
Graph Network for Multi-hop Question Answering", EMNLP 2020; MDR, Xiong et al., "Answering
Complex Open-Domain Questions with Multi-Hop Dense Retrieval", ICLR 2021; Baleen, Khattab et al.,
NeurIPS 2021, condense the first hop into the second hop's query):

1. **hop 1**: documents whose title (``metadata["title"]``, else the lead entity of the text)
   appears in the question, scored in ``[0, 1]`` (1 = the whole title as a phrase, else the
   squared fraction of its content words);
2. **hop 2**: documents whose title appears in the text of the best first-hop documents (the
   question-title matches, and the best lexical document);
3. a cheap lexical base (:class:`~unipruner.adapters.rag.BM25Scorer`, whole documents and units)
   orders documents within and beyond the hops;
4. units: the document score dominates (``doc_weight``), so the greedy packing of
   :class:`~unipruner.adapters.rag.ContextPruner` spends the budget on few whole documents in
   document order instead of slivers of many; within a document the lead sentence comes first
   (``lead_bonus``; also the second unit when the first is a heading of at most 6 words, e.g. a
   "Title." prefix), then the units by BM25.

No model: a prune of 10 paragraphs takes a few milliseconds at one thread.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ...errors import UniprunerError
from ._scorers import BM25Scorer, Spans, _check_texts

__all__ = ["MultihopScorer", "lead_entity", "normalise_title", "title_match"]

_WORD = re.compile(r"\w+")
_PAREN = re.compile(r"\s*\([^)]*\)")
#: words that do not identify an entity (a title made only of them never matches)
_STOP = frozenset("""a an the of and or in on at to for from by with as is was are were be been it its this that
these those de la le du von van der den di da el del who what which when where why how""".split())
_CONNECT = frozenset({"of", "the", "de", "la", "le", "du", "von", "van", "der", "den", "di", "da", "and", "&",
                      "for", "in", "on", "del", "el"})
_LEAD_WORD = re.compile(r"[^\s]+")
#: a first unit of at most this many words is a heading, not the lead sentence
_HEADING_WORDS = 6
#: a hop-1 match at least this strong names the document in the question (``named_lead_bonus``)
_NAMED = 0.9


def normalise_title(title: str) -> list[str]:
    """Lower-cased words of a title without its parenthetical disambiguation (``"Foo (band)"`` -> foo).

    >>> normalise_title("Kiss_and_Tell (1945 film)")
    ['kiss', 'and', 'tell']
    """
    return _WORD.findall(_PAREN.sub("", title.replace("_", " ")).lower().replace("_", " "))


def lead_entity(text: str, max_words: int = 6) -> str:
    """The text's lead entity: its leading capitalised words (connectors such as "of" inside).

    The topic of an encyclopedic passage is its first noun phrase ("Shirley Temple Black was an
    actress ..."); a passage that starts with a lower-case word has no lead entity (``""``).

    >>> lead_entity("Shirley Temple Black (April 23, 1928) was an American actress.")
    'Shirley Temple Black'
    >>> lead_entity("Kiss and Tell. Kiss and Tell is a 1945 film.")
    'Kiss and Tell'
    >>> lead_entity("it rained.")
    ''
    """
    words: list[str] = []
    for m in _LEAD_WORD.finditer(text[:200]):
        raw = m.group()
        w = raw.strip("\"'“”‘’()[],;:")
        if not w or raw.startswith(("(", "[")):  # a parenthesis (dates, pronunciations) ends the entity
            break
        if w[0].isupper() or w[0].isdigit():
            words.append(w.rstrip("."))
        elif w.lower() in _CONNECT and words:
            words.append(w)
        else:
            break
        if len(words) >= max_words or raw.endswith((".", ",", ";", ":", ")")) or "(" in raw[1:]:
            break
    while words and words[-1].lower() in _CONNECT:
        words.pop()
    return " ".join(words)


def _phrase_prefix(title: Sequence[str], text_words: Sequence[str]) -> int:
    """Length of the longest prefix of ``title`` found as a phrase in ``text_words`` (0 if none)."""
    best = 0
    for i, w in enumerate(text_words):
        if w != title[0]:
            continue
        k = 1
        while k < len(title) and i + k < len(text_words) and text_words[i + k] == title[k]:
            k += 1
        best = max(best, k)
        if best == len(title):
            break
    return best


def title_match(title: Sequence[str], text_words: Sequence[str], text_set: frozenset[str] | set[str],
                prefix: bool = False) -> float:
    """How well a title (normalised words) appears in a text, in ``[0, 1]``.

    1 for the whole phrase; with ``prefix=True`` (lead entities, which may run longer than the
    name used elsewhere: "Shirley Temple Black" mentioned as "Shirley Temple"), ``sqrt(k / n)``
    when only its first ``k >= 2`` of ``n`` words are there as a phrase; else
    the squared fraction of its content words present (0.9 if all, not as a phrase); 0 for a
    title of stop words only.

    >>> t = "who starred in kiss and tell".split()
    >>> title_match(["kiss", "and", "tell"], t, set(t)), title_match(["a", "kiss", "for", "corliss"], t, set(t))
    (1.0, 0.25)
    """
    content = [w for w in title if w not in _STOP]
    if not content:
        return 0.0
    n = len(title)
    k = _phrase_prefix(title, text_words)
    if k == n:
        return 1.0
    frac = sum(w in text_set for w in content) / len(content)
    bag = frac * frac if frac < 1.0 else 0.9  # every content word, not as a phrase
    part = (k / n) ** 0.5 if prefix and k >= 2 and any(w not in _STOP for w in title[:k]) else 0.0
    return max(bag, part)


def _standardise(x: Tensor) -> Tensor:
    if x.numel() < 2:
        return torch.zeros_like(x)
    return (x - x.mean()) / x.std().clamp(min=1e-9)


@dataclass
class MultihopScorer:
    """Structure-aware RAG scorer: question titles, bridge titles, then BM25 units (see the module docstring).

    Document score ``z(bm25(document)) + hop_weight * hop1 + bridge_weight * hop2`` (``z``:
    standardised over the query's documents); unit score ``doc_weight * z(document score) +
    z(bm25(unit)) + lead_bonus * [unit is the document's first]``.

    Parameters
    ----------
    hop_weight : float
        Weight of the question-title match (hop 1), in standard deviations of the base score.
    bridge_weight : float
        Weight of the bridge match (hop 2): this document's title in the best first-hop documents.
    doc_weight : float
        How much the document score dominates unit scores: large values pack whole documents in
        document order, 0 ranks units by BM25 alone.
    lead_bonus : float
        Added to each document's first unit (its lead sentence).
    named_lead_bonus : float
        When the question names two or more documents (hop-1 match >= 0.9: every content word of
        the title; comparison questions such as "Which is older, X or Y?"), added to the lead
        sentence of each of them, so that the budget covers every named entity before the rest
        of any one document (tuned on the HotpotQA dev split: 8x survival 0.883 -> 0.928).
    k1, b : float
        BM25's parameters.
    dense_weight : float
        ``0`` (default): no model. Else all-MiniLM-L6-v2 similarity
        (:class:`~unipruner.adapters.rag.EmbeddingScorer`, one forward for units and documents) is
        added, standardised and times this weight, to the base document score and to the unit
        scores (a neural rescoring stage; hundreds of milliseconds per question on a CPU).
    rerank : {"none", "auto", "onnx", "torch"}
        ``"none"`` (default): no model. Else the ``rerank_top_k`` best units of the cheap stage are
        rescored with all-MiniLM-L6-v2 (:class:`~unipruner.adapters.rag._rerank.MiniLMEncoder`:
        ``"onnx"`` = int8 ONNX built once into a user cache directory, ``"torch"`` = the torch
        model in bfloat16, ``"auto"`` = ONNX when onnxruntime is installed): each of them gets
        ``rerank_weight * z(cos(unit, query))`` added (``z`` standardised over the shortlist), so
        the shortlist is reordered and its weakest units may fall below the rest. Unit embeddings
        are cached across calls (LRU keyed by the unit text's hash).
    rerank_top_k : int
        Units rescored (the shortlist).
    rerank_weight : float
        Weight of the reranker, in standard deviations of the shortlist's cosines.
    rerank_cache_dir : str, optional
        Where the ONNX file is cached (default ``$UNIPRUNER_CACHE_DIR``, else
        ``$XDG_CACHE_HOME/unipruner``, else ``~/.cache/unipruner``).

    Examples
    --------
    >>> docs = ["Kiss and Tell. Kiss and Tell is a 1945 film starring Shirley Temple.",
    ...         "Shirley Temple. Shirley Temple was an actress. She served as Chief of Protocol.",
    ...         "Corliss Archer. Corliss Archer is a radio character in a film about a kiss."]
    >>> d = MultihopScorer().document_scores("Which office did the star of Kiss and Tell hold?", docs)
    >>> d.argsort(descending=True).tolist()
    [0, 1, 2]
    """

    hop_weight: float = 2.0
    bridge_weight: float = 1.5
    doc_weight: float = 2.0
    lead_bonus: float = 1.0
    k1: float = 1.5
    b: float = 0.75
    dense_weight: float = 0.0
    named_lead_bonus: float = 5.0
    rerank: str = "none"
    rerank_top_k: int = 16
    rerank_weight: float = 1.0
    rerank_cache_dir: str | None = None
    name: str = "multihop"
    #: ContextPruner passes ``titles=`` (``metadata["title"]`` of each document, else ``None``)
    uses_titles: bool = True
    _dense: Any = field(default=None, repr=False, compare=False)
    _encoder: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        from ._rerank import BACKENDS

        if self.rerank not in ("none", *BACKENDS):
            raise UniprunerError(f"rerank must be one of {('none', *BACKENDS)}, got {self.rerank!r}")
        k = self.rerank_top_k
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise UniprunerError(f"rerank_top_k must be an int >= 1, got {k!r}")
        for name in ("hop_weight", "bridge_weight", "doc_weight", "lead_bonus", "dense_weight", "named_lead_bonus",
                     "rerank_weight"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(float(v)):
                raise UniprunerError(f"{name} must be a finite number, got {v!r}")
        if self.rerank_cache_dir is not None and not isinstance(self.rerank_cache_dir, (str, os.PathLike)):
            raise UniprunerError(f"rerank_cache_dir must be a path or None, got {type(self.rerank_cache_dir).__name__}")

    def encoder(self) -> Any:
        """The reranker's :class:`~unipruner.adapters.rag._rerank.MiniLMEncoder` (built on first use)."""
        if self._encoder is None:
            from ._rerank import MiniLMEncoder

            self._encoder = MiniLMEncoder(backend="auto" if self.rerank == "none" else self.rerank,
                                          cache_dir=None if self.rerank_cache_dir is None
                                          else os.fspath(self.rerank_cache_dir))
        return self._encoder

    def _titles(self, texts: Sequence[str], titles: Sequence[str | None] | None) -> list[tuple[list[str], bool]]:
        """Each document's title words and whether they are a lead entity (no usable title given)."""
        if titles is not None and len(titles) != len(texts):
            raise UniprunerError(f"{len(texts)} texts but {len(titles)} titles")
        out = []
        for i, t in enumerate(texts):
            title = None if titles is None else titles[i]
            if title is not None and not isinstance(title, str):
                raise UniprunerError(f"document {i}: the title must be a str or None, got {type(title).__name__}")
            words = normalise_title(title) if title and title.strip() else []
            out.append((words, False) if words else (normalise_title(lead_entity(t)), True))
        return out

    def _embedder(self) -> Any:
        if self._dense is None:
            from ._scorers import EmbeddingScorer

            self._dense = EmbeddingScorer()
        return self._dense

    def document_scores(self, query: str, texts: Sequence[str], titles: Sequence[str | None] | None = None) -> Tensor:
        """One score per document (higher = more likely a hop of the question), ``[len(texts)]``.

        With ``dense_weight``, each whole text is embedded (:meth:`score` pools its units instead).
        """
        dense = None
        if self.dense_weight and len(texts):
            _check_texts(query, texts, [[] for _ in texts])
            dense = self._embedder().score_with_documents(query, texts, [[(0, len(t))] for t in texts])[1]
        return self._document_scores(query, texts, titles, dense)[0]

    def _document_scores(self, query: str, texts: Sequence[str], titles: Sequence[str | None] | None,
                         dense: Tensor | None) -> tuple[Tensor, Tensor]:
        """``(document scores, hop-1 matches)``, each ``[len(texts)]``."""
        _check_texts(query, texts, [[] for _ in texts])
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise UniprunerError(f"document {i}: text must be a str, got {type(t).__name__}")
        n = len(texts)
        if n == 0:
            return torch.zeros(0), torch.zeros(0)
        words = self._titles(texts, titles)
        base = torch.cat(BM25Scorer(k1=self.k1, b=self.b).score(query, texts, [[(0, len(t))] for t in texts]))
        q_words = _WORD.findall(query.lower())
        q_set = set(q_words)
        hop1 = torch.tensor([title_match(w, q_words, q_set, lead) for w, lead in words])
        # the best first-hop documents: question-title matches, and the best lexical document
        first = hop1.clone()
        first[int(torch.argmax(base))] = torch.clamp(first[int(torch.argmax(base))] + 0.5, max=1.0)
        text_words = [_WORD.findall(t.lower()) for t in texts]
        sets = [set(w) for w in text_words]
        # bridge[d, h]: document d's title in the text of document h (h != d); one loop per pair of documents
        bridge = torch.zeros(n, n)
        for h in range(n):
            if float(first[h]) <= 0.0:
                continue
            for d in range(n):
                if d != h and words[d][0]:
                    bridge[d, h] = title_match(words[d][0], text_words[h], sets[h], words[d][1])
        hop2 = (bridge * first[None, :]).amax(dim=1)
        out = _standardise(base) + self.hop_weight * hop1 + self.bridge_weight * hop2
        return (out if dense is None else out + self.dense_weight * _standardise(dense.float())), hop1

    def score(self, query: str, texts: Sequence[str], spans: Spans,
              titles: Sequence[str | None] | None = None) -> list[Tensor]:
        """Unit scores: the document's score dominates, then the lead sentence, then BM25."""
        _check_texts(query, texts, spans)
        if len(texts) == 0:
            return []
        sizes = torch.tensor([len(s) for s in spans], dtype=torch.long)
        if int(sizes.sum()) == 0:
            _check_texts(query, texts, spans)
            self._document_scores(query, texts, titles, None)  # the same input checks
            return [torch.zeros(0) for _ in texts]
        dense_units, dense_doc = None, None
        if self.dense_weight:  # one MiniLM forward for units and documents
            for i, t in enumerate(texts):
                if not isinstance(t, str):
                    raise UniprunerError(f"document {i}: text must be a str, got {type(t).__name__}")
            du, dense_doc = self._embedder().score_with_documents(query, texts, spans)
            dense_units = torch.cat(du)
        doc_raw, hop1 = self._document_scores(query, texts, titles, dense_doc)
        doc = _standardise(doc_raw)
        unit = _standardise(torch.cat(BM25Scorer(k1=self.k1, b=self.b).score(query, texts, spans)))
        if dense_units is not None:
            unit = unit + self.dense_weight * _standardise(dense_units.float())
        starts = torch.cumsum(sizes, 0) - sizes
        lead = torch.zeros(int(sizes.sum()))
        lead[starts[sizes > 0]] = 1.0
        # a first unit of a few words is a heading ("Title." prefixed to the text): the lead is the next one too
        first_words = torch.tensor([len(_WORD.findall(t[sp[0][0]:sp[0][1]])) if sp else 0
                                    for t, sp in zip(texts, spans, strict=True)])
        heading = (sizes > 1) & (first_words > 0) & (first_words <= _HEADING_WORDS)
        lead[starts[heading] + 1] = 1.0
        # a question that names two or more documents (comparison / intersection questions, e.g. "X or
        # Y?", "X and Y are both what?"): the lead sentence of each named document comes first
        named = hop1 >= _NAMED
        bonus = self.lead_bonus + (self.named_lead_bonus if int(named.sum()) >= 2 else 0.0) * named.float()
        lead = lead * torch.repeat_interleave(bonus, sizes)
        flat = self.doc_weight * torch.repeat_interleave(doc, sizes) + unit + lead
        if self.rerank != "none":
            flat = self._rerank(query, texts, spans, flat)
        return list(torch.split(flat, sizes.tolist()))

    def _rerank(self, query: str, texts: Sequence[str], spans: Spans, flat: Tensor) -> Tensor:
        """Add ``rerank_weight * z(cos)`` to the ``rerank_top_k`` best units (a new tensor)."""
        k = min(self.rerank_top_k, flat.numel())
        top = torch.argsort(-flat, stable=True)[:k]
        units = [texts[d][s:e] for d in range(len(texts)) for s, e in spans[d]]
        emb = self.encoder().embed([query.strip(), *(units[i].strip() or units[i] for i in top.tolist())])
        out = flat.clone()
        out[top] += self.rerank_weight * _standardise(emb[1:] @ emb[0])
        return out
