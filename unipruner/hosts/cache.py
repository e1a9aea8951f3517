"""A Hugging Face ``DynamicCache`` that knows its logical length differs from what it stores.

Used by :mod:`unipruner.kv` (and next by in-LLM pruning of ``unipruner.vlm``); this module
imports ``transformers`` at load, so :mod:`unipruner.hosts` does not import it eagerly.

A pruned KV cache holds fewer key/value slots than the number of tokens the model has seen.
``transformers`` derives positions (``position_ids = arange + cache.get_seq_length()``), the
restart point of ``generate()`` and the attention-mask geometry from the cache length, so a
plain ``DynamicCache`` whose tensors were shortened silently puts new tokens at wrong positions.
:class:`CompressedCache` keeps the two apart:

* ``get_seq_length()`` is the **logical** length (tokens fed, padding included: the length of
  the 2-D attention mask), so positions and ``generate()``'s slicing stay right;
* each :class:`CompressedLayer` stores ``[B, H_kv, S, D]`` slots plus a validity mask
  ``[B, H_kv, S]`` (rows and heads may keep different counts; ``None`` = all valid), and the
  adapter's attention hook builds the attention mask from that layout;
* sliding-window layers (Gemma 3, Mistral/Qwen2 with a window) stay Hugging Face's own
  ``DynamicSlidingWindowLayer`` and are never compressed by :mod:`unipruner.kv`; with
  ``CompressedCache(config, sliding=True)`` (what :mod:`unipruner.vlm` builds) they are
  :class:`CompressedSlidingLayer`: the same last ``window - 1`` slots, plus the validity and the
  position id of each, so a layer that saw a pruned sequence can mask its window by position.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

from ..errors import UniprunerError

__all__ = ["CompressedCache", "CompressedLayer", "CompressedSlidingLayer", "Step"]


@dataclass
class Step:
    """What the current forward feeds: set by the adapter's model hook, read by the layers.

    Attributes
    ----------
    valid : Tensor ``[B, q]`` bool or None
        Which of the ``q`` new tokens are real (None = all).
    positions : Tensor ``[B, q]`` long
        Their position ids.
    settings : object, optional
        The adapter's settings for this forward, read once when it begins (a later
        ``configure`` does not change a forward already running).
    """

    valid: Tensor | None
    positions: Tensor
    settings: Any = None


class _BatchedTensors:
    """Batch reordering (beam search, ``batch_select_indices``, ``repeat_interleave``) applied to every
    per-row tensor a cache layer keeps: the names in ``_BATCHED``."""

    _BATCHED: tuple[str, ...] = ()

    def _batch_apply(self, fn: Callable[[Tensor], Tensor]) -> None:
        f: Any = fn
        for name in self._BATCHED:
            t = getattr(self, name)
            if isinstance(t, Tensor) and t.numel() > 0:
                setattr(self, name, f(t))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._batch_apply(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: Tensor) -> None:
        self._batch_apply(lambda t: t[indices.to(t.device)])

    def reorder_cache(self, beam_idx: Tensor) -> None:
        self._batch_apply(lambda t: t.index_select(0, beam_idx.to(t.device)))


class CompressedLayer(_BatchedTensors, DynamicLayer):
    """One full-attention layer of a :class:`CompressedCache`.

    Attributes
    ----------
    keys, values : Tensor ``[B, H, S, D]``
        Stored slots (post-RoPE keys, as Hugging Face stores them).
    valid : Tensor ``[B, H, S]`` bool or None
        Which slots hold a real token (None = all).
    seen : int
        Logical length: tokens fed so far, padding included.
    compressed : bool
        Whether the adapter has compressed this layer (it compresses once, at prefill).
    offset : Tensor ``[B]`` long or None
        Re-rotated caches (StreamingLLM ``rerotate=True``): new tokens are placed at
        ``position_id - offset`` so positions stay contiguous inside the cache.
    scores : Tensor ``[B, H, S]`` or None
        Eviction scores kept while decoding with a fixed budget (H2O's accumulated attention).
    budget : Tensor ``[B, H]`` long or None
        Fixed number of slots per row and head while decoding (evict-as-you-go), or None.
    prefill_valid : Tensor ``[B]`` long or None
        Real tokens per row when the layer was compressed (for :func:`stats`).
    """

    is_croppable = False

    def __init__(self) -> None:
        super().__init__()
        self.seen = 0
        self.valid: Tensor | None = None
        self.compressed = False
        self.offset: Tensor | None = None
        self.scores: Tensor | None = None
        self.budget: Tensor | None = None
        self.recent: Tensor | None = None
        self.prefill_valid: Tensor | None = None

    # -- sizes ----------------------------------------------------------------------------------
    @property
    def stored(self) -> int:
        """Number of stored slots ``S`` (padding slots included)."""
        if not self.is_initialized or self.keys is None or self.keys.numel() == 0:
            return 0
        return int(self.keys.shape[-2])

    def get_seq_length(self) -> int:
        """The logical length (tokens seen), not the number of stored slots."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Mask geometry for Hugging Face's mask builders: ``S + q`` keys ending at ``seen + q``.

        The adapter replaces the mask of a compressed layer by one built from :attr:`valid`;
        these sizes only keep the model-level mask well-formed.
        """
        return self.stored + query_length, self.seen - self.stored

    @property
    def k(self) -> Tensor:
        """The stored keys (an error before the first update)."""
        if self.keys is None:
            raise UniprunerError("this cache layer holds nothing yet")
        return self.keys

    @property
    def v(self) -> Tensor:
        """The stored values (an error before the first update)."""
        if self.values is None:
            raise UniprunerError("this cache layer holds nothing yet")
        return self.values

    def slot_valid(self) -> Tensor:
        """``[B, H, S]`` bool validity of every stored slot."""
        if self.valid is not None:
            return self.valid
        b, h, s, _ = self.k.shape
        return torch.ones(b, h, s, dtype=torch.bool, device=self.k.device)

    # -- growth -----------------------------------------------------------------------------------
    def append(self, key_states: Tensor, value_states: Tensor, step: Step | None) -> tuple[Tensor, Tensor]:
        """Append ``q`` new slots and return all stored keys and values."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self.compressed and step is None:
            raise UniprunerError(
                "this cache was compressed by unipruner.kv and can only be extended by a model patched with "
                "unipruner.kv.patch / compress (its attention masks must follow the stored-slot layout)"
            )
        b, h, q, _ = key_states.shape
        new_valid = None if step is None or step.valid is None else step.valid.to(key_states.device)
        if self.valid is not None or new_valid is not None:
            old = self.slot_valid() if self.stored else torch.zeros(b, h, 0, dtype=torch.bool,
                                                                    device=key_states.device)
            add = (torch.ones(b, h, q, dtype=torch.bool, device=key_states.device) if new_valid is None
                   else new_valid[:, None, :].expand(b, h, q))
            self.valid = torch.cat([old, add], dim=-1)
        if self.scores is not None:
            self.scores = torch.cat([self.scores, self.scores.new_zeros(b, h, q)], dim=-1)
        self.keys = torch.cat([self.k, key_states], dim=-2)
        self.values = torch.cat([self.v, value_states], dim=-2)
        self.seen += q
        return self.keys, self.values

    def update(self, key_states: Tensor, value_states: Tensor, *args: object,
               **kwargs: object) -> tuple[Tensor, Tensor]:
        """Hugging Face's entry point; :class:`CompressedCache` calls :meth:`append` with the step."""
        return self.append(key_states, value_states, None)

    def replace(self, keys: Tensor, values: Tensor, valid: Tensor | None,
                scores: Tensor | None = None) -> None:
        """Swap in a reduced set of slots (the logical length does not change)."""
        if valid is not None and bool(valid.all()):
            valid = None
        self.keys, self.values, self.valid, self.scores = keys, values, valid, scores

    # -- Hugging Face cache API -------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.valid = self.offset = self.scores = self.budget = self.recent = self.prefill_valid = None
        self.compressed = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise UniprunerError(
                "a compressed KV cache cannot be cropped (its slots are no longer the last tokens); "
                "assisted / speculative decoding is not supported with unipruner.kv"
            )

    _BATCHED = ("keys", "values", "valid", "offset", "scores", "budget", "recent", "prefill_valid")


class CompressedSlidingLayer(_BatchedTensors, DynamicSlidingWindowLayer):
    """A sliding-window layer that knows the position and validity of the slots it keeps.

    Stores what ``DynamicSlidingWindowLayer`` stores (the last ``window - 1`` slots, the same
    tensors while nothing is pruned) plus, per slot, whether it is a real token and its position
    id. Once the layer has seen a pruned sequence (``compressed``), its slots are no longer the
    last ``window - 1`` positions, and the adapter masks them by position (a key at ``p`` is
    visible to a query at ``t`` when ``t - window < p <= t``).

    Attributes
    ----------
    seen : int
        Logical length: tokens fed so far, padding included (``get_seq_length``).
    valid : Tensor ``[B, S]`` bool or None
        Which stored slots are real tokens (None before the first update).
    positions : Tensor ``[B, S]`` long or None
        Their position ids.
    compressed : bool
        Whether the adapter pruned the sequence this layer saw (its masks follow the slots).
    """

    is_croppable = False

    def __init__(self, sliding_window: int) -> None:
        super().__init__(sliding_window=sliding_window)
        self.seen = 0
        self.valid: Tensor | None = None
        self.positions: Tensor | None = None
        self.compressed = False

    def get_seq_length(self) -> int:
        """The logical length (tokens seen), not the number of stored slots."""
        return self.seen

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        """Hugging Face's sizes while nothing is pruned; ``S + q`` keys ending at ``seen + q`` after."""
        if not self.compressed:
            return super().get_mask_sizes(query_length)
        stored = 0 if self.keys is None or not self.is_initialized else int(self.keys.shape[-2])
        return stored + query_length, self.seen - stored

    def append(self, key_states: Tensor, value_states: Tensor, step: Step | None) -> tuple[Tensor, Tensor]:
        """Append ``q`` new slots; return every stored plus new slot, keep the last ``window - 1``.

        Keeps more than ``window - 1`` slots only when tokens share a position (aggregate tokens
        take their image's last position) and a key still visible to the next query would go.
        """
        if self.compressed and step is None:
            raise UniprunerError(
                "this cache holds a pruned sequence and can only be extended by the model patched with "
                "unipruner.vlm (its attention masks must follow the stored slots)"
            )
        b, _, q, _ = key_states.shape
        dev = key_states.device
        new_valid = (torch.ones(b, q, dtype=torch.bool, device=dev) if step is None or step.valid is None
                     else step.valid.to(dev))
        new_pos = (self.seen + torch.arange(q, device=dev)[None].expand(b, q) if step is None
                   else step.positions.to(dev).expand(b, q))
        if not self.is_initialized or self.valid is None or self.positions is None:
            valid, pos = new_valid, new_pos
        else:
            valid, pos = torch.cat([self.valid, new_valid], 1), torch.cat([self.positions, new_pos], 1)
        full_k, full_v = super().update(key_states, value_states)  # Hugging Face's own crop of keys / values
        self.seen += q
        assert self.keys is not None
        total, stored = full_k.shape[-2], self.keys.shape[-2]
        last = torch.where(valid, pos, torch.full_like(pos, -1)).max(1, keepdim=True).values
        live = valid & (pos > last + 1 - self.sliding_window)  # still visible to the next query
        first = torch.where(live.any(1), live.long().argmax(1), torch.full_like(last[:, 0], total))
        keep = max(stored, int((total - first).max()))
        if keep > stored:
            self.keys, self.values = full_k[:, :, total - keep:], full_v[:, :, total - keep:]
        self.valid, self.positions = valid[:, total - keep:], pos[:, total - keep:]
        return full_k, full_v

    def update(self, key_states: Tensor, value_states: Tensor, *args: object,
               **kwargs: object) -> tuple[Tensor, Tensor]:
        """Hugging Face's entry point; :class:`CompressedCache` calls :meth:`append` with the step."""
        return self.append(key_states, value_states, None)

    def reset(self) -> None:
        super().reset()
        self.seen = 0
        self.valid = self.positions = None
        self.compressed = False

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove != 0:
            raise UniprunerError(
                "a sliding-window layer of a pruned sequence cannot be cropped; assisted / speculative decoding "
                "is not supported with unipruner.vlm"
            )

    _BATCHED = ("keys", "values", "valid", "positions")


class CompressedCache(DynamicCache):
    """A ``DynamicCache`` whose full-attention layers may be compressed by :mod:`unipruner.kv`.

    Built from the model config like ``DynamicCache(config=...)``; full-attention layers are
    :class:`CompressedLayer`, sliding-window layers stay ``DynamicSlidingWindowLayer``. A model
    patched with :func:`unipruner.kv.patch` creates one automatically (also inside
    ``generate()``); pass one explicitly to keep a compressed context across calls.

    Parameters
    ----------
    config : transformers.PretrainedConfig
        The model's config.
    sliding : bool
        Sliding-window layers become :class:`CompressedSlidingLayer` (slot positions and validity
        tracked) instead of staying Hugging Face's ``DynamicSlidingWindowLayer``.

    Examples
    --------
    >>> from transformers import LlamaConfig
    >>> cache = CompressedCache(LlamaConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=2,
    ...                                     num_key_value_heads=1, intermediate_size=64, vocab_size=50))
    >>> [type(layer).__name__ for layer in cache.layers], cache.get_seq_length()
    (['CompressedLayer', 'CompressedLayer'], 0)
    """

    def __init__(self, config: object, *, sliding: bool = False) -> None:
        if config is None:
            raise UniprunerError("CompressedCache needs the model config: CompressedCache(model.config)")
        super().__init__(config=config)  # type: ignore[arg-type]
        layers: list[Any] = []
        for layer in self.layers:
            if type(layer) is DynamicLayer:
                layer = CompressedLayer()
            elif sliding and type(layer) is DynamicSlidingWindowLayer:
                layer = CompressedSlidingLayer(layer.sliding_window)
            layers.append(layer)
        self.layers = layers
        self.step: Step | None = None
        self.plan: object | None = None  # the settings it was compressed with (set by the adapter)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args: object,
               **kwargs: object) -> tuple[Tensor, Tensor]:
        layer = self.layers[layer_idx]
        if isinstance(layer, (CompressedLayer, CompressedSlidingLayer)):
            return layer.append(key_states, value_states, self.step)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    @property
    def compressed(self) -> bool:
        """Whether any layer has been compressed."""
        return any(isinstance(layer, (CompressedLayer, CompressedSlidingLayer)) and layer.compressed
                   for layer in self.layers)
