"""Budgets and selection: how many tokens survive, and which.

A :class:`Budget` turns a sequence length (and, for data-dependent budgets, the scores) into a
number of tokens to keep. :func:`topk` turns scores into sorted keep indices that never point at
masked (padding) positions and always include protected ones (CLS, attention sinks, the
observation window, text tokens...). :class:`Schedule` gives one budget per layer.

Conventions
-----------
* ``ratio`` is the fraction of tokens **kept** (``Budget(ratio=0.25)`` keeps a quarter).
* Protected tokens always survive: when there are more of them than the budget allows, the
  budget of that row is raised to cover them (so ``K = max(budget, n_protected)``).
* Ragged batches: rows may keep different counts; the returned ``[B, K]`` index tensor is then
  right-padded with ``-1`` (``K`` = the largest count). :func:`unipruner.reduce.drop` understands
  the padding and returns the new validity mask. Padding never appears when no mask is given and
  the budget is not data-dependent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from ._validate import check_finite, check_mask, protected_mask, valid_counts
from .errors import UniprunerError

__all__ = ["Budget", "Schedule", "knee_count", "r_schedule", "topk"]


@dataclass(frozen=True)
class Budget:
    """How many tokens survive a pruning step.

    Exactly one of ``ratio``, ``keep``, ``threshold``, ``knee`` or ``rows`` is set (``factor``
    comes with its ``ratio = 1 / factor``).

    Parameters
    ----------
    ratio : float, optional
        Fraction of the (valid) tokens kept, in ``[0, 1]``; rounded half up.
    keep : int, optional
        Number of tokens kept (rows with fewer valid tokens keep them all).
    threshold : float, optional
        Keep every token whose score is ``>= threshold`` (data-dependent).
    knee : bool
        Keep the tokens before the knee of the sorted-score curve (Kneedle; data-dependent).
        Build it with :meth:`Budget.auto`.
    factor : float, optional
        A pool factor ``f >= 1`` (Clavié et al. 2024, PyLate's ``pool_factor``); build it with
        :meth:`Budget.pool_factor`. ``ratio`` is then ``1 / f`` (the fraction kept), but the
        count is PyLate's: ``p + max((n - p) // f, 1)`` of ``n`` valid tokens whose first ``p``
        are protected (``n`` when ``n <= p``): floor instead of half-up rounding, at least one
        token besides the protected ones, which do not count against the factor.
    rows : tuple of int, optional
        An explicit count per row (``len(rows)`` = batch size), e.g. a collection-wide budget
        already spent per sequence (ColBERT ``scope="global"``); build it with
        :meth:`Budget.per_row`. Each row keeps ``min(rows[b], n_valid[b])``.

    Examples
    --------
    >>> Budget(ratio=0.25).count(200)
    50
    >>> Budget(keep=64).count(576)
    64
    >>> Budget.auto()
    Budget.auto()
    >>> Budget.pool_factor(2).ratio, Budget.pool_factor(3).count(10)
    (0.5, 3)
    """

    ratio: float | None = None
    keep: int | None = None
    threshold: float | None = None
    knee: bool = False
    factor: float | None = None
    rows: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.factor is not None:
            f = self.factor
            if isinstance(f, bool) or not isinstance(f, (int, float)) or not math.isfinite(float(f)) or f < 1:
                raise UniprunerError(f"a pool factor must be a finite number >= 1 (2 halves the tokens), got {f!r}")
            if self.ratio is None:
                object.__setattr__(self, "ratio", 1.0 / float(f))
            elif self.ratio != 1.0 / float(f):
                raise UniprunerError(f"Budget.pool_factor({f!r}) keeps the fraction ratio = 1/{f!r}; give either "
                                     f"factor= or ratio=, not both (got ratio={self.ratio!r})")
        if self.rows is not None:
            rows = tuple(self.rows) if isinstance(self.rows, (list, tuple)) else self.rows
            if not isinstance(rows, tuple) or not all(
                isinstance(r, int) and not isinstance(r, bool) and r >= 0 for r in rows
            ):
                raise UniprunerError(f"Budget rows must be a sequence of non-negative ints (one count per row), "
                                     f"got {self.rows!r}")
            object.__setattr__(self, "rows", rows)
        n_set = (sum(x is not None for x in (self.ratio, self.keep, self.threshold, self.rows))
                 + int(self.knee))
        if n_set != 1:
            raise UniprunerError(
                "Budget needs exactly one of ratio=, keep=, threshold=, Budget.pool_factor(), Budget.per_row() or "
                f"Budget.auto(); got {n_set} (ratio={self.ratio}, keep={self.keep}, threshold={self.threshold}, "
                f"knee={self.knee}, rows={self.rows})"
            )
        if self.ratio is not None:
            if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not (
                0.0 <= float(self.ratio) <= 1.0
            ):
                raise UniprunerError(
                    f"Budget ratio is the fraction of tokens kept and must be in [0, 1], got {self.ratio!r}"
                )
        if self.keep is not None:
            if isinstance(self.keep, bool) or not isinstance(self.keep, int) or self.keep < 0:
                raise UniprunerError(f"Budget keep must be a non-negative int, got {self.keep!r}")
        if self.threshold is not None and (
            not isinstance(self.threshold, (int, float)) or math.isnan(float(self.threshold))
        ):
            raise UniprunerError(f"Budget threshold must be a number, got {self.threshold!r}")

    @classmethod
    def auto(cls) -> Budget:
        """A budget that keeps the tokens before the knee of the sorted-score curve (Kneedle)."""
        return cls(knee=True)

    @classmethod
    def pool_factor(cls, factor: float) -> Budget:
        """A pool factor ``f``: about ``n / f`` tokens remain (``ratio = 1 / f``), counted as PyLate does.

        Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal
        Performance Impact via Token Pooling", 2024: a document of ``n`` tokens whose first ``p``
        are protected keeps ``p + max((n - p) // f, 1)`` (PyLate's ``pool_factor`` and
        ``protected_tokens``); ``f = 1`` keeps everything.

        >>> b = Budget.pool_factor(2)
        >>> b, b.ratio, b.counts(torch.tensor([1, 3, 9]), n_max=9).tolist()
        (Budget.pool_factor(2), 0.5, [1, 1, 4])
        >>> b.counts(torch.tensor([1, 3, 9]), n_max=9, protected=1).tolist()
        [1, 2, 5]
        """
        return cls(factor=factor)

    @classmethod
    def per_row(cls, counts: Sequence[int] | Tensor) -> Budget:
        """An explicit number of tokens kept per row (``counts[b]`` for row ``b``, capped at its length).

        For budgets decided outside one batch, e.g. one budget spent over a whole collection by
        score (Lassance et al., "A Study on Token Pruning for ColBERT", 2021, global pruning).

        >>> Budget.per_row([2, 0, 5]).counts(torch.tensor([4, 4, 3]), n_max=4).tolist()
        [2, 0, 3]
        """
        if isinstance(counts, Tensor):
            if counts.ndim != 1 or counts.is_floating_point() or counts.dtype == torch.bool:
                raise UniprunerError(f"per-row counts must be a 1-D integer tensor, got {counts.dtype} "
                                     f"{tuple(counts.shape)}")
            counts = counts.tolist()
        return cls(rows=tuple(counts))

    @classmethod
    def coerce(cls, value: Budget | float | int | None = None, *, ratio: float | None = None,
               keep: int | None = None, threshold: float | None = None) -> Budget:
        """Build a budget from a Budget, a float (ratio), an int (keep) or keyword shortcuts.

        >>> Budget.coerce(0.5), Budget.coerce(64), Budget.coerce(keep=8)
        (Budget(ratio=0.5), Budget(keep=64), Budget(keep=8))
        """
        given = [v for v in (value, ratio, keep, threshold) if v is not None]
        if len(given) > 1:
            raise UniprunerError("give one budget: a Budget, or one of ratio=, keep=, threshold=")
        if isinstance(value, Budget):
            return value
        if ratio is not None:
            return cls(ratio=ratio)
        if keep is not None:
            return cls(keep=keep)
        if threshold is not None:
            return cls(threshold=threshold)
        if isinstance(value, bool):
            raise UniprunerError(f"a budget cannot be a bool, got {value!r}")
        if isinstance(value, int):
            return cls(keep=value)
        if isinstance(value, float):
            return cls(ratio=value)
        if value is None:
            raise UniprunerError("no budget given: pass budget=Budget(...), ratio=, keep= or threshold=")
        raise UniprunerError(f"cannot make a Budget from {value!r}")

    @property
    def data_dependent(self) -> bool:
        """True when the count depends on the scores (threshold, knee)."""
        return self.threshold is not None or self.knee

    def __repr__(self) -> str:
        if self.knee:
            return "Budget.auto()"
        if self.factor is not None:
            return f"Budget.pool_factor({self.factor!r})"
        if self.rows is not None:
            return f"Budget.per_row({list(self.rows)!r})"
        for field in ("ratio", "keep", "threshold"):
            v = getattr(self, field)
            if v is not None:
                return f"Budget({field}={v!r})"
        return "Budget()"  # pragma: no cover - unreachable, __post_init__ forbids it

    def count(self, n: int) -> int:
        """Tokens kept out of ``n`` for a data-independent budget (ratio or keep)."""
        if self.data_dependent:
            raise UniprunerError(f"{self!r} depends on the scores; use Budget.counts(scores=...)")
        return int(self.counts(torch.tensor([n]), n_max=n)[0])

    def counts(self, n_valid: Tensor, *, n_max: int, scores: Tensor | None = None,
               mask: Tensor | None = None, protected: Tensor | int | None = None) -> Tensor:
        """Tokens kept per row, ``[B]`` long, given the valid counts per row.

        ``n_max`` is the padded sequence length: ``Budget(keep=K)`` with ``K > n_max`` is an
        error (the budget asks for more tokens than any row has). ``protected`` (an int or
        ``[B]`` counts of protected valid tokens) matters only to a pool factor, which counts the
        other tokens (:meth:`pool_factor`); selectors raise every count to the protected ones.
        """
        if self.rows is not None:
            if len(self.rows) != n_valid.shape[0]:
                raise UniprunerError(f"{self!r} gives counts for {len(self.rows)} rows but the batch has "
                                     f"{n_valid.shape[0]}")
            return torch.minimum(torch.tensor(self.rows, dtype=torch.long, device=n_valid.device), n_valid.long())
        if self.factor is not None:
            n = n_valid.long()
            p = torch.zeros_like(n) if protected is None else torch.as_tensor(protected, device=n.device).long()
            p = torch.minimum(p.expand_as(n), n)
            rest = n - p
            pooled = torch.div(rest.double(), float(self.factor), rounding_mode="floor").long().clamp(min=1)
            return p + torch.where(rest > 0, pooled, torch.zeros_like(rest))
        if self.ratio is not None:
            return torch.floor(n_valid.double() * float(self.ratio) + 0.5).long().clamp(max=n_valid)
        if self.keep is not None:
            if self.keep > n_max:
                raise UniprunerError(
                    f"Budget(keep={self.keep}) asks for more tokens than the sequence has ({n_max}); "
                    "lower keep or use Budget(ratio=...)"
                )
            return torch.clamp(n_valid, max=self.keep)
        if scores is None:
            raise UniprunerError(f"{self!r} depends on the scores; pass scores=")
        valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
        if self.threshold is not None:
            return ((scores >= float(self.threshold)) & valid).sum(dim=1)
        return knee_count(scores, mask=mask)


def knee_count(scores: Tensor, mask: Tensor | None = None) -> Tensor:
    """Number of tokens before the knee of each row's descending score curve (Kneedle).

    Satopää et al., "Finding a 'Kneedle' in a Haystack", ICDCSW 2011: scale the sorted curve and
    its x axis to ``[0, 1]``, and take the point farthest above the chord joining its ends.
    Returns ``[B]`` counts in ``[1, n_valid]`` (0 for an empty row).

    >>> knee_count(torch.tensor([[10.0, 9.0, 8.5, 1.0, 0.9, 0.8, 0.7, 0.6]]))
    tensor([3])
    """
    n = scores.shape[1]
    valid = torch.ones_like(scores, dtype=torch.bool) if mask is None else mask
    s = scores.double().masked_fill(~valid, -math.inf)
    s = torch.sort(s, dim=1, descending=True).values
    nv = valid.sum(dim=1)
    pos = torch.arange(n, device=scores.device).unsqueeze(0)
    inrow = pos < nv.unsqueeze(1)
    first = s[:, :1]
    last = s.gather(1, (nv - 1).clamp(min=0).unsqueeze(1))
    span = (first - last).clamp(min=1e-300)
    y = torch.where(inrow, (first - s) / span, torch.zeros_like(s))  # 0 at the top, 1 at the tail
    x = pos.double() / (nv - 1).clamp(min=1).unsqueeze(1).double()
    gap = (x - y).masked_fill(~inrow, -math.inf)  # the curve rises fastest before the knee
    k = gap.argmax(dim=1) + 1
    k = torch.where(nv <= 2, nv, k)
    return torch.minimum(k, nv)


def topk(scores: Tensor, budget: Budget | int | float | Tensor, *, mask: Tensor | None = None,
         protected: int | Tensor | None = None) -> Tensor:
    """Indices of the highest-scoring tokens, in original order.

    Parameters
    ----------
    scores : Tensor ``[B, N]``
        Higher = keep. NaN is an error.
    budget : Budget, int, float or Tensor ``[B]``
        How many survive (a float is a ratio, an int a count, a tensor a count per row).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked positions are never returned.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Leading-token count or mask of tokens that always survive (a protected padding
        position is ignored).

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices; rows keeping fewer than ``K`` are right-padded with ``-1``.
        Ties are broken towards the lower index.

    Examples
    --------
    >>> topk(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2)
    tensor([[1, 3]])
    >>> topk(torch.tensor([[0.1, 0.9, 0.5, 0.7]]), 2, protected=1)
    tensor([[0, 1]])
    """
    if not isinstance(scores, Tensor) or scores.ndim != 2:
        shape = tuple(scores.shape) if isinstance(scores, Tensor) else type(scores).__name__
        raise UniprunerError(f"scores must be a tensor [B, N], got {shape}")
    check_finite(scores, "scores")
    b, n = scores.shape
    mask = check_mask(mask, b, n)
    prot = protected_mask(protected, b, n, scores.device)
    nv = valid_counts(mask, b, n, scores.device)
    if isinstance(budget, Tensor):
        if budget.shape != (b,):
            raise UniprunerError(f"a per-row budget must have shape [B] = ({b},), got {tuple(budget.shape)}")
        if bool((budget < 0).any()) or bool((budget > n).any()):
            raise UniprunerError(f"per-row budgets must lie in [0, {n}], got {budget.tolist()}")
        k = torch.minimum(budget.long().to(scores.device), nv)
    if prot is not None and mask is not None:
        prot = prot & mask
    if not isinstance(budget, Tensor):
        n_prot = None if prot is None else prot.sum(dim=1)  # a pool factor counts the other tokens
        k = Budget.coerce(budget).counts(nv, n_max=n, scores=scores, mask=mask, protected=n_prot)
    s = scores.float() if not scores.is_floating_point() else scores
    if prot is not None:
        k = torch.maximum(k, prot.sum(dim=1))
        s = s.masked_fill(prot, math.inf)
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf)
    kmax = int(k.max()) if b > 0 else 0
    order = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :kmax]
    rank = torch.arange(kmax, device=scores.device).unsqueeze(0)
    keep = rank < k.unsqueeze(1)
    big = torch.iinfo(torch.long).max
    idx = torch.sort(order.masked_fill(~keep, big), dim=1).values
    return idx.masked_fill(idx == big, -1)


@dataclass(frozen=True)
class Schedule:
    """How many tokens each layer (or step) keeps: one budget per layer, or a rule resolved per model.

    ``ratio`` keeps its one meaning (the fraction kept) in every kind; protected tokens (CLS,
    registers, sinks) are never counted or removed.

    * ``Schedule([Budget(ratio=.5), None, 64])`` — one :class:`Budget` per layer, applied to that
      layer's unprotected tokens (a float is a ratio, an int a count, ``None`` = no reduction);
      :meth:`constant` and :meth:`linear` build common ones.
    * :meth:`Schedule.geometric` ``(final=0.25)`` — the unprotected tokens shrink geometrically so
      that ``final`` of them are left after the last layer (each layer keeps ``final ** (1/L)``).
    * :meth:`Schedule.remove` ``(16)`` — Token Merging's ``r`` (Bolya et al., ICLR 2023): a count of
      tokens removed by every layer, optionally with ToMe's inflection, or one count per layer.

    The last two depend on the model (its number of layers and tokens): :meth:`removals` and
    :meth:`counts` resolve any schedule for an input of ``n0`` tokens and ``n_layers`` layers,
    with the cap a reduction imposes (:meth:`max_removal`).

    >>> s = Schedule.linear(1.0, 0.5, 3)
    >>> [b.ratio for b in s]
    [1.0, 0.75, 0.5]
    >>> Schedule.remove(8).counts(17, 2, protected=1, limit="bipartite")  # capped at half in layer 1
    [(17, 9), (9, 5)]
    >>> Schedule.geometric(final=0.25).counts(17, 2, protected=1)
    [(17, 9), (9, 5)]
    """

    budgets: tuple[Budget | None, ...]
    final: float | None = None
    r: int | tuple[int, ...] | None = None
    inflection: float = 0.0

    def __init__(self, budgets: Sequence[Budget | float | int | None]) -> None:
        if len(budgets) == 0:
            raise UniprunerError("a Schedule needs at least one entry")
        out = tuple(None if b is None else Budget.coerce(b) for b in budgets)
        object.__setattr__(self, "budgets", out)
        object.__setattr__(self, "final", None)
        object.__setattr__(self, "r", None)
        object.__setattr__(self, "inflection", 0.0)

    @classmethod
    def _rule(cls, *, final: float | None = None, r: int | tuple[int, ...] | None = None,
              inflection: float = 0.0) -> Schedule:
        obj = object.__new__(cls)
        for name, value in (("budgets", ()), ("final", final), ("r", r), ("inflection", inflection)):
            object.__setattr__(obj, name, value)
        return obj

    @classmethod
    def constant(cls, budget: Budget | float | int, n_layers: int) -> Schedule:
        """The same budget at every layer."""
        return cls([budget] * n_layers)

    @classmethod
    def linear(cls, start: float, end: float, n_layers: int) -> Schedule:
        """Ratios interpolated linearly from ``start`` (first layer) to ``end`` (last layer)."""
        if n_layers < 1:
            raise UniprunerError(f"n_layers must be >= 1, got {n_layers}")
        if n_layers == 1:
            return cls([Budget(ratio=end)])
        return cls([Budget(ratio=round(start + (end - start) * i / (n_layers - 1), 10))
                    for i in range(n_layers)])

    @classmethod
    def geometric(cls, final: float) -> Schedule:
        """Shrink the unprotected tokens geometrically, leaving ``final`` of them after the last layer.

        Layer ``l`` (0-based, of ``L``) leaves ``round(final ** ((l + 1) / L) * (n0 - protected))``
        unprotected tokens (at least one when nothing is protected), i.e. every layer keeps
        ``final ** (1 / L)`` of its tokens. A layer that cannot remove that many (see
        :meth:`max_removal`) removes what it can.

        >>> Schedule.geometric(final=0.15).counts(65, 4, protected=1)
        [(65, 41), (41, 26), (26, 16), (16, 11)]
        """
        if isinstance(final, bool) or not isinstance(final, (int, float)) or not 0.0 < float(final) <= 1.0:
            raise UniprunerError(
                f"final is the fraction of the tokens left after the last layer, in (0, 1]; got {final!r}"
            )
        return cls._rule(final=float(final))

    @classmethod
    def remove(cls, r: int | Sequence[int], inflection: float = 0.0) -> Schedule:
        """Remove ``r`` tokens at every layer (Token Merging's ``r``; Bolya et al., ICLR 2023).

        ``inflection`` in ``[-1, 1]`` makes the count change linearly across layers with the same
        mean (-1: decreasing, 0: constant, +1: increasing; see :func:`r_schedule`); a list gives one
        count per layer. As in ToMe, later layers are capped silently when too few tokens remain;
        a first reduction that cannot be met is an error.

        >>> Schedule.remove(4, inflection=-1.0).removals(17, 3, protected=1, limit="bipartite")
        [8, 4, 0]
        """
        if isinstance(r, bool) or isinstance(inflection, bool) or not isinstance(inflection, (int, float)):
            raise UniprunerError(f"r must be an int or a list of ints and inflection a number; got {r!r}, "
                                 f"{inflection!r}")
        infl = float(inflection)
        if isinstance(r, int):
            r_schedule(r if infl == 0.0 else (r, infl), 1)  # validates r >= 0 and inflection in [-1, 1]
            return cls._rule(r=r, inflection=infl)
        if not isinstance(r, Sequence) or isinstance(r, str) or not all(
                isinstance(x, int) and not isinstance(x, bool) for x in r):
            raise UniprunerError(f"r must be an int or a list of ints (one per layer), got {r!r}")
        if infl != 0.0:
            raise UniprunerError("an inflection applies to a constant r, not to a list of counts")
        if len(r) == 0:
            raise UniprunerError("an explicit r schedule needs one count per layer, got an empty list")
        rs = tuple(int(x) for x in r)
        r_schedule(list(rs), len(rs))  # validates: non-negative, at least one layer
        return cls._rule(r=rs)

    @property
    def kind(self) -> str:
        """``"budgets"`` (one per layer), ``"geometric"`` or ``"remove"``."""
        if self.final is not None:
            return "geometric"
        if self.r is not None:
            return "remove"
        return "budgets"

    def __repr__(self) -> str:
        if self.final is not None:
            return f"Schedule.geometric(final={self.final!r})"
        if self.r is not None:
            r = list(self.r) if isinstance(self.r, tuple) else self.r
            return f"Schedule.remove({r!r}" + (f", inflection={self.inflection!r})" if self.inflection else ")")
        if len(self.budgets) > 1 and len(set(self.budgets)) == 1 and self.budgets[0] is not None:
            return f"Schedule.constant({self.budgets[0]!r}, {len(self.budgets)})"
        return f"Schedule({list(self.budgets)!r})"

    def _per_layer(self) -> tuple[Budget | None, ...]:
        if self.kind != "budgets":
            raise UniprunerError(
                f"{self!r} depends on the model (its layers and tokens): resolve it with "
                ".removals(n0, n_layers) or .counts(n0, n_layers)"
            )
        return self.budgets

    def __bool__(self) -> bool:
        return True

    def __len__(self) -> int:
        return len(self._per_layer())

    def __iter__(self) -> Iterator[Budget | None]:
        return iter(self._per_layer())

    def __getitem__(self, layer: int) -> Budget | None:
        budgets = self._per_layer()
        if not -len(budgets) <= layer < len(budgets):
            raise UniprunerError(f"layer {layer} is outside this {len(budgets)}-layer schedule")
        return budgets[layer]

    @staticmethod
    def max_removal(n: int, *, protected: int = 0, limit: str = "protected") -> tuple[int, str]:
        """The most tokens one layer can remove out of ``n``, and why.

        ``limit`` is what the reduction allows: ``"protected"`` (drop, merge into kept tokens,
        pooling: the protected tokens, or one token when none are protected, always stay),
        ``"fuse"`` (EViT's fusion also keeps one fused token) or ``"bipartite"`` (ToMe's bipartite
        soft matching merges at most half of the unprotected tokens; Bolya et al., ICLR 2023).

        >>> Schedule.max_removal(17, protected=1, limit="bipartite")
        (8, 'bipartite matching merges at most half of the unprotected tokens')
        """
        floor = max(protected, 1)
        if limit == "bipartite":
            cap, why = (n - protected) // 2, "bipartite matching merges at most half of the unprotected tokens"
        elif limit == "fuse":
            cap, why = n - floor - 1, "fusing keeps the protected tokens plus one fused token"
        elif limit == "protected":
            cap, why = n - floor, f"the {floor} protected token(s) always stay"
        else:
            raise UniprunerError(f"limit must be 'protected', 'fuse' or 'bipartite', got {limit!r}")
        return max(cap, 0), why

    def removals(self, n0: int, n_layers: int, *, protected: int = 0, limit: str = "protected",
                 who: str = "the method") -> list[int]:
        """Tokens removed by each layer for an input of ``n0`` tokens (``protected`` of them leading).

        A per-layer budget applies to that layer's unprotected tokens (and keeps at least one token
        when none are protected); every layer is capped by :meth:`max_removal` for ``limit``. A
        budget schedule that asks a layer for more than its cap is an error, as is the first
        reducing layer of a :meth:`remove` schedule (ToMe caps later layers silently); a
        :meth:`geometric` schedule is capped silently. ``who`` names the method in errors.

        >>> Schedule([0.5, None, Budget(keep=2)]).removals(17, 3, protected=1)
        [8, 0, 6]
        """
        if n_layers < 1:
            raise UniprunerError(f"n_layers must be >= 1, got {n_layers}")
        if not 0 <= protected <= n0:
            raise UniprunerError(f"protected must lie in [0, n0 = {n0}], got {protected}")
        self.max_removal(n0, protected=protected, limit=limit)  # validates limit
        kind, p = self.kind, protected
        if kind == "budgets" and len(self.budgets) != n_layers:
            raise UniprunerError(
                f"this schedule has {len(self.budgets)} entries but the model has {n_layers} layers; "
                "give one entry per layer"
            )
        rs: list[int] = []
        if kind == "remove":
            rs = r_schedule(list(self.r) if isinstance(self.r, tuple) else (int(self.r or 0), self.inflection),
                            n_layers)
        least = 0 if p else 1
        out: list[int] = []
        n, first = n0, True
        for layer in range(n_layers):
            if kind == "remove":
                want = rs[layer]
            elif kind == "geometric":
                target = max(round(float(self.final or 0.0) ** ((layer + 1) / n_layers) * (n0 - p)), least)
                want = max(n - p - target, 0)
            else:
                b = self.budgets[layer]
                want = 0 if b is None else (n - p) - max(b.count(n - p), least)
            cap, why = self.max_removal(n, protected=p, limit=limit)
            if want > cap and (kind == "budgets" or (kind == "remove" and first)):
                raise UniprunerError(
                    f"{self!r} asks layer {layer} to remove {want} of its {n} tokens, but {who} can remove "
                    f"at most {cap} there ({why}); ask for fewer"
                )
            want = min(max(want, 0), cap)
            if want > 0:
                first = False
            out.append(want)
            n -= want
        return out

    def counts(self, n0: int, n_layers: int, *, protected: int = 0, limit: str = "protected",
               who: str = "the method") -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every layer (:meth:`removals` as running counts).

        >>> Schedule.remove(3).counts(17, 3, protected=1, limit="bipartite")
        [(17, 14), (14, 11), (11, 8)]
        """
        out, n = [], n0
        for r in self.removals(n0, n_layers, protected=protected, limit=limit, who=who):
            out.append((n, n - r))
            n -= r
        return out


def r_schedule(r: int | tuple[int, float] | Sequence[int], n_layers: int) -> list[int]:
    """Tokens merged per layer for ToMe-style schedules (the arithmetic of :meth:`Schedule.remove`).

    Bolya et al., "Token Merging: Your ViT but Faster", ICLR 2023. ``r`` is an int (constant),
    ``(r, inflection)`` with ``inflection`` in ``[-1, 1]`` (-1: decreasing across layers,
    0: constant, +1: increasing; the mean stays ``r``), or an explicit list (one per layer).

    >>> r_schedule(8, 3)
    [8, 8, 8]
    >>> r_schedule((8, -1.0), 3)
    [16, 8, 0]
    """
    if n_layers < 1:
        raise UniprunerError(f"n_layers must be >= 1, got {n_layers}")
    if isinstance(r, int) and not isinstance(r, bool):
        if r < 0:
            raise UniprunerError(f"r must be >= 0, got {r}")
        return [r] * n_layers
    if isinstance(r, tuple) and len(r) == 2 and isinstance(r[1], float):
        base, infl = int(r[0]), float(r[1])
        if base < 0 or not -1.0 <= infl <= 1.0:
            raise UniprunerError(f"(r, inflection) needs r >= 0 and inflection in [-1, 1], got {r}")
        if n_layers == 1:
            return [base]
        return [max(0, int(base + infl * base * (2 * i / (n_layers - 1) - 1))) for i in range(n_layers)]
    rs = [int(x) for x in r]  # type: ignore[union-attr]
    if len(rs) != n_layers or any(x < 0 for x in rs):
        raise UniprunerError(f"an explicit r schedule needs {n_layers} non-negative ints, got {rs}")
    return rs
