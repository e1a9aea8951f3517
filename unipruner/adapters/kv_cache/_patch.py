"""Per-instance hooks that compress a Hugging Face causal LM's KV cache at prefill.

Three kinds of hooks, all on *this* model's modules (nothing global, no attributes set on
modules, removed exactly by :meth:`KVCompressor.unpatch`):

* a forward pre-hook on the decoder (``model.base_model``) swaps an absent or empty
  ``DynamicCache`` (``generate()``'s default) for a :class:`CompressedCache` and records what
  the forward feeds (which new tokens are real, their positions) on that cache;
* a forward pre-hook on every compressible attention module replaces the attention mask of a
  compressed layer by one built from the stored-slot layout (and, for re-rotated StreamingLLM
  caches, shifts the rotary positions);
* a forward hook on the same modules compresses the layer once, right after its prefill, and
  evicts while decoding for fixed-budget policies (H2O, TOVA, StreamingLLM).

Scores always come from the core registry (:func:`unipruner.method`): the hook only gathers the
signals a method needs — keys and values per KV head, and attention rows of the last queries,
recomputed from the layer's input with the model's own projections and rotary embedding
(:func:`unipruner.scorers.importance.window_attention`), so the model keeps running SDPA.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache, DynamicLayer

from ...errors import UniprunerError
from ...methods import H2O, TOVA, VATP, LastQueryAttention, MergingMethod, Method, ScoringMethod, SnapKV, StreamingLLM
from ...methods import method as build_method
from ...scorers.importance import accumulated_attention, window_attention
from ...select import Budget, topk
from ._cache import CompressedCache, CompressedLayer, Step

__all__ = ["SUPPORTED_MODEL_TYPES", "KVCompressor", "compress", "find", "patch", "unpatch"]

#: ``config.model_type`` -> family name, the model families the adapter is tested on.
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (SmolLM2, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3 (text)",
}
_ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_SIGNALS = frozenset({"attn", "keys", "values"})
_CHUNK_ELEMENTS = 1 << 24  # attention-row chunk for "all rows" methods (H2O, VATP): 64 MB of float32
_POLICIES = {H2O: "accumulate", TOVA: "replace", StreamingLLM: "positional"}


def _supported() -> str:
    return ", ".join(f"{v} (model_type {k!r})" for k, v in SUPPORTED_MODEL_TYPES.items())


# ------------------------------------------------------------------------------------ settings


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
    given = sum(x is not None for x in (ratio, keep, budget))
    if given > 1:
        raise UniprunerError("give one budget: ratio=, keep= or budget=")
    if isinstance(method, Method):
        if params:
            raise UniprunerError(f"parameters {sorted(params)} go into the Method itself when passing an instance")
        m = method
        if given:
            m = dataclasses.replace(m, budget=Budget.coerce(budget, ratio=ratio, keep=keep))
    elif isinstance(method, str):
        if not given:
            raise UniprunerError(f"no budget for {method!r}: pass ratio= (fraction kept), keep= or budget=")
        m = build_method(method, budget, ratio=ratio, keep=keep, **params)
    else:
        raise UniprunerError(f"method must be a registry name or a unipruner Method, got {type(method).__name__}")
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


# ------------------------------------------------------------------------------------ model access


@dataclass(frozen=True)
class _Layer:
    """What the hooks need to know about one attention module (read from the model, never set)."""

    index: int
    module: torch.nn.Module
    rope: Callable[..., tuple[Tensor, Tensor]]
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    layer_type: str | None


def _decoder(model: Any) -> torch.nn.Module:
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UniprunerError(
            f"unipruner.kv compresses Hugging Face causal LMs (transformers PreTrainedModel), got "
            f"{type(model).__name__}; supported: {_supported()}"
        )
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UniprunerError(
            f"{type(model).__name__} (model_type {mtype!r}) is not supported by unipruner.kv; supported: "
            f"{_supported()}"
        )
    base = model.base_model
    if base is model or not hasattr(base, "layers"):
        raise UniprunerError(
            f"{type(model).__name__} has no decoder with .layers; pass the *ForCausalLM model "
            f"(supported: {_supported()})"
        )
    impl = getattr(model.config, "_attn_implementation", None)
    if impl not in _ATTN_IMPLEMENTATIONS:
        raise UniprunerError(
            f"attention implementation {impl!r} is not supported (the adapter builds the attention masks of "
            f"compressed layers); use one of {_ATTN_IMPLEMENTATIONS} (model.set_attn_implementation('sdpa'))"
        )
    return base


def _layers(model: Any, base: torch.nn.Module) -> tuple[list[_Layer], dict[int, str]]:
    """Compressible attention layers, and the skipped ones with the reason."""
    cfg = model.config
    probe = DynamicCache(config=cfg)  # layer types exactly as generate() will build them
    layers: list[_Layer] = []
    skipped: dict[int, str] = {}
    blocks: Any = base.layers
    for i, block in enumerate(blocks):
        attn = getattr(block, "self_attn", None)
        if attn is None or not (hasattr(attn, "q_proj") or hasattr(attn, "qkv_proj")):
            raise UniprunerError(f"layer {i} of {type(model).__name__} has no self_attn with q_proj / qkv_proj")
        kind = probe.layers[i] if i < len(probe.layers) else None
        if kind is not None and type(kind) is not DynamicLayer:
            window = getattr(kind, "sliding_window", None)
            skipped[i] = (f"sliding-window layer (window {window}): Hugging Face already keeps only the last "
                          f"{window} tokens there, and pruning inside the window would break its positions")
            continue
        rope = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            raise UniprunerError(f"{type(attn).__name__} has no apply_rotary_pos_emb in its modeling module")
        n_heads = int(cfg.num_attention_heads)
        layers.append(_Layer(i, attn, rope, n_heads, int(cfg.num_key_value_heads), int(attn.head_dim),
                             float(attn.scaling), getattr(attn, "layer_type", None)))
    if not layers:
        raise UniprunerError(
            f"nothing to compress in {type(model).__name__}: all {len(skipped)} layers are sliding-window layers "
            "(set config.sliding_window=None for a full-attention model, e.g. Mistral v0.2+)"
        )
    return layers, skipped


def _queries(spec: _Layer, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Post-RoPE queries ``[B, H, T, D]`` of ``hidden [B, T, C]``, computed as the module does."""
    mod: Any = spec.module
    b, t, _ = hidden.shape
    if hasattr(mod, "q_proj"):
        q = mod.q_proj(hidden)
    else:  # Phi-3: fused qkv, queries first
        q = mod.qkv_proj(hidden)[..., : spec.n_heads * spec.head_dim]
    q = q.view(b, t, -1, spec.head_dim)
    if hasattr(mod, "q_norm"):  # Qwen3, Gemma 3: RMSNorm over the head dim
        q = mod.q_norm(q)
    q = q.transpose(1, 2)
    q, _ = spec.rope(q, q, cos, sin)
    return q


