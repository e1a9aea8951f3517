"""Per-document reduction of multi-vector (ColBERT) documents through the method registry.

Every method maps a chunk of contiguous documents (flat float32 vectors + ``doclens``) to a reduced chunk with the
same documents, each keeping at least one vector. Documents are processed in batches of similar length (padded
``[B, N, D]`` tensors with a validity mask) and handed to a registry method (:mod:`unipruner.methods`) like any
other batch: pooling methods through ``reduce`` (cluster means), pruning methods through ``select`` (the kept
vectors, in document order). The adapter accepts exactly the methods whose domains include ``"colbert"``
(``unipruner methods --domain colbert``, :func:`accepted_methods`):

* pooling (Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance
  Impact via Token Pooling", 2024): ``ward_cosine_pool`` (PyLate's criterion, the CLI default), ``ward_pool``
  (exact Euclidean Ward on unit vectors), ``kmeans_pool`` (``backend="torch"`` or ``"faiss"``),
  ``sequential_pool``;
* pruning (Lassance et al., "A Study on Token Pruning for ColBERT", 2021; Acquavia et al., "Static Pruning for
  Multi-Representation Dense Retrieval", DocEng 2023): ``first``, ``hidden_norm``, ``duplicates``, ``divprune``,
  ``centroid``, ``idf`` and ``stopwords`` (these two need the token ids of every vector: collection text + the
  encoder's tokenizer, see :class:`TokenTable`), and the other registry methods of the domain (``kcenter``,
  ``gprune``, ``random``).

Budgets (:class:`unipruner.Budget`): ``factor`` is :meth:`Budget.pool_factor` (``p + max((n - p) // factor, 1)``
vectors remain, PyLate's count), ``ratio`` the fraction kept, ``keep`` vectors per document; ``protected`` leading
vectors (e.g. ``[CLS]``/``[D]``) always survive and every document keeps at least one vector. ``scope="global"``
(methods with ``global_scope``: scores comparable across documents) spends one budget over the whole index by
score instead of per document: see :func:`global_counts`.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ...errors import UniprunerError
from ...methods import REGISTRY, MergingMethod, Method, ScoringMethod, methods
from ...scorers import importance
from ...select import Budget
from .formats.base import Chunk

__all__ = [
    "RENAMED",
    "ReduceSpec",
    "TokenTable",
    "accepted_methods",
    "chunk_scores",
    "global_counts",
    "global_total",
    "reduce_chunk",
    "target_counts",
]

#: ColBERT names of earlier releases -> the registry name of the same algorithm
RENAMED = {"ward": "ward_pool", "ward_cosine": "ward_cosine_pool", "kmeans": "kmeans_pool",
           "sequential": "sequential_pool", "norm": "hidden_norm", "diversity": "divprune"}
#: the signals this adapter can give a method: token ids of every vector and the collection's statistics
TOKEN_SIGNALS = frozenset({"token_ids", "doc_freq", "n_docs", "stop_ids"})

#: bytes of one batch's ``[B, N, N]`` float32 workspace (distance / Gram matrices)
BATCH_BYTES = 128 * 2**20

_STOPWORDS = frozenset(
    "a about above after again against all am an and any are as at be because been before being below between "
    "both but by can could did do does doing down during each few for from further had has have having he her "
    "here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not "
    "now of off on once only or other our ours ourselves out over own same she should so some such than that the "
    "their theirs them themselves then there these they this those through to too under until up very was we "
    "were what when where which while who whom why will with would you your yours yourself yourselves".split()
)


def accepted_methods() -> tuple[str, ...]:
    """Registry names this adapter accepts: exactly ``unipruner.methods(domain="colbert")``."""
    return tuple(m.name for m in methods(domain="colbert"))


def _global_methods() -> tuple[str, ...]:
    return tuple(m.name for m in methods(domain="colbert") if m.cls.global_scope)


def _method_class(name: str) -> type[Method]:
    """The registry class of a ColBERT method name, or a clear error (renamed, unknown, other domain)."""
    if name in RENAMED and name not in REGISTRY:
        raise UniprunerError(f"ColBERT method {name!r} is now {RENAMED[name]!r} (one name per algorithm across "
                             "unipruner; `unipruner methods --domain colbert` lists them)")
    cls = REGISTRY.get(name)
    if cls is None:
        raise UniprunerError(f"unknown method {name!r}; ColBERT accepts {', '.join(accepted_methods())}")
    _check_domain(cls)
    return cls


def _check_domain(cls: type[Method]) -> None:
    if "colbert" not in cls.domains:
        raise UniprunerError(f"method {cls.name!r} does not apply to multi-vector indexes (its domains: "
                             f"{', '.join(cls.domains)}); ColBERT accepts {', '.join(accepted_methods())}")


@dataclass(frozen=True)
class TokenTable:
    """Token ids of every vector of an index (for ``idf`` / ``stopwords``), in index order.

    Attributes
    ----------
    ids : numpy.ndarray
        int64 ``[n_vectors]``, the token id of each vector.
    offsets : numpy.ndarray
        int64 ``[n_docs + 1]``, document ``d`` owns ``ids[offsets[d]:offsets[d + 1]]``.
    doc_freq : numpy.ndarray
        int64 ``[vocab]`` document frequencies (core :func:`unipruner.scorers.importance.idf_table`).
    n_docs : int
    stop_ids : numpy.ndarray
        int64 ids of stopwords and punctuation in the vocabulary.
    """

    ids: np.ndarray
    offsets: np.ndarray
    doc_freq: np.ndarray
    n_docs: int
    stop_ids: np.ndarray

    @classmethod
    def from_texts(cls, texts: Sequence[str], tokenizer: Any, doclens: np.ndarray, *,
                   max_length: int | None = None) -> TokenTable:
        """Tokenise the collection and check it lines up with the index (Lassance et al. 2021 IDF pruning).

        Parameters
        ----------
        texts : sequence of str
            One text per document, in index order (BEIR: ``title + " " + text`` as the encoder saw it).
        tokenizer : transformers tokenizer
            The encoder's tokenizer (special tokens added as at encoding time).
        doclens : numpy.ndarray
            The index's vectors per document: each document must have exactly as many tokens.
        max_length : int, optional
            Truncation length used at encoding time.

        Raises
        ------
        UniprunerError
            If the number of texts or any document's token count differs from the index.
        """
        doclens = np.asarray(doclens, dtype=np.int64)
        if len(texts) != len(doclens):
            raise UniprunerError(f"the collection has {len(texts)} texts but the index has {len(doclens)} documents; "
                                 "IDF/stopword pruning needs one text per document, in index order")
        enc = tokenizer(list(texts), add_special_tokens=True, truncation=max_length is not None,
                        max_length=max_length)["input_ids"]
        lens = np.fromiter((len(e) for e in enc), dtype=np.int64, count=len(enc))
        bad = np.flatnonzero(lens != doclens)
        if bad.size:
            d = int(bad[0])
            raise UniprunerError(
                f"document {d} has {int(doclens[d])} vectors in the index but the tokenizer gives {int(lens[d])} "
                f"tokens ({bad.size} documents differ): IDF/stopword pruning needs one vector per token, i.e. an "
                "index encoded with this tokenizer and max length and not pooled yet")
        ids = np.fromiter((t for e in enc for t in e), dtype=np.int64, count=int(lens.sum()))
        offsets = np.concatenate([[0], np.cumsum(lens)])
        vocab = max(len(tokenizer), int(ids.max()) + 1 if ids.size else 1)
        df, n_docs = importance.idf_table([torch.from_numpy(ids[offsets[i]:offsets[i + 1]])
                                           for i in range(len(lens))], vocab)
        vocab_items = tokenizer.get_vocab().items()
        punct = set("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")
        stop = [i for tok, i in vocab_items
                if tok.lstrip("Ġ▁#").lower() in _STOPWORDS or (tok and all(c in punct for c in tok.lstrip("Ġ▁")))]
        return cls(ids, offsets, df.numpy(), int(n_docs), np.asarray(sorted(stop), dtype=np.int64))

    def signals(self) -> dict[str, Any]:
        """The collection-level signals of the registry methods: ``doc_freq``, ``n_docs``, ``stop_ids``."""
        return {"doc_freq": torch.from_numpy(self.doc_freq), "n_docs": self.n_docs,
                "stop_ids": torch.from_numpy(self.stop_ids)}

    def chunk_ids(self, chunk: Chunk) -> Tensor:
        """Token ids ``[n_vectors of chunk]`` of a chunk (checked against its doclens)."""
        d0 = chunk.doc_offset
        d1 = d0 + len(chunk.doclens)
        if d1 > len(self.offsets) - 1:
            raise UniprunerError(f"chunk {chunk.index} reaches document {d1} but the token table has "
                                 f"{len(self.offsets) - 1}")
        lens = np.diff(self.offsets[d0:d1 + 1])
        if not np.array_equal(lens, np.asarray(chunk.doclens)):
            raise UniprunerError(f"chunk {chunk.index}: document lengths differ from the token table; the index "
                                 "was changed after the token ids were computed")
        return torch.from_numpy(self.ids[self.offsets[d0]:self.offsets[d1]])


@dataclass(frozen=True)
class ReduceSpec:
    """What to do to every document: a registry method with its budget and protected vectors, and a scope.

    Give a registry name with exactly one budget keyword (Clavié et al. 2024 pool factor; Lassance et al. 2021
    pruning ratio / first-k), or a :class:`unipruner.Method` instance that carries its own budget and
    ``protected``::

        ReduceSpec("ward_cosine_pool", factor=2, protected=1)
        ReduceSpec(unipruner.method("kmeans_pool", budget=Budget.pool_factor(2), protected=1, backend="faiss"))

    Attributes
    ----------
    method : str or Method
        A name of :func:`accepted_methods` (``unipruner methods --domain colbert``) or a Method instance.
    factor : float, optional
        Pool factor >= 1 (:meth:`Budget.pool_factor`): ``p + max((n - p) // factor, 1)`` vectors remain.
    ratio : float, optional
        Fraction of each document's vectors kept, in ``(0, 1]`` (at least one, half up).
    keep : int, optional
        Vectors kept per document (>= 1; shorter documents keep all).
    protected : int
        Leading vectors of each document kept unchanged.
    scope : {"document", "global"}
        ``global``: one budget over the whole index, spent by score (methods with ``global_scope``).
    seed : int
        Seed of the methods that draw random numbers (``kmeans_pool``, ``random``).
    reducer : Method
        The method instance used (built from the fields above, or the instance given).
    """

    method: str | Method
    factor: float | None = None
    ratio: float | None = None
    keep: int | None = None
    protected: int = 0
    scope: str = "document"
    seed: int = 0
    reducer: Method = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.protected, bool) or not isinstance(self.protected, int) or self.protected < 0:
            raise UniprunerError(f"protected must be a non-negative int (leading vectors), got {self.protected!r}")
        if isinstance(self.method, Method):
            reducer = self._from_instance(self.method)
        elif isinstance(self.method, str):
            reducer = self._from_name(self.method)
        else:
            raise UniprunerError(f"method must be a registry name or a unipruner.Method, got "
                                 f"{type(self.method).__name__}")
        object.__setattr__(self, "reducer", reducer)
        object.__setattr__(self, "protected", reducer.protected)
        if self.scope not in ("document", "global"):
            raise UniprunerError(f"scope must be 'document' or 'global', got {self.scope!r}")
        if self.scope == "global" and not (reducer.global_scope and isinstance(reducer, ScoringMethod)):
            raise UniprunerError(f"scope='global' spends the budget by score across documents and works with "
                                 f"{', '.join(_global_methods())}; {reducer.name!r} is per document only")

    def _from_name(self, name: str) -> Method:
        cls = _method_class(name)
        given = [n for n in ("factor", "ratio", "keep") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UniprunerError(f"give exactly one budget: factor=, ratio= or keep= (got {given or 'none'})")
        f, r, k = self.factor, self.ratio, self.keep
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= 1):
            raise UniprunerError(f"ratio is the fraction of vectors kept and must be in (0, 1], got {r!r}; "
                                 "every document keeps at least one vector, so 0 is not allowed")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UniprunerError(f"keep must be an int >= 1 (every document keeps at least one vector), got {k!r}")
        budget = Budget.pool_factor(f) if f is not None else Budget(ratio=r) if r is not None else Budget(keep=k)
        params: dict[str, Any] = {"budget": budget, "protected": self.protected}
        if "seed" in {fl.name for fl in dataclasses.fields(cls)}:
            params["seed"] = self.seed
        return cls(**params)

    def _from_instance(self, m: Method) -> Method:
        _check_domain(type(m))
        extra = [n for n in ("factor", "ratio", "keep") if getattr(self, n) is not None]
        if self.seed:
            extra.append("seed")
        if self.protected not in (0, m.protected):
            extra.append("protected")
        if extra:
            raise UniprunerError(f"a Method instance carries its own budget, protected and seed; do not also give "
                                 f"{', '.join(extra)} (set them on the method: unipruner.method({m.name!r}, ...))")
        b = m.budget
        if b.data_dependent or b.rows is not None:
            raise UniprunerError(f"ColBERT needs a pool-factor, ratio or keep budget per document, got {b!r}")
        return m

    @property
    def name(self) -> str:
        """The registry name of the method."""
        return self.reducer.name

    @property
    def budget(self) -> Budget:
        """The method's budget."""
        return self.reducer.budget

    @property
    def needs_tokens(self) -> bool:
        """True for methods that need the token ids of every vector (``idf``, ``stopwords``)."""
        return bool(TOKEN_SIGNALS & set(self.reducer.requires))


def as_spec(spec: ReduceSpec | Method) -> ReduceSpec:
    """A :class:`ReduceSpec` from a spec or a Method instance (per-document scope)."""
    if isinstance(spec, ReduceSpec):
        return spec
    if isinstance(spec, Method):
        return ReduceSpec(spec)
    raise UniprunerError(f"spec must be a ReduceSpec or a unipruner.Method, got {type(spec).__name__}")


def target_counts(doclens: np.ndarray | Tensor, spec: ReduceSpec) -> Tensor:
    """Vectors kept per document under a per-document budget, ``[n_docs]`` long, each in ``[1, n]``.

    The method's :class:`~unipruner.Budget` (``pool_factor``: ``p + max((n - p) // factor, 1)`` as in PyLate /
    Clavié et al. 2024), raised to the protected vectors and to one vector per document.

    >>> target_counts(np.array([1, 4, 9]), ReduceSpec("ward_pool", factor=2))
    tensor([1, 2, 4])
    >>> target_counts(np.array([1, 4, 9]), ReduceSpec("first", keep=3, protected=1))
    tensor([1, 3, 3])
    """
    n = torch.as_tensor(np.asarray(doclens), dtype=torch.long)
    p = torch.clamp(n, max=spec.protected)
    b = spec.budget
    n_max = max(int(n.max()) if n.numel() else 0, b.keep or 0)  # shorter documents than keep= keep everything
    t = b.counts(n, n_max=n_max, protected=p)
    return torch.minimum(torch.maximum(t, torch.maximum(p, torch.ones_like(p))), n)


# ----------------------------------------------------------------------------------------------
# batching documents of similar length
# ----------------------------------------------------------------------------------------------


def _batches(doclens: np.ndarray, dim: int = 0) -> Iterator[np.ndarray]:
    """Document indices in batches of similar length; a batch's ``[B, N, N]`` and ``[B, N, dim]`` float32 workspaces
    stay under BATCH_BYTES each (a single longer document is a batch alone)."""
    lens = np.asarray(doclens, dtype=np.int64)
    if lens.size == 0:
        return
    key = np.ceil(np.log2(np.maximum(lens, 1)) * 4).astype(np.int64)  # 4 buckets per octave: <= 19% padding
    order = np.argsort(key, kind="stable")
    _keys, starts = np.unique(key[order], return_index=True)
    ends = np.append(starts[1:], len(order))
    for s, e in zip(starts.tolist(), ends.tolist(), strict=True):
        idx = order[s:e]
        nmax = int(lens[idx].max())
        per = max(1, BATCH_BYTES // (4 * nmax * max(nmax, dim)))
        for i in range(0, len(idx), per):
            yield idx[i:i + per]


def _pad(values: Tensor, starts: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """Gather documents of ``values [n, ...]`` into ``[B, Nmax, ...]`` (zeros after each end) and the ``[B, Nmax]``
    mask."""
    nmax = int(lens.max())
    pos = torch.arange(nmax).unsqueeze(0)
    mask = pos < lens.unsqueeze(1)
    rows = (starts.unsqueeze(1) + pos).masked_fill(~mask, 0)
    x = values.index_select(0, rows.reshape(-1)).view(len(lens), nmax, *values.shape[1:])
    return x.masked_fill_(~mask.view(*mask.shape, *([1] * (values.ndim - 1))), 0), mask


class _Batches:
    """The padded batches of a chunk with the signals the method needs (token ids, collection statistics)."""

    def __init__(self, chunk: Chunk, spec: ReduceSpec, tokens: TokenTable | None) -> None:
        self.lens_np = np.asarray(chunk.doclens, dtype=np.int64)
        self.vectors = chunk.vectors.float()
        self.lens = torch.from_numpy(self.lens_np)
        self.starts = torch.cumsum(self.lens, 0) - self.lens
        if spec.needs_tokens and tokens is None:
            raise UniprunerError(f"method {spec.name!r} needs the token ids of every vector: give the collection "
                                 "text and the tokenizer (corpus= and tokenizer=, or --corpus/--model in the CLI)")
        self.ids = tokens.chunk_ids(chunk) if spec.needs_tokens and tokens is not None else None
        self.shared = tokens.signals() if self.ids is not None and tokens is not None else {}

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor, dict[str, Any]]]:
        """``(documents of the batch, x [B, N, D], mask [B, N], signals)``."""
        for idx in _batches(self.lens_np, self.vectors.shape[1]):
            ti = torch.from_numpy(idx)
            x, mask = _pad(self.vectors, self.starts[ti], self.lens[ti])
            signals = dict(self.shared)
            if self.ids is not None:
                signals["token_ids"] = _pad(self.ids, self.starts[ti], self.lens[ti])[0]
            yield ti, x, mask, signals


def _reduce_batch(m: Method, x: Tensor, mask: Tensor, counts: Tensor, signals: dict[str, Any]
                  ) -> tuple[Tensor, Tensor]:
    """Output vectors ``[B, K, D]`` (pooled means, or kept vectors in document order) and their mask ``[B, K]``."""
    mb = dataclasses.replace(m, budget=Budget.per_row(counts))
    if isinstance(mb, MergingMethod):  # pooling: cluster means, protected vectors first
        red = mb.reduce(x, mask=mask, **signals)
        omask = red.mask if red.mask is not None else torch.ones(red.tokens.shape[:2], dtype=torch.bool)
        return red.tokens, omask
    keep = mb.select(x, mask=mask, **signals)
    ok = keep >= 0
    out = torch.gather(x, 1, keep.clamp(min=0).unsqueeze(2).expand(-1, -1, x.shape[2])) * ok.unsqueeze(2)
    return out, ok


def chunk_scores(chunk: Chunk, spec: ReduceSpec, tokens: TokenTable | None = None) -> np.ndarray:
    """Scores of every vector of a chunk for a global budget, float64 ``[n_vectors]`` (Lassance et al. 2021).

    The method's own ``score`` on each batch. Protected vectors, and the best vector of every document without
    protected ones, score ``+inf``: they are kept whatever the budget, so no document ends up empty.
    """
    m = spec.reducer
    if not isinstance(m, ScoringMethod):
        raise UniprunerError(f"{m.name!r} has no per-vector score; a global budget needs one of "
                             f"{', '.join(_global_methods())}")
    batches = _Batches(chunk, spec, tokens)
    out = np.empty(int(batches.lens.sum()), dtype=np.float64)
    for ti, x, mask, signals in batches:
        s = m.score(x, mask=mask, **signals).double().masked_fill(~mask, -math.inf)
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        s = s.masked_fill(mask & (pos < spec.protected), math.inf)
        best = s.argmax(dim=1, keepdim=True)
        s.scatter_(1, best, math.inf)
        rows = (batches.starts[ti].unsqueeze(1) + pos)[mask]
        out[rows.numpy()] = s[mask].numpy()
    return out


def global_counts(scores: np.ndarray, doclens: np.ndarray, total: int) -> np.ndarray:
    """Vectors kept per document when ``total`` vectors are kept over the whole index by score.

    The ``total`` highest scores win (ties towards the earlier vector); ``+inf`` scores (protected / best of each
    document) always win, so ``total`` is raised to their number when smaller. Returns int64 ``[n_docs]``.

    >>> global_counts(np.array([np.inf, 0.1, 0.9, np.inf, 0.5]), np.array([3, 2]), 4)
    array([2, 2])
    """
    scores = np.asarray(scores, dtype=np.float64)
    doclens = np.asarray(doclens, dtype=np.int64)
    if scores.shape != (int(doclens.sum()),):
        raise UniprunerError(f"scores has {scores.shape[0]} entries but the documents have {int(doclens.sum())}")
    total = int(min(max(total, int(np.isposinf(scores).sum())), scores.size))
    order = np.argsort(-scores, kind="stable")[:total]
    doc_of = np.repeat(np.arange(doclens.size), doclens)
    return np.bincount(doc_of[order], minlength=doclens.size).astype(np.int64)


def global_total(n_vectors: int, n_docs: int, spec: ReduceSpec) -> int:
    """Vectors kept over the whole index by a global budget: the budget applied to all ``n_vectors`` at once
    (``N // factor``, ``ratio * N`` half up), or ``keep`` per document on average (``keep * n_docs``)."""
    b = spec.budget
    if b.keep is not None:
        return int(min(n_vectors, b.keep * n_docs))
    if b.factor is not None:
        return int(n_vectors // b.factor)
    return int(b.counts(torch.tensor([n_vectors]), n_max=n_vectors)[0])


def reduce_chunk(chunk: Chunk, spec: ReduceSpec | Method, *, counts: np.ndarray | None = None,
                 tokens: TokenTable | None = None) -> Chunk:
    """Reduce every document of a chunk; the per-chunk task of the compress pipeline (pure, picklable inputs).

    Token pooling (Clavié et al., 2024) or pruning (Lassance et al., 2021) of each document by the spec's registry
    method, in batches of documents of similar length, each document with its own count (``Budget.per_row``).
    Outputs are cluster means (pooling) or the kept vectors in document order (pruning), float32.

    Parameters
    ----------
    chunk : Chunk
        Decoded documents.
    spec : ReduceSpec or Method
        Method and budget (a Method instance: per-document scope).
    counts : numpy.ndarray, optional
        Vectors kept per document (int64 ``[docs in chunk]``), e.g. from :func:`global_counts`; default: the
        per-document budget :func:`target_counts`.
    tokens : TokenTable, optional
        Token ids, for ``idf`` / ``stopwords``.

    Returns
    -------
    Chunk
        Same ``index``, ``doc_offset`` and documents; every document keeps ``>= 1`` vector.

    Examples
    --------
    >>> ch = Chunk(0, 0, np.array([4, 1]), torch.eye(5, 3))
    >>> out = reduce_chunk(ch, ReduceSpec("first", keep=2))
    >>> out.doclens.tolist(), out.vectors.shape
    ([2, 1], torch.Size([3, 3]))
    """
    spec = as_spec(spec)
    lens_np = np.asarray(chunk.doclens, dtype=np.int64)
    if lens_np.size and int(lens_np.min()) < 1:
        raise UniprunerError(f"chunk {chunk.index}: a document has no vectors")
    if int(lens_np.sum()) != chunk.vectors.shape[0]:
        raise UniprunerError(f"chunk {chunk.index}: doclens sum to {int(lens_np.sum())} but there are "
                             f"{chunk.vectors.shape[0]} vectors")
    batches = _Batches(chunk, spec, tokens)
    lens = batches.lens
    if counts is None:
        target = target_counts(lens_np, spec)
    else:
        target = torch.as_tensor(np.asarray(counts), dtype=torch.long)
        if target.shape != lens.shape:
            raise UniprunerError(f"counts has shape {tuple(target.shape)}, expected ({lens.numel()},)")
        target = torch.minimum(target.clamp(min=1), lens)
    out_lens = torch.zeros_like(lens)
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []
    for ti, x, mask, signals in batches:
        out, omask = _reduce_batch(spec.reducer, x, mask, target[ti], signals)
        out_lens[ti] = omask.sum(dim=1)
        pieces.append((ti, omask, out[omask]))
    out_starts = torch.cumsum(out_lens, 0) - out_lens
    result = batches.vectors.new_empty(int(out_lens.sum()), batches.vectors.shape[1])
    for ti, omask, rows in pieces:
        rank = omask.long().cumsum(dim=1) - 1  # packed position of every real output slot
        dst = (out_starts[ti].unsqueeze(1) + rank)[omask]
        result[dst] = rows
    return Chunk(chunk.index, chunk.doc_offset, out_lens.numpy().astype(np.int64), result)
