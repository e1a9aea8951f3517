"""What the KV adapter applies: a registry method plus how it meets the cache (resolved at patch time).

:func:`make_plan` validates the settings of :func:`unipruner.kv.patch` (and of
:meth:`~unipruner.adapters.kv_cache.KVCompressor.configure`) into a frozen :class:`Plan`.
``ratio`` is the fraction of each row's tokens **kept** in every compressed layer.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ...errors import UniprunerError
from ...methods import (
    H2O,
    REGISTRY,
    TOVA,
    VATP,
    LastQueryAttention,
    MergingMethod,
    Method,
    ScoringMethod,
    SnapKV,
    StreamingLLM,
    resolve,
)
from ...methods import method as build_method
from ...select import Budget

__all__ = ["KV_METHODS", "Plan", "make_plan", "replan"]

#: Registry methods the KV adapter runs: exactly those whose domains include "kv" (``unipruner methods --domain kv``).
KV_METHODS: tuple[str, ...] = tuple(sorted(n for n, c in REGISTRY.items() if "kv" in c.domains))

_SIGNALS = frozenset({"attn", "keys", "values"})
_POLICIES = {H2O: "accumulate", TOVA: "replace", StreamingLLM: "positional"}


@dataclass(frozen=True)
class Plan:
    """How the adapter applies one registry method to the KV cache (resolved at patch time).

    Attributes
    ----------
    method : Method
        The registry method (its budget is the fraction / number of tokens kept per row).
    rows : int, "all" or None
        Attention rows the method needs: the last ``rows`` queries (SnapKV's window, TOVA's last
        token), every query (H2O, VATP: accumulated attention) or none.
    per_head : bool
        Select per KV head (SnapKV, H2O, KNorm, ...) or one set shared by all heads (TOVA).
    evict : str or None
        Fixed-budget decoding policy: ``"accumulate"`` (H2O), ``"replace"`` (TOVA),
        ``"positional"`` (StreamingLLM) or None (compress at prefill only).
    recent : float
        Fraction of each row's budget reserved for the most recent tokens (H2O's local window).
    rerotate : bool
        Re-rotate kept keys to contiguous positions (StreamingLLM, as in the paper).
    """

    method: Method
    rows: int | str | None
    per_head: bool
    evict: str | None
    recent: float
    rerotate: bool


def _rows_for(m: Method) -> int | str | None:
    if "attn" not in m.requires:
        return None
    if isinstance(m, SnapKV):
        return m.window
    if isinstance(m, LastQueryAttention):  # FastV, TOVA
        return m.n_queries
    if isinstance(m, (H2O, VATP)):
        return "all"
    raise UniprunerError(
        f"method {m.name!r} needs a full attention map ({m.requires}); the KV adapter computes attention rows "
        "of the last queries (snapkv, tova, fastv) or accumulated attention (h2o, vatp) inside the hook"
    )


def make_plan(method: str | Method, ratio: float | None = None, *, keep: int | None = None,
              budget: Budget | None = None, per_head: bool | None = None, evict: bool | None = None,
              recent: float | None = None, rerotate: bool = False, **params: Any) -> Plan:
    """Validate the user's settings and build a :class:`Plan` (see :func:`patch`)."""
    if ratio is not None and (isinstance(ratio, bool) or not isinstance(ratio, (int, float))
                              or not 0.0 < float(ratio) <= 1.0):
        raise UniprunerError(
            f"ratio is the fraction of the KV cache kept (as everywhere in unipruner) and must be in (0, 1], "
            f"got {ratio!r}; kvpress's compression_ratio c is ratio = 1 - c"
        )
    m = resolve(method, budget, ratio=ratio, keep=keep, **params)
    if isinstance(m, MergingMethod) or m.reduction != "drop":
        raise UniprunerError(
            f"method {m.name!r} merges tokens; the KV adapter evicts cache entries (reduction='drop'). "
            "Use a scoring method or a selector (snapkv, h2o, tova, knorm, vatp, streamingllm, random, "
            "divprune, dart, ...)"
        )
    extra = sorted(set(m.requires) - _SIGNALS)
    if extra:
        raise UniprunerError(
            f"method {m.name!r} needs signal(s) {extra} that a KV cache does not have; the adapter provides "
            f"{sorted(_SIGNALS)} (keys and values per KV head, attention rows from the hook)"
        )
    rows = _rows_for(m)
    if "kv" not in m.domains:
        raise UniprunerError(
            f"method {m.name!r} does not run on KV caches; the kv methods are {', '.join(KV_METHODS)} "
            "(`unipruner methods --domain kv`)"
        )
    if m.budget.ratio is not None and not 0.0 < float(m.budget.ratio) <= 1.0:
        raise UniprunerError(f"the budget keeps a fraction in (0, 1], got {m.budget.ratio}")
    if m.budget.keep is not None and m.budget.keep < 1:
        raise UniprunerError(f"the budget must keep at least one token, got keep={m.budget.keep}")
    policy = None
    for cls, name in _POLICIES.items():
        if type(m) is cls:
            policy = name
    if evict is None:
        evict = policy is not None
    if evict and policy is None:
        raise UniprunerError(
            f"evict=True (fixed-budget decoding) is defined for h2o, tova and streamingllm, not {m.name!r}"
        )
    if recent is None:
        recent = 0.5 if isinstance(m, H2O) else 0.0
    if isinstance(recent, bool) or not isinstance(recent, (int, float)) or not 0.0 <= float(recent) < 1.0:
        raise UniprunerError(
            f"recent is the fraction of the budget kept for the latest tokens, in [0, 1); got {recent!r}"
        )
    if recent and m.budget.data_dependent:
        raise UniprunerError("recent= needs a ratio or keep budget (the window is a fraction of the count kept)")
    if rerotate and not isinstance(m, StreamingLLM):
        raise UniprunerError("rerotate=True is StreamingLLM's position re-assignment; use it with 'streamingllm'")
    if rerotate and m.budget.data_dependent:
        raise UniprunerError("rerotate=True needs a ratio or keep budget")
    if per_head is None:
        per_head = not isinstance(m, TOVA)
    if m.protected and not isinstance(m, ScoringMethod):
        raise UniprunerError(
            f"{m.name!r} with protected={m.protected}: selectors count protected tokens from position 0, which is "
            "padding in a left-padded batch; use protected=0"
        )
    return Plan(m, rows, bool(per_head), policy if evict else None, float(recent), bool(rerotate))



