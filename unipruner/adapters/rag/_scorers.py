"""Unit scorers for RAG context pruning: query similarity, focal attention, self-information, BM25, IDF.

A scorer maps ``(query, texts, spans)`` to one score per unit (higher = keep), where
``spans[d]`` are the character spans of document ``d``'s units (see :func:`unit_spans`). The
formulas come from the core: :func:`unipruner.scorers.importance.query_similarity` (``query_similarity``,
on sentence-transformers embeddings),
:func:`~unipruner.scorers.importance.window_attention` +
:func:`~unipruner.scorers.importance.query_attention` (focal attention),
:func:`~unipruner.scorers.importance.idf_table` / :func:`~unipruner.scorers.importance.idf`
(BM25's IDF). Self-information (token surprisal under a causal LM) is not in the core and lives
here privately. Language-model scores are computed per LM token and aggregated to units by
character offsets (:func:`aggregate_spans`, vectorised).
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor

from ..._threads import limit_threads
from ...errors import UniprunerError
from ...models import load_minilm, load_smollm2, require
from ...scorers.importance import idf, idf_table, query_attention, query_similarity

__all__ = [
    "BM25Scorer",
    "EmbeddingScorer",
    "FocalAttentionScorer",
    "HybridScorer",
    "IDFScorer",
    "RandomScorer",
    "Scorer",
    "SelfInformationScorer",
    "aggregate_spans",
    "rrf",
]

Spans = Sequence[Sequence[tuple[int, int]]]


@runtime_checkable
class Scorer(Protocol):
    """What :class:`~unipruner.adapters.rag.ContextPruner` needs from a scorer."""

    name: str

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """One float tensor ``[n_units_d]`` per document (higher = keep).

        A scorer with ``uses_titles = True`` also takes ``titles=`` (one ``str`` or ``None`` per
        document: ``metadata["title"]``), which ContextPruner then passes; others never get it.
        """
        ...


def aggregate_spans(token_scores: Tensor, token_spans: Tensor, unit_spans: Tensor,
                    reduce: str = "mean") -> Tensor:
    """Aggregate per-token scores into per-unit scores by character overlap (vectorised).

    A token belongs to the unit that contains its first character; units that received no token
    get the minimum of the valid unit scores (so they are pruned first).

    Parameters
    ----------
    token_scores : Tensor ``[T]``
    token_spans : LongTensor ``[T, 2]``
        Character ``(start, end)`` of each token (empty spans are ignored).
    unit_spans : LongTensor ``[U, 2]``
        Sorted, non-overlapping unit spans.
    reduce : {"mean", "max", "sum"}

    Returns
    -------
    Tensor ``[U]`` float32

    Examples
    --------
    >>> aggregate_spans(torch.tensor([1.0, 3.0, 5.0]), torch.tensor([[0, 2], [3, 4], [6, 8]]),
    ...                 torch.tensor([[0, 5], [5, 9]]))
    tensor([2., 5.])
    """
    if reduce not in ("mean", "max", "sum"):
        raise UniprunerError(f"reduce must be 'mean', 'max' or 'sum', got {reduce!r}")
    n_units = unit_spans.shape[0]
    ok = token_spans[:, 1] > token_spans[:, 0]
    starts = token_spans[:, 0]
    unit = torch.searchsorted(unit_spans[:, 0].contiguous(), starts.contiguous(), right=True) - 1
    ok = ok & (unit >= 0) & (starts < unit_spans[unit.clamp(min=0), 1])
    unit, vals = unit[ok], token_scores[ok].float()
    out = torch.zeros(n_units, dtype=torch.float32)
    count = torch.zeros(n_units, dtype=torch.float32).index_add_(0, unit, torch.ones_like(vals))
    if reduce == "max":
        out = out.fill_(-math.inf).scatter_reduce(0, unit, vals, reduce="amax", include_self=True)
    else:
        out = out.index_add_(0, unit, vals)
        if reduce == "mean":
            out = out / count.clamp(min=1)
    has = count > 0
    if bool(has.any()):
        out = torch.where(has, out, out[has].min())
    else:
        out = torch.zeros(n_units)
    return out


def _check_texts(query: str, texts: Sequence[str], spans: Spans) -> None:
    if not isinstance(query, str) or not query.strip():
        raise UniprunerError("the query must be a non-empty string")
    if len(texts) != len(spans):
        raise UniprunerError(f"{len(texts)} texts but {len(spans)} span lists")


def _span_tensor(spans: Sequence[tuple[int, int]], offset: int = 0) -> Tensor:
    return torch.tensor(list(spans), dtype=torch.long).reshape(-1, 2) + offset


# ----------------------------------------------------------------------------- embedding


@lru_cache(maxsize=2)
def _shared_minilm(device: str) -> Any:
    return load_minilm(device)


@lru_cache(maxsize=2)
def _shared_smollm2() -> tuple[Any, Any]:
    return load_smollm2()


def _specials(tok: Any) -> tuple[list[int], list[int]]:
    """The special token ids a tokenizer puts before and after a text (e.g. ``[CLS]``, ``[SEP]``)."""
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    full = list(tok("a", add_special_tokens=True)["input_ids"])
    for p in range(len(full) - len(plain) + 1):
        if full[p:p + len(plain)] == plain:
            return full[:p], full[p + len(plain):]
    return [], []


def _pool_spans(states: Tensor, offsets: Tensor, spans: Tensor, fallback: Tensor) -> Tensor:
    """Mean of the token states whose first character lies in each span (``fallback`` if none)."""
    n = spans.shape[0]
    unit = torch.searchsorted(spans[:, 0].contiguous(), offsets[:, 0].contiguous(), right=True) - 1
    ok = (unit >= 0) & (offsets[:, 0] < spans[unit.clamp(min=0), 1])
    unit, st = unit[ok], states[ok]
    sums = torch.zeros(n, states.shape[1]).index_add_(0, unit, st)
    count = torch.zeros(n).index_add_(0, unit, torch.ones(unit.shape[0]))
    return torch.where(count[:, None] > 0, sums / count.clamp(min=1)[:, None], fallback[None])


@dataclass
class EmbeddingScorer:
    """Cosine similarity of each unit to the query under a sentence-transformers model.

    The query-similarity scorer of RAG context pruning / Recoverable Compression (Chen et al.,
    2024), computed by :func:`unipruner.scorers.importance.query_similarity`.

    One prune is one batched forward pass (:meth:`encode_tokens`): the query and every text are
    tokenised once, sorted by length and run through the transformer in small batches (little
    padding) under ``torch.inference_mode``; embeddings are mean-pooled from the token states.

    * ``pooling="sentence"`` (default): each unit is encoded on its own, exactly the
      sentence-transformers embedding of the unit (mean pooling); a document's embedding is the
      mean of its units' token states.
    * ``pooling="late"``: each *document* is encoded once and a unit is the mean of its own
      tokens' contextual states ("late chunking", Günther et al., "Late Chunking: Contextual
      Chunk Embeddings Using Long-Context Embedding Models", 2024), so a sentence that says "he"
      is embedded with its paragraph's context; documents longer than the model's
      ``max_seq_length`` are encoded in consecutive windows.

    Token states of the texts do not depend on the query, so they are cached for the last set of
    texts: re-scoring the same documents with another query (``feedback``) encodes only the query.
    Words (``granularity="token"``) score their best word-piece's contextual embedding.

    Parameters
    ----------
    model : SentenceTransformer, optional
        Default: the packaged all-MiniLM-L6-v2 (``unipruner.models.load_minilm``), loaded once
        per process and shared.
    batch_size : int
        Sequences per forward batch (sorted by length, so padding stays small).
    device : str
    pooling : {"sentence", "late"}
    dtype : {"float32", "bfloat16"}
        ``"bfloat16"`` runs the forward under CPU autocast (faster on CPUs with AVX512-BF16/AMX).
    threads : int, optional
        Torch intra-op threads during the forward (restored afterwards). On a loaded machine one
        thread is several times faster than two (threads wait for each other at every op).

    Examples
    --------
    >>> s = EmbeddingScorer()
    >>> t = "Paris is the capital of France. Bananas are yellow."
    >>> sc = s.score("What is the capital of France?", [t], [[(0, 31), (31, len(t))]])
    >>> bool(sc[0][0] > sc[0][1])
    True
    """

    model: Any = None
    batch_size: int = 8
    device: str = "cpu"
    name: str = "query_similarity"
    whole_documents: bool = True
    token_level: bool = field(default=False, repr=False)
    pooling: str = "sentence"
    dtype: str = "float32"
    threads: int | None = None
    _cache: dict[Any, Any] = field(default_factory=dict, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.pooling not in ("sentence", "late"):
            raise UniprunerError(f"pooling must be 'sentence' or 'late', got {self.pooling!r}")
        if self.dtype not in ("float32", "bfloat16"):
            raise UniprunerError(f"dtype must be 'float32' or 'bfloat16', got {self.dtype!r}")

    def _model(self) -> Any:
        if self.model is None:
            self.model = _shared_minilm(self.device)
        return self.model

    # ---------------------------------------------------------------- one batched forward
    def encode_tokens(self, texts: Sequence[str]) -> list[tuple[Tensor, Tensor]]:
        """Token states of each text in one batched pass: ``(states [T, D], offsets [T, 2])``.

        ``states`` includes the special tokens of each window (their offsets are ``(0, 0)``), so
        the mean over all rows of a short text is its sentence-transformers mean-pooled
        embedding. Sequences are sorted by length and batched ``batch_size`` at a time.
        """
        model = self._model()
        tok = model.tokenizer
        net = model[0].auto_model
        width = max(8, int(model.max_seq_length) - sum(map(len, _specials(tok))))
        enc = tok(list(texts), add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        pieces: list[tuple[int, list[int], list[tuple[int, int]]]] = []  # (text, ids, offsets)
        for i, (ids, off) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], strict=True)):
            for s in range(0, max(len(ids), 1), width):
                pieces.append((i, list(ids[s:s + width]), [tuple(o) for o in off[s:s + width]]))
        head, tail = _specials(tok)
        built = [head + ids + tail for _, ids, _ in pieces]
        order = sorted(range(len(pieces)), key=lambda j: len(built[j]))
        states: list[Tensor | None] = [None] * len(pieces)
        pad = tok.pad_token_id or 0
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if self.dtype == "bfloat16" else nullcontext()
        with self._lock, torch.inference_mode(), ctx, limit_threads(self.threads or None):
            for b in range(0, len(order), self.batch_size):
                idx = order[b:b + self.batch_size]
                n = max(len(built[j]) for j in idx)
                ids_t = torch.full((len(idx), n), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), n), dtype=torch.long)
                for r, j in enumerate(idx):
                    ids_t[r, : len(built[j])] = torch.tensor(built[j])
                    mask[r, : len(built[j])] = 1
                out = net(input_ids=ids_t.to(net.device), attention_mask=mask.to(net.device))
                h = out.last_hidden_state.float().cpu()
                for r, j in enumerate(idx):
                    states[j] = h[r, : len(built[j])]
        result: list[tuple[list[Tensor], list[Tensor]]] = [([], []) for _ in texts]
        for j, (i, ids, off) in enumerate(pieces):
            st = states[j]
            assert st is not None
            lead = len(head)
            o = torch.zeros(st.shape[0], 2, dtype=torch.long)
            if ids:
                o[lead: lead + len(ids)] = torch.tensor(off, dtype=torch.long)
            result[i][0].append(st)
            result[i][1].append(o)
        return [(torch.cat(s), torch.cat(o)) for s, o in result]

    def embed(self, texts: Sequence[str]) -> Tensor:
        """Sentence embeddings ``[len(texts), D]`` (mean pooling, float32, not normalised)."""
        return torch.stack([st.mean(dim=0) for st, _ in self.encode_tokens(texts)])

    # ---------------------------------------------------------------- scoring
    def _unit_doc_embeddings(self, query: str, texts: Sequence[str], spans: Spans) -> tuple[Tensor, Tensor, Tensor]:
        """``(query [1, D], units [U, D], documents [N, D])``, one forward pass (cached texts)."""
        key = (self.pooling, tuple(texts), tuple(tuple(s) for s in spans))
        cached = self._cache.get(key)
        if cached is None:
            if self.pooling == "sentence":
                units = [texts[d][s:e].strip() or texts[d][s:e] for d in range(len(texts)) for s, e in spans[d]]
                enc = self.encode_tokens([query, *units])
                q = enc[0][0].mean(dim=0)[None]
                sums = torch.stack([st.sum(dim=0) for st, _ in enc[1:]])
                counts = torch.tensor([float(st.shape[0]) for st, _ in enc[1:]])
                u_emb = sums / counts[:, None]
                owner = torch.repeat_interleave(torch.arange(len(texts)), torch.tensor([len(s) for s in spans]))
                d_emb = torch.zeros(len(texts), sums.shape[1]).index_add_(0, owner, sums)
                d_emb = d_emb / torch.zeros(len(texts)).index_add_(0, owner, counts).clamp(min=1)[:, None]
            else:
                enc = self.encode_tokens([query, *texts])
                q = enc[0][0].mean(dim=0)[None]
                u_list, d_list = [], []
                for d, (st, off) in enumerate(enc[1:]):
                    content = off[:, 1] > off[:, 0]
                    us = _span_tensor(spans[d])
                    u_list.append(_pool_spans(st[content], off[content], us, fallback=st.mean(dim=0)))
                    d_list.append(st.mean(dim=0))
                u_emb, d_emb = torch.cat(u_list), torch.stack(d_list)
            self._cache.clear()
            self._cache[key] = (u_emb, d_emb)
            return q, u_emb, d_emb
        return self.embed([query]), cached[0], cached[1]

    def score_with_documents(self, query: str, texts: Sequence[str], spans: Spans) -> tuple[list[Tensor], Tensor]:
        """Unit scores (as :meth:`score`) and one score per whole document, from one forward."""
        _check_texts(query, texts, spans)
        q, u_emb, d_emb = self._unit_doc_embeddings(query, texts, spans)
        sims = query_similarity(u_emb[None], q)[0] if u_emb.numel() else torch.zeros(0)
        return list(torch.split(sims, [len(s) for s in spans])), query_similarity(d_emb[None], q)[0]

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Cosine to the query per unit; see the class docstring."""
        _check_texts(query, texts, spans)
        units = [texts[d][s:e] for d in range(len(texts)) for s, e in spans[d]]
        if not units:
            return [torch.zeros(0) for _ in texts]
        is_words = all(len(u.split()) <= 1 for u in units) and len(units) > len(texts)
        if self.token_level or is_words:
            return self._score_words(query, texts, spans)
        return self.score_with_documents(query, texts, spans)[0]

    def _score_words(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        from ._split import unit_spans

        model = self._model()
        tok = model.tokenizer
        q = self.embed([query])
        out: list[Tensor] = []
        for d, text in enumerate(texts):  # one encode call per document (sentences batched)
            sent = unit_spans(text, "sentence")
            pieces = [text[s:e] for s, e in sent]
            enc = tok(pieces, return_offsets_mapping=True, truncation=True,
                      max_length=model.max_seq_length)
            with torch.inference_mode():
                tok_emb = model.encode(pieces, output_value="token_embeddings", batch_size=self.batch_size,
                                       show_progress_bar=False)
            embs, offs = [], []
            for j, (s, _e) in enumerate(sent):
                off = torch.tensor(enc["offset_mapping"][j], dtype=torch.long).reshape(-1, 2)
                e_j = torch.as_tensor(tok_emb[j]).float()[: off.shape[0]]
                embs.append(e_j)
                offs.append(torch.where(off[:, 1:] > off[:, :1], off + s, torch.zeros_like(off)))
            all_emb, all_off = torch.cat(embs), torch.cat(offs)
            sims = query_similarity(all_emb[None], q)[0]
            out.append(aggregate_spans(sims, all_off, _span_tensor(spans[d]), reduce="max"))
        return out


# ----------------------------------------------------------------------------- BM25


_TERM = re.compile(r"\w+")


def _unit_terms(texts: Sequence[str], spans: Spans, vocab: dict[str, int]) -> tuple[list[str], list[list[int]]]:
    """Every unit's text and its lower-cased word ids (``vocab`` grows with new words)."""
    units = [texts[d][s:e] for d in range(len(texts)) for s, e in spans[d]]
    return units, [[vocab.setdefault(t, len(vocab)) for t in _TERM.findall(u.lower())] for u in units]


@dataclass
class BM25Scorer:
    """Okapi BM25 of each unit against the query, the units of one query being the collection.

    Robertson & Zaragoza, "The Probabilistic Relevance Framework: BM25 and Beyond", Foundations
    and Trends in IR, 2009. IDF comes from :func:`unipruner.scorers.importance.idf_table` /
    :func:`~unipruner.scorers.importance.idf` over the units. For single-word units
    (``granularity="token"``) the collection is the sentences and a word scores its IDF,
    multiplied by ``1 + k1`` when it occurs in the query.

    Examples
    --------
    >>> t = "Paris is the capital of France. Bananas are yellow."
    >>> BM25Scorer().score("capital of France", [t], [[(0, 31), (31, len(t))]])[0].argmax().item()
    0
    """

    k1: float = 1.5
    b: float = 0.75
    name: str = "bm25"
    whole_documents: bool = True

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """BM25 per unit; see the class docstring."""
        _check_texts(query, texts, spans)
        vocab: dict[str, int] = {}
        q_terms = sorted({vocab.setdefault(t, len(vocab)) for t in _TERM.findall(query.lower())})
        units, docs = _unit_terms(texts, spans, vocab)
        is_words = all(len(d) <= 1 for d in docs) and len(units) > len(texts)
        if is_words:
            from ._split import unit_spans

            sents = [text[s:e] for text in texts for s, e in unit_spans(text, "sentence")]
            coll = [[vocab.setdefault(t, len(vocab)) for t in _TERM.findall(u.lower())] for u in sents]
            df, n = idf_table(coll, max(len(vocab), 1))
            ids = torch.tensor([d[0] if d else 0 for d in docs], dtype=torch.long)
            w = idf(ids[None], df, n)[0]
            inq = torch.isin(ids, torch.tensor(q_terms, dtype=torch.long))
            has = torch.tensor([bool(d) for d in docs])
            scores = torch.where(has, w * (1.0 + self.k1 * inq.float()), torch.zeros_like(w))
            return list(torch.split(scores, [len(s) for s in spans]))
        v = max(len(vocab), 1)
        df, n = idf_table(docs, v)
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.float32)
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        row = torch.repeat_interleave(torch.arange(len(docs)), lengths.long())
        qt = torch.tensor(q_terms, dtype=torch.long)
        tf = torch.zeros(len(docs), len(q_terms))
        if qt.numel() and flat.numel():
            hit = flat[:, None] == qt[None, :]  # [tokens, query terms]
            tf = tf.index_add_(0, row, hit.float())
        w = idf(qt[None], df, n)[0] if qt.numel() else torch.zeros(0)
        avg = lengths.mean().clamp(min=1e-9)
        denom = tf + self.k1 * (1 - self.b + self.b * lengths[:, None] / avg)
        scores = (w[None, :] * tf * (self.k1 + 1) / denom.clamp(min=1e-9)).sum(dim=1)
        return list(torch.split(scores, [len(s) for s in spans]))


