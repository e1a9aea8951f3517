"""Per-document reduction of multi-vector (ColBERT) documents: pooling and pruning.

Every method maps a chunk of contiguous documents (flat float32 vectors + ``doclens``) to a reduced chunk with the
same documents, each keeping at least one vector. Documents are processed in batches of similar length (padded
``[B, N, D]`` tensors with a validity mask), so all work is vectorised torch (or one faiss call per document for
k-means).

Pooling (vectors replaced by cluster means; Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector
Retrieval with Minimal Performance Impact via Token Pooling", 2024):

* ``ward``: hierarchical Ward clustering on L2-normalised vectors (core :func:`unipruner.reduce.ward_labels`: exact
  Ward in Euclidean geometry);
* ``ward_cosine``: PyLate's criterion (``pool_factor``): scipy Ward fed the cosine distances ``1 - cos`` as if they
  were Euclidean, i.e. Lance–Williams on ``(1 - cos)^2``; batched here with the core's Ward merge loop. Not a valid
  Euclidean geometry, but it favours tight clusters and retains more nDCG on Cranfield (see docs/colbert.md);
* ``kmeans``: k-means on L2-normalised vectors with faiss (one :class:`faiss.Kmeans` per document);
* ``sequential``: 1-D pooling of consecutive vectors (equal runs along the sequence).

Pruning (a subset of the vectors survives; Lassance et al., "A Study on Token Pruning for ColBERT", 2021; Acquavia
et al., "Static Pruning for Multi-Representation Dense Retrieval", DocEng 2023):

* ``first``: keep the first k vectors;  ``norm``: largest vector norm (core ``hidden_norm``);
* ``duplicates``: drop near-duplicates (a vector's score is ``1 - max cos`` to the vectors before it);
* ``diversity``: max-min diverse subset (core ``divprune``);  ``centroid``: most similar to the document centroid;
* ``idf`` and ``stopwords``: need the token ids of every vector (collection text + the encoder's tokenizer, see
  :class:`TokenTable`); core ``idf`` / ``stopword_mask``.

Budgets: ``factor`` (about ``n / factor`` vectors remain; PyLate's ``max(n // factor, 1)`` clusters), ``ratio``
(fraction kept) or ``keep`` (vectors per document); ``protected`` leading vectors (e.g. ``[CLS]``/``[D]``) always
survive. ``scope="global"`` (pruning methods) spends one removal budget over the whole index by score instead of
per document: see :func:`global_counts`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ..._pooling import _ward_chunk
from ...errors import UniprunerError
from ...reduce import ward_labels
from ...scorers import diversity, importance
from ...select import topk
from .formats.base import Chunk

__all__ = [
    "GLOBAL_METHODS",
    "METHODS",
    "POOLING_METHODS",
    "ReduceSpec",
    "TokenTable",
    "chunk_scores",
    "global_counts",
    "reduce_chunk",
    "target_counts",
]

POOLING_METHODS = ("ward", "ward_cosine", "kmeans", "sequential")
PRUNING_METHODS = ("first", "norm", "duplicates", "diversity", "centroid", "idf", "stopwords")
METHODS = POOLING_METHODS + PRUNING_METHODS
#: methods with a score comparable across documents (usable with ``scope="global"``)
GLOBAL_METHODS = ("norm", "duplicates", "centroid", "idf", "stopwords")
TOKEN_METHODS = ("idf", "stopwords")

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
    """What to do to every document: method, budget, protected vectors, scope.

    Exactly one of ``factor``, ``ratio`` or ``keep`` is set (Clavié et al. 2024 pool factor; Lassance et al. 2021
    pruning ratio / first-k).

    Attributes
    ----------
    method : str
        One of :data:`METHODS`.
    factor : float, optional
        Pool factor >= 1: ``p + max((n - p) // factor, 1)`` vectors remain.
    ratio : float, optional
        Fraction of each document's vectors kept, in ``(0, 1]`` (at least one, half up).
    keep : int, optional
        Vectors kept per document (>= 1; shorter documents keep all).
    protected : int
        Leading vectors of each document kept unchanged.
    scope : {"document", "global"}
        ``global``: one budget over the whole index, spent by score (pruning methods in :data:`GLOBAL_METHODS`).
    seed : int
        Seed of k-means.
    """

    method: str
    factor: float | None = None
    ratio: float | None = None
    keep: int | None = None
    protected: int = 0
    scope: str = "document"
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise UniprunerError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        given = [n for n in ("factor", "ratio", "keep") if getattr(self, n) is not None]
        if len(given) != 1:
            raise UniprunerError(f"give exactly one budget: factor=, ratio= or keep= (got {given or 'none'})")
        f, r, k = self.factor, self.ratio, self.keep
        if f is not None and (isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(f)
                              or f < 1):
            raise UniprunerError(f"factor must be a finite number >= 1 (2 halves the vectors), got {f!r}")
        if r is not None and (isinstance(r, bool) or not isinstance(r, (int, float)) or not 0 < float(r) <= 1):
            raise UniprunerError(f"ratio is the fraction of vectors kept and must be in (0, 1], got {r!r}; "
                                 "every document keeps at least one vector, so 0 is not allowed")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            raise UniprunerError(f"keep must be an int >= 1 (every document keeps at least one vector), got {k!r}")
        if isinstance(self.protected, bool) or not isinstance(self.protected, int) or self.protected < 0:
            raise UniprunerError(f"protected must be a non-negative int (leading vectors), got {self.protected!r}")
        if self.scope not in ("document", "global"):
            raise UniprunerError(f"scope must be 'document' or 'global', got {self.scope!r}")
        if self.scope == "global" and self.method not in GLOBAL_METHODS:
            raise UniprunerError(f"scope='global' spends the budget by score across documents and works with "
                                 f"{', '.join(GLOBAL_METHODS)}; {self.method!r} is per document only")

    @property
    def needs_tokens(self) -> bool:
        """True for methods that need the token ids of every vector."""
        return self.method in TOKEN_METHODS


def target_counts(doclens: np.ndarray | Tensor, spec: ReduceSpec) -> Tensor:
    """Vectors kept per document under a per-document budget, ``[n_docs]`` long, each in ``[1, n]``.

    Pool factor as in PyLate / Clavié et al. 2024: ``p + max((n - p) // factor, 1)`` (``n`` when ``n <= p``).

    >>> target_counts(np.array([1, 4, 9]), ReduceSpec("ward", factor=2))
    tensor([1, 2, 4])
    >>> target_counts(np.array([1, 4, 9]), ReduceSpec("first", keep=3, protected=1))
    tensor([1, 3, 3])
    """
    n = torch.as_tensor(np.asarray(doclens), dtype=torch.long)
    p = torch.clamp(n, max=spec.protected)
    rest = n - p
    if spec.factor is not None:
        t = p + torch.where(rest > 0, torch.div(rest.double(), float(spec.factor), rounding_mode="floor").long()
                            .clamp(min=1), torch.zeros_like(rest))
    elif spec.ratio is not None:
        t = torch.floor(n.double() * float(spec.ratio) + 0.5).long()
    else:
        t = torch.full_like(n, int(spec.keep or 1))
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


def _pad(vectors: Tensor, starts: Tensor, lens: Tensor) -> tuple[Tensor, Tensor]:
    """Gather documents into ``[B, Nmax, D]`` (zeros after each document's end) and their ``[B, Nmax]`` mask."""
    nmax = int(lens.max())
    pos = torch.arange(nmax).unsqueeze(0)
    mask = pos < lens.unsqueeze(1)
    rows = (starts.unsqueeze(1) + pos).masked_fill(~mask, 0)
    x = vectors.index_select(0, rows.reshape(-1)).view(len(lens), nmax, -1)
    return x.masked_fill_(~mask.unsqueeze(2), 0.0), mask


# ----------------------------------------------------------------------------------------------
# scores (higher = keep) of the pruning methods, on a padded batch
# ----------------------------------------------------------------------------------------------


def _unit(x: Tensor) -> Tensor:
    return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-12)


def _scores(method: str, x: Tensor, mask: Tensor, ids: Tensor | None, tokens: TokenTable | None) -> Tensor:
    """Scores ``[B, N]`` for a padded batch (``-inf`` at padding)."""
    b, n, _ = x.shape
    if method == "first":
        s = -torch.arange(n, dtype=torch.float32).expand(b, n).clone()
    elif method == "norm":
        s = importance.hidden_norm(x, mask=mask)
    elif method == "duplicates":
        xn = _unit(x)
        sim = xn @ xn.transpose(1, 2)  # [B, N, N]
        earlier = torch.ones(n, n, dtype=torch.bool).tril(-1)  # j < i
        ok = earlier.unsqueeze(0) & mask.unsqueeze(1)
        mx = sim.masked_fill(~ok, -math.inf).amax(dim=2)
        s = 1.0 - torch.where(torch.isfinite(mx), mx, torch.full_like(mx, -1.0))  # the first vector scores 2
    elif method == "centroid":
        xn = _unit(x)
        m = mask.unsqueeze(2).to(x.dtype)
        centre = _unit((xn * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp(min=1))
        s = (xn * centre).sum(dim=2)
    elif method in TOKEN_METHODS:
        if ids is None or tokens is None:
            raise UniprunerError(f"method {method!r} needs the token ids of every vector: give the collection text "
                                 "and the tokenizer (corpus= and tokenizer=, or --corpus/--model in the CLI)")
        s = importance.idf(ids, torch.from_numpy(tokens.doc_freq), tokens.n_docs, mask=mask)
        if method == "stopwords":
            stop = importance.stopword_mask(ids, torch.from_numpy(tokens.stop_ids))
            s = torch.where(stop, s - 1e4, s)  # stopwords and punctuation go first, then by IDF
    else:  # pragma: no cover - ReduceSpec validates the name
        raise UniprunerError(f"{method!r} is not a pruning method")
    return s.float().masked_fill(~mask, -math.inf)


# ----------------------------------------------------------------------------------------------
# pooling on a padded batch -> labels [B, N] (-1 at padding), slots numbered from 0 per row
# ----------------------------------------------------------------------------------------------


@contextmanager
def _one_thread(faiss: Any = None) -> Iterator[None]:
    """Run a loop of many small tensor ops on one thread (intra-op threads only add synchronisation there, and
    under CPU contention they slow the Ward merge loop down >10x); restores the previous settings."""
    before = torch.get_num_threads()
    fbefore = faiss.omp_get_max_threads() if faiss is not None else None
    torch.set_num_threads(1)
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
        if faiss is not None and fbefore is not None:
            faiss.omp_set_num_threads(fbefore)


def _sequential_labels(mask: Tensor, n_prot: Tensor, k_rest: Tensor) -> Tensor:
    """1-D pooling: the ``n - p`` unprotected vectors split into ``k`` runs of (almost) equal length."""
    n = mask.shape[1]
    pos = torch.arange(n).unsqueeze(0)
    nv = mask.sum(dim=1, keepdim=True)
    rest = (nv - n_prot.unsqueeze(1)).clamp(min=1)
    r = (pos - n_prot.unsqueeze(1)).clamp(min=0)
    lab = torch.div(r * k_rest.unsqueeze(1), rest, rounding_mode="floor") + n_prot.unsqueeze(1)
    lab = torch.where(pos < n_prot.unsqueeze(1), pos, lab)
    return lab.masked_fill(~mask, -1)


def _kmeans_labels(x: Tensor, mask: Tensor, n_prot: Tensor, k_rest: Tensor, seed: int) -> Tensor:
    """k-means (faiss) on the unit vectors of each document's unprotected part; one faiss call per document."""
    from ...models import require

    faiss = require("faiss", "colbert")
    b, n, _ = x.shape
    lab = torch.full((b, n), -1, dtype=torch.long)
    nv = mask.sum(dim=1)
    xn = _unit(x).float().contiguous().numpy()
    with _one_thread(faiss):
        _kmeans_loop(faiss, xn, lab, nv, n_prot, k_rest, seed)
    return lab


def _kmeans_loop(faiss: Any, xn: np.ndarray, lab: Tensor, nv: Tensor, n_prot: Tensor, k_rest: Tensor,
                 seed: int) -> None:
    b, _, d = xn.shape
    for i in range(b):  # one clustering per document (faiss works on one point set at a time)
        p, m, k = int(n_prot[i]), int(nv[i]), int(k_rest[i])
        lab[i, :p] = torch.arange(p)
        if m - p <= 0:
            continue
        pts = np.ascontiguousarray(xn[i, p:m])
        if k >= m - p:
            lab[i, p:m] = torch.arange(m - p) + p
            continue
        km = faiss.Kmeans(d, k, niter=20, seed=seed + 1, min_points_per_centroid=1, max_points_per_centroid=1 << 30,
                          verbose=False)
        km.train(pts)
        _, a = km.index.search(pts, 1)
        lab[i, p:m] = torch.from_numpy(a[:, 0].astype(np.int64)) + p


def _ward_cosine_labels(x: Tensor, mask: Tensor, protected: int, k_rest: Tensor) -> Tensor:
    """Ward on ``(1 - cos)^2`` (PyLate / scipy fed cosine distances), batched; labels unique per cluster.

    Uses the core's Lance–Williams merge loop (``unipruner._pooling._ward_chunk``) on a custom distance matrix.
    """
    b, n, _ = x.shape
    p = min(protected, n)
    xr, mr = x[:, p:], mask[:, p:]
    nr = mr.sum(dim=1)
    pos = torch.arange(n).expand(b, n)
    lab = torch.where(mask, pos, torch.full_like(pos, -1))
    if xr.shape[1] == 0:
        return lab
    u = _unit(xr.float())
    dist = torch.bmm(u, u.transpose(1, 2)).neg_().add_(1.0).clamp_(min=0.0).square_()  # (1 - cos)^2, in place
    if not bool(torch.equal(dist, dist.transpose(1, 2))):  # the merge loop compares a row with a column by value
        dist = torch.minimum(dist, dist.transpose(1, 2))
    dist.masked_fill_(~mr.unsqueeze(1), math.inf)
    dist.diagonal(dim1=1, dim2=2).fill_(math.inf)
    steps = (nr - torch.minimum(k_rest.clamp(min=1), nr)).clamp(min=0)
    order = torch.argsort(steps, descending=True, stable=True)  # the merge loop wants most merges first
    parent = torch.empty(b, xr.shape[1], dtype=torch.long)
    with _one_thread():
        parent[order] = _ward_chunk(dist[order].contiguous(), mr[order], steps[order])
    return torch.cat([lab[:, :p], torch.where(mr, parent + p, torch.full_like(parent, -1))], dim=1)


def _compact(lab: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Renumber labels by first member (empty clusters removed); return labels and slot counts ``[B]``."""
    b, n = lab.shape
    big = n + 1
    safe = torch.where(mask, lab, torch.full_like(lab, n))
    pos = torch.arange(n).expand(b, n)
    first = torch.full((b, n + 1), big, dtype=torch.long)
    first.scatter_reduce_(1, safe, pos, reduce="amin", include_self=True)
    first = first[:, :n]
    used = first < big
    order = torch.argsort(first, dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n).expand(b, n).contiguous())
    out = rank.gather(1, safe.clamp(max=n - 1)).masked_fill(~mask, -1)
    return out, used.sum(dim=1)


def _pool_batch(spec: ReduceSpec, x: Tensor, mask: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
    """Pooled vectors ``[B, K, D]`` (cluster means) and per-row output counts ``[B]``."""
    nv = mask.sum(dim=1)
    n_prot = torch.clamp(nv, max=spec.protected)
    k_rest = (counts - n_prot).clamp(min=0)
    if spec.method == "ward":
        rest = mask & (torch.arange(x.shape[1]).unsqueeze(0) >= n_prot.unsqueeze(1))
        with _one_thread():
            rl = ward_labels(x, k_rest.clamp(min=1), mask=rest, chunk_size=x.shape[0])
        pos = torch.arange(x.shape[1]).expand_as(rl)
        lab = torch.where(rest, rl + spec.protected, torch.where(mask, pos, torch.full_like(pos, -1)))
    elif spec.method == "ward_cosine":
        lab = _ward_cosine_labels(x, mask, spec.protected, k_rest)
    elif spec.method == "kmeans":
        lab = _kmeans_labels(x, mask, n_prot, k_rest, spec.seed)
    else:
        lab = _sequential_labels(mask, n_prot, k_rest)
    lab, n_out = _compact(lab, mask)
    kmax = int(n_out.max())
    b, _, d = x.shape
    slot = (lab + torch.arange(b).unsqueeze(1) * kmax).masked_fill(~mask, b * kmax)
    sums = x.new_zeros(b * kmax + 1, d).index_add_(0, slot.reshape(-1), x.reshape(-1, d))
    cnt = torch.zeros(b * kmax + 1, dtype=x.dtype).index_add_(0, slot.reshape(-1), mask.reshape(-1).to(x.dtype))
    out = (sums[:-1] / cnt[:-1].clamp(min=1).unsqueeze(1)).view(b, kmax, d)
    return out, n_out


def _prune_batch(spec: ReduceSpec, x: Tensor, mask: Tensor, counts: Tensor, ids: Tensor | None,
                 tokens: TokenTable | None) -> tuple[Tensor, Tensor]:
    """Kept vectors ``[B, K, D]`` in document order and per-row output counts ``[B]``."""
    prot = spec.protected or None
    if spec.method == "diversity":
        keep = diversity.divprune(x, counts, mask=mask, protected=prot)
    else:
        keep = topk(_scores(spec.method, x, mask, ids, tokens), counts, mask=mask, protected=prot)
    ok = keep >= 0
    out = torch.gather(x, 1, keep.clamp(min=0).unsqueeze(2).expand(-1, -1, x.shape[2])) * ok.unsqueeze(2)
    return out, ok.sum(dim=1)


def chunk_scores(chunk: Chunk, spec: ReduceSpec, tokens: TokenTable | None = None) -> np.ndarray:
    """Scores of every vector of a chunk for a global budget, float64 ``[n_vectors]`` (Lassance et al. 2021).

    Protected vectors, and the best vector of every document without protected ones, score ``+inf``: they are kept
    whatever the budget, so no document ends up empty.
    """
    vectors = chunk.vectors.float()
    lens = torch.as_tensor(np.asarray(chunk.doclens), dtype=torch.long)
    starts = torch.cumsum(lens, 0) - lens
    ids_all = tokens.chunk_ids(chunk) if spec.needs_tokens and tokens is not None else None
    out = np.empty(int(lens.sum()), dtype=np.float64)
    for idx in _batches(lens.numpy(), vectors.shape[1]):
        ti = torch.from_numpy(idx)
        x, mask = _pad(vectors, starts[ti], lens[ti])
        ids = _pad_ids(ids_all, starts[ti], lens[ti]) if ids_all is not None else None
        s = _scores(spec.method, x, mask, ids, tokens).double()
        pos = torch.arange(x.shape[1]).unsqueeze(0)
        s = s.masked_fill(mask & (pos < spec.protected), math.inf)
        best = s.masked_fill(~mask, -math.inf).argmax(dim=1, keepdim=True)
        s.scatter_(1, best, math.inf)
        rows = (starts[ti].unsqueeze(1) + pos)[mask]
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
    """Vectors kept over the whole index by a global budget (``N / factor``, ``ratio * N`` or ``keep * n_docs``)."""
    if spec.factor is not None:
        return int(n_vectors // spec.factor)
    if spec.ratio is not None:
        return math.floor(n_vectors * spec.ratio + 0.5)
    return int(min(n_vectors, (spec.keep or 1) * n_docs))


def _pad_ids(ids: Tensor, starts: Tensor, lens: Tensor) -> Tensor:
    nmax = int(lens.max())
    pos = torch.arange(nmax).unsqueeze(0)
    mask = pos < lens.unsqueeze(1)
    rows = (starts.unsqueeze(1) + pos).masked_fill(~mask, 0)
    return ids[rows.reshape(-1)].view(len(lens), nmax).masked_fill(~mask, 0)


def reduce_chunk(chunk: Chunk, spec: ReduceSpec, *, counts: np.ndarray | None = None,
                 tokens: TokenTable | None = None) -> Chunk:
    """Reduce every document of a chunk; the per-chunk task of the compress pipeline (pure, picklable inputs).

    Token pooling (Clavié et al., 2024) or pruning (Lassance et al., 2021) of each document, in batches of
    documents of similar length. Vectors keep their dtype-independent float32 form; outputs are cluster means
    (pooling) or the kept vectors in document order (pruning).

    Parameters
    ----------
    chunk : Chunk
        Decoded documents.
    spec : ReduceSpec
        Method and budget.
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
    lens_np = np.asarray(chunk.doclens, dtype=np.int64)
    vectors = chunk.vectors.float()
    if lens_np.size and int(lens_np.min()) < 1:
        raise UniprunerError(f"chunk {chunk.index}: a document has no vectors")
    if int(lens_np.sum()) != vectors.shape[0]:
        raise UniprunerError(f"chunk {chunk.index}: doclens sum to {int(lens_np.sum())} but there are "
                             f"{vectors.shape[0]} vectors")
    lens = torch.from_numpy(lens_np)
    if counts is None:
        target = target_counts(lens_np, spec)
    else:
        target = torch.as_tensor(np.asarray(counts), dtype=torch.long)
        if target.shape != lens.shape:
            raise UniprunerError(f"counts has shape {tuple(target.shape)}, expected ({lens.numel()},)")
        target = torch.minimum(target.clamp(min=1), lens)
    if spec.needs_tokens and tokens is None:
        raise UniprunerError(f"method {spec.method!r} needs the token ids of every vector: give the collection text "
                             "and the tokenizer (corpus= and tokenizer=, or --corpus/--model in the CLI)")
    ids_all = tokens.chunk_ids(chunk) if spec.needs_tokens and tokens is not None else None
    starts = torch.cumsum(lens, 0) - lens
    out_lens = torch.zeros_like(lens)
    pieces: list[tuple[Tensor, Tensor, Tensor]] = []
    for idx in _batches(lens_np, vectors.shape[1]):
        ti = torch.from_numpy(idx)
        x, mask = _pad(vectors, starts[ti], lens[ti])
        if spec.method in POOLING_METHODS:
            out, n_out = _pool_batch(spec, x, mask, target[ti])
        else:
            ids = _pad_ids(ids_all, starts[ti], lens[ti]) if ids_all is not None else None
            out, n_out = _prune_batch(spec, x, mask, target[ti], ids, tokens)
        out_lens[ti] = n_out
        omask = torch.arange(out.shape[1]).unsqueeze(0) < n_out.unsqueeze(1)
        pieces.append((ti, omask, out[omask]))
    out_starts = torch.cumsum(out_lens, 0) - out_lens
    result = vectors.new_empty(int(out_lens.sum()), vectors.shape[1])
    for ti, omask, rows in pieces:
        pos = torch.arange(omask.shape[1]).unsqueeze(0)
        dst = (out_starts[ti].unsqueeze(1) + pos)[omask]
        result[dst] = rows
    return Chunk(chunk.index, chunk.doc_offset, out_lens.numpy().astype(np.int64), result)
