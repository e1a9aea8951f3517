"""What to keep and what to evict, given scores: pure tensor functions (no model, no cache).

The KV adapter's hooks gather signals and call these; each is tested against a plainly written
per-row reference in ``tests/test_kv_policies.py``. Shapes: ``B`` rows, ``H`` KV heads, ``S``
stored slots; a selection is made per KV head (``B' = B * H``) or once per row shared by all
heads (``B' = B``, TOVA).

* :func:`layout` / :func:`to_heads` — the per-head or shared layout of keys, values and attention;
* :func:`prefill_keep` — top-k of the scores with sinks (``protected`` leading tokens) and a recent
  window (H2O's local half) protected;
* :func:`prefill_rerotation` — StreamingLLM's contiguous positions for the kept keys;
* :func:`evict_keep` / :func:`compact` / :func:`compaction_shift` — fixed-budget eviction while
  decoding (H2O, TOVA, StreamingLLM): which slots go, the kept slots packed to the left in their
  order, and the position shift of re-rotated keys;
* :func:`kept_scores` / :func:`accumulate` — H2O's accumulated-attention buffer.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ...hosts.masks import leading, trailing
from ...select import Budget, topk

__all__ = ["accumulate", "compact", "compaction_shift", "evict_keep", "gather_slots", "kept_scores", "layout",
           "prefill_keep", "prefill_rerotation", "to_heads"]


def layout(keys: Tensor, values: Tensor, attn: Tensor | None, valid: Tensor | None, n_kv: int,
           per_head: bool) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
    """Tokens ``[B', S, D']``, mask ``[B', S]`` and signals for a registry method.

    ``keys``/``values`` ``[B, H_kv, S, D]``; ``attn [B, H, R, S]`` (query heads) or None;
    ``valid [B, H_kv, S]`` or None. Per head: one sequence per (row, KV head) of ``D``-dim keys,
    attention averaged over each KV head's query group (GQA). Shared: one sequence per row of
    the heads' keys concatenated (``H_kv * D``), the mask of head 0, attention of every head.
    """
    b, h, s, d = keys.shape
    if per_head:
        tokens = keys.reshape(b * h, s, d)
        mask = None if valid is None else valid.reshape(b * h, s)
        signals = {"keys": tokens, "values": values.reshape(b * h, s, d)}
        if attn is not None:
            # group_heads without its input checks (a NaN scan of rows just computed): the same reshape + mean
            r = attn.shape[-2]
            signals["attn"] = attn.reshape(b, n_kv, attn.shape[1] // n_kv, r, s).mean(dim=2).reshape(b * h, r, s)
        return tokens, mask, signals
    tokens = keys.transpose(1, 2).reshape(b, s, h * d)
    mask = None if valid is None else valid[:, 0]
    signals = {"keys": tokens, "values": values.transpose(1, 2).reshape(b, s, h * d)}
    if attn is not None:
        signals["attn"] = attn
    return tokens, mask, signals


def to_heads(x: Tensor, b: int, h: int, per_head: bool) -> Tensor:
    """``[B', ...]`` selection results -> ``[B, H, ...]`` (a shared selection is repeated for every head)."""
    if per_head:
        return x.reshape(b, h, *x.shape[1:])
    return x[:, None].expand(b, h, *x.shape[1:])


def prefill_keep(scores: Tensor, budget: Budget, mask: Tensor | None, *, n_protected: int = 0,
                 recent: float = 0.0) -> Tensor:
    """Keep indices ``[B', K]`` (sorted, ``-1`` padded) of the top-``budget`` scores of each row.

    Parameters
    ----------
    scores : Tensor ``[B', S]``
    budget : Budget
        How many of each row's valid tokens survive (``ratio`` = fraction kept).
    mask : Tensor ``[B', S]`` bool or None
        Valid tokens (None = all).
    n_protected : int
        The first ``n_protected`` valid tokens of a row are always kept (attention sinks).
    recent : float in [0, 1)
        ``floor(count * recent)`` of the row's last valid tokens are always kept (H2O's recent
        window; needs a ratio / keep budget).
    """
    vmask = mask if mask is not None else torch.ones_like(scores, dtype=torch.bool)
    prot = leading(vmask, n_protected) if n_protected else torch.zeros_like(vmask)
    counts = None if budget.data_dependent else budget.counts(vmask.sum(-1), n_max=scores.shape[-1])
    if recent and counts is not None:
        prot = prot | trailing(vmask, torch.floor(counts.double() * recent).long())
    return topk(scores, budget, mask=mask, protected=prot if bool(prot.any()) else None)


def gather_slots(keys: Tensor, values: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """Slots ``idx [B, H, K]`` of ``keys``/``values`` ``[B, H, S, D]``."""
    gather = idx[..., None].expand(*idx.shape, keys.shape[-1])
    return keys.gather(2, gather), values.gather(2, gather)


def prefill_rerotation(positions: Tensor, row_valid: Tensor, kept: Tensor, idx: Tensor) -> tuple[Tensor, Tensor]:
    """StreamingLLM re-rotation (Xiao et al., ICLR 2024): kept keys move to contiguous positions.

    Parameters
    ----------
    positions : Tensor ``[B, S]``
        Original position of every slot.
    row_valid : Tensor ``[B, S]`` bool
    kept : Tensor ``[B, H, K]`` bool
        Which kept indices are real (the rest is ``-1`` padding).
    idx : Tensor ``[B, H, K]``
        Kept slot indices (padding clamped to 0).

    Returns
    -------
    delta : Tensor ``[B, H, K]``
        Position shift of each kept key (its rank among the kept minus its original position).
    offset : Tensor ``[B]``
        New tokens go to ``position - offset``: right after the kept ones.
    """
    b, h, _ = kept.shape
    s = positions.shape[-1]
    orig = positions[:, None, :].expand(b, h, s).gather(2, idx)
    new_pos = torch.cumsum(kept.long(), dim=-1) - 1
    delta = torch.where(kept, new_pos - orig, torch.zeros_like(orig))
    last = torch.where(row_valid, positions, torch.full_like(positions, -1)).amax(-1)
    return delta, last + 1 - kept[:, 0].sum(-1)


def kept_scores(scores: Tensor, idx: Tensor, kept: Tensor) -> Tensor:
    """The float32 scores ``[B, H, K]`` of the kept slots (0 for padding and non-finite scores)."""
    sc = torch.where(torch.isfinite(scores), scores, torch.zeros_like(scores)).gather(2, idx)
    return torch.where(kept, sc, torch.zeros_like(sc)).to(torch.float32)


def accumulate(total: Tensor | None, scores: Tensor, valid: Tensor) -> Tensor:
    """H2O's running sum: ``total + scores`` over valid slots with finite scores (``total`` None = 0)."""
    inc = torch.where(valid & torch.isfinite(scores), scores, torch.zeros_like(scores))
    return (total if total is not None else torch.zeros_like(inc)) + inc


def evict_keep(valid: Tensor, scores: Tensor, budget: Tensor, *, n_protected: int = 0,
               recent: Tensor | None = None) -> Tensor | None:
    """Which slots stay ``[B, H, S]`` when each (row, head) must shrink back to ``budget [B, H]``.

    The lowest-scoring evictable slots go (ties: the earliest slot first); a slot is evictable
    when it is valid, not among the first ``n_protected`` valid slots (sinks), not among the
    last ``recent [B, H]`` valid slots, and its score is not ``+inf``. None when nothing exceeds
    its budget.
    """
    s = valid.shape[-1]
    n_evict = (valid.sum(-1) - budget).clamp(min=0)
    if not bool((n_evict > 0).any()):
        return None
    protected = leading(valid, n_protected) if n_protected else torch.zeros_like(valid)
    if recent is not None:
        protected = protected | trailing(valid, recent)
    evictable = valid & ~protected & (scores != math.inf)
    key = torch.where(evictable, scores, torch.full_like(scores, math.inf))
    order = torch.sort(key, dim=-1, stable=True).indices
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=valid.device).expand_as(order))
    return valid & ~(evictable & (rank < n_evict[..., None]))


def compact(keepmask: Tensor) -> tuple[Tensor, Tensor]:
    """Kept slots packed to the left in their order: ``(slot_order [B, H, W], new_valid [B, H, W])``.

    ``W`` is the largest kept count; ``slot_order`` indexes the old slots (rows with fewer kept
    slots end with dropped ones, marked invalid in ``new_valid``).
    """
    new_count = keepmask.sum(-1)
    width = int(new_count.max())
    slot_order = torch.sort((~keepmask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
    new_valid = torch.arange(width, device=keepmask.device) < new_count[..., None]
    return slot_order, new_valid


def compaction_shift(valid: Tensor, slot_order: Tensor, new_valid: Tensor) -> Tensor:
    """Position shift ``[B, H, W]`` of re-rotated keys after :func:`compact`: new rank minus old rank."""
    old_rank = (torch.cumsum(valid.long(), dim=-1) - 1).gather(2, slot_order)
    new_rank = torch.arange(slot_order.shape[-1], device=valid.device).expand_as(slot_order)
    return torch.where(new_valid, new_rank - old_rank, torch.zeros_like(old_rank))