@dataclass
class IDFScorer:
    """Query-agnostic term rarity: a unit scores the mean IDF of its words over the query's units.

    Lassance et al., "A Study on Token Pruning for ColBERT", 2021 keep rare tokens; here the
    words of every retrieved unit form the collection (:func:`unipruner.scorers.importance.idf_table`
    / :func:`~unipruner.scorers.importance.idf`, BM25's IDF), so boilerplate repeated across
    documents goes first. A unit without words scores 0.

    Examples
    --------
    >>> t = "The cat. The cat sat on a zebra."
    >>> IDFScorer().score("anything", [t], [[(0, 8), (8, len(t))]])[0].argmax().item()
    1
    """

    name: str = "idf"
    whole_documents: bool = True

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Mean word IDF per unit; see the class docstring."""
        _check_texts(query, texts, spans)
        vocab: dict[str, int] = {}
        _, docs = _unit_terms(texts, spans, vocab)
        df, n = idf_table(docs, max(len(vocab), 1))
        lengths = torch.tensor([len(d) for d in docs], dtype=torch.long)
        flat = torch.tensor([t for d in docs for t in d], dtype=torch.long)
        w = idf(flat[None], df, n)[0] if flat.numel() else torch.zeros(0)
        row = torch.repeat_interleave(torch.arange(len(docs)), lengths)
        sums = torch.zeros(len(docs)).index_add_(0, row, w.float())
        scores = sums / lengths.clamp(min=1).float()
        return list(torch.split(scores, [len(s) for s in spans]))


@dataclass
class RandomScorer:
    """Uniform random unit scores (the baseline every scorer must beat), seeded."""

    seed: int = 0
    name: str = "random"

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Random scores, reproducible for a given seed and call order."""
        _check_texts(query, texts, spans)
        from ...scorers.importance import random_scores

        g = torch.Generator().manual_seed(self.seed)
        total = sum(len(s) for s in spans)
        sc = random_scores(1, max(total, 1), generator=g)[0, :total]
        return list(torch.split(sc, [len(s) for s in spans]))


