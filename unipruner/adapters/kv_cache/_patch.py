"""Per-instance hooks that compress a Hugging Face causal LM's KV cache at prefill (the ``kv`` handle).

Three kinds of hooks, all on *this* model's modules (nothing global, nothing set on the model,
removed exactly by :meth:`KVCompressor.unpatch`), registered through
:meth:`~unipruner.hosts.patching.PatchHandle.add_hook` so :func:`find` finds the handle from them:

* a forward pre-hook on the decoder (``model.base_model``) swaps an absent or empty
  ``DynamicCache`` (``generate()``'s default) for a :class:`~unipruner.hosts.cache.CompressedCache`
  and records what the forward feeds (which new tokens are real, their positions, the settings
  read once for this forward) on that cache's :class:`~unipruner.hosts.cache.Step`;
* a forward pre-hook on every compressible attention module replaces the attention mask of a
  compressed layer by one built from the stored-slot layout (:mod:`unipruner.hosts.masks`) and,
  for re-rotated StreamingLLM caches, shifts the rotary positions;
* a forward hook on the same modules compresses the layer once, right after its prefill, and
  evicts while decoding for fixed-budget policies (H2O, TOVA, StreamingLLM).

Per-call state lives in the per-call cache, never on the handle, so one patched model serves
concurrent calls (each ``generate()`` / forward builds or receives its own cache). Scores always
come from the core registry (:func:`unipruner.method`): the hooks gather the signals a method
needs — keys and values per KV head, and attention rows of the last queries recomputed by
:mod:`unipruner.hosts.hf_attention` — and the policies of :mod:`._policies` decide what stays.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ...errors import UniprunerError
from ...hosts.cache import CompressedCache, CompressedLayer, Step
from ...hosts.hf_attention import (
    AttentionLayer,
    attention_layers,
    attention_rows,
    check_static_rope,
    decoder,
    rotary_at,
    rotate,
)
from ...hosts.masks import stored_slot_mask
from ...hosts.patching import PatchHandle, find_handle, reuse_or_refuse
from ...methods import Method, ScoringMethod
from ...select import Budget
from ._plan import Plan, make_plan, replan
from ._policies import (
    accumulate,
    compact,
    compaction_shift,
    evict_keep,
    gather_slots,
    kept_scores,
    layout,
    prefill_keep,
    prefill_rerotation,
    to_heads,
)
from ._stats import KVStats, stats

__all__ = ["KVCompressor", "compress", "find", "patch", "unpatch"]


class KVCompressor(PatchHandle):
    """A model patched for KV-cache compression (returned by :func:`patch`; a context manager).

    Attributes
    ----------
    model : transformers.PreTrainedModel
    plan : Plan
        The method and how it is applied (the handle's settings; :meth:`configure` swaps it).
    layers : list[int]
        Compressed (full-attention) layer indices.
    skipped : dict[int, str]
        Layers left uncompressed, with the reason (sliding-window layers of hybrid models).
    """

    domain = "kv"

    def __init__(self, model: Any, plan: Plan) -> None:
        base = decoder(model)
        specs, skipped = attention_layers(model, base)
        if not specs:
            raise UniprunerError(
                f"nothing to compress in {type(model).__name__}: all {len(skipped)} layers are sliding-window layers "
                "(set config.sliding_window=None for a full-attention model, e.g. Mistral v0.2+)"
            )
        super().__init__(model, plan)
        self._base = base
        self.skipped = skipped
        self._specs = {s.index: s for s in specs}
        self.layers = sorted(self._specs)
        self._rotary = getattr(base, "rotary_emb", None)
        if plan.rerotate:
            check_static_rope(self._rotary)
        self._by_module = {id(s.module): s for s in specs}

    # -- settings / lifecycle ---------------------------------------------------------------------
    @property
    def plan(self) -> Plan:
        """The current :class:`Plan` (immutable; replaced whole by :meth:`configure`)."""
        plan: Plan = self.settings
        return plan

    def _install(self) -> None:
        base = self._base
        self.add_hook(base, "forward_pre", self._model_pre, with_kwargs=True)
        self.add_hook(base, "forward", self._model_post, with_kwargs=True, always_call=True)
        for spec in self._specs.values():
            self.add_hook(spec.module, "forward_pre", self._attn_pre, with_kwargs=True)
            self.add_hook(spec.module, "forward", self._attn_post, with_kwargs=True)

    def configure(self, method: str | Method | None = None, ratio: float | None = None, *,
                  keep: int | None = None, budget: Budget | None = None, per_head: bool | None = None,
                  evict: bool | None = None, recent: float | None = None, rerotate: bool | None = None,
                  **params: Any) -> KVCompressor:
        """Change the settings between calls; the keywords of :func:`patch`, ``None`` keeping the current value.

        Validated exactly like :func:`patch` before anything changes; a forward already running keeps
        the settings it started with. Without ``method`` the current method is kept (``ratio=`` /
        ``keep=`` / ``budget=`` change its budget, ``window=`` etc. its parameters); another
        ``method`` keeps the current budget unless one is given. Returns ``self``.
        """
        plan = replan(self.plan, method, ratio, keep=keep, budget=budget, per_head=per_head, evict=evict,
                      recent=recent, rerotate=rerotate, **params)
        if plan.rerotate:
            check_static_rope(self._rotary)
        self._set_settings(plan)
        return self

    def _on_unpatch(self) -> None:
        cache = self.last_stats
        if isinstance(cache, CompressedCache):  # keep what it kept, not the tensors
            self.publish(stats(cache))

    def __repr__(self) -> str:
        m = self.plan.method
        return (f"KVCompressor({type(self.model).__name__}, {m.name}, budget={m.budget!r}, "
                f"layers={len(self.layers)}/{len(self.layers) + len(self.skipped)}, active={self.active})")

    def describe(self) -> str:
        """One line saying what is compressed and what is left alone (and why)."""
        n = len(self.layers) + len(self.skipped)
        m = self.plan.method
        text = f"{m.name} ({m.budget!r}) on {len(self.layers)} of {n} layers"
        if self.skipped:
            reasons = sorted(set(self.skipped.values()))
            text += f"; {len(self.skipped)} left uncompressed: " + "; ".join(reasons)
        return text

    def new_cache(self) -> CompressedCache:
        """An empty :class:`CompressedCache` for this model (pass it as ``cache=`` to keep a context)."""
        return CompressedCache(self.model.config)

    @property
    def last_cache(self) -> CompressedCache | None:
        """The cache of the most recently finished forward through this model (None after unpatch)."""
        cache = self.last_stats
        return cache if isinstance(cache, CompressedCache) else None

    def stats(self) -> KVStats:
        """:func:`unipruner.kv.stats` of the last call's cache: tokens and bytes per layer, before and after."""
        last = self.last_stats
        if last is None:
            raise UniprunerError("no cache yet: run the model (or generate) on the patched model first")
        return last if isinstance(last, KVStats) else stats(last)

    # -- hooks: model level -------------------------------------------------------------------------
    def _model_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                   ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        if "cache" in kwargs and "past_key_values" in kwargs:
            raise UniprunerError("pass the cache once, as cache= (or the deprecated past_key_values=), not both")
        key = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(self.model.config, "use_cache", True)
        if cache is None:
            if not use_cache:
                return args, kwargs
            cache = CompressedCache(self.model.config)
        elif not isinstance(cache, CompressedCache):
            if type(cache) is DynamicCache and cache.get_seq_length() == 0:
                cache = CompressedCache(self.model.config)  # generate()'s fresh default cache
            else:
                raise UniprunerError(
                    f"unipruner.kv needs an empty DynamicCache (generate()'s default) or a CompressedCache, got a "
                    f"{type(cache).__name__} holding {cache.get_seq_length()} tokens; start from an empty cache or "
                    "use unipruner.kv.CompressedCache(model.config)"
                )
        plan = self.plan  # read once: configure() does not change a forward already running
        if cache.compressed and cache.plan is not None and cache.plan != plan:
            done = cache.plan.method if isinstance(cache.plan, Plan) else cache.plan
            raise UniprunerError(
                f"this cache is already compressed (with {done!r}); it cannot be compressed again with "
                f"{plan.method!r}. Feed it through a model patched with the same settings, or start a new cache"
            )
        kwargs[key] = cache
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        if ref is None:
            raise UniprunerError("the model was called without input_ids or inputs_embeds")
        b, q = int(ref.shape[0]), int(ref.shape[1])
        seen = cache.get_seq_length()
        mask = kwargs.get("attention_mask")
        valid = None
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.ndim != 2:
                raise UniprunerError(
                    "unipruner.kv needs a 2-D attention mask [batch, tokens seen + new] (or none); got "
                    f"{'a ' + str(mask.ndim) + '-D tensor' if isinstance(mask, Tensor) else type(mask).__name__}"
                )
            if mask.shape[-1] != seen + q:
                raise UniprunerError(
                    f"attention_mask covers {mask.shape[-1]} tokens but the cache has seen {seen} and {q} are new; "
                    f"it must cover all {seen + q} (the mask of the whole sequence, as generate() keeps it)"
                )
            valid = mask[:, -q:].to(torch.bool)
            if not bool(valid[:, -1].all()):
                raise UniprunerError(
                    "the last new token of some row is padding: unipruner.kv needs left padding "
                    "(tokenizer.padding_side = 'left'), as generate() does"
                )
            if bool(valid.all()):
                valid = None
        pos = kwargs.get("position_ids")
        if pos is None:
            pos = torch.arange(seen, seen + q, device=ref.device).unsqueeze(0)
        if pos.ndim != 2:
            raise UniprunerError(f"position_ids must be [batch, new tokens], got shape {tuple(pos.shape)}")
        cache.step = Step(valid, pos.expand(b, q), plan)
        return args, kwargs

    def _model_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, CompressedCache) and cache.step is not None:
            cache.step = None
            self.publish(cache)

    # -- hooks: attention level -----------------------------------------------------------------------
    @staticmethod
    def _cache_of(kwargs: dict[str, Any]) -> CompressedCache | None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        return cache if isinstance(cache, CompressedCache) else None

    @staticmethod
    def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Tensor:
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(hidden, Tensor):
            raise UniprunerError("attention module called without hidden_states")
        return hidden

    def _attn_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                  ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        cache = self._cache_of(kwargs)
        if cache is None:
            return None
        spec = self._by_module[id(module)]
        layer = cache.layers[spec.index]
        if not isinstance(layer, CompressedLayer) or not layer.compressed:
            return None
        if cache.step is None:
            raise UniprunerError("a compressed cache must be fed through the patched model, not its layers")
        hidden = self._hidden(args, kwargs)
        if "attention_mask" not in kwargs:
            raise UniprunerError(f"{type(module).__name__} received its attention mask positionally; unsupported")
        kwargs["attention_mask"] = self._mask(spec, layer, cache.step, hidden)
        if layer.offset is not None:
            kwargs["position_embeddings"] = rotary_at(self._rotary, spec, hidden,
                                                      cache.step.positions - layer.offset[:, None])
        return args, kwargs

    def _mask(self, spec: AttentionLayer, layer: CompressedLayer, step: Step, hidden: Tensor) -> Tensor | None:
        b, q = hidden.shape[0], hidden.shape[1]
        old = layer.slot_valid() if layer.stored else torch.zeros(b, spec.n_kv_heads, 0, dtype=torch.bool,
                                                                  device=hidden.device)
        additive = hidden.dtype if self.model.config._attn_implementation == "eager" else None
        return stored_slot_mask(old, step.valid, q, n_heads=spec.n_heads, additive=additive)

    def _attn_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
        cache = self._cache_of(kwargs)
        if cache is None or cache.step is None:
            return
        spec = self._by_module[id(module)]
        layer = cache.layers[spec.index]
        if not isinstance(layer, CompressedLayer) or not layer.is_initialized:
            return
        plan: Plan = cache.step.settings
        with torch.no_grad():
            if not layer.compressed:
                _compress(plan, self._rotary, cache, spec, layer, cache.step, self._hidden(args, kwargs),
                          kwargs["position_embeddings"])
            elif plan.evict is not None and layer.budget is not None:
                _evict(plan, self._rotary, spec, layer, self._hidden(args, kwargs), kwargs["position_embeddings"])


