"""Attention masks built from a stored-slot layout (torch only).

A compressed KV cache stores, per row and KV head, a set of slots that are no longer the last
tokens: the attention mask of a layer follows the slots' validity ``[B, H_kv, S]`` rather than
Hugging Face's ``arange`` geometry. Used by :mod:`unipruner.kv` and by the focal-attention RAG
scorer (sliding-window rows); VLM in-LLM pruning is the next user.

>>> valid = torch.tensor([[[True, False, True]]])          # one row, one KV head, 3 slots
>>> stored_slot_mask(valid, None, 2, n_heads=2).int()[0, 0]  # 2 new tokens, causal among themselves
tensor([[1, 0, 1, 1, 0],
        [1, 0, 1, 1, 1]], dtype=torch.int32)
>>> leading(torch.tensor([[False, True, True, True]]), 2).int()
tensor([[0, 1, 1, 0]], dtype=torch.int32)
>>> trailing(torch.tensor([[True, True, False, True]]), 2).int()
tensor([[0, 1, 0, 1]], dtype=torch.int32)
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["expand_heads", "leading", "sliding_key_mask", "stored_slot_mask", "trailing"]


def expand_heads(mask: Tensor, n_heads: int) -> Tensor:
    """``[B, H_kv, ...]`` -> ``[B, H, ...]``: query head ``h`` uses KV head ``h // (H / H_kv)`` (HF's ``repeat_kv``)."""
    return mask.repeat_interleave(n_heads // mask.shape[1], dim=1) if mask.shape[1] != n_heads else mask


def leading(mask: Tensor, count: Tensor | int) -> Tensor:
    """The first ``count`` valid positions of each row of ``mask [..., S]`` (``count`` int or ``[...]``)."""
    rank = torch.cumsum(mask.long(), dim=-1)
    c = count if isinstance(count, int) else count[..., None]
    return mask & (rank <= c)


def trailing(mask: Tensor, count: Tensor | int) -> Tensor:
    """The last ``count`` valid positions of each row of ``mask [..., S]`` (``count`` int or ``[...]``)."""
    rank = torch.flip(torch.cumsum(torch.flip(mask.long(), [-1]), dim=-1), [-1])
    c = count if isinstance(count, int) else count[..., None]
    return mask & (rank <= c)


def stored_slot_mask(old: Tensor, new_valid: Tensor | None, q: int, *, n_heads: int,
                     additive: torch.dtype | None = None) -> Tensor | None:
    """The attention mask of ``q`` new queries over stored slots followed by the ``q`` new keys.

    Parameters
    ----------
    old : Tensor ``[B, H_kv, S]`` bool
        Which stored slots hold a real token (``S`` may be 0).
    new_valid : Tensor ``[B, q]`` bool or None
        Which new tokens are real (None = all); padding queries still see themselves.
    q : int
    n_heads : int
        Query heads (the mask is expanded from KV heads when heads differ).
    additive : torch.dtype, optional
        None: a boolean mask (SDPA); a float dtype: an additive mask, 0 / ``finfo.min`` (eager).

    Returns
    -------
    Tensor ``[B, 1 or H, q, S + q]`` or None
        None when nothing needs masking (one real new token over all-valid slots).
    """
    b, dev = old.shape[0], old.device
    if bool((old == old[:, :1]).all()):
        old = old[:, :1]
    if q == 1 and new_valid is None and bool(old.all()):
        return None
    new = torch.ones(q, q, dtype=torch.bool, device=dev).tril()[None, None]
    if new_valid is not None:
        new = (new & new_valid.to(dev)[:, None, None, :]) | torch.eye(q, dtype=torch.bool, device=dev)
    h = old.shape[1]
    full = torch.cat([old[:, :, None, :].expand(b, h, q, old.shape[-1]), new.expand(b, h, q, q)], dim=-1)
    if h > 1:
        full = expand_heads(full, n_heads)
    if additive is not None:
        zero = torch.zeros((), dtype=additive, device=dev)
        return torch.where(full, zero, torch.finfo(additive).min)
    return full


def sliding_key_mask(n_keys: int, n_queries: int, window: int | None, device: torch.device | str = "cpu") -> Tensor:
    """``[Q, N]`` keys each of the last ``Q`` queries sees in a sliding-window layer (causal included).

    Query ``i`` sits at position ``N - Q + i`` and sees keys ``j`` with ``pos - window < j <= pos``
    (Hugging Face's ``sliding_window_overlay``); ``window=None`` is plain causal attention.

    >>> sliding_key_mask(5, 2, 2).int()
    tensor([[0, 0, 1, 1, 0],
            [0, 0, 0, 1, 1]], dtype=torch.int32)
    """
    pos = torch.arange(n_keys - n_queries, n_keys, device=device)[:, None]
    j = torch.arange(n_keys, device=device)[None, :]
    ok = j <= pos
    if window is not None:
        ok = ok & (j > pos - window)
    return ok
