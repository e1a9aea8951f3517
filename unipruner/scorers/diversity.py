"""Diversity selectors: pick a set of tokens that covers the sequence, not just the top scores.

* :func:`divprune` — max-min diversity on ``1 - cos`` (DivPrune).
* :func:`kcenter` — greedy k-center / farthest-first traversal on L2-normalised tokens.
* :func:`mmr` — maximal marginal relevance: relevance to a query minus redundancy.
* :func:`greedy_saliency_diversity` — saliency plus diversity, greedily (GreedyPrune-style).
* :func:`crop_balanced` — HoloV's budget spread over spatial crops by their holistic score.

Every selector returns sorted keep indices ``[B, K]`` long exactly like
:func:`unipruner.select.topk`: the budget is resolved per row with
``Budget.coerce(budget).counts(...)`` and raised to cover the protected tokens
(``K = max(budget, n_protected)``); rows keeping fewer than ``K`` are right-padded with ``-1``;
masked positions are never returned; protected tokens are always kept and count as already
chosen. The greedy loop runs once per pick, batched over the rows (rows with different counts
simply stop picking earlier). Ties are broken towards the lower index.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .._ops import l2_normalize, pairwise_sq_dist
from .._validate import check_finite, check_mask, check_tokens, protected_mask
from ..errors import UniprunerError
from ..select import Budget

__all__ = ["crop_balanced", "divprune", "greedy_saliency_diversity", "kcenter", "mmr"]

# Upper bound on the elements of one [B, chunk, N] block of pairwise similarities.
_BLOCK = 1 << 24
_GRAM = 1 << 26  # largest Gram matrix (elements) precomputed for the greedy selectors


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_unit(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (
        0.0 <= float(value) <= 1.0
    ):
        raise UniprunerError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_row_scores(scores: object, b: int, n: int, valid: Tensor, name: str,
                      dtype: torch.dtype) -> Tensor:
    """``[B, N]`` float scores, NaN-free, finite where valid (``-inf`` allowed at padding)."""
    if not isinstance(scores, Tensor) or tuple(scores.shape) != (b, n):
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UniprunerError(f"{name} must be a tensor [B, N] = {(b, n)}, got {shape}")
    check_finite(scores, name)
    s = scores.to(device=valid.device, dtype=dtype)
    if not bool(torch.isfinite(s[valid]).all()):
        raise UniprunerError(f"{name} must be finite at valid (unmasked) positions")
    return s


def _setup(tokens: object, budget: Budget | int | float | Tensor, mask: Tensor | None,
           protected: int | Tensor | None, fname: str,
           scores_fn: Callable[[Tensor, torch.dtype], Tensor | None] | None = None,
           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
    """Validate and resolve: (features, valid [B,N], protected [B,N], counts [B], scores)."""
    x = check_tokens(tokens)
    check_finite(x, "tokens")
    if not bool(torch.isfinite(x).all()):
        raise UniprunerError("tokens contains inf; check the model outputs that produced them")
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    dtype = _compute_dtype(x)
    scores = None if scores_fn is None else scores_fn(valid, dtype)
    prot = protected_mask(protected, b, n, x.device)
    prot = torch.zeros_like(valid) if prot is None else prot & valid
    nv = valid.sum(dim=1)
    if isinstance(budget, Tensor):
        if tuple(budget.shape) != (b,):
            raise UniprunerError(
                f"a per-row budget must have shape [B] = ({b},), got {tuple(budget.shape)}"
            )
        if bool((budget < 0).any()) or bool((budget > n).any()):
            raise UniprunerError(f"per-row budgets must lie in [0, {n}], got {budget.tolist()}")
        counts = torch.minimum(budget.long().to(x.device), nv)
    else:
        bud = Budget.coerce(budget)
        if bud.data_dependent and scores is None:
            raise UniprunerError(
                f"{fname} has no scores to resolve {bud!r}; use Budget(ratio=...) or "
                "Budget(keep=...)" + (", or pass scores=" if scores_fn is not None else "")
            )
        counts = bud.counts(nv, n_max=n, scores=scores, mask=mask, protected=prot.sum(dim=1))
    counts = torch.maximum(counts, prot.sum(dim=1))
    return x.to(dtype), valid, prot, counts, scores


def _set_extreme(feats: Tensor, members: Tensor, pair: Callable[[Tensor, Tensor], Tensor],
                 *, exclude_self: bool = False) -> Tensor:
    """``max_{j in members[b]} pair(feats[b, i], feats[b, j])`` for every ``(b, i)``; ``-inf`` if
    the set is empty. ``pair(a [B, C, D], all [B, N, D]) -> [B, C, N]``. Computed in query
    blocks so memory stays bounded for long sequences."""
    b, n, _ = feats.shape
    out = torch.empty(b, n, dtype=feats.dtype, device=feats.device)
    step = max(1, _BLOCK // max(1, b * n))
    cols = torch.arange(n, device=feats.device)
    for start in range(0, n, step):
        stop = min(n, start + step)
        block = pair(feats[:, start:stop], feats)
        allowed = members.unsqueeze(1).expand(b, stop - start, n)
        if exclude_self:
            rows = torch.arange(start, stop, device=feats.device)
            allowed = allowed & (rows.unsqueeze(1) != cols.unsqueeze(0))
        out[:, start:stop] = block.masked_fill(~allowed, -math.inf).amax(dim=2)
    return out


def _cos_pair(a: Tensor, allf: Tensor) -> Tensor:
    return a @ allf.transpose(1, 2)


def _neg_sq_pair(a: Tensor, allf: Tensor) -> Tensor:
    return -pairwise_sq_dist(a, allf)


def _greedy(chosen: Tensor, valid: Tensor, counts: Tensor, state: Tensor,
            gain: Callable[[Tensor], Tensor], seed: Tensor | None,
            update: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """Pick ``counts - chosen.sum(1)`` more tokens per row, one batched argmax per pick.

    ``gain(state)`` scores the candidates of rows that already have a pick; ``seed`` scores the
    candidates of rows with nothing chosen yet; ``update(state, pick)`` folds a new pick in.
    """
    b = chosen.shape[0]
    left = counts - chosen.sum(dim=1)
    steps = int(left.max()) if b > 0 else 0
    lowest = torch.finfo(state.dtype).min
    for t in range(steps):
        active = left > t
        score = gain(state)
        if seed is not None:
            score = torch.where(chosen.any(dim=1, keepdim=True), score, seed)
        candidate = valid & ~chosen
        # a candidate always beats a non-candidate, even when its own score is -inf
        score = torch.where(candidate, score.clamp(min=lowest), -math.inf)
        pick = score.argmax(dim=1)  # first maximum: ties go to the lower index
        hit = torch.zeros_like(chosen).scatter_(1, pick.unsqueeze(1), active.unsqueeze(1))
        chosen = chosen | hit
        state = update(state, pick)
    return chosen


def _indices(chosen: Tensor, counts: Tensor) -> Tensor:
    """Chosen mask ``[B, N]`` -> sorted indices ``[B, K]`` right-padded with ``-1``."""
    b, n = chosen.shape
    kmax = int(counts.max()) if b > 0 else 0
    pos = torch.arange(n, device=chosen.device).expand(b, n)
    idx = torch.sort(pos.masked_fill(~chosen, n), dim=1).values[:, :kmax]
    return idx.masked_fill(idx == n, -1)


def _pick_rows(x: Tensor, pick: Tensor) -> Tensor:
    """``x[b, pick[b]]`` -> ``[B, D]``."""
    return x.gather(1, pick.view(-1, 1, 1).expand(-1, 1, x.shape[2])).squeeze(1)


def _dot_fn(xn: Tensor, gram: Tensor | None = None) -> Callable[[Tensor], Tensor]:
    """``pick [B] -> [B, N]``: dot product of every token with row ``b``'s pick.

    When the Gram matrix ``[B, N, N]`` fits in ``_GRAM`` elements it is computed once (one GEMM)
    and each pick gathers a row; otherwise each pick is a batched matrix-vector product, which
    re-reads all of ``xn`` (memory-bound: the slow path for long, wide sequences).
    """
    gram = _gram(xn) if gram is None else gram
    if gram is not None:
        n = xn.shape[1]
        return lambda pick: gram.gather(1, pick.view(-1, 1, 1).expand(-1, 1, n)).squeeze(1)
    return lambda pick: torch.bmm(xn, _pick_rows(xn, pick).unsqueeze(2)).squeeze(2)


def _gram(xn: Tensor) -> Tensor | None:
    """``xn @ xn^T`` when it fits in ``_GRAM`` elements, else None."""
    b, n, _ = xn.shape
    return xn @ xn.transpose(1, 2) if b * n * n <= _GRAM else None


def divprune(tokens: Tensor, budget: Budget | int | float | Tensor, *, mask: Tensor | None = None,
             protected: int | Tensor | None = None) -> Tensor:
    """Max-min diverse subset of the tokens under the distance ``1 - cos`` (DivPrune).

    Alvar et al., "DivPrune: Diversity-based Visual Token Pruning for Large Multimodal Models",
    CVPR 2025. Token selection is cast as a Max-Min Diversity Problem and solved greedily: the
    first pick is the most isolated token (largest distance to its nearest neighbour); each
    next pick is the token whose distance to the closest already-chosen token is largest.
    A running min-distance vector ``[B, N]`` makes every pick ``O(N D)`` (``O(K N D)`` in all,
    plus one ``O(N^2 D)`` pass for the first pick).

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Features compared by cosine (hidden states, or keys).
    budget : Budget, int, float or Tensor ``[B]``
        Tokens kept per row, resolved as in :func:`unipruner.select.topk` (a ratio or a count;
        score-dependent budgets are not available here).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are never picked and never count as neighbours.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Tokens always kept; they count as already chosen, so the greedy search starts from
        them (and skips the most-isolated first pick).

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1`` for rows keeping fewer than ``K``.

    Notes
    -----
    Ties are broken towards the lower index. Zero vectors have cosine 0 with everything. We
    follow the paper's selection rule; only the implementation (batched, running minimum) is
    ours.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [-1.0, 0.05]]])
    >>> divprune(x, 2)  # 3 is the most isolated, then 0 is the farthest from it
    tensor([[0, 3]])
    """
    x, valid, prot, counts, _ = _setup(tokens, budget, mask, protected, "divprune")
    xn = l2_normalize(x)
    gram = _gram(xn)
    dot = _dot_fn(xn, gram)
    b, n, _ = x.shape
    has_prot = prot.any(dim=1)
    state = 1.0 - _set_extreme(xn, prot, _cos_pair) if bool(has_prot.any()) else (
        torch.full((b, n), math.inf, dtype=x.dtype, device=x.device))
    need_seed = bool((~has_prot & (counts > 0)).any())
    seed = None
    if need_seed and gram is not None:  # nearest-neighbour distance from the Gram matrix
        eye = torch.eye(n, dtype=torch.bool, device=x.device)
        allowed = valid.unsqueeze(1) & ~eye
        seed = 1.0 - gram.masked_fill(~allowed, -math.inf).amax(dim=2)
    elif need_seed:
        seed = 1.0 - _set_extreme(xn, valid, _cos_pair, exclude_self=True)
    chosen = _greedy(prot.clone(), valid, counts, state, lambda s: s, seed,
                     lambda s, p: torch.minimum(s, 1.0 - dot(p)))
    return _indices(chosen, counts)


def kcenter(tokens: Tensor, budget: Budget | int | float | Tensor, *,
            scores: Tensor | None = None, mask: Tensor | None = None,
            protected: int | Tensor | None = None) -> Tensor:
    """Greedy k-center (farthest-first traversal) on L2-normalised tokens.

    Gonzalez, "Clustering to minimize the maximum intercluster distance", Theoretical Computer
    Science 1985 (a 2-approximation of the k-center problem); used for visual token pruning in
    ToDRE (Li et al., "Beyond Attention or Similarity: Maximizing Conditional Diversity for
    Token Pruning in MLLMs", 2025). The first centre is the highest-``scores`` token when
    scores are given, else the token closest to the mean of the valid (normalised) tokens;
    each next centre is the token farthest (Euclidean) from its nearest centre.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Features; L2-normalised before measuring Euclidean distances.
    budget : Budget, int, float or Tensor ``[B]``
        Tokens kept per row, resolved as in :func:`unipruner.select.topk`; with ``scores``
        given, score-dependent budgets (threshold, knee) work too.
    scores : Tensor ``[B, N]``, optional
        Importance used to seed the first centre (``-inf`` allowed at masked positions).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are never picked and are not part of the mean.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Tokens always kept; they are the initial centres (no seed pick then).

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1``.

    Notes
    -----
    How it differs from :func:`divprune`: on unit vectors ``||a - b||^2 = 2 (1 - cos)``, so
    after the first pick both run the same farthest-first rule (up to rounding); they differ
    in the seed. DivPrune seeds with the most isolated token (an outlier), while Gonzalez's
    seed is arbitrary; we make it deterministic and representative instead: the most salient
    token (ToDRE seeds with the most important token) or the most central one (medoid-like).
    ToDRE's task-relevance stage is not part of this selector. Ties go to the lower index.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.9, 0.4], [0.0, 1.0], [-1.0, 0.1]]])
    >>> kcenter(x, 2)  # 2 is the most central, 0 the farthest from it
    tensor([[0, 2]])
    >>> kcenter(x, 2, scores=torch.tensor([[0.0, 0.0, 0.0, 5.0]]))
    tensor([[0, 3]])
    """
    def _scores(valid: Tensor, dtype: torch.dtype) -> Tensor | None:
        if scores is None:
            return None
        return _check_row_scores(scores, valid.shape[0], valid.shape[1], valid, "scores", dtype)

    x, valid, prot, counts, s = _setup(tokens, budget, mask, protected, "kcenter", _scores)
    xn = l2_normalize(x)
    dot = _dot_fn(xn)
    b, n, _ = x.shape
    has_prot = prot.any(dim=1)
    # state = squared distance to the nearest centre
    state = -_set_extreme(xn, prot, _neg_sq_pair) if bool(has_prot.any()) else (
        torch.full((b, n), math.inf, dtype=x.dtype, device=x.device))
    seed: Tensor | None = None
    if bool((~has_prot & (counts > 0)).any()):
        if s is not None:
            seed = s
        else:
            vf = valid.to(x.dtype).unsqueeze(2)
            mean = (xn * vf).sum(dim=1) / vf.sum(dim=1).clamp(min=1)
            seed = -((xn - mean.unsqueeze(1)) ** 2).sum(dim=2)

    sq_norm = (xn * xn).sum(dim=2)  # 1, or 0 for zero vectors

    def _update(st: Tensor, pick: Tensor) -> Tensor:
        # ||x - c||^2 = ||x||^2 + ||c||^2 - 2 x.c : one batched mat-vec per pick
        dist = sq_norm + sq_norm.gather(1, pick.unsqueeze(1)) - 2.0 * dot(pick)
        return torch.minimum(st, dist.clamp(min=0.0))

    chosen = _greedy(prot.clone(), valid, counts, state, lambda st: st, seed, _update)
    return _indices(chosen, counts)


def mmr(tokens: Tensor, query: Tensor | None, budget: Budget | int | float | Tensor, *,
        lambda_: float = 0.5, mask: Tensor | None = None, protected: int | Tensor | None = None,
        relevance: Tensor | None = None) -> Tensor:
    """Maximal Marginal Relevance: relevant to the query, not redundant with what is kept.

    Carbonell & Goldstein, "The Use of MMR, Diversity-Based Reranking for Reordering Documents
    and Producing Summaries", SIGIR 1998. Greedily picks

    ``argmax_d  lambda_ * rel(d) - (1 - lambda_) * max_{s chosen} cos(d, s)``

    with ``rel(d) = cos(d, query)`` (or the given ``relevance``). The first pick (nothing
    chosen or protected yet) is the most relevant token.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Token / passage embeddings.
    query : Tensor ``[B, D]`` or ``[D]``, or None
        Query embedding (a ``[D]`` query is shared by the batch). May be ``None`` when
        ``relevance`` is given (which then takes precedence).
    budget : Budget, int, float or Tensor ``[B]``
        Tokens kept per row, resolved as in :func:`unipruner.select.topk`; score-dependent
        budgets (threshold, knee) are resolved on the relevance.
    lambda_ : float
        Trade-off in ``[0, 1]``: ``1`` = pure relevance (top-k), ``0`` = pure novelty.
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are never picked.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Tokens always kept; they count as already chosen (they make later picks redundant).
    relevance : Tensor ``[B, N]``, optional
        Precomputed relevance (e.g. cross-encoder scores); its scale should be comparable to
        cosine similarities for ``lambda_`` to mean the same thing.

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1``.

    Notes
    -----
    Redundancy is the cosine between token embeddings as in the paper's ``Sim_2``; relevance
    defaults to cosine with the query (``Sim_1``). Ties go to the lower index.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.95, 0.3], [0.6, 0.8], [-1.0, 0.0]]])
    >>> q = torch.tensor([[0.9, 0.3]])
    >>> mmr(x, q, 2, lambda_=0.5)  # 0 is nearly a duplicate of 1
    tensor([[1, 2]])
    >>> mmr(x, q, 2, lambda_=1.0)
    tensor([[0, 1]])
    """
    lam = _check_unit(lambda_, "lambda_")

    def _relevance(valid: Tensor, dtype: torch.dtype) -> Tensor:
        b, n = valid.shape
        if relevance is not None:
            return _check_row_scores(relevance, b, n, valid, "relevance", dtype)
        if query is None:
            raise UniprunerError("mmr needs a query [B, D] or a relevance [B, N]")
        if not isinstance(query, Tensor) or query.ndim not in (1, 2):
            shape = tuple(query.shape) if isinstance(query, Tensor) else type(query).__name__
            raise UniprunerError(
                f"query must be a tensor [B, D] or [D], got {shape}; mean-pool multi-vector "
                "queries first or pass relevance="
            )
        q = query if query.ndim == 2 else query.unsqueeze(0).expand(b, -1)
        d = tokens.shape[2]
        if q.shape != (b, d):
            raise UniprunerError(
                f"query must have shape [B, D] = {(b, d)} to match the tokens, got "
                f"{tuple(query.shape)}"
            )
        if not q.is_floating_point() or not bool(torch.isfinite(q).all()):
            raise UniprunerError("query must be a finite floating-point tensor (NaN or inf found)")
        qn = l2_normalize(q.to(device=valid.device, dtype=dtype))
        tn = l2_normalize(tokens.to(dtype))
        return torch.bmm(tn, qn.unsqueeze(2)).squeeze(2)

    x, valid, prot, counts, rel = _setup(tokens, budget, mask, protected, "mmr", _relevance)
    assert rel is not None
    xn = l2_normalize(x)
    dot = _dot_fn(xn)
    b, n, _ = x.shape
    # state = max cosine to the chosen set (-inf while empty)
    state = _set_extreme(xn, prot, _cos_pair) if bool(prot.any()) else torch.full(
        (b, n), -math.inf, dtype=x.dtype, device=x.device)
    chosen = _greedy(prot.clone(), valid, counts, state,
                     lambda st: lam * rel - (1.0 - lam) * st, rel,
                     lambda st, p: torch.maximum(st, dot(p)))
    return _indices(chosen, counts)


def greedy_saliency_diversity(tokens: Tensor, scores: Tensor,
                              budget: Budget | int | float | Tensor, *, alpha: float = 0.5,
                              mask: Tensor | None = None,
                              protected: int | Tensor | None = None) -> Tensor:
    """Greedy trade-off between saliency and diversity (GreedyPrune-style).

    After Pei et al., "GreedyPrune: Retenting Critical Visual Token Set for Large Vision
    Language Models", arXiv 2025, which casts pruning as the joint optimisation of semantic
    saliency and visual diversity solved greedily. Each pick maximises

    ``alpha * sal(d) + (1 - alpha) * min_{s chosen} (1 - cos(d, s)) / 2``

    where ``sal`` is ``scores`` min-max normalised to ``[0, 1]`` over each row's valid tokens
    (so both terms live in ``[0, 1]``). The first pick (nothing chosen or protected) is the
    most salient token.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Features compared by cosine.
    scores : Tensor ``[B, N]``
        Saliency (higher = more important; e.g. text-to-image attention); ``-inf`` allowed at
        masked positions.
    budget : Budget, int, float or Tensor ``[B]``
        Tokens kept per row, resolved as in :func:`unipruner.select.topk` (score-dependent
        budgets are resolved on ``scores``).
    alpha : float
        Weight of saliency in ``[0, 1]``: ``1`` = top-k by score, ``0`` = farthest-first.
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are never picked.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Tokens always kept; they count as already chosen.

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1``.

    Notes
    -----
    The objective above is our own concrete form of the paper's saliency-plus-diversity
    criterion (normalisation and the min-distance diversity term are our choices). Ties go to
    the lower index.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.99, 0.1], [0.0, 1.0]]])
    >>> greedy_saliency_diversity(x, torch.tensor([[1.0, 0.9, 0.5]]), 2, alpha=0.2)
    tensor([[0, 2]])
    >>> greedy_saliency_diversity(x, torch.tensor([[1.0, 0.9, 0.5]]), 2, alpha=1.0)
    tensor([[0, 1]])
    """
    a = _check_unit(alpha, "alpha")

    def _scores(valid: Tensor, dtype: torch.dtype) -> Tensor:
        return _check_row_scores(scores, valid.shape[0], valid.shape[1], valid, "scores", dtype)

    x, valid, prot, counts, s = _setup(tokens, budget, mask, protected,
                                       "greedy_saliency_diversity", _scores)
    assert s is not None
    lo = s.masked_fill(~valid, math.inf).amin(dim=1, keepdim=True)
    hi = s.masked_fill(~valid, -math.inf).amax(dim=1, keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 0)
    sal = torch.where(ok, (s - lo) / torch.where(ok, span, torch.ones_like(span)),
                      torch.zeros_like(s))
    sal = sal.masked_fill(~valid, 0.0)
    xn = l2_normalize(x)
    dot = _dot_fn(xn)
    b, n, _ = x.shape
    # state = min cosine distance to the chosen set, halved to [0, 1] (+inf while empty)
    state = (1.0 - _set_extreme(xn, prot, _cos_pair)) / 2.0 if bool(prot.any()) else (
        torch.full((b, n), math.inf, dtype=x.dtype, device=x.device))
    chosen = _greedy(prot.clone(), valid, counts, state,
                     lambda st: a * sal + (1.0 - a) * st, sal,
                     lambda st, p: torch.minimum(st, (1.0 - dot(p)) / 2.0))
    return _indices(chosen, counts)


def _check_pair(value: object, name: str) -> tuple[int, int]:
    if (not isinstance(value, (tuple, list)) or len(value) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in value)):
        raise UniprunerError(f"{name} must be a pair of ints >= 1 (rows, columns), got {value!r}")
    return int(value[0]), int(value[1])


def _crop_ids(b: int, n: int, cand: Tensor, hw: tuple[int, int] | None, crops: tuple[int, int]) -> Tensor:
    """Crop of every position ``[B, N]`` (``-1`` outside every crop)."""
    ch, cw = crops
    c = ch * cw
    dev = cand.device
    if hw is None:  # contiguous runs of the candidates, the first n % c one longer (HoloV's released code)
        rank = torch.cumsum(cand.long(), dim=1) - 1
        total = cand.sum(dim=1, keepdim=True)
        q, r = torch.div(total, c, rounding_mode="floor"), total % c
        head = r * (q + 1)
        crop = torch.where(rank < head, torch.div(rank, q + 1, rounding_mode="floor"),
                           r + torch.div(rank - head, q.clamp(min=1), rounding_mode="floor"))
        return torch.where(cand, crop, torch.full_like(crop, -1))
    h, w = hw
    g = torch.arange(n, device=dev) - (n - h * w)
    row = torch.div(g, w, rounding_mode="floor")
    col = g % w
    crop = torch.div(row * ch, h, rounding_mode="floor") * cw + torch.div(col * cw, w, rounding_mode="floor")
    return torch.where(g >= 0, crop, torch.full_like(crop, -1)).expand(b, n)


def _allocate(picks: Tensor, weights: Tensor, cap: Tensor) -> Tensor:
    """Spread ``picks [B]`` over crops by ``weights [B, C]`` within capacities ``cap [B, C]``.

    Each round gives every open crop ``floor(share * left)`` (capped at its room) and then one
    more token to the ``left`` open crops of largest weight (HoloV's remainder rule); full
    crops close and their share goes to the others, so the budget is met exactly. Crops of zero
    weight receive tokens only once the weighted ones are full.
    """
    alloc = torch.zeros_like(cap)
    left = picks.clone()
    c = cap.shape[1]
    for _ in range(c + 2):
        if not bool((left > 0).any()):
            break
        room = cap - alloc
        open_ = room > 0
        wo = torch.where(open_, weights, torch.zeros_like(weights))
        total = wo.sum(dim=1, keepdim=True)
        wo = torch.where(total > 0, wo / total.clamp(min=torch.finfo(wo.dtype).tiny),
                         room.to(wo.dtype) / room.sum(dim=1, keepdim=True).clamp(min=1).to(wo.dtype))
        share = torch.minimum(torch.floor(wo * left.unsqueeze(1).to(wo.dtype)).long(), room)
        alloc = alloc + share
        left = left - share.sum(dim=1)
        open_ = alloc < cap
        order = torch.sort(torch.where(open_, weights, torch.full_like(weights, -math.inf)), dim=1,
                           descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(c, device=cap.device).expand_as(order))
        give = open_ & (rank < torch.minimum(left, open_.sum(dim=1)).unsqueeze(1))
        alloc = alloc + give.long()
        left = left - give.sum(dim=1)
    return alloc


def crop_balanced(tokens: Tensor, scores: Tensor, budget: Budget | int | float | Tensor, *,
                  hw: tuple[int, int] | None = None, crops: tuple[int, int] = (4, 4), alpha: float = 1.0,
                  beta: float = 0.09, temperature: float = 1.0, mask: Tensor | None = None,
                  protected: int | Tensor | None = None) -> Tensor:
    """HoloV: spend the budget across spatial crops by their holistic score, then pick inside each.

    Zou et al., "Don't Just Chase 'Highlighted Tokens' in MLLMs: Revisiting Visual Holistic
    Context Retention" (HoloV), NeurIPS 2025. Attention-only selection piles the budget onto one
    salient region; HoloV splits the visual tokens into crops, gives each crop a share of the
    budget that grows with its importance, and keeps the best tokens of every crop, so the
    survivors cover the whole image.

    Steps per row (``K`` = the budget's count, at least the protected tokens, which are kept):

    1. crops: with ``hw = (h, w)`` the last ``h * w`` tokens are a row-major grid cut into
       ``crops = (rows, cols)`` windows of (almost) equal size; without ``hw``, the valid
       unprotected tokens in order are cut into ``rows * cols`` contiguous runs, the first ones
       one token longer when the count does not divide (the released code's crops);
    2. token score ``s_i = alpha * a_i + beta * v_i * mean_c(a) / mean_c(v)``: ``a`` = the
       attention (``scores``), ``v_i`` = the variance of token ``i``'s cosine similarities to the
       other tokens of its crop (its diversity), rescaled per crop to the attention's mean;
    3. crop score ``S_c = mean_{i in c} s_i`` and share ``softmax(log S_c / temperature)``
       (``temperature = 1``: proportional to ``S_c``, as released; smaller sharpens, larger
       flattens); each crop gets ``floor(share * left)`` and the remainder goes one token each to
       the crops of largest share; a crop's allotment never exceeds its tokens, the excess is
       re-spread over the other crops, so exactly ``K`` tokens survive;
    4. inside each crop its allotment of the highest ``s_i`` is kept (``beta = 0``: the highest
       attention, as the released code does).

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        What the similarities are measured on (HoloV: the visual features).
    scores : Tensor ``[B, N]``
        Non-negative attention importance (e.g. :func:`~unipruner.scorers.importance.received_attention`).
    budget : Budget, int, float or Tensor ``[B]``
        Tokens kept, resolved per row on the valid count as in :func:`unipruner.select.topk`.
    hw : (int, int), optional
        The patch grid of the last ``h * w`` tokens; tokens before it must be protected.
    crops : (int, int)
        Crop rows and columns (16 crops by default, as released).
    alpha, beta : float
        Weights of attention and diversity in the token score (released: 1 and 0.09).
    temperature : float
        Sharpness of the budget allocation (``> 0``).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked positions are never picked and belong to no crop.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Leading-token count or mask of tokens always kept.

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices; rows keeping fewer than ``K`` are right-padded with ``-1``.

    Notes
    -----
    Deviations from the released code: crops follow the 2-D grid when ``hw`` is given; the
    variance excludes a token's own (zeroed) similarity; a crop's excess allotment is re-spread
    instead of lost (the released code then pads with zero tokens); inside a crop the holistic
    score ranks the tokens (the released code uses attention alone: ``beta=0``). With the
    released per-crop rescaling the diversity term adds ``beta * mean_c(a)`` to every crop
    score, so the allocation itself follows the crops' mean attention.

    Examples
    --------
    >>> x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    >>> a = torch.zeros(1, 16); a[0, :4] = 1.0  # all the attention on the top row
    >>> crop_balanced(x, a + 0.01, 4, hw=(4, 4), crops=(2, 2)).shape
    torch.Size([1, 4])
    """
    def _scores(valid: Tensor, dtype: torch.dtype) -> Tensor:
        return _check_row_scores(scores, valid.shape[0], valid.shape[1], valid, "scores", torch.float64)

    x, valid, prot, counts, s = _setup(tokens, budget, mask, protected, "crop_balanced", _scores)
    assert s is not None
    b, n, _ = x.shape
    if bool((s[valid] < 0).any()):
        raise UniprunerError("HoloV spreads the budget by attention: scores must be >= 0 at valid positions")
    ch, cw = _check_pair(crops, "crops")
    for value, name in ((alpha, "alpha"), (beta, "beta")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise UniprunerError(f"{name} must be a finite number >= 0, got {value!r}")
    if (isinstance(temperature, bool) or not isinstance(temperature, (int, float))
            or not math.isfinite(temperature) or temperature <= 0):
        raise UniprunerError(f"temperature must be a finite number > 0, got {temperature!r}")
    grid = None
    if hw is not None:
        grid = _check_pair(hw, "hw")
        if grid[0] * grid[1] > n:
            raise UniprunerError(f"hw={grid} is a grid of {grid[0] * grid[1]} tokens but the sequence has {n}")
        lead = n - grid[0] * grid[1]
        if bool((valid[:, :lead] & ~prot[:, :lead]).any()):
            raise UniprunerError(f"the {lead} token(s) before the {grid[0]}x{grid[1]} grid belong to no crop: "
                                 f"protect them (protected={lead}) or pass only the grid")
    cand = valid & ~prot
    crop = _crop_ids(b, n, cand, grid, (ch, cw))
    cand = cand & (crop >= 0)
    nc = ch * cw
    member = F.one_hot(crop.clamp(min=0), nc).to(torch.float64) * cand.unsqueeze(-1).to(torch.float64)
    size = member.sum(dim=1)  # [B, C]
    with torch.no_grad():
        xn = l2_normalize(x.detach())
        sim = (xn @ xn.transpose(1, 2)).to(torch.float64)
        same = (crop.unsqueeze(2) == crop.unsqueeze(1)) & cand.unsqueeze(2) & cand.unsqueeze(1)
        same = same & ~torch.eye(n, dtype=torch.bool, device=x.device)
        k = same.sum(dim=2).clamp(min=1).to(torch.float64)
        mean = (sim * same).sum(dim=2) / k
        var = (((sim - mean.unsqueeze(2)) ** 2) * same).sum(dim=2) / k
        a = s.masked_fill(~cand, 0.0)
        sum_a = torch.einsum("bn,bnc->bc", a, member)
        sum_v = torch.einsum("bn,bnc->bc", var, member)
        scale = torch.where(sum_v > 0, sum_a / sum_v.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
        token = float(alpha) * a + float(beta) * var * scale.gather(1, crop.clamp(min=0))
        token = token.masked_fill(~cand, -math.inf)
        crop_score = torch.einsum("bn,bnc->bc", token.masked_fill(~cand, 0.0), member) / size.clamp(min=1)
        log_s = torch.where((crop_score > 0) & (size > 0), crop_score.clamp(min=torch.finfo(torch.float64).tiny).log(),
                            torch.full_like(crop_score, -math.inf))
        has = torch.isfinite(log_s).any(dim=1, keepdim=True)
        share = torch.where(has, torch.softmax(torch.where(has, log_s, torch.zeros_like(log_s)) / temperature, dim=1),
                            torch.zeros_like(log_s)).masked_fill(~torch.isfinite(log_s), 0.0)
        alloc = _allocate(counts - prot.sum(dim=1), share, size.long())
        # inside each crop: the allotment of the best token scores
        order = torch.sort(token, dim=1, descending=True, stable=True).indices
        crop_sorted = crop.gather(1, order)
        cand_sorted = cand.gather(1, order)
        hot = F.one_hot(crop_sorted.clamp(min=0), nc) * cand_sorted.unsqueeze(-1)
        rank = (torch.cumsum(hot, dim=1) - 1).gather(2, crop_sorted.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        take = cand_sorted & (rank < alloc.gather(1, crop_sorted.clamp(min=0)))
        chosen = torch.zeros_like(cand).scatter_(1, order, take) | prot
    return _indices(chosen, counts)