# ------------------------------------------------------------------------------------ what the hooks do


def _compress(plan: Plan, rotary: torch.nn.Module | None, cache: CompressedCache, spec: AttentionLayer,
              layer: CompressedLayer, step: Step, hidden: Tensor, pe: tuple[Tensor, Tensor]) -> None:
    """Compress one layer right after its prefill (once)."""
    m = plan.method
    keys, values = layer.k, layer.v
    b, h, s, _ = keys.shape
    valid = layer.valid  # identical across heads before the first compression
    attn = None if plan.rows is None else attention_rows(spec, hidden, pe, keys, plan.rows, valid)
    tokens, mask, signals = layout(keys, values, attn, valid, h, plan.per_head)
    scores = None
    if isinstance(m, ScoringMethod):
        scores = m.score(tokens, mask=mask, **signals)
        keep = prefill_keep(scores, m.budget, mask, n_protected=m.protected, recent=plan.recent)
    else:
        keep = m.select(tokens, mask=mask, **signals)
    keep = to_heads(keep, b, h, plan.per_head)  # [B, H, K], -1 padded
    kept = keep >= 0
    idx = keep.clamp(min=0)
    new_keys, new_values = gather_slots(keys, values, idx)
    row_valid = valid[:, 0] if valid is not None else torch.ones(b, s, dtype=torch.bool, device=keys.device)
    layer.prefill_valid = row_valid.sum(-1)
    if plan.rerotate:
        if s != step.positions.shape[-1]:
            raise UniprunerError("rerotate=True needs the whole context in one prefill forward")
        if not bool((kept.sum(-1) == kept[:, :1].sum(-1)).all()):
            raise UniprunerError("rerotate=True needs the same number of kept tokens in every head")
        delta, layer.offset = prefill_rerotation(step.positions.to(keys.device), row_valid, kept, idx)
        new_keys = rotate(rotary, spec, new_keys, delta)
    buf = None
    if plan.evict is not None:
        layer.budget = kept.sum(-1)
        layer.recent = torch.floor(layer.budget.double() * plan.recent).long() if plan.recent else None
        if plan.evict == "accumulate" and scores is not None:
            buf = kept_scores(to_heads(scores, b, h, plan.per_head), idx, kept)
    layer.replace(new_keys, new_values, kept, buf)
    layer.compressed = True
    cache.plan = plan


