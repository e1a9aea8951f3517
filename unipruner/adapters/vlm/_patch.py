"""Per-instance hooks that prune the visual tokens of a Hugging Face VLM (the ``vlm`` handle).

Hooks, all on *this* model's modules and registered through
:meth:`~unipruner.hosts.patching.PatchHandle.add_hook` (so :func:`find` finds the handle, and
:meth:`VLMHandle.unpatch` removes them exactly):

* the multimodal body (``model.model``): a pre-hook starts the per-call state (the
  ``input_ids`` that say where the image placeholders are, ``image_grid_thw``), a post-hook
  publishes what the call kept;
* the language model: a pre-hook swaps ``generate()``'s empty cache for a
  :class:`~unipruner.hosts.cache.CompressedCache` (logical vs stored length), runs the
  ``input`` stage at prefill — the kept rows of ``inputs_embeds``, their **original** position
  ids (1-D or M-RoPE rows, gathered, never recomputed), a mask of the packed layout, Qwen3-VL's
  deepstack inputs — and, while decoding, builds the mask of the stored slots; a post-hook sets
  every layer's logical length;
* decoder layers: layer ``K`` of an ``llm`` stage prunes the hidden states entering it (scored
  with attention rows of layer ``K - 1``, recomputed from the queries and keys captured by a
  pre-hook on that layer's attention, :mod:`unipruner.hosts.hf_attention`), and the layers after
  it receive the pruned mask and rotary embeddings; their KV cache is shorter than that of the
  layers before ``K``, and their decode-time masks follow their own stored slots.

Per-call state lives in a :class:`contextvars.ContextVar` (one forward) and in the per-call
cache (across ``generate()`` steps), never on the handle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers.cache_utils import DynamicCache

from ..._merge import MergePlan
from ...errors import UniprunerError
from ...hosts.cache import CompressedCache, CompressedLayer, CompressedSlidingLayer, Step
from ...hosts.hf_attention import AttentionLayer, attention_layers, attention_rows, keys, queries, unrotated_keys
from ...hosts.masks import stored_slot_mask
from ...hosts.patching import PatchHandle, find_handle, reuse_or_refuse
from ...methods import Method, Reduced, ScoringMethod
from ...select import Budget, topk
from ._hosts import find_host, runs
from ._layout import Blocks, Packed, blocks, gather_last, pack, row_query
from ._settings import Stage, VLMSettings, make_settings
from ._stats import StageStats, VLMStats

__all__ = ["VLMHandle", "find", "patch", "unpatch"]


@dataclass
class _Seq:
    """The sequence the language model is running on (original, or packed after a stage)."""

    visual: Tensor  # [B, S] bool: visual slots
    group: Tensor  # [B, S] long: block (image) of each visual slot, -1 elsewhere
    valid: Tensor  # [B, S] bool
    positions: Tensor  # [B, S] or [R, B, S] long: position ids as the layers use them
    packed: bool = False
    block: Tensor | None = None  # [B, S] long: Gemma 3's bidirectional image block of each slot, -1 elsewhere


@dataclass
class _Decision:
    """What one stage decided for its blocks (block coordinates)."""

    kept: Tensor  # [n, K] kept representatives, -1 padded
    reps: Tensor  # [n, K_out] representative of every output slot (-1: aggregate / padding)
    plan: Any  # MergePlan over the block slots, or None (dropping)
    new_tokens: Tensor | None  # [n, K_out, D] output values (merging), or None
    aggregates: tuple[Tensor, Tensor] | None  # (values [n, K_out, D], is_aggregate [n, K_out])


@dataclass
class _Call:
    """State of one forward through the body (a ContextVar value)."""

    settings: VLMSettings
    inputs: dict[str, Any]
    token: Any = None
    pending: bool = False  # vision-side state recorded outside a body call (generate() encodes images first)
    seq: _Seq | None = None
    cache: CompressedCache | None = None
    mask: Any = None  # the attention mask of the packed sequence (prefill), for layers after a stage (a dict per type)
    pe: Any = None  # their rotary embeddings (cos, sin), or a dict of them per layer type (Gemma 3)
    first_pruned: int | None = None
    captured: dict[int, tuple[Tensor, tuple[Tensor, Tensor], Any]] = field(default_factory=dict)
    previous: dict[int, Tensor] = field(default_factory=dict)
    stats: list[StageStats] = field(default_factory=list)
    seq_before: list[int] = field(default_factory=list)
    logical: int | None = None  # the cache's logical length after this forward
    vision: tuple[Tensor, Tensor, float] | None = None  # (queries, keys [n_img, H, T, Dh], scale) of the tower layer
    vision_decision: _Decision | None = None
    origin: Tensor | None = None  # [Nv] current flat slot (b * S + s) of every original visual token, -1 = gone
    n_images: int = 0
    image_of: Tensor | None = None  # [Nv] image of every original visual token
    patch_of: Tensor | None = None  # [Nv] its index inside its image


class VLMHandle(PatchHandle):
    """A VLM patched for visual-token pruning (returned by :func:`patch`; a context manager).

    Attributes
    ----------
    model : transformers.PreTrainedModel
    host : VLMHost
        What the adapter found in the model (language model, decoder layers, image token).
    """

    domain = "vlm"

    def __init__(self, model: Any, settings: VLMSettings) -> None:
        host = find_host(model)
        impl = getattr(host.language_model.config, "_attn_implementation", None)
        if impl not in ("sdpa", "eager"):
            raise UniprunerError(
                f"attention implementation {impl!r} is not supported (the adapter builds the masks of pruned "
                "sequences); use 'sdpa' or 'eager' (model.set_attn_implementation('sdpa'))"
            )
        super().__init__(model, settings)
        self.host = host
        self._eager = impl == "eager"
        specs, _ = attention_layers(host.language_model, host.language_model, sliding=True)
        self._specs: dict[int, AttentionLayer] = {s.index: s for s in specs}
        self._check(settings)

    # -- settings ---------------------------------------------------------------------------------
    @property
    def vlm_settings(self) -> VLMSettings:
        """The current :class:`VLMSettings` (immutable; replaced whole by :meth:`configure`)."""
        s: VLMSettings = self.settings
        return s

    def _check(self, settings: VLMSettings) -> None:
        n = self.host.n_layers
        for st in settings.stages:
            if st.where == "vision" and self.host.vision_attn is None:
                raise UniprunerError(
                    f"stage='vision' is not available on {self.host.cls_name}: {self.host.vision_reason}; use "
                    "stage='input' (methods needing attention: stage='llm', layer=K)"
                )
            if st.where == "llm":
                assert st.layer is not None
                if st.layer >= n:
                    raise UniprunerError(
                        f"layer={st.layer} is outside the language model: {type(self.model).__name__} has {n} decoder "
                        f"layers, so stage='llm' takes 1 <= layer <= {n - 1}"
                    )
                if st.layer < self.host.deepstack:
                    raise UniprunerError(
                        f"{self.host.cls_name} adds deepstack visual features after decoder layers "
                        f"0..{self.host.deepstack - 1}; stage='llm' needs layer >= {self.host.deepstack}"
                    )

    def configure(self, method: Any = None, **kw: Any) -> VLMHandle:
        """Change the settings between calls: the keywords of :func:`patch`, validated the same way.

        Without ``method`` the current single stage's method name is kept (``keep=`` / ``ratio=``
        change its budget). A forward already running keeps the settings it started with.
        """
        cur = self.vlm_settings
        if method is None:
            if len(cur.stages) != 1:
                raise UniprunerError("this handle runs a schedule of stages: pass the new schedule as method=")
            st = cur.stages[0]
            method = st.method.name
            kw.setdefault("stage", st.where)
            if st.where == "llm":
                kw.setdefault("layer", st.layer)
            if not any(k in kw for k in ("keep", "ratio", "budget")):
                kw["budget"] = st.method.budget
        kw.setdefault("positions", cur.positions)
        kw.setdefault("per_image", cur.per_image)
        new = _settings_from(method, kw)
        self._check(new)
        self._set_settings(new)
        return self

    def __repr__(self) -> str:
        return f"VLMHandle({type(self.model).__name__}, {self.describe()}, active={self.active})"

    def describe(self) -> str:
        """What is pruned where, and what is left alone."""
        s = self.vlm_settings
        parts = [st.describe() for st in s.stages]
        text = "; then ".join(parts) + f" in {self.host.cls_name} (positions {s.positions}"
        text += ", budget per image)" if s.per_image else ", budget per row)"
        text += "; the vision tower and the projector run unchanged on every image"
        return text

    def stats(self) -> VLMStats:
        """What the last prefill kept: visual tokens per image and stage, sequence lengths, KV slots per layer."""
        last = self.last_stats
        if last is None:
            raise UniprunerError("no call yet: run the patched model (or generate) first")
        stats: VLMStats = last
        return stats

    # -- install ----------------------------------------------------------------------------------
    def _install(self) -> None:
        h = self.host
        if h.vision_attn is not None and h.projector is not None:
            self.add_hook(h.vision_attn, "forward_pre", self._vision_attn_pre, with_kwargs=True)
            self.add_hook(h.projector, "forward_pre", self._projector_pre)
            self.add_hook(h.projector, "forward", self._projector_post)
        self.add_hook(h.body, "forward_pre", self._body_pre, with_kwargs=True)
        self.add_hook(h.body, "forward", self._body_post, with_kwargs=True, always_call=True)
        self.add_hook(h.language_model, "forward_pre", self._lm_pre, with_kwargs=True)
        self.add_hook(h.language_model, "forward", self._lm_post, with_kwargs=True, always_call=True)
        for i, layer in enumerate(h.layers):
            self.add_hook(layer, "forward_pre", self._make_layer_pre(i), with_kwargs=True)
            # layer i's attention input is what a stage at layer i + 1 scores with (captured only then)
            attn = getattr(layer, "self_attn", None)
            if attn is not None:
                self.add_hook(attn, "forward_pre", self._make_attn_pre(i), with_kwargs=True)

    # -- hooks: body --------------------------------------------------------------------------------
    def _body_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        inputs = dict(kwargs)
        if args:
            inputs.setdefault("input_ids", args[0])
        prev = self.call_state()
        state = _Call(self.vlm_settings, inputs)
        if isinstance(prev, _Call) and prev.pending:
            self.end_call()  # adopt what the tower and projector decided when generate() encoded the images
            if inputs.get("pixel_values") is None:
                state.vision, state.vision_decision = prev.vision, prev.vision_decision
        state.token = self.begin_call(state)

    def _body_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
        state = self.call_state()
        if not isinstance(state, _Call):
            return
        self.end_call(state.token)
        if state.stats:
            self.publish(VLMStats(tuple(state.stats), tuple(state.seq_before),
                                  _kv_slots(state.cache), self.host.n_layers))

    # -- hooks: vision tower and projector (stage="vision") --------------------------------------
    def _vision_stage(self, state: Any) -> Stage | None:
        if not isinstance(state, _Call):
            return None
        return next((s for s in state.settings.stages if s.where == "vision"), None)

    def _vision_state(self) -> _Call | None:
        """The call state for the tower's hooks; a pending one when the tower runs outside a body call."""
        state = self.call_state()
        if state is None and any(s.where == "vision" for s in self.vlm_settings.stages):
            state = _Call(self.vlm_settings, {}, pending=True)
            self.begin_call(state)
        return state if isinstance(state, _Call) else None

    def _vision_attn_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        state = self._vision_state()
        if self._vision_stage(state) is None:
            return
        x = kwargs.get("hidden_states", args[0] if args else None)
        if not isinstance(x, Tensor):
            return
        attn: Any = module
        n, t, _ = x.shape
        heads = int(getattr(attn, "num_heads", 0) or attn.config.num_attention_heads)
        dh = int(attn.head_dim)
        with torch.no_grad():
            q = attn.q_proj(x).view(n, t, heads, dh).transpose(1, 2)
            k = attn.k_proj(x).view(n, t, heads, dh).transpose(1, 2)
        assert isinstance(state, _Call)
        state.vision = (q, k, float(getattr(attn, "scale", dh ** -0.5)))

    def _vision_signals(self, m: Method, feats: Tensor, q: Tensor, k: Tensor, scale: float
                        ) -> tuple[dict[str, Any], Tensor | None]:
        """Signals of the tower's feature layer: (per-patch signals, full scores of a scoring method or None).

        Scoring methods (EViT's CLS attention, ...) score the tower's whole sequence from its full
        attention map, CLS included, and the CLS column is then dropped with the CLS feature; the
        other methods receive the attention each patch receives (the CLS row, or the mean over
        rows for towers without CLS, as VisionZip / PruMerge / HoloV read it) and the layer's keys.
        """
        cls = 1 if self.host.vision_cls else 0
        keys_ = k[:, :, cls:].transpose(1, 2).flatten(2)
        signals: dict[str, Any] = {"keys": keys_}
        grid = self.host.grid
        if grid is not None and grid[0] * grid[1] == feats.shape[1]:
            signals["hw"] = grid
        with torch.no_grad():
            rows = q[:, :, :1] if cls else q
            probs = torch.softmax((rows.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
            if isinstance(m, ScoringMethod) and "attn" in m.requires:
                full = probs if not cls else torch.softmax((q.float() @ k.float().transpose(-1, -2)) * scale, dim=-1)
                pad = feats.new_zeros(feats.shape[0], cls, feats.shape[2])
                scores = m.score(torch.cat([pad, feats], 1), attn=full.to(feats.dtype), keys=torch.cat(
                    [k[:, :, :cls].transpose(1, 2).flatten(2), keys_], 1))
                return signals, scores[:, cls:]
            signals["attn"] = probs.mean(dim=(1, 2))[:, cls:].to(feats.dtype)
        return signals, None

    def _projector_pre(self, module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...] | None:
        state = self._vision_state()
        st = self._vision_stage(state)
        if st is None or not args or not isinstance(args[0], Tensor):
            return None
        assert isinstance(state, _Call)
        feats = args[0]
        cls = 1 if self.host.vision_cls else 0
        if state.vision is None or (state.vision[0].shape[0], state.vision[0].shape[2] - cls) != feats.shape[:2]:
            got = None if state.vision is None else tuple(state.vision[0].shape)
            raise UniprunerError(f"stage='vision': the tower's attention covers {got} tokens but the projector "
                                 f"received features {tuple(feats.shape[:2])}")
        q, k, scale = state.vision
        m = st.method
        if m.budget is not None and m.budget.keep is not None and m.budget.keep > feats.shape[1]:
            raise UniprunerError(f"keep={m.budget.keep} is more than the {feats.shape[1]} visual tokens of an image")
        signals, scores = self._vision_signals(m, feats, q, k, scale)
        with torch.no_grad():
            if scores is not None:
                kept = topk(scores, m.budget)
                d = _Decision(kept, kept, None, None, None)
            else:
                d = _decide(m.reduce(feats, **signals))
        state.vision_decision = d
        if m.reduction == "drop" or d.new_tokens is None:
            return None
        merged = feats.clone()  # merged values replace their representative before the projector
        reps = d.reps >= 0
        rows = torch.arange(feats.shape[0], device=feats.device)[:, None].expand_as(d.reps)
        merged[rows[reps], d.reps[reps]] = d.new_tokens[reps].to(feats.dtype)
        return (merged, *args[1:])

    def _projector_post(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        state = self._vision_state()
        if self._vision_stage(state) is None:
            return
        assert isinstance(state, _Call)
        d = state.vision_decision
        if d is not None and d.aggregates is not None:  # contextual / fused tokens: projected like the others
            vals, is_agg = d.aggregates
            with torch.no_grad():
                d.aggregates = (module.forward(vals.to(args[0].dtype)), is_agg)

    # -- hooks: language model ----------------------------------------------------------------------
    def _lm_pre(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        state = self.call_state()
        if not isinstance(state, _Call):
            return None  # the language model called on its own: not a multimodal call
        embeds = kwargs.get("inputs_embeds")
        if not isinstance(embeds, Tensor):
            return None
        key = "past_key_values" if "past_key_values" in kwargs else "cache"
        cache = kwargs.get(key)
        use_cache = kwargs.get("use_cache")
        if use_cache is None:
            use_cache = getattr(module.config, "use_cache", True)
        if cache is None and use_cache:
            cache = CompressedCache(module.config, sliding=True)
        elif cache is not None and not isinstance(cache, CompressedCache):
            if type(cache) is DynamicCache and cache.get_seq_length() == 0:
                cache = CompressedCache(module.config, sliding=True)
            else:
                raise UniprunerError(
                    f"unipruner.vlm needs an empty DynamicCache (generate()'s default) or a CompressedCache, got a "
                    f"{type(cache).__name__} holding {cache.get_seq_length()} tokens"
                )
        elif isinstance(cache, CompressedCache) and any(getattr(la, "is_sliding", False) and not isinstance(
                la, CompressedSlidingLayer) for la in cache.layers):
            raise UniprunerError(
                f"{self.host.cls_name} has sliding-window layers: pass CompressedCache(config, sliding=True), whose "
                "sliding layers keep the positions a pruned sequence needs"
            )
        if cache is not None:
            kwargs[key] = cache
        state.cache = cache
        b, q = embeds.shape[0], embeds.shape[1]
        seen = 0 if cache is None else cache.get_seq_length()
        mask2d = kwargs.get("attention_mask")
        if isinstance(mask2d, dict) and self.host.layer_types is not None:
            mask2d = state.inputs.get("attention_mask")  # Gemma 3's body built a mask per layer type from it
        if mask2d is not None and (not isinstance(mask2d, Tensor) or mask2d.ndim != 2):
            raise UniprunerError(
                "unipruner.vlm needs a 2-D attention mask [batch, tokens] (or none) at the language model; got "
                + (f"a {mask2d.ndim}-D tensor" if isinstance(mask2d, Tensor) else type(mask2d).__name__)
            )
        valid_new = None if mask2d is None else mask2d[:, -q:].to(torch.bool)
        if seen == 0:
            return self._prefill(state, kwargs, embeds, valid_new)
        pos = kwargs.get("position_ids")
        rows = (_row_positions(pos) if isinstance(pos, Tensor)
                else seen + torch.arange(q, device=embeds.device)[None].expand(b, q))  # the language model's default
        if cache is None or not cache.compressed:
            if cache is not None:
                cache.step = Step(valid_new if valid_new is not None and not bool(valid_new.all()) else None,
                                  rows, state.settings)
                state.logical = seen + q
            return args, kwargs
        return self._decode(state, kwargs, cache, embeds, valid_new, rows)

    def _prefill(self, state: _Call, kwargs: dict[str, Any], embeds: Tensor, valid_new: Tensor | None
                 ) -> tuple[tuple[Any, ...], dict[str, Any]]:
        host = self.host
        b, q = embeds.shape[0], embeds.shape[1]
        visual = self._visual_mask(state, embeds)
        valid = torch.ones(b, q, dtype=torch.bool, device=embeds.device) if valid_new is None else valid_new
        if valid_new is not None and not bool(valid[:, -1].all()):
            raise UniprunerError("the last token of some row is padding: unipruner.vlm needs left padding "
                                 "(processor.tokenizer.padding_side = 'left'), as generate() does")
        pos = kwargs.get("position_ids")
        if pos is None:
            base = torch.arange(q, device=embeds.device)[None].expand(b, q)
            pos = base[None].expand(3, b, q) if host.mrope else base
        group = self._groups(state, visual)
        state.seq = _Seq(visual, group, valid, pos, block=self._image_blocks(state, b, q))
        flat_vis = torch.nonzero(visual.flatten()).squeeze(1)
        state.origin = flat_vis
        img = group.flatten()[flat_vis] if state.settings.per_image else self._groups_per_image(state, visual)
        state.image_of = img
        state.n_images = int(img.max()) + 1 if img.numel() else 0
        per = torch.bincount(img, minlength=state.n_images)
        state.patch_of = torch.arange(img.numel(), device=img.device) - (torch.cumsum(per, 0) - per)[img]
        state.seq_before = [int(x) for x in valid.sum(-1).tolist()]
        n_vis = int(visual.sum())
        if n_vis == 0:
            raise UniprunerError(
                f"the input holds no image placeholder (token id {host.image_token_id}); unipruner.vlm prunes visual "
                "tokens: call the model with images (or unpatch it for text-only prompts)"
            )
        cache = state.cache
        vis_stage = self._vision_stage(state)
        if vis_stage is not None:
            embeds = self._apply_vision(state, vis_stage, kwargs, embeds)
        inp = next((s for s in state.settings.stages if s.where == "input"), None)
        if inp is not None:
            seq0 = state.seq
            query = row_query(embeds, seq0.valid & ~seq0.visual)
            result = self._run_stage(state, inp, embeds, query=query)
            if result is not None:
                self._enter_packed(state, kwargs, result)
        if cache is not None:
            seq = state.seq
            cache.step = Step(None if bool(seq.valid.all()) else seq.valid, _row_positions(seq.positions),
                              state.settings)
            cache.plan = state.settings
        state.logical = q
        return (), kwargs

    def _apply_vision(self, state: _Call, st: Stage, kwargs: dict[str, Any], embeds: Tensor) -> Tensor:
        d = state.vision_decision
        if d is None:
            raise UniprunerError("stage='vision': the vision tower did not run in this call (pixel_values missing?)")
        state.vision_decision = None
        seq = state.seq
        assert seq is not None
        blk = self._blocks(seq)
        if tuple(blk.flat.shape) != (d.kept.shape[0], self.host.tokens_per_image or -1):
            raise UniprunerError(f"stage='vision' decided for {d.kept.shape[0]} images but the prompt holds "
                                 f"{blk.flat.shape[0]} blocks of {blk.flat.shape[1]} visual tokens")
        d.new_tokens = None  # the merged values went through the projector into the embeddings already
        result = self._commit(state, st, blk, embeds, d)
        if result is None:
            return embeds
        self._enter_packed(state, kwargs, result)
        return result[0]

    def _enter_packed(self, state: _Call, kwargs: dict[str, Any], result: tuple[Tensor, Packed, Tensor | None]
                      ) -> None:
        """The language model's inputs for a sequence packed before its first layer (vision / input stage)."""
        seq = state.seq
        assert seq is not None
        new_embeds, packed, agg_pos = result
        kwargs["inputs_embeds"] = new_embeds
        kwargs["position_ids"] = self._positions(state, seq, packed, agg_pos)
        self._deepstack(kwargs, state, packed)
        state.first_pruned = 0
        state.seq = _Seq(*self._packed_seq(seq, packed, kwargs["position_ids"], agg_pos))
        kwargs["attention_mask"] = self._packed_mask(state.seq, new_embeds.dtype)

    def _decode(self, state: _Call, kwargs: dict[str, Any], cache: CompressedCache, embeds: Tensor,
                valid_new: Tensor | None, rows: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]]:
        q = embeds.shape[1]
        if cache.plan is not None and cache.plan != state.settings:
            raise UniprunerError(
                "this cache was pruned with other settings; continue it with the settings it started with "
                "(or start a new cache)"
            )
        vn = None if valid_new is None or bool(valid_new.all()) else valid_new
        cache.step = Step(vn, rows, state.settings)
        first = cache.layers[0]
        if isinstance(first, CompressedLayer) and first.compressed and self.host.layer_types is None:
            kwargs["attention_mask"] = self._layer_mask(first, vn, q, embeds.dtype)
        state.logical = cache.get_seq_length() + q
        return (), kwargs

    def _lm_post(self, module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                 output: Any) -> None:
        state = self.call_state()
        if not isinstance(state, _Call) or state.cache is None or state.logical is None:
            return
        cache = state.cache
        cache.step = None
        first = state.first_pruned
        for i, layer in enumerate(cache.layers):
            if not isinstance(layer, (CompressedLayer, CompressedSlidingLayer)):
                continue
            if first is not None and i >= first:
                layer.compressed = True
            layer.seen = state.logical  # every layer stands for the same tokens, stored or pruned
        state.first_pruned, state.logical = None, None

    # -- hooks: decoder layers ----------------------------------------------------------------------
    def _make_attn_pre(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            state = self.call_state()
            if not isinstance(state, _Call) or state.seq is None:
                return
            if any(s.where == "llm" and s.layer == index + 1 for s in state.settings.stages):
                hidden = kwargs.get("hidden_states", args[0] if args else None)
                pe = kwargs.get("position_embeddings")
                if isinstance(hidden, Tensor) and pe is not None:
                    state.captured[index] = (hidden, pe, kwargs.get("attention_mask"))
        return hook

    def _make_layer_pre(self, index: int) -> Any:
        def hook(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
                 ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
            state = self.call_state()
            if not isinstance(state, _Call):
                return None
            hidden = args[0] if args else kwargs.get("hidden_states")
            if not isinstance(hidden, Tensor):
                return None
            cache = state.cache
            if state.seq is not None and hidden.shape[1] > 1 and (cache is None or cache.step is not None):
                return self._prefill_layer(state, index, module, args, kwargs, hidden)
            if cache is not None and index < len(cache.layers) and cache.step is not None:
                layer = cache.layers[index]
                own = index > 0 or self.host.layer_types is not None  # Gemma 3: layer 0 gets a dict of masks
                if isinstance(layer, CompressedLayer) and layer.compressed and own:
                    kwargs["attention_mask"] = self._layer_mask(layer, cache.step.valid, hidden.shape[1], hidden.dtype)
                    return args, kwargs
                if isinstance(layer, CompressedSlidingLayer) and layer.compressed:
                    kwargs["attention_mask"] = self._sliding_mask(layer, cache.step, hidden.shape[1], hidden.dtype)
                    return args, kwargs
            return None
        return hook

    def _prefill_layer(self, state: _Call, index: int, module: torch.nn.Module, args: tuple[Any, ...],
                       kwargs: dict[str, Any], hidden: Tensor) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        st = next((s for s in state.settings.stages if s.where == "llm" and s.layer == index), None)
        if any(s.where == "llm" and s.layer == index + 1 and "previous" in s.method.requires
               for s in state.settings.stages):
            state.previous[index + 1] = hidden
        if st is not None:
            seq = state.seq
            assert seq is not None
            pe = self._layer_value(state.pe, index) if state.pe is not None else kwargs.get("position_embeddings")
            if pe is None:
                raise UniprunerError(f"decoder layer {index} received no position_embeddings")
            result = self._run_stage(state, st, hidden, layer=index, pe=pe, module=module)
            if result is not None:
                new_hidden, packed, agg_pos = result
                positions = self._positions(state, seq, packed, agg_pos)
                idx = packed.index
                if self.host.layer_types is None:
                    cos, sin = pe
                    state.pe = (_take_rows(cos, idx, agg_pos), _take_rows(sin, idx, agg_pos))
                else:  # every layer type's rotary embeddings of the current sequence, gathered at the kept slots
                    state.pe = {t: (_take_rows(c, idx, agg_pos), _take_rows(s_, idx, agg_pos))
                                for t, (c, s_) in self._type_pe(state, index, pe, hidden).items()}
                state.seq = _Seq(*self._packed_seq(seq, packed, positions, agg_pos))
                state.mask = self._packed_mask(state.seq, hidden.dtype)
                state.first_pruned = index if state.first_pruned is None else state.first_pruned
                if state.cache is not None:
                    ns = state.seq
                    state.cache.step = Step(None if bool(ns.valid.all()) else ns.valid, _row_positions(ns.positions),
                                            state.settings)
                args = (new_hidden, *args[1:]) if args else args
                if not args:
                    kwargs["hidden_states"] = new_hidden
        if state.mask is not None:
            kwargs["attention_mask"] = self._layer_value(state.mask, index)
            kwargs["position_embeddings"] = self._layer_value(state.pe, index)
            if "position_ids" in kwargs and state.seq is not None:
                kwargs["position_ids"] = _row_positions(state.seq.positions)
            return args, kwargs
        return (args, kwargs) if st is not None else None

    # -- a stage ------------------------------------------------------------------------------------
    def _run_stage(self, state: _Call, st: Stage, hidden: Tensor, *, query: Tensor | None = None,
                   layer: int | None = None, pe: tuple[Tensor, Tensor] | None = None,
                   module: torch.nn.Module | None = None) -> tuple[Tensor, Packed, Tensor | None] | None:
        """Prune the visual tokens of ``hidden [B, S, D]``: (packed hidden, packing, aggregate positions)."""
        seq = state.seq
        assert seq is not None
        m = st.method
        blk = self._blocks(seq)
        n_in = blk.counts
        if m.budget is not None and m.budget.keep is not None:
            low = int(n_in.min())
            if m.budget.keep > low:
                raise UniprunerError(
                    f"keep={m.budget.keep} is more than the {low} visual tokens an image has at {st.describe()}; "
                    f"use keep <= {low} (or ratio=)"
                )
        signals: dict[str, Any] = {}
        if query is None:
            query = row_query(hidden, seq.valid & ~seq.visual)
        signals["query"] = query[blk.row]
        tokens = blk.take(hidden)
        with torch.no_grad():
            if st.where == "llm" and isinstance(m, ScoringMethod):
                scores = m.score(hidden, mask=seq.valid, **self._llm_signals(state, st, hidden, pe, module, signals,
                                                                            full=True))
                kept = topk(blk.take(scores[..., None])[..., 0], m.budget, mask=blk.mask)
                new_tokens, plan, reps = None, None, kept
            else:
                if st.where == "llm":
                    signals.update(self._llm_signals(state, st, hidden, pe, module, signals, full=False, blk=blk))
                d = _reduce_by_shape(m, tokens, blk, signals, self._grids(state, blk))
                return self._commit(state, st, blk, hidden, d)
        return self._commit(state, st, blk, hidden, _Decision(kept, reps, plan, new_tokens, None))

    def _commit(self, state: _Call, st: Stage, blk: Blocks, hidden: Tensor, d: _Decision
                ) -> tuple[Tensor, Packed, Tensor | None] | None:
        """Apply one stage's decision to the running sequence (or nothing, when it keeps everything)."""
        seq = state.seq
        assert seq is not None
        n_in = blk.counts
        n_out = (d.kept >= 0).sum(-1) + (0 if d.aggregates is None else d.aggregates[1].sum(-1))
        if bool((n_out == n_in).all()) and d.aggregates is None:
            state.stats.append(self._stage_stats(state, st, n_in, n_out))
            return None  # keeps (and merges) nothing: the model runs exactly as unpatched
        new_tokens = None if st.method.reduction == "drop" else d.new_tokens  # dropping leaves values untouched
        out = self._apply(seq, blk, hidden, d.kept, new_tokens, d.aggregates)
        dest, width = _destinations(seq, blk, d.kept, d.reps, d.plan,
                                    None if d.aggregates is None else d.aggregates[1])
        state.origin = _follow(state.origin, dest, width, out[1])
        state.stats.append(self._stage_stats(state, st, n_in, n_out))
        return out

    def _apply(self, seq: _Seq, blk: Blocks, hidden: Tensor, kept: Tensor, new_tokens: Tensor | None,
               aggregates: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Packed, Tensor | None]:
        b, s, d = hidden.shape
        flat_keep = torch.where(kept >= 0, blk.flat.gather(1, kept.clamp(min=0)), torch.full_like(kept, -1))
        keep_slot = (seq.valid & ~seq.visual).flatten().clone()
        sel = flat_keep[flat_keep >= 0]
        keep_slot[sel] = True
        values = hidden.reshape(b * s, d)
        if new_tokens is not None:  # merged representatives carry their merged value
            reps = kept >= 0
            values = values.clone()
            values[flat_keep[reps]] = new_tokens[reps].to(values.dtype)
        slot = torch.arange(s, device=hidden.device, dtype=torch.float64)[None].expand(b, s)
        keys_ = torch.where(keep_slot.view(b, s), slot, torch.full_like(slot, float("inf")))
        src = values.view(b, s, d)
        agg_pos = None
        if aggregates is not None:  # one extra slot per aggregate, right after its image's last visual token
            tok, is_agg = aggregates
            n_blk, k = is_agg.shape
            last_flat = blk.flat.max(dim=1).values  # the block's last visual slot (left-padded blocks)
            last_l = (last_flat % s).to(torch.float64)
            extra = torch.full((b, n_blk * k), float("inf"), dtype=torch.float64, device=hidden.device)
            cols = torch.arange(n_blk * k, device=hidden.device).view(n_blk, k)
            rank = torch.arange(k, device=hidden.device, dtype=torch.float64)[None] / (2 * k + 2)
            extra[blk.row[:, None].expand(n_blk, k)[is_agg], cols[is_agg]] = (last_l[:, None] + 0.5 + rank)[is_agg]
            ex_val = torch.zeros(b, n_blk * k, d, dtype=hidden.dtype, device=hidden.device)
            ex_val[blk.row[:, None].expand(n_blk, k)[is_agg], cols[is_agg]] = tok[is_agg].to(hidden.dtype)
            keys_ = torch.cat([keys_, extra], dim=1)
            src = torch.cat([src, ex_val], dim=1)
            agg_pos = torch.full((b, n_blk * k), -1, dtype=torch.long, device=hidden.device)
            agg_pos[blk.row[:, None].expand(n_blk, k)[is_agg], cols[is_agg]] = (last_flat[:, None] % s).expand(
                n_blk, k)[is_agg]
        packed = pack(keys_)
        return packed.take(src), packed, agg_pos

    def _packed_seq(self, seq: _Seq, packed: Packed, positions: Tensor, agg_pos: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, Tensor, Tensor, bool, Tensor | None]:
        b, s = seq.visual.shape
        extra = packed.index.shape[1] and int(packed.index.max()) >= s
        vis, grp, blk = seq.visual, seq.group, seq.block
        if extra:  # aggregate slots: visual, in no block (they are not pruned again)
            m = int(packed.index.max()) + 1 - s
            vis = torch.cat([vis, torch.ones(b, m, dtype=torch.bool, device=vis.device)], dim=1)
            grp = torch.cat([grp, torch.full((b, m), -1, dtype=grp.dtype, device=grp.device)], dim=1)
        idx = packed.index
        visual = vis.gather(1, idx) & packed.valid
        group = torch.where(packed.valid, grp.gather(1, idx), torch.full_like(idx, -1))
        block = None
        if blk is not None:  # Gemma 3's image blocks follow their tokens; an aggregate joins its anchor's block
            if agg_pos is not None:
                blk = torch.cat([blk, blk.gather(1, agg_pos.clamp(min=0))], dim=1)
            block = torch.where(packed.valid, blk.gather(1, idx), torch.full_like(idx, -1))
        return visual, group, packed.valid, positions, True, block

    def _positions(self, state: _Call, seq: _Seq, packed: Packed, agg_pos: Tensor | None) -> Tensor:
        pos = seq.positions
        if agg_pos is not None:  # aggregate slots take their anchor's position
            pos = torch.cat([pos, gather_last(pos, agg_pos.clamp(min=0))], dim=-1)
        out = gather_last(pos, packed.index)
        if state.settings.positions == "compact":
            if out.ndim != 2:
                raise UniprunerError(
                    f"positions='compact' renumbers 1-D positions; {self.host.cls_name} uses M-RoPE, whose kept "
                    "tokens keep their original (t, h, w) positions"
                )
            out = (torch.cumsum(packed.valid.long(), 1) - 1).clamp(min=0)
        return torch.where(packed.valid, out, torch.zeros_like(out)) if out.ndim == 2 else out

    def _deepstack(self, kwargs: dict[str, Any], state: _Call, packed: Packed) -> None:
        ds = kwargs.get("deepstack_visual_embeds")
        vpm = kwargs.get("visual_pos_masks")
        if ds is None or vpm is None:
            return
        seq = state.seq
        assert seq is not None
        b, s = vpm.shape
        order = torch.cumsum(vpm.flatten().long(), 0) - 1  # rank of each visual slot among all visual slots
        idx = packed.index.clamp(max=s - 1)
        kept_vis = vpm.gather(1, idx) & packed.valid & (packed.index < s)
        ranks = order.view(b, s).gather(1, idx)[kept_vis]
        kwargs["visual_pos_masks"] = kept_vis
        kwargs["deepstack_visual_embeds"] = [x[ranks] for x in ds]

    # -- signals --------------------------------------------------------------------------------------
    def _llm_signals(self, state: _Call, st: Stage, hidden: Tensor, pe: tuple[Tensor, Tensor] | None,
                     module: torch.nn.Module | None, base: dict[str, Any], *, full: bool,
                     blk: Blocks | None = None) -> dict[str, Any]:
        """Signals of an ``llm`` stage: whole rows for scoring methods (``full``), else per block."""
        m = st.method
        seq = state.seq
        assert seq is not None and st.layer is not None
        out: dict[str, Any] = {}
        if "attn" in m.requires:
            cap = state.captured.get(st.layer - 1)
            if cap is None:
                raise UniprunerError(f"layer {st.layer - 1}'s attention input was not captured")
            h_prev, pe_prev, mask_prev = cap
            spec = self._specs[st.layer - 1]
            pe_prev = _expand_pe(pe_prev, h_prev.shape[0])
            ks = keys(spec, h_prev, *pe_prev)
            kvalid = seq.valid[:, None, :].expand(ks.shape[0], ks.shape[1], ks.shape[2])
            rows = _rows_needed(m, hidden.shape[1])
            if self.host.layer_types is not None and isinstance(mask_prev, Tensor) and rows != "all":
                # Gemma 3: the rows under the mask the layer used (sliding window, bidirectional image blocks)
                out["attn"] = attn_rows = _masked_rows(spec, h_prev, pe_prev, ks, int(rows), mask_prev)
            else:
                out["attn"] = attn_rows = attention_rows(spec, h_prev, pe_prev, ks, rows, kvalid)
            if "text_queries" in m.requires:
                n = out["attn"].shape[2]
                out["text_queries"] = (seq.valid & ~seq.visual)[:, -n:]
        prev = state.previous.get(st.layer) if "previous" in m.requires else None
        if "previous" in m.requires and prev is None:
            raise UniprunerError(f"the hidden states entering layer {st.layer - 1} were not captured")
        if full:
            if prev is not None:
                out["previous"] = prev
            if "query" in m.requires:
                out["query"] = row_query(hidden, seq.valid & ~seq.visual)
            return out
        assert blk is not None
        out = dict(base)
        if "attn" in m.requires:  # per-block methods get the attention each token receives from the valid rows
            r = attn_rows.shape[2]
            w = seq.valid[:, -r:].to(torch.float32)
            received = torch.einsum("bhrs,br->bs", attn_rows.float(), w) / (w.sum(1, keepdim=True) * attn_rows.shape[1])
            out["attn"] = blk.take(received[..., None])[..., 0]
        if prev is not None:
            out["previous"] = blk.take(prev)
        if pe is not None and st.layer in self._specs and module is not None:
            norm = getattr(module, "input_layernorm", None)
            normed = norm(hidden) if norm is not None else hidden
            k = unrotated_keys(self._specs[st.layer], normed)  # before RoPE: the same wherever a row starts
            out["keys"] = blk.take(k.transpose(1, 2).flatten(2))
        return out

    def _stage_stats(self, state: _Call, st: Stage, n_in: Tensor, n_out: Tensor) -> StageStats:
        """Counts, and which slot now holds every original patch of every image (for drawing)."""
        assert state.origin is not None and state.image_of is not None and state.patch_of is not None
        n_img = state.n_images
        n_max = int(state.patch_of.max()) + 1 if state.patch_of.numel() else 0
        owner = torch.full((n_img, n_max), -1, dtype=torch.long, device=state.origin.device)
        owner[state.image_of, state.patch_of] = state.origin
        return StageStats(st.where, st.layer, st.method.name, tuple(n_in.tolist()), tuple(n_out.tolist()),
                          owner.cpu())

    def _groups_per_image(self, state: _Call, visual: Tensor) -> Tensor:
        counts = self.host.image_counts(int(visual.sum()), state.inputs)
        if counts:
            return torch.repeat_interleave(torch.arange(len(counts), device=visual.device),
                                           torch.tensor(counts, device=visual.device))
        return runs(visual)

    # -- helpers --------------------------------------------------------------------------------------
    def _visual_mask(self, state: _Call, embeds: Tensor) -> Tensor:
        ids = state.inputs.get("input_ids")
        if isinstance(ids, Tensor) and ids.shape == embeds.shape[:2]:
            return ids == self.host.image_token_id
        user_embeds = state.inputs.get("inputs_embeds")
        if isinstance(user_embeds, Tensor) and user_embeds.shape == embeds.shape:
            table = self.host.body.get_input_embeddings()  # type: ignore[operator]
            tok = table(torch.tensor(self.host.image_token_id, device=embeds.device))
            return (user_embeds == tok).all(-1)
        raise UniprunerError("unipruner.vlm could not find the image placeholders: call the model with input_ids")

    def _groups(self, state: _Call, visual: Tensor) -> Tensor:
        b, q = visual.shape
        if state.settings.per_image:
            ids = self._groups_per_image(state, visual)
        else:
            ids = (torch.nonzero(visual.flatten()).squeeze(1) // q)
            ids = torch.unique_consecutive(ids, return_inverse=True)[1]
        group = torch.full((b * q,), -1, dtype=torch.long, device=visual.device)
        group[visual.flatten()] = ids
        return group.view(b, q)

    def _blocks(self, seq: _Seq) -> Blocks:
        g = seq.group.flatten()
        live = g >= 0
        vis = live.view(seq.group.shape)
        ids = torch.unique_consecutive(g[live], return_inverse=True)[1]
        return blocks(vis, ids)

    def _grids(self, state: _Call, blk: Blocks) -> list[tuple[int, int] | None]:
        """The token grid of every block where it is one whole image (None after pruning, or per row)."""
        n = blk.flat.shape[0]
        if (state.seq is not None and state.seq.packed) or not state.settings.per_image:
            return [None] * n  # a pruned image is no longer a grid; a row of several images is none
        grids = self.host.image_grids(state.inputs, n)
        counts = blk.counts.tolist()
        if len(grids) != n:
            return [None] * n
        return [g if g is not None and g[0] * g[1] == c else None for g, c in zip(grids, counts, strict=True)]

    def _mask(self, valid: Tensor, dtype: torch.dtype) -> Tensor | None:
        b, q = valid.shape
        empty = torch.zeros(b, 1, 0, dtype=torch.bool, device=valid.device)
        additive = dtype if self._eager else None
        return stored_slot_mask(empty, None if bool(valid.all()) else valid, q, n_heads=1, additive=additive)

    def _layer_mask(self, layer: CompressedLayer, valid_new: Tensor | None, q: int, dtype: torch.dtype
                    ) -> Tensor | None:
        additive = dtype if self._eager else None
        old = layer.slot_valid()
        return stored_slot_mask(old, valid_new, q, n_heads=old.shape[1], additive=additive)

    # -- Gemma 3: masks and rotary embeddings per layer type ------------------------------------------
    def _layer_value(self, value: Any, index: int) -> Any:
        """``value`` for decoder layer ``index``: its layer type's entry when ``value`` is a dict per type."""
        if isinstance(value, dict) and self.host.layer_types is not None:
            return value[self.host.layer_types[index]]
        return value

    def _image_blocks(self, state: _Call, b: int, q: int) -> Tensor | None:
        """Gemma 3: the image block of every slot (runs of ``token_type_ids == 1``, -1 elsewhere), or None.

        The body makes those blocks bidirectional only when it receives ``token_type_ids``
        (``generate()`` passes them at prefill); without them its masks are causal, and so are ours.
        """
        tt = state.inputs.get("token_type_ids")
        if self.host.layer_types is None or not isinstance(tt, Tensor):
            return None
        if tuple(tt.shape) != (b, q):
            raise UniprunerError(f"token_type_ids has shape {tuple(tt.shape)} but the prompt is {(b, q)} tokens; "
                                 "build them with the model's processor")
        img = tt == 1
        prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=img.device), img[:, :-1]], dim=1)
        ids = torch.cumsum((img & ~prev).long(), dim=1) - 1
        return torch.where(img, ids, torch.full_like(ids, -1))

    def _packed_mask(self, seq: _Seq, dtype: torch.dtype) -> Any:
        """The prefill mask of a packed sequence: one tensor, or Gemma 3's dict of one per layer type.

        Gemma 3 (Hugging Face's ``create_masks_for_vision_model``, in the kept tokens' original
        positions): global layers see ``causal | same image block``, local layers that AND
        ``position_k > position_q - sliding_window``; padding keys are hidden, a padding query sees itself.
        """
        if self.host.layer_types is None:
            return self._mask(seq.valid, dtype)
        valid = seq.valid
        b, s = valid.shape
        pos = _row_positions(seq.positions)
        idx = torch.arange(s, device=valid.device)
        allowed = (idx[None, :] <= idx[:, None])[None].expand(b, s, s)
        if seq.block is not None:
            blk = seq.block
            allowed = allowed | ((blk[:, :, None] == blk[:, None, :]) & (blk[:, :, None] >= 0))
        eye = torch.eye(s, dtype=torch.bool, device=valid.device)[None]
        full = (allowed & valid[:, None, :]) | eye
        out = {"full_attention": full}
        if self.host.sliding_window is not None:
            window = pos[:, None, :] > pos[:, :, None] - self.host.sliding_window
            out["sliding_attention"] = (allowed & valid[:, None, :] & window) | eye
        return {t: self._as_mask(m[:, None], dtype) for t, m in out.items()}

    def _as_mask(self, allowed: Tensor, dtype: torch.dtype) -> Tensor:
        """A boolean mask as the attention implementation takes it (boolean for SDPA, additive for eager)."""
        if not self._eager:
            return allowed
        return torch.where(allowed, torch.zeros((), dtype=dtype, device=allowed.device), torch.finfo(dtype).min)

    def _sliding_mask(self, layer: CompressedSlidingLayer, step: Step, q: int, dtype: torch.dtype) -> Tensor:
        """Decode-time mask of a pruned sliding layer: its stored slots and the ``q`` new tokens, by position."""
        assert layer.valid is not None and layer.positions is not None and self.host.sliding_window is not None
        b = layer.valid.shape[0]
        dev = layer.valid.device
        new_valid = torch.ones(b, q, dtype=torch.bool, device=dev) if step.valid is None else step.valid.to(dev)
        new_pos = step.positions.to(dev).expand(b, q)
        key_valid = torch.cat([layer.valid, new_valid], dim=1)
        key_pos = torch.cat([layer.positions, new_pos], dim=1)
        s = layer.valid.shape[1]
        causal = torch.ones(q, s + q, dtype=torch.bool, device=dev).tril(s)[None]
        window = key_pos[:, None, :] > new_pos[:, :, None] - self.host.sliding_window
        eye = torch.cat([torch.zeros(q, s, dtype=torch.bool, device=dev), torch.eye(q, dtype=torch.bool, device=dev)],
                        dim=1)[None]
        allowed = (causal & window & key_valid[:, None, :]) | eye
        return self._as_mask(allowed[:, None], dtype)

    def _type_pe(self, state: _Call, index: int, pe: tuple[Tensor, Tensor], hidden: Tensor
                 ) -> dict[str, tuple[Tensor, Tensor]]:
        """Gemma 3: the rotary embeddings of every layer type for the current sequence (before a stage packs it).

        Layer ``index``'s own are ``pe``; the other types' come from an earlier stage, or from the
        language model's ``rotary_emb`` at the sequence's position ids, as its forward computed them.
        """
        assert self.host.layer_types is not None and state.seq is not None
        if isinstance(state.pe, dict):
            return dict(state.pe)
        own = self.host.layer_types[index]
        rotary: Any = getattr(self.host.language_model, "rotary_emb", None)
        pos = _row_positions(state.seq.positions)
        out = {own: pe}
        with torch.no_grad():
            for t in sorted(set(self.host.layer_types) - {own}):
                out[t] = rotary(hidden, pos, t)
        return out


def _reduce_by_shape(m: Method, tokens: Tensor, blk: Blocks, signals: dict[str, Any],
                     grids: list[tuple[int, int] | None]) -> _Decision:
    """Run ``m.reduce`` on the blocks, one call per (token count, grid) shape.

    Blocks of one shape are stacked without padding, so a batch gives every image exactly what it
    would get alone: ragged images (anyres tiles, Qwen's dynamic resolution) reach methods that
    merge whole batches (ToMe), and each image gets its own grid (HoloV, 2-D methods).
    """
    counts = blk.counts.tolist()
    shapes = sorted(set(zip(counts, grids, strict=True)), key=lambda x: (x[0], x[1] or (0, 0)))
    n_blk, width = blk.flat.shape
    if len(shapes) == 1 and shapes[0][0] == width:
        extra = {} if shapes[0][1] is None else {"hw": shapes[0][1]}
        return _decide(m.reduce(tokens, mask=None, **{**signals, **extra}))
    parts = []
    for count, grid in shapes:
        idx = torch.tensor([i for i, (c, g) in enumerate(zip(counts, grids, strict=True)) if (c, g) == (count, grid)],
                           device=tokens.device)
        sub = {k: (v[idx][:, width - count:] if isinstance(v, Tensor) and v.ndim >= 2 and v.shape[:2] == (n_blk, width)
                   else v[idx] if isinstance(v, Tensor) and v.shape[:1] == (n_blk,) else v) for k, v in signals.items()}
        if grid is not None:
            sub["hw"] = grid
        parts.append((idx, width - count, _decide(m.reduce(tokens[idx][:, width - count:], mask=None, **sub))))
    k_out = max(d.reps.shape[1] for _, _, d in parts)
    dev = tokens.device
    kept = torch.full((n_blk, k_out), -1, dtype=torch.long, device=dev)
    reps = torch.full((n_blk, k_out), -1, dtype=torch.long, device=dev)
    dst = torch.full((n_blk, width), -1, dtype=torch.long, device=dev)
    values = tokens.new_zeros(n_blk, k_out, tokens.shape[-1])
    is_agg = torch.zeros(n_blk, k_out, dtype=torch.bool, device=dev)
    merged = False
    for idx, off, d in parts:
        k = d.reps.shape[1]
        kept[idx, :k] = torch.where(d.kept >= 0, d.kept + off, d.kept)
        reps[idx, :k] = torch.where(d.reps >= 0, d.reps + off, d.reps)
        if d.new_tokens is not None:
            values[idx, :k] = d.new_tokens.to(values.dtype)
        if d.aggregates is not None:
            is_agg[idx, :k] = d.aggregates[1]
        if d.plan is not None:
            merged = True
            dst[idx, off:] = d.plan.dst
    plan = MergePlan(dst, k_out) if merged else None
    return _Decision(kept, reps, plan, values, (values, is_agg) if bool(is_agg.any()) else None)


def _decide(red: Reduced) -> _Decision:
    """A method's :class:`~unipruner.methods.Reduced` as a stage decision (aggregates = valid slots with no index)."""
    reps = red.indices
    ok = red.mask if red.mask is not None else torch.ones_like(reps, dtype=torch.bool)
    is_agg = ok & (reps < 0)
    kept = torch.where(ok & (reps >= 0), reps, torch.full_like(reps, -1))
    return _Decision(kept, reps, red.plan, red.tokens, (red.tokens, is_agg) if bool(is_agg.any()) else None)


def _destinations(seq: _Seq, blk: Blocks, kept: Tensor, reps: Tensor, plan: Any, is_agg: Tensor | None
                  ) -> tuple[Tensor, int]:
    """Where every slot of ``seq`` goes, in the source of the packing (``[B, S + E]`` flattened), -1 = dropped.

    Kept text and kept visual tokens stay; a token merged into another goes to its representative;
    a token merged into an aggregate goes to that aggregate's extra column.
    """
    b, s = seq.visual.shape
    n_blk, k = reps.shape
    width = s + (n_blk * k if is_agg is not None else 0)
    ext = (torch.arange(b * s, device=kept.device) // s) * width + torch.arange(b * s, device=kept.device) % s
    dest = torch.where((seq.valid & ~seq.visual).flatten(), ext, torch.full_like(ext, -1))
    live = blk.mask
    if plan is None:  # dropping: kept block slots stay
        hit = torch.zeros_like(blk.mask)
        hit.scatter_(1, kept.clamp(min=0), kept >= 0)
        own = blk.flat.clamp(min=0)
        dest[own[hit & live]] = ext[own[hit & live]]
        return dest, width
    j = plan.dst  # [n_blk, N] -> output slot
    ok = live & (j >= 0)
    jj = j.clamp(min=0)
    rep = reps.gather(1, jj)  # representative of each slot's output (block coordinates, -1 = aggregate)
    rep_flat = blk.flat.gather(1, rep.clamp(min=0))
    target = ext[rep_flat.clamp(min=0)]
    if is_agg is not None:
        row = blk.row[:, None].expand_as(jj)
        col = torch.arange(n_blk, device=kept.device)[:, None] * k + jj
        target = torch.where(rep >= 0, target, row * width + s + col)
    else:
        ok = ok & (rep >= 0)
    own = blk.flat.clamp(min=0)
    dest[own[ok]] = target[ok]
    return dest, width


def _follow(origin: Tensor | None, dest: Tensor, width: int, packed: Packed) -> Tensor:
    """Compose the original visual tokens' current slots with one stage's destinations and packing."""
    assert origin is not None
    b, kmax = packed.index.shape
    src = (torch.arange(b, device=dest.device)[:, None] * width + packed.index)[packed.valid]
    inv = torch.full((b * width,), -1, dtype=torch.long, device=dest.device)
    new = (torch.arange(b, device=dest.device)[:, None] * kmax + torch.arange(kmax, device=dest.device))[packed.valid]
    inv[src] = new
    alive = origin >= 0
    d = torch.where(alive, dest[origin.clamp(min=0)], torch.full_like(origin, -1))
    return torch.where(d >= 0, inv[d.clamp(min=0)], torch.full_like(d, -1))


def _masked_rows(spec: AttentionLayer, hidden: Tensor, pe: tuple[Tensor, Tensor], ks: Tensor, rows: int,
                 mask: Tensor) -> Tensor:
    """Attention rows ``[B, H, R, S]`` of the last ``rows`` queries under the 4-D ``mask`` the layer itself used.

    ``mask [B, 1, S, S]``: boolean (SDPA) or additive (eager). Gemma 3's layers attend under a
    sliding window and bidirectional image blocks, which plain causal rows would not follow.
    """
    w = min(rows, hidden.shape[1])
    cos, sin = pe
    qs = queries(spec, hidden[:, -w:], cos[:, -w:], sin[:, -w:]).float()
    kk = ks.float().repeat_interleave(qs.shape[1] // ks.shape[1], dim=1)
    allowed = mask[:, :, -w:, :]
    allowed = allowed if allowed.dtype == torch.bool else allowed == 0
    logits = (qs @ kk.transpose(-1, -2)) * spec.scale
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.where(torch.isfinite(probs), probs, torch.zeros_like(probs))


def _rows_needed(m: Method, n: int) -> int | str:
    if "text_queries" in m.requires:
        return n
    rows = getattr(m, "window", None) or getattr(m, "n_queries", None)
    if rows is not None:
        return int(rows)
    if m.name == "h2o":
        return "all"
    return n


def _row_positions(pos: Tensor) -> Tensor:
    """``[B, S]`` positions of a ``[B, S]`` or M-RoPE ``[R, B, S]`` tensor (the text / temporal row)."""
    return pos if pos.ndim == 2 else pos[0]


def _expand_pe(pe: tuple[Tensor, Tensor], b: int) -> tuple[Tensor, Tensor]:
    cos, sin = pe
    return cos.expand(b, *cos.shape[1:]), sin.expand(b, *sin.shape[1:])


def _take_rows(x: Tensor, index: Tensor, anchors: Tensor | None) -> Tensor:
    """Rotary ``cos`` / ``sin`` ``[B or 1, S, D]`` at the packed slots (aggregate slots reuse their anchor's)."""
    b = index.shape[0]
    x = x.expand(b, *x.shape[1:])
    if anchors is not None:
        a = anchors.clamp(min=0)
        x = torch.cat([x, x.gather(1, a[..., None].expand(b, a.shape[1], x.shape[-1]))], dim=1)
    return x.gather(1, index[..., None].expand(b, index.shape[1], x.shape[-1]))


def _kv_slots(cache: CompressedCache | None) -> tuple[int, ...]:
    if cache is None:
        return ()
    out = []
    for layer in cache.layers:
        k = getattr(layer, "keys", None)
        out.append(int(k.shape[-2]) if isinstance(k, Tensor) and k.numel() else 0)
    return tuple(out)


def _settings_from(method: Any, kw: dict[str, Any]) -> VLMSettings:
    where = kw.pop("stage", "input")
    return make_settings(method, stage_=where, **kw)


# ------------------------------------------------------------------------------------ public API


def find(model: Any) -> VLMHandle | None:
    """The active :class:`VLMHandle` of ``model``, or None (found through its hooks, nothing stored on it)."""
    return find_handle(model, VLMHandle)


def patch(model: Any, method: str | Method | Stage | list[Stage] = "divprune", *, keep: int | None = None,
          ratio: float | None = None, budget: Budget | None = None, stage: str = "input", layer: int | None = None,
          positions: str = "original", per_image: bool = True, **params: Any) -> VLMHandle:
    """Prune the visual tokens of ``model`` from now on (per instance; a context manager).

    ``with unipruner.vlm.patch(model, "divprune", keep=64) as h:`` unpatches on exit. Patching
    again with identical settings returns the same handle; other settings raise (use
    ``h.configure(...)``).

    Parameters
    ----------
    model : transformers.PreTrainedModel
        One of :data:`SUPPORTED_HOSTS` (LLaVA, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL,
        Qwen3-VL, Idefics3, SmolVLM, Gemma 3) with ``sdpa`` or ``eager`` attention.
    method : str, Method, Stage or list of Stage
        A registry method with ``"vlm"`` in its domains — ``divprune`` (Alvar et al., CVPR 2025),
        ``dart`` (Wen et al., 2025), ``fastv`` (Chen et al., ECCV 2024), ``sparsevlm`` (Zhang et
        al., ICML 2025), ``random``, ``kcenter``, ``gprune``, ``query_similarity``, ``tome``,
        ``hidden_norm``, ``transprune`` ... — or a schedule of :func:`stage` values (e.g. DART
        at the input, then FastV at layer 2).
    keep : int, optional
        Visual tokens kept by the stage (per image with ``per_image=True``, else per row), e.g. 64
        of LLaVA's 576.
    ratio : float in (0, 1], optional
        Fraction of the visual tokens reaching the stage that it keeps.
    budget : Budget, optional
        Any other :class:`unipruner.Budget`.
    stage : {"input", "llm"}
        ``"input"``: on the projected visual tokens entering the language model;
        ``"llm"`` with ``layer=K``: on the hidden states entering decoder layer K, scored with
        layer K-1's attention (FastV's setting is K=2). Layers >= K then hold a shorter KV cache.
    layer : int, optional
        K for ``stage="llm"`` (``1 <= K < n_layers``).
    positions : {"original", "compact"}
        ``"original"`` (default): kept tokens keep their position ids (1-D, or Qwen's M-RoPE rows,
        gathered) and decoding continues from the original numbering; ``"compact"`` renumbers the
        kept sequence (input stage, 1-D RoPE hosts).
    per_image : bool
        The budget applies to each image (default) or is shared by all the images of a row.
    **params
        Method parameters (``n_pivots=8`` for DART, ``n_queries=1`` for FastV, ...).

    Returns
    -------
    VLMHandle
        ``configure()``, ``stats()``, ``describe()``, ``unpatch()``.

    Notes
    -----
    A pruned forward returns logits for the kept sequence (``[B, K, V]``: the last position is
    still each row's last token, which is what ``generate()`` reads).

    Raises
    ------
    UniprunerError
        Unsupported model or attention implementation, a method outside the vlm domain or at a
        stage that lacks its signals, ``layer`` outside the LLM, ``keep`` < 1 or (at call time)
        larger than an image's visual tokens, a model already patched differently.
    """
    settings = make_settings(method, keep=keep, ratio=ratio, budget=budget, stage_=stage, layer=layer,
                             positions=positions, per_image=per_image, **params)
    existing = reuse_or_refuse(model, VLMHandle, settings)
    if existing is not None:
        return existing
    handle = VLMHandle(model, settings)
    handle._install()
    return handle


def unpatch(model: Any) -> bool:
    """Remove :func:`patch`'s hooks from ``model`` (exactly as before); False when it was not patched."""
    handle = find(model)
    return False if handle is None else handle.unpatch()