def rrf(rankings: Sequence[Tensor], k: float = 60.0) -> Tensor:
    """Reciprocal-rank fusion of several score vectors over the same items.

    Cormack, Clarke & Büttcher, "Reciprocal Rank Fusion outperforms Condorcet and individual
    Rank Learning Methods", SIGIR 2009: ``rrf(i) = sum_s 1 / (k + rank_s(i))`` with ranks from 1
    (highest score first; ties keep the earlier item first), ``k = 60``.

    >>> rrf([torch.tensor([3.0, 1.0, 2.0]), torch.tensor([0.1, 0.9, 0.5])], k=1.0)
    tensor([0.7500, 0.7500, 0.6667])
    """
    if not rankings:
        raise UniprunerError("rrf needs at least one score vector")
    n = rankings[0].numel()
    out = torch.zeros(n, dtype=torch.float32)
    for sc in rankings:
        if sc.numel() != n:
            raise UniprunerError("rrf: every score vector must have the same length")
        order = torch.argsort(-sc.float(), stable=True)
        rank = torch.empty(n, dtype=torch.float32)
        rank[order] = torch.arange(1, n + 1, dtype=torch.float32)
        out += 1.0 / (k + rank)
    return out


@dataclass
class HybridScorer:
    """Lexical + dense: BM25 and embedding similarity fused by reciprocal rank (:func:`rrf`).

    Hybrid sparse-dense ranking with reciprocal-rank fusion (Cormack et al., SIGIR 2009), the
    usual way to combine BM25 with a dense retriever (e.g. Ma et al., "A Replication Study of
    Dense Passage Retriever", 2021): exact entity matches from BM25, paraphrases from the
    embedding. Units are ranked among the query's units, whole documents among its documents;
    one embedding forward pass per call.

    Parameters
    ----------
    lexical, dense : Scorer, optional
        Default :class:`BM25Scorer` and :class:`EmbeddingScorer`.
    k : float
        RRF's constant (60 in the paper).
    """

    lexical: Any = None
    dense: Any = None
    k: float = 60.0
    name: str = "hybrid"
    whole_documents: bool = True

    def __post_init__(self) -> None:
        self.lexical = BM25Scorer() if self.lexical is None else self.lexical
        self.dense = EmbeddingScorer() if self.dense is None else self.dense

    def _doc_scores(self, scorer: Any, query: str, texts: Sequence[str], spans: Spans) -> tuple[Tensor, Tensor]:
        both = getattr(scorer, "score_with_documents", None)
        if both is not None:
            u, d = both(query, texts, spans)
            return torch.cat(u) if u else torch.zeros(0), d
        u = scorer.score(query, texts, spans)
        d = scorer.score(query, texts, [[(0, len(t))] for t in texts])
        return torch.cat(u) if u else torch.zeros(0), torch.cat(d)

    def score_with_documents(self, query: str, texts: Sequence[str], spans: Spans) -> tuple[list[Tensor], Tensor]:
        """Fused unit scores and fused whole-document scores."""
        _check_texts(query, texts, spans)
        lu, ld = self._doc_scores(self.lexical, query, texts, spans)
        du, dd = self._doc_scores(self.dense, query, texts, spans)
        units = rrf([lu, du], self.k)
        return list(torch.split(units, [len(s) for s in spans])), rrf([ld, dd], self.k)

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Fused unit scores; see the class docstring."""
        _check_texts(query, texts, spans)
        lu = torch.cat(self.lexical.score(query, texts, spans))
        du = torch.cat(self.dense.score(query, texts, spans))
        return list(torch.split(rrf([lu, du], self.k), [len(s) for s in spans]))


# ----------------------------------------------------------------------------- causal LM


class _Stop(Exception):
    """Raised by a hook to end the forward pass after the last layer that is needed."""


def _lm_prompt(tok: Any, pieces: Sequence[tuple[str, int | None]]) -> tuple[Tensor, Tensor, Tensor]:
    """Tokenise prompt pieces; returns ids ``[1, T]``, char spans ``[T, 2]`` in document
    coordinates and the document index of each token (``-1`` outside documents)."""
    text = "".join(p for p, _ in pieces)
    enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = torch.tensor(enc["input_ids"], dtype=torch.long)[None]
    off = torch.tensor(enc["offset_mapping"], dtype=torch.long).reshape(-1, 2)
    starts, docs, pos = [], [], 0
    for p, d in pieces:
        starts.append(pos)
        docs.append(-1 if d is None else d)
        pos += len(p)
    bounds = torch.tensor(starts, dtype=torch.long)
    piece = torch.searchsorted(bounds, off[:, 0].contiguous(), right=True) - 1
    doc = torch.tensor(docs, dtype=torch.long)[piece]
    local = off - bounds[piece][:, None]
    return ids, local, doc


def _per_document(token_scores: Tensor, local: Tensor, doc: Tensor, spans: Spans, reduce: str) -> list[Tensor]:
    out = []
    for d in range(len(spans)):  # one vectorised aggregation per document
        sel = doc == d
        out.append(aggregate_spans(token_scores[sel], local[sel], _span_tensor(spans[d]), reduce))
    return out


def _context_pieces(texts: Sequence[str], sep: str) -> list[tuple[str, int | None]]:
    pieces: list[tuple[str, int | None]] = []
    for d, t in enumerate(texts):
        if d:
            pieces.append((sep, None))
        pieces.append((t, d))
    return pieces


@dataclass
class _LMBase:
    model: Any = None
    tokenizer: Any = None
    max_tokens: int = 4096
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def _lm(self) -> tuple[Any, Any]:
        if self.model is None or self.tokenizer is None:
            require("transformers", "llm")
            self.model, self.tokenizer = _shared_smollm2()
        return self.model, self.tokenizer

    def _check_len(self, ids: Tensor) -> None:
        if ids.shape[1] > self.max_tokens:
            raise UniprunerError(
                f"the prompt has {ids.shape[1]} tokens, more than max_tokens={self.max_tokens}; "
                "prune fewer documents at once or raise max_tokens"
            )


@dataclass
class FocalAttentionScorer(_LMBase):
    """Attention from the focal token (end of "question + answer prefix") to each context token.

    AttentionRAG (Fang et al., "AttentionRAG: Attention-Guided Context Pruning in
    Retrieval-Augmented Generation", 2025): the prompt is context, question and an answer
    prefix; the last token's attention to the context, averaged over heads
    (:func:`unipruner.scorers.importance.query_attention`) and over ``layers``, scores each
    context token; a unit scores the mean of its tokens. Only the focal token's row is computed,
    by forward pre-hooks that recompute the layer's queries and keys from its input exactly as
    the layer does (:func:`unipruner.hosts.hf_attention.input_rows`: q/k norms, fused qkv, RoPE,
    grouped-query heads, sliding windows), so the model keeps running SDPA, and the forward pass
    stops after the last layer used.

    Parameters
    ----------
    model, tokenizer : optional
        A Hugging Face causal LM of a family :mod:`unipruner.hosts.hf_attention` supports (Llama /
        SmolLM2, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3 text); default SmolLM2-135M-Instruct
        (offline package).
    layers : sequence of int, optional
        Decoder layers to average; default the middle third.
    answer_prefix : str
    """

    layers: Sequence[int] | None = None
    answer_prefix: str = "Answer:"
    name: str = "focal_attention"

    def _layer_ids(self, n_layers: int) -> list[int]:
        if self.layers is None:
            return list(range(n_layers // 3, 2 * n_layers // 3))
        ids = sorted({int(i) for i in self.layers})
        if not ids or ids[0] < 0 or ids[-1] >= n_layers:
            raise UniprunerError(f"layers must be a non-empty list of indices in [0, {n_layers}), got {self.layers}")
        return ids

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Focal-token attention per unit; see the class docstring."""
        _check_texts(query, texts, spans)
        model, tok = self._lm()
        pieces = [("Context:\n", None), *_context_pieces(texts, "\n\n"),
                  (f"\n\nQuestion: {query.strip()}\n{self.answer_prefix}", None)]
        ids, local, doc = _lm_prompt(tok, pieces)
        self._check_len(ids)
        tok_scores = self._focal(model, ids)
        return _per_document(tok_scores, local, doc, spans, "mean")

    def _focal(self, model: Any, ids: Tensor) -> Tensor:
        from ...hosts import hf_attention as hf

        base = hf.decoder(model, user="the focal_attention scorer", implementations=None)
        specs, _ = hf.attention_layers(model, base, sliding=True)  # every layer, windows included
        wanted = self._layer_ids(len(specs))
        by_module = {id(specs[i].module): specs[i] for i in wanted}
        rows: list[Tensor] = []  # this call's rows (the hooks live only for this call, under the lock)
        last = wanted[-1]

        def hook(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            spec = by_module[id(module)]
            h: Tensor = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            attn = hf.input_rows(spec, h, kwargs["position_embeddings"], 1)  # [B, H, 1, N]
            rows.append(query_attention(attn)[0])
            if spec.index == last:
                raise _Stop

        with self._lock:
            handles = [specs[i].module.register_forward_pre_hook(hook, with_kwargs=True) for i in wanted]
            try:
                with torch.inference_mode():
                    try:
                        model(input_ids=ids, use_cache=False)
                    except _Stop:
                        pass
            finally:
                for hd_ in handles:
                    hd_.remove()
        return torch.stack(rows).mean(dim=0)


@dataclass
class SelfInformationScorer(_LMBase):
    """Self-information of each context token under a causal LM, conditioned on the question.

    Selective Context (Li et al., "Compressing Context to Enhance Inference Efficiency of Large
    Language Models", EMNLP 2023) and LLMLingua (Jiang et al., EMNLP 2023) keep the tokens with
    the highest surprisal ``-log p(x_i | x_<i)``; LongLLMLingua (Jiang et al., ACL 2024)
    conditions on the question, which here precedes the context. A unit scores the mean
    surprisal of its tokens (not in the core: a private, vectorised computation from the logits).

    Parameters
    ----------
    model, tokenizer : optional
        Default SmolLM2-135M-Instruct (offline package).
    """

    name: str = "self_information"

    def score(self, query: str, texts: Sequence[str], spans: Spans) -> list[Tensor]:
        """Question-conditioned surprisal per unit; see the class docstring."""
        _check_texts(query, texts, spans)
        model, tok = self._lm()
        pieces = [(f"Question: {query.strip()}\n\nContext:\n", None), *_context_pieces(texts, "\n\n")]
        ids, local, doc = _lm_prompt(tok, pieces)
        self._check_len(ids)
        with self._lock, torch.inference_mode():
            logits = model(input_ids=ids, use_cache=False).logits[0].float()
        logp = torch.log_softmax(logits[:-1], dim=-1)
        surprisal = torch.cat([torch.zeros(1), -logp.gather(1, ids[0, 1:, None])[:, 0]])
        return _per_document(surprisal, local, doc, spans, "mean")