def _evict(plan: Plan, rotary: torch.nn.Module | None, spec: AttentionLayer, layer: CompressedLayer,
           hidden: Tensor, pe: tuple[Tensor, Tensor]) -> None:
    """Shrink one layer back to its fixed budget after a decoding step (H2O, TOVA, StreamingLLM)."""
    m = plan.method
    assert isinstance(m, ScoringMethod) and layer.budget is not None
    keys, values = layer.k, layer.v
    b, h = keys.shape[0], keys.shape[1]
    valid = layer.slot_valid()
    attn = None
    if plan.evict != "positional":
        attn = attention_rows(spec, hidden, pe, keys, hidden.shape[1] if plan.evict == "accumulate" else 1, valid)
    tokens, mask, signals = layout(keys, values, attn, valid, h, plan.per_head)
    sc = to_heads(m.score(tokens, mask=mask, **signals), b, h, plan.per_head).to(torch.float32)
    if plan.evict == "accumulate":
        layer.scores = sc = accumulate(layer.scores, sc, valid)
    keepmask = evict_keep(valid, sc, layer.budget, n_protected=m.protected, recent=layer.recent)
    if keepmask is None:
        return
    slot_order, new_valid = compact(keepmask)
    new_keys, new_values = gather_slots(keys, values, slot_order)
    buf = None if layer.scores is None else layer.scores.gather(2, slot_order)
    if layer.offset is not None:
        new_keys = rotate(rotary, spec, new_keys, compaction_shift(valid, slot_order, new_valid))
        layer.offset = layer.offset + (valid.sum(-1) - new_valid.sum(-1))[:, 0]
    layer.replace(new_keys, new_values, new_valid, buf)