def replan(current: Plan, method: str | Method | None = None, ratio: float | None = None, *,
           keep: int | None = None, budget: Budget | None = None, per_head: bool | None = None,
           evict: bool | None = None, recent: float | None = None, rerotate: bool | None = None,
           **params: Any) -> Plan:
    """The plan after ``configure(...)``: the keywords of :func:`make_plan`, ``None`` keeping the current value.

    Without ``method`` the current method is kept (``params`` change its fields, a budget keyword
    its budget); with another method the current budget carries over unless one is given, and
    ``per_head`` / ``evict`` / ``recent`` / ``rerotate`` fall back to that method's defaults.
    Validated exactly like :func:`make_plan`.
    """
    cur = current.method
    given = any(x is not None for x in (ratio, keep, budget))
    if method is None:
        m = cur
        if params:
            fields = {f.name for f in dataclasses.fields(m) if f.init}
            unknown = sorted(set(params) - fields)
            if unknown:
                raise UniprunerError(f"method {m.name!r} has no parameter(s) {unknown}; it takes {sorted(fields)}")
            m = dataclasses.replace(m, **params)
    elif isinstance(method, str):
        m = build_method(method, **params)
        if not given:
            m = dataclasses.replace(m, budget=cur.budget)
    elif isinstance(method, Method):
        if params:
            raise UniprunerError(f"parameters {sorted(params)} go into the Method itself when passing an instance")
        m = method
    else:
        raise UniprunerError(f"method must be a registry name or a unipruner Method, got {type(method).__name__}")
    same = type(m) is type(cur)

    def kept(new: Any, old: Any, default: Any) -> Any:
        return new if new is not None else (old if same else default)

    return make_plan(m, ratio, keep=keep, budget=budget, per_head=kept(per_head, current.per_head, None),
                     evict=kept(evict, current.evict is not None, None), recent=kept(recent, current.recent, None),
                     rerotate=kept(rerotate, current.rerotate, False))