def _expand_heads(mask: Tensor, n_heads: int) -> Tensor:
    """``[B, H_kv, ...]`` -> ``[B, H, ...]`` (query head h uses KV head h // groups)."""
    return mask.repeat_interleave(n_heads // mask.shape[1], dim=1) if mask.shape[1] != n_heads else mask


# ------------------------------------------------------------------------------------ the handle


class KVCompressor:
    """A model patched for KV-cache compression (returned by :func:`patch` / :func:`compress`).

    Attributes
    ----------
    model : transformers.PreTrainedModel
    plan : Plan
        The method and how it is applied.
    layers : list[int]
        Compressed (full-attention) layer indices.
    skipped : dict[int, str]
        Layers left uncompressed, with the reason (sliding-window layers of hybrid models).
    """

    def __init__(self, model: Any, plan: Plan) -> None:
        self.model = model
        self.plan = plan
        self._base = _decoder(model)
        specs, self.skipped = _layers(model, self._base)
        self._specs = {s.index: s for s in specs}
        self.layers = sorted(self._specs)
        self._rotary = getattr(self._base, "rotary_emb", None)
        if plan.rerotate:
            self._check_rerotate()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last: CompressedCache | None = None
        self._by_module = {id(s.module): s for s in specs}

    # -- lifecycle --------------------------------------------------------------------------------
    def _install(self) -> None:
        base = self._base
        self._handles.append(base.register_forward_pre_hook(self._model_pre, with_kwargs=True))
        self._handles.append(base.register_forward_hook(self._model_post, with_kwargs=True, always_call=True))
        for spec in self._specs.values():
            self._handles.append(spec.module.register_forward_pre_hook(self._attn_pre, with_kwargs=True))
            self._handles.append(spec.module.register_forward_hook(self._attn_post, with_kwargs=True))

    @property
    def active(self) -> bool:
        """Whether the hooks are installed."""
        return bool(self._handles)

    def unpatch(self) -> None:
        """Remove every hook this handle installed (the model is exactly as before)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None

    def __enter__(self) -> KVCompressor:
        return self

    def __exit__(self, *exc: object) -> None:
        self.unpatch()

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
        """An empty :class:`CompressedCache` for this model."""
        return CompressedCache(self.model.config)

    @property
    def last_cache(self) -> CompressedCache | None:
        """The cache of the latest forward through this model (held until the next one or unpatch)."""
        return self._last

    def stats(self) -> Any:
        """:func:`unipruner.kv.stats` of the latest cache."""
        from ._stats import stats

        cache = self.last_cache
        if cache is None:
            raise UniprunerError("no cache yet: run the model (or generate) inside compress() first")
        return stats(cache)

    def same_settings(self, plan: Plan) -> bool:
        return self.plan == plan

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
        if cache.compressed and cache.plan is not None and cache.plan != self.plan:
            done = cache.plan.method if isinstance(cache.plan, Plan) else cache.plan
            raise UniprunerError(
                f"this cache is already compressed (with {done!r}); it cannot be compressed again with "
                f"{self.plan.method!r}. Feed it through a model patched with the same settings, or start a new cache"
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
        cache.step = Step(valid, pos.expand(b, q))
        self._last = cache
        return args, kwargs

    def _model_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                    output: Any) -> None:
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        if isinstance(cache, CompressedCache):
            cache.step = None

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
            kwargs["position_embeddings"] = self._rotary_at(spec, hidden, cache.step.positions - layer.offset[:, None])
        return args, kwargs

    def _mask(self, spec: _Layer, layer: CompressedLayer, step: Step, hidden: Tensor) -> Tensor | None:
        b, q = hidden.shape[0], hidden.shape[1]
        dev = hidden.device
        old = layer.slot_valid() if layer.stored else torch.zeros(b, spec.n_kv_heads, 0, dtype=torch.bool,
                                                                  device=dev)
        if bool((old == old[:, :1]).all()):
            old = old[:, :1]
        if q == 1 and step.valid is None and bool(old.all()):
            return None
        new = torch.ones(q, q, dtype=torch.bool, device=dev).tril()[None, None]
        if step.valid is not None:
            new = (new & step.valid.to(dev)[:, None, None, :]) | torch.eye(q, dtype=torch.bool, device=dev)
        h = old.shape[1]
        full = torch.cat([old[:, :, None, :].expand(b, h, q, old.shape[-1]), new.expand(b, h, q, q)], dim=-1)
        if h > 1:
            full = _expand_heads(full, spec.n_heads)
        if self.model.config._attn_implementation == "eager":
            zero = torch.zeros((), dtype=hidden.dtype, device=dev)
            return torch.where(full, zero, torch.finfo(hidden.dtype).min)
        return full

    def _rotary_at(self, spec: _Layer, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
        rotary = self._rotary
        if rotary is None:  # pragma: no cover - checked at patch time
            raise UniprunerError("this model has no rotary embedding to re-rotate keys with")
        if "layer_type" in inspect.signature(rotary.forward).parameters:
            return rotary(x, positions, spec.layer_type)
        return rotary(x, positions)

    def _check_rerotate(self) -> None:
        rotary = self._rotary
        if rotary is None or not callable(rotary):
            raise UniprunerError("rerotate=True needs a model whose decoder has a rotary_emb module")
        scaling = getattr(rotary, "attention_scaling", 1.0)
        rope_type = getattr(rotary, "rope_type", "default")
        if scaling != 1.0 or rope_type in ("dynamic", "longrope", "yarn"):
            raise UniprunerError(
                f"rerotate=True re-applies RoPE by a position difference, which needs a static RoPE without "
                f"attention scaling; this model uses rope_type={rope_type!r} (scaling {scaling})"
            )

    def _rotate(self, spec: _Layer, keys: Tensor, delta: Tensor) -> Tensor:
        """Rotate post-RoPE keys ``[B, H, K, D]`` by ``delta [B, H, K]`` positions."""
        b, h, k, d = keys.shape
        flat = keys.reshape(b * h, 1, k, d)
        cos, sin = self._rotary_at(spec, flat, delta.reshape(b * h, k))
        out, _ = spec.rope(flat, flat, cos, sin)
        return out.reshape(b, h, k, d)

    def _attn_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
        cache = self._cache_of(kwargs)
        if cache is None or cache.step is None:
            return
        spec = self._by_module[id(module)]
        layer = cache.layers[spec.index]
        if not isinstance(layer, CompressedLayer) or not layer.is_initialized:
            return
        with torch.no_grad():
            if not layer.compressed:
                self._compress(cache, spec, layer, cache.step, self._hidden(args, kwargs),
                               kwargs["position_embeddings"])
            elif self.plan.evict is not None and layer.budget is not None:
                self._evict(spec, layer, cache.step, self._hidden(args, kwargs), kwargs["position_embeddings"])

    # -- signals ------------------------------------------------------------------------------------
    def _attention_rows(self, spec: _Layer, layer: CompressedLayer, hidden: Tensor,
                        pe: tuple[Tensor, Tensor], rows: int | str, valid: Tensor | None) -> Tensor:
        """Attention rows ``[B, H, R, S]`` of the new queries over the stored keys.

        ``rows="all"``: the column sums of every new query's attention as one row ``[B, H, 1, S]``
        (H2O's accumulated attention, computed in chunks of query rows without the full map).
        ``valid`` is the key validity ``[B, H_kv, S]``.
        """
        keys = layer.k
        s, q = keys.shape[-2], hidden.shape[1]
        cos, sin = pe
        key_mask = None if valid is None else _expand_heads(valid, spec.n_heads)
        if rows != "all":
            w = min(int(rows), q)
            qs = _queries(spec, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
            return window_attention(qs, keys, scale=spec.scale, causal=True, key_mask=key_mask)
        qs = _queries(spec, hidden, cos, sin)
        b, h = qs.shape[0], qs.shape[1]
        total = torch.zeros(b * h, s, dtype=torch.float32 if qs.dtype != torch.float64 else qs.dtype,
                            device=keys.device)
        chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * s))
        for start in range(0, q, chunk):
            end = min(q, start + chunk)
            n = s - q + end  # the rows are the last (end - start) positions of the first n keys
            km = None if key_mask is None else key_mask[..., :n]
            probs = window_attention(qs[:, :, start:end], keys[:, :, :n], scale=spec.scale, causal=True, key_mask=km)
            rmask = None if km is None else km.reshape(b * h, n)
            col = accumulated_attention(probs.reshape(b * h, end - start, n), mask=rmask)
            total[:, :n] += torch.where(torch.isfinite(col), col, torch.zeros_like(col)).to(total.dtype)
        return total.reshape(b, h, 1, s)

    def _layout(self, layer: CompressedLayer, attn: Tensor | None, valid: Tensor | None,
                n_kv: int) -> tuple[Tensor, Tensor | None, dict[str, Tensor]]:
        """Tokens ``[B', S, D']``, mask ``[B', S]`` and signals for the registry method."""
        keys, values = layer.k, layer.v
        b, h, s, d = keys.shape
        if self.plan.per_head:
            tokens = keys.reshape(b * h, s, d)
            mask = None if valid is None else valid.reshape(b * h, s)
            signals = {"keys": tokens, "values": values.reshape(b * h, s, d)}
            if attn is not None:
                # group_heads without its input checks (a NaN scan of the rows we just computed):
                # the same reshape + mean, ~0.5 ms per layer less at 1k tokens
                r = attn.shape[-2]
                signals["attn"] = attn.reshape(b, n_kv, attn.shape[1] // n_kv, r, s).mean(dim=2).reshape(b * h, r, s)
        else:
            tokens = keys.transpose(1, 2).reshape(b, s, h * d)
            mask = None if valid is None else valid[:, 0]
            signals = {"keys": tokens, "values": values.transpose(1, 2).reshape(b, s, h * d)}
            if attn is not None:
                signals["attn"] = attn
        return tokens, mask, signals

    def _per_head(self, x: Tensor, b: int, h: int) -> Tensor:
        """``[B', ...]`` selection results -> ``[B, H, ...]``."""
        if self.plan.per_head:
            return x.reshape(b, h, *x.shape[1:])
        return x[:, None].expand(b, h, *x.shape[1:])

    @staticmethod
    def _leading(mask: Tensor, count: Tensor | int) -> Tensor:
        """The first ``count`` valid positions of each row."""
        rank = torch.cumsum(mask.long(), dim=-1)
        c = count if isinstance(count, int) else count[..., None]
        return mask & (rank <= c)

    @staticmethod
    def _trailing(mask: Tensor, count: Tensor | int) -> Tensor:
        """The last ``count`` valid positions of each row."""
        rank = torch.flip(torch.cumsum(torch.flip(mask.long(), [-1]), dim=-1), [-1])
        c = count if isinstance(count, int) else count[..., None]
        return mask & (rank <= c)

    # -- compression at prefill ----------------------------------------------------------------------
    def _compress(self, cache: CompressedCache, spec: _Layer, layer: CompressedLayer, step: Step,
                  hidden: Tensor, pe: tuple[Tensor, Tensor]) -> None:
        plan, m = self.plan, self.plan.method
        keys, values = layer.k, layer.v
        b, h, s, d = keys.shape
        valid = layer.valid  # identical across heads before the first compression
        attn = None if plan.rows is None else self._attention_rows(spec, layer, hidden, pe, plan.rows, valid)
        tokens, mask, signals = self._layout(layer, attn, valid, h)
        n = tokens.shape[0]
        vmask = mask if mask is not None else torch.ones(n, s, dtype=torch.bool, device=keys.device)
        scores = None
        if isinstance(m, ScoringMethod):
            scores = m.score(tokens, mask=mask, **signals)
            counts = None if m.budget.data_dependent else m.budget.counts(vmask.sum(-1), n_max=s)
            prot = self._leading(vmask, m.protected) if m.protected else torch.zeros_like(vmask)
            if plan.recent and counts is not None:
                prot = prot | self._trailing(vmask, torch.floor(counts.double() * plan.recent).long())
            keep = topk(scores, m.budget, mask=mask, protected=prot if bool(prot.any()) else None)
        else:
            keep = m.select(tokens, mask=mask, **signals)
        keep = self._per_head(keep, b, h)  # [B, H, K], -1 padded
        kept = keep >= 0
        idx = keep.clamp(min=0)
        gather = idx[..., None].expand(b, h, idx.shape[-1], d)
        new_keys, new_values = keys.gather(2, gather), values.gather(2, gather)
        row_valid = valid[:, 0] if valid is not None else torch.ones(b, s, dtype=torch.bool, device=keys.device)
        layer.prefill_valid = row_valid.sum(-1)
        if plan.rerotate:
            if s != step.positions.shape[-1]:
                raise UniprunerError("rerotate=True needs the whole context in one prefill forward")
            if not bool((kept.sum(-1) == kept[:, :1].sum(-1)).all()):
                raise UniprunerError("rerotate=True needs the same number of kept tokens in every head")
            orig = step.positions.to(keys.device)[:, None, :].expand(b, h, s).gather(2, idx)
            new_pos = torch.cumsum(kept.long(), dim=-1) - 1
            delta = torch.where(kept, new_pos - orig, torch.zeros_like(orig))
            new_keys = self._rotate(spec, new_keys, delta)
            pos = step.positions.to(keys.device)
            last = torch.where(row_valid, pos, torch.full_like(pos, -1)).amax(-1)
            layer.offset = last + 1 - kept[:, 0].sum(-1)
        buf = None
        if plan.evict is not None:
            layer.budget = kept.sum(-1)
            recent = torch.floor(layer.budget.double() * plan.recent).long() if plan.recent else None
            layer.recent = recent
            if plan.evict == "accumulate" and scores is not None:
                sc = self._per_head(scores, b, h)
                sc = torch.where(torch.isfinite(sc), sc, torch.zeros_like(sc)).gather(2, idx)
                buf = torch.where(kept, sc, torch.zeros_like(sc)).to(torch.float32)
        layer.replace(new_keys, new_values, kept, buf)
        layer.compressed = True
        cache.plan = plan

    # -- eviction while decoding ---------------------------------------------------------------------
    def _evict(self, spec: _Layer, layer: CompressedLayer, step: Step, hidden: Tensor,
               pe: tuple[Tensor, Tensor]) -> None:
        plan, m = self.plan, self.plan.method
        assert isinstance(m, ScoringMethod) and layer.budget is not None
        keys = layer.k
        b, h, s, d = keys.shape
        valid = layer.slot_valid()
        if plan.evict == "positional":
            attn = None
        else:
            rows: int | str = hidden.shape[1] if plan.evict == "accumulate" else 1
            attn = self._attention_rows(spec, layer, hidden, pe, rows, valid)
        tokens, mask, signals = self._layout(layer, attn, valid, h)
        sc = self._per_head(m.score(tokens, mask=mask, **signals), b, h).to(torch.float32)
        if plan.evict == "accumulate":
            inc = torch.where(valid & torch.isfinite(sc), sc, torch.zeros_like(sc))
            layer.scores = (layer.scores if layer.scores is not None else torch.zeros_like(inc)) + inc
            sc = layer.scores
        count = valid.sum(-1)
        n_evict = (count - layer.budget).clamp(min=0)
        if not bool((n_evict > 0).any()):
            return
        protected = self._leading(valid, m.protected) if m.protected else torch.zeros_like(valid)
        if layer.recent is not None:
            protected = protected | self._trailing(valid, layer.recent)
        evictable = valid & ~protected & (sc != math.inf)
        key = torch.where(evictable, sc, torch.full_like(sc, math.inf))
        order = torch.sort(key, dim=-1, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(s, device=keys.device).expand(b, h, s))
        keepmask = valid & ~(evictable & (rank < n_evict[..., None]))
        new_count = keepmask.sum(-1)
        width = int(new_count.max())
        slot_order = torch.sort((~keepmask).to(torch.int8), dim=-1, stable=True).indices[..., :width]
        new_valid = torch.arange(width, device=keys.device) < new_count[..., None]
        gather = slot_order[..., None].expand(b, h, width, d)
        new_keys, new_values = keys.gather(2, gather), layer.v.gather(2, gather)
        buf = None if layer.scores is None else layer.scores.gather(2, slot_order)
        if layer.offset is not None:
            old_rank = (torch.cumsum(valid.long(), dim=-1) - 1).gather(2, slot_order)
            new_rank = torch.arange(width, device=keys.device).expand(b, h, width)
            delta = torch.where(new_valid, new_rank - old_rank, torch.zeros_like(old_rank))
            new_keys = self._rotate(spec, new_keys, delta)
            layer.offset = layer.offset + (count - new_count)[:, 0]
        layer.replace(new_keys, new_values, new_valid, buf)


# ------------------------------------------------------------------------------------ public API


def find(model: Any) -> KVCompressor | None:
    """The active :class:`KVCompressor` of ``model``, or None (found through its hooks)."""
    base = getattr(model, "base_model", None)
    if not isinstance(base, torch.nn.Module):
        return None
    for fn in base._forward_pre_hooks.values():
        owner = getattr(fn, "__self__", None)
        if isinstance(owner, KVCompressor):
            return owner
    return None


def patch(model: Any, method: str | Method = "snapkv", ratio: float | None = None, *, keep: int | None = None,
          budget: Budget | None = None, per_head: bool | None = None, evict: bool | None = None,
          recent: float | None = None, rerotate: bool = False, **params: Any) -> KVCompressor:
    """Compress ``model``'s KV cache at prefill from now on (per instance; undo with :func:`unpatch`).

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
        The handle; ``.unpatch()``, ``.stats()``, ``.describe()``.

    Raises
    ------
    UniprunerError
        Unsupported model or attention implementation, a ratio outside (0, 1], an unknown method or
        one that needs signals a KV cache does not have, or a model already patched differently.
    """
    plan = make_plan(method, ratio, keep=keep, budget=budget, per_head=per_head, evict=evict, recent=recent,
                     rerotate=rerotate, **params)
    existing = find(model)
    if existing is not None:
        if existing.same_settings(plan):
            return existing
        raise UniprunerError(
            f"this model is already patched ({existing!r}); call unipruner.kv.unpatch(model) first"
        )
    handle = KVCompressor(model, plan)
    handle._install()
    return handle


def unpatch(model: Any) -> None:
    """Remove :func:`patch`'s hooks from ``model``; an unpatched model is an error."""
    handle = find(model)
    if handle is None:
        raise UniprunerError("this model is not patched by unipruner.kv (nothing to unpatch)")
    handle.unpatch()


def compress(model: Any, method: str | Method = "snapkv", ratio: float | None = None, **kwargs: Any) -> KVCompressor:
    """Context manager: ``with unipruner.kv.compress(model, "snapkv", ratio=0.5) as kv: ...``.

    Same arguments as :func:`patch`; the hooks are removed on exit. The handle's
    :meth:`KVCompressor.stats` reports the latest cache.
    """
    if find(model) is not None:
        raise UniprunerError("this model is already patched by unipruner.kv; unpatch it before compress()")
    return patch(model, method, ratio, **kwargs)