# ------------------------------------------------------------------------------------ public API


def find(model: Any) -> KVCompressor | None:
    """The active :class:`KVCompressor` of ``model``, or None (found through its hooks, nothing stored on it)."""
    return find_handle(model, KVCompressor)


def patch(model: Any, method: str | Method = "snapkv", ratio: float | None = None, *, keep: int | None = None,
          budget: Budget | None = None, per_head: bool | None = None, evict: bool | None = None,
          recent: float | None = None, rerotate: bool = False, **params: Any) -> KVCompressor:
    """Compress ``model``'s KV cache at prefill from now on (per instance; a context manager).

    ``with unipruner.kv.patch(model, "snapkv", ratio=0.5) as h:`` unpatches on exit; without
    ``with``, undo with ``h.unpatch()`` or :func:`unpatch`. Patching again with identical
    settings returns the same handle; with other settings it raises (change them with
    ``h.configure(...)``).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A causal LM of a supported family (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 3 text)
        running ``sdpa`` or ``eager`` attention.
    method : str or Method
        Registry name or instance: ``snapkv`` (Li et al., NeurIPS 2024), ``h2o`` (Zhang et al.,
        NeurIPS 2023), ``tova`` (Oren et al., EMNLP 2024), ``knorm`` (Devoto et al., EMNLP 2024),
        ``vatp`` (Guo et al., EMNLP 2024), ``streamingllm`` (Xiao et al., ICLR 2024),
        ``fastv``, ``random``, or any selector applied to the keys (``divprune``, ``dart``,
        ``kcenter``, ``hidden_norm``...).
    ratio : float in (0, 1]
        Fraction of each sequence's tokens kept in every compressed layer (``1.0`` keeps all).
    keep, budget
        Alternatively a fixed count, or a :class:`unipruner.Budget`.
    per_head : bool, optional
        Select per KV head (default) or one set for all heads (default for TOVA, as in the paper).
    evict : bool, optional
        Keep the budget fixed while decoding, evicting one token per new one: H2O (accumulated
        attention, plus a recent window), TOVA (current token's attention), StreamingLLM (oldest
        non-sink). Default True for those three.
    recent : float, optional
        Fraction of the budget reserved for the latest tokens (H2O's local window; default 0.5
        for H2O, as in the paper's equal split, 0 otherwise).
    rerotate : bool
        StreamingLLM only: re-rotate kept keys to contiguous positions and place new tokens
        right after them, as the paper does (default False: keys keep their original positions).
    **params
        Method parameters (``window=64``, ``kernel=5``, ``n_sink=4``...).

    Returns
    -------
    KVCompressor
        The handle: ``configure()``, ``stats()``, ``describe()``, ``unpatch()``.

    Raises
    ------
    UniprunerError
        Unsupported model or attention implementation, a ratio outside (0, 1], an unknown method or
        one that needs signals a KV cache does not have, or a model already patched differently.
    """
    plan = make_plan(method, ratio, keep=keep, budget=budget, per_head=per_head, evict=evict, recent=recent,
                     rerotate=rerotate, **params)
    existing = reuse_or_refuse(model, KVCompressor, plan)
    if existing is not None:
        return existing
    handle = KVCompressor(model, plan)
    handle._install()
    return handle


#: ``with unipruner.kv.compress(model, "snapkv", ratio=0.5) as h:`` — the same function as :func:`patch`
#: (kept for the name; both return the handle, which unpatches when the ``with`` block ends).
compress = patch


def unpatch(model: Any) -> bool:
    """Remove :func:`patch`'s hooks from ``model`` (exactly as before); False when it was not patched."""
    handle = find(model)
    return False if handle is None else handle.unpatch()
