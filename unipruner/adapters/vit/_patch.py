"""Per-instance patching of vision transformers: prune or merge tokens between encoder blocks.

Nothing of the host's code is copied or replaced. :func:`patch` registers forward hooks on
*this* model's modules only, through a :class:`ViTHandle` (the handle contract of
:mod:`unipruner.hosts.patching`):

* a pre-hook on the patch embedding validates the image size;
* a pre-hook on every encoder block: block 0 begins the call (a :class:`_State` for this call
  only, kept in a context variable, with the settings read once); every block keeps its input
  (for methods that compare layers) and, once tokens have been merged, passes ToMe's
  proportional attention as an additive ``log(size)`` bias through the block's own
  attention-mask argument (a float mask keeps SDPA usable);
* hooks on the query/key projections keep references to the queries and keys the block computes
  anyway (ToMe's metric is the head-averaged keys; EViT and Zero-TPrune rebuild only the attention
  rows they need from them);
* a hook on every block's output reduces its tokens with a :mod:`unipruner.methods` method
  (select + drop / merge / fuse), tracks sizes and which original patches each token stands for,
  and after the last block optionally spreads the tokens back over the full patch grid, publishes
  what the call kept (:meth:`ViTHandle.stats`) and ends the call;
* a forward hook on the model itself (``always_call=True``) ends the call also when a forward
  raises.

How many tokens each block removes is :class:`unipruner.select.Schedule` arithmetic
(:meth:`~unipruner.select.Schedule.removals`). :func:`unpatch` (or leaving the handle's ``with``
block) removes the hooks; the model is then exactly the unpatched model again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from ... import reduce as _reduce
from ..._merge import MergePlan
from ..._ops import batched_gather
from ...errors import UniprunerError
from ...hosts.patching import PatchHandle, find_handle, reuse_or_refuse
from ...methods import REGISTRY, CLSAttention, MergingMethod, Method, ToMe, ZeroTPrune
from ...methods import method as _make_method
from ...select import Budget, Schedule
from ._hosts import SUPPORTED_HOSTS, Host, find_host

__all__ = ["VIT_METHODS", "LayerTokens", "ViTHandle", "ViTSettings", "ViTStats", "find", "kept_tokens", "patch",
           "unpatch"]

#: Registry methods the ViT adapter runs: exactly those whose domains include "vit"
#: (``unipruner methods --domain vit``; the 2-D ``tomesd`` is diffusion-only: its windows need an intact grid).
VIT_METHODS: tuple[str, ...] = tuple(sorted(n for n, c in REGISTRY.items() if "vit" in c.domains))
_KEY_METHODS = ("tome", "dart")  # methods whose similarity metric is the attention keys

RSpec = int | tuple[int, float] | Sequence[int]
ScheduleSpec = Schedule | Sequence[Budget | float | int | None]


@dataclass(frozen=True, eq=False)
class LayerTokens:
    """Which original tokens survive after one encoder block (from the last forward call).

    Attributes
    ----------
    layer : int
        Block index.
    n_in, n_out : int
        Tokens entering and leaving the block's reduction.
    owner : Tensor ``[B, N0]`` long
        For every original token (prefix tokens first, then the patches in raster order), the
        position of the token that now stands for it, or ``-1`` once it was dropped.
    """

    layer: int
    n_in: int
    n_out: int
    owner: Tensor

    @property
    def kept(self) -> Tensor:
        """``[B, N0]`` bool: the original token is still represented (kept or merged)."""
        return self.owner >= 0


@dataclass(frozen=True, eq=False)
class ViTStats:
    """What one forward call of a patched ViT kept (:meth:`ViTHandle.stats`).

    A sequence of :class:`LayerTokens`, one per block, with the token counts as shortcuts.

    Attributes
    ----------
    layers : tuple of LayerTokens
    """

    layers: tuple[LayerTokens, ...]

    @property
    def tokens(self) -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every block."""
        return [(r.n_in, r.n_out) for r in self.layers]

    @property
    def n0(self) -> int:
        """Tokens entering the first block (prefix tokens + patches)."""
        return self.layers[0].n_in

    @property
    def n_out(self) -> int:
        """Tokens leaving the last block."""
        return self.layers[-1].n_out

    def __len__(self) -> int:
        return len(self.layers)

    def __iter__(self) -> Iterator[LayerTokens]:
        return iter(self.layers)

    def __getitem__(self, layer: int) -> LayerTokens:
        return self.layers[layer]

    def __repr__(self) -> str:
        return f"ViTStats(tokens={self.tokens})"


@dataclass(frozen=True)
class ViTSettings:
    """What a :class:`ViTHandle` does: an immutable value, replaced whole by :meth:`ViTHandle.configure`.

    Attributes
    ----------
    method : Method
        The registry method (its own budget is ignored: the schedule sets one per block).
    schedule : Schedule
        How many tokens each block keeps or removes (resolved per input by
        :meth:`unipruner.select.Schedule.removals`).
    prop_attn : bool
        Proportional attention (ToMe): add ``log(size)`` to the attention logits of merged tokens.
    return_unmerged : bool
        Spread the last block's tokens back over the full token grid (dense outputs).
    enabled : bool
        False makes the hooks pass everything through untouched.
    """

    method: Method
    schedule: Schedule
    prop_attn: bool = True
    return_unmerged: bool = False
    enabled: bool = True

    def __repr__(self) -> str:
        m = self.method
        params = ", ".join(f"{f.name}={getattr(m, f.name)!r}" for f in dataclasses.fields(m)
                           if f.name not in ("budget", "protected"))
        return (f"ViTSettings(method={m.name!r} ({params}), schedule={self.schedule!r}, prop_attn={self.prop_attn}, "
                f"return_unmerged={self.return_unmerged}, enabled={self.enabled})")


@dataclass
class _State:
    """Per-forward state (made by block 0's pre-hook; lives in the calling context only)."""

    settings: ViTSettings
    n0: int
    plan: list[int]
    n: int
    owner: Tensor
    sizes: Tensor | None = None
    merged: bool = False
    dense: Tensor | None = None
    bias: Tensor | None = None
    prev: Tensor | None = None
    q: Tensor | None = None
    k: Tensor | None = None
    records: list[LayerTokens] = dataclasses.field(default_factory=list)


def _limit(m: Method) -> str:
    """The :meth:`Schedule.max_removal` cap of a method's reduction."""
    if isinstance(m, ToMe):
        return "bipartite"
    if m.reduction == "fuse" and not isinstance(m, MergingMethod):
        return "fuse"
    return "protected"


class ViTHandle(PatchHandle):
    """The handle :func:`patch` returns: a context manager, the live knob and the report.

    ``with unipruner.vit.patch(model, "tome", r=16) as h: ...`` unpatches on exit;
    :meth:`configure` changes settings between calls (validated like :func:`patch`);
    :meth:`stats` reports what the last call kept, :meth:`describe` what was patched. Each call
    keeps its bookkeeping in its own context, so one patched model can serve concurrent calls.

    Attributes
    ----------
    settings : ViTSettings
        The current settings (immutable; a call reads them once, when it begins).
    """

    domain = "vit"

    def __init__(self, model: nn.Module, host: Host, settings: ViTSettings) -> None:
        super().__init__(model, settings)
        self._host = host

    # -- report -------------------------------------------------------------------------------
    @property
    def settings(self) -> ViTSettings:
        """The current :class:`ViTSettings` (replaced whole by :meth:`configure`)."""
        return cast(ViTSettings, self._settings)

    @property
    def host(self) -> str:
        """The host class name."""
        return self._host.cls_name

    @property
    def blocks(self) -> list[str]:
        """Qualified names of the patched encoder blocks."""
        return list(self._host.layer_names)

    @property
    def protected(self) -> int:
        """Leading tokens that are never pruned (CLS, distillation token, registers)."""
        return self._host.protected

    @property
    def n_layers(self) -> int:
        """Number of patched encoder blocks."""
        return len(self._host.layers)

    def __repr__(self) -> str:
        s = self.settings
        return (f"ViTHandle(host={self.host}, blocks={self.n_layers}, method={s.method.name!r}, "
                f"reduction={s.method.reduction!r}, schedule={s.schedule!r}, protected={self.protected}, "
                f"prop_attn={s.prop_attn}, return_unmerged={s.return_unmerged}"
                + ("" if s.enabled else ", enabled=False") + ("" if self.active else ", unpatched") + ")")

    def describe(self) -> str:
        """What was patched, what each block keeps and what was left alone (and why)."""
        s = self.settings
        h = self._host
        plan = self.tokens_per_layer()
        reducing = [i for i, (a, b) in enumerate(plan) if b < a]
        idle = [i for i in range(self.n_layers) if i not in reducing]
        lines = [
            f"unipruner.vit: {h.cls_name} ({SUPPORTED_HOSTS[h.cls_name]}), {self.n_layers} encoder blocks patched "
            f"({h.layer_names[0]} .. {h.layer_names[-1]})",
            f"method {s.method.name!r} (reduction {s.method.reduction!r}), schedule {s.schedule!r}",
            f"tokens per block at {h.image_size[0]}x{h.image_size[1]}: "
            + ", ".join(f"{a}->{b}" for a, b in plan),
            f"protected: the first {h.protected} token(s), never pruned or merged" if h.protected
            else "protected: none (this host has no CLS token)",
        ]
        alone = ["the patch embedding (its pre-hook only checks the image size)",
                 "everything after the last block (final norm, pooler, head) sees the reduced tokens"
                 + (" spread back over the full grid" if s.return_unmerged else "")]
        if idle:
            alone.append(f"blocks {idle} remove nothing (the schedule asks for no reduction there, or too few "
                         "tokens remain)")
        lines.append("left alone: " + "; ".join(alone))
        lines.append(f"proportional attention {'on' if s.prop_attn else 'off'}"
                     + ("" if s.enabled else "; DISABLED: every hook passes through")
                     + ("" if self.active else "; unpatched"))
        return "\n".join(lines)

    def stats(self) -> ViTStats:
        """What the last finished forward call kept, block by block (:class:`ViTStats`)."""
        last = self.last_stats
        if last is None:
            raise UniprunerError("run the patched model once; stats() reports the last forward call")
        return cast(ViTStats, last)

    # -- settings -----------------------------------------------------------------------------
    def configure(self, method: str | Method | None = None, *, r: RSpec | None = None,
                  ratio: float | None = None, keep: int | None = None, budget: Budget | float | int | None = None,
                  schedule: ScheduleSpec | None = None, prop_attn: bool | None = None,
                  return_unmerged: bool | None = None, enabled: bool | None = None, **params: Any) -> ViTHandle:
        """Change settings (validated before anything changes); returns ``self``.

        The live knob of ToMe (Bolya et al., ICLR 2023: ``model.r = ...``), per instance: the
        keywords are those of :func:`patch`, ``None`` keeps the current value. A call already
        running keeps the settings it began with.
        """
        new = _settings(self._host, self.settings, method, r=r, ratio=ratio, keep=keep, budget=budget,
                        schedule=schedule, prop_attn=prop_attn, return_unmerged=return_unmerged, enabled=enabled,
                        params=params)
        self._set_settings(new)
        return self

    # -- token plan ---------------------------------------------------------------------------
    def tokens_per_layer(self, n0: int | None = None) -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every block for an input of ``n0`` tokens.

        :meth:`unipruner.select.Schedule.counts` with this host's protected tokens and the
        method's cap (ToMe, Bolya et al., ICLR 2023: bipartite matching merges at most half of the
        unprotected tokens). ``n0`` defaults to the model's own image size (prefix tokens + patches).
        """
        return _counts(self._host, self.settings, _n0(self._host) if n0 is None else n0)

    # -- hooks --------------------------------------------------------------------------------
    def _install(self) -> None:
        h = self._host
        self.add_hook(h.embed, "forward_pre", self._check_image, with_kwargs=True)
        for i, (layer, qs, ks) in enumerate(zip(h.layers, h.q_src, h.k_src, strict=True)):
            self.add_hook(layer, "forward_pre", self._pre_hook(i), with_kwargs=True)
            self.add_hook(layer, "forward", self._post_hook(i))
            self.add_hook(qs, "forward", self._capture(i, "q"))
            self.add_hook(ks, "forward", self._capture(i, "k"))
        self.add_hook(self.model, "forward", self._finish, always_call=True)

    def _finish(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        """End a call the last block did not finish (the forward raised, or blocks were skipped)."""
        if self.call_state() is not None:
            self.end_call()

    def _check_image(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.settings.enabled:
            return
        h = self._host
        x = args[0] if args else kwargs.get("pixel_values", kwargs.get("x"))
        if not isinstance(x, Tensor) or x.ndim != 4:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise UniprunerError(f"{h.cls_name} takes images [B, C, H, W]; got {shape}")
        if h.kind == "timm" and x.shape[-1] == h.channels and x.shape[1] != h.channels:
            return  # timm NHWC after an earlier stage: nothing to check
        dynamic = h.dynamic_size or bool(kwargs.get("interpolate_pos_encoding"))
        size_ok = tuple(x.shape[-2:]) == h.image_size or (
            dynamic and x.shape[-2] % h.patch_size[0] == 0 and x.shape[-1] % h.patch_size[1] == 0)
        if x.shape[1] != h.channels or not size_ok:
            extra = ("pass interpolate_pos_encoding=True for other multiples of the patch size"
                     if h.kind == "transformers" else "build the timm model with dynamic_img_size=True for other sizes")
            raise UniprunerError(
                f"{h.cls_name} accepts images of {h.channels}x{h.image_size[0]}x{h.image_size[1]} "
                f"(patch {h.patch_size[0]}x{h.patch_size[1]}); got {tuple(x.shape[1:])}. Resize them, or {extra}"
            )

    def _begin(self, x: Tensor) -> _State | None:
        """Block 0: start this call's state with one read of the settings (None when disabled)."""
        self.end_call()  # a call that never finished in this context (e.g. forward_features raised)
        settings = self.settings
        if not settings.enabled:
            return None
        b, n0 = x.shape[:2]
        owner = torch.arange(n0, device=x.device).expand(b, n0)
        plan = _removals(self._host, settings, n0)
        st = _State(settings=settings, n0=n0, plan=plan, n=n0, owner=owner)
        self.begin_call(st)
        return st

    def _pre_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if not isinstance(x, Tensor):
                return None
            st = self._begin(x) if layer == 0 else self.call_state()
            if st is None:
                return None
            if x.shape[1] != st.n:
                self.end_call()
                raise UniprunerError(
                    f"block {layer} received {x.shape[1]} tokens but the patched model expected {st.n}; "
                    "run the whole model (blocks called one by one are not supported while patched)"
                )
            st.q = st.k = None
            st.prev = x if st.plan[layer] > 0 else None
            st.bias = None
            if not (st.settings.prop_attn and st.merged and st.sizes is not None):
                return None
            bias = st.sizes.to(x.dtype).log().transpose(1, 2).unsqueeze(1)  # [B, 1, 1, n]
            st.bias = bias
            if self._host.kind == "timm":
                if kwargs.get("attn_mask") is not None:
                    raise UniprunerError("attention masks are not supported on a patched timm ViT once tokens merged")
                return args, {**kwargs, "attn_mask": bias}
            if len(args) > 1:
                if args[1] is not None:
                    raise UniprunerError("attention masks are not supported on a patched ViT once tokens merged")
                return (args[0], bias, *args[2:]), kwargs
            if kwargs.get("attention_mask") is not None:
                raise UniprunerError("attention masks are not supported on a patched ViT once tokens merged")
            return args, {**kwargs, "attention_mask": bias}

        return hook

    def _capture(self, layer: int, which: str) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Tensor) -> None:
            st = self.call_state()
            if st is not None and st.plan[layer] > 0:
                setattr(st, which, output)

        return hook

    def _post_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            st = self.call_state()
            if st is None:
                return None
            x = output if isinstance(output, Tensor) else output[0]
            n_in = x.shape[1]
            changed = False
            if st.plan[layer] > 0:
                x = self._reduce(x, st.plan[layer], st)
                changed = True
            st.q = st.k = st.prev = st.bias = None
            st.n = x.shape[1]
            st.records.append(LayerTokens(layer, n_in, st.n, st.owner))
            if layer == self.n_layers - 1:
                if st.settings.return_unmerged and st.n != st.n0:
                    x = self._spread(x, st)
                    changed = True
                self.publish(ViTStats(tuple(st.records)))
                self.end_call()
            if not changed:
                return None
            return x if isinstance(output, Tensor) else (x, *output[1:])

        return hook

    # -- reduction ----------------------------------------------------------------------------
    def _attention(self, st: _State, full: bool) -> Tensor:
        h = self._host
        if st.q is None or st.k is None:
            raise UniprunerError(
                f"{st.settings.method.name!r} needs the block's queries and keys, which were not captured")
        q, k = h.split_heads(st.q), h.split_heads(st.k)  # [B, n, H, Dh]
        if full:
            logits = torch.einsum("bqhd,bkhd->bhqk", q, k) * h.scaling
        else:  # only the CLS row: O(n) instead of O(n^2)
            logits = torch.einsum("bhd,bkhd->bhk", q[:, 0], k).unsqueeze(2) * h.scaling
        if st.bias is not None:
            logits = logits + st.bias
        attn = logits.float().softmax(dim=-1)
        if full:
            return attn.mean(dim=1)  # [B, n, n]
        # EViT reads row cls_index=0 of a square map: an expanded view, no copy
        return attn.expand(-1, -1, attn.shape[-1], -1)

    def _reduce(self, x: Tensor, r: int, st: _State) -> Tensor:
        h = self._host
        m = st.settings.method
        n = x.shape[1]
        with torch.no_grad():
            if isinstance(m, ToMe):
                if st.k is None:
                    raise UniprunerError("tome needs the block's keys, which were not captured")
                metric = h.split_heads(st.k).mean(dim=2)
                merge, _ = dataclasses.replace(m, protected=h.protected).match(metric, r)
                plan = MergePlan.from_fn(merge)
                new_x, sizes = _reduce.merge_wavg(plan, x, st.sizes)
            else:
                keep = n - r - (1 if _limit(m) == "fuse" else 0)
                lm = dataclasses.replace(m, budget=Budget(keep=keep), protected=h.protected)
                signals: dict[str, Any] = {}
                if m.name in _KEY_METHODS and st.k is not None:
                    signals["keys"] = st.k if h.kind == "transformers" else h.split_heads(st.k).flatten(2)
                if isinstance(m, CLSAttention):
                    signals["attn"] = self._attention(st, full=False)
                elif isinstance(m, ZeroTPrune):
                    signals["attn"] = self._attention(st, full=True)
                if "previous" in m.requires:
                    signals["previous"] = st.prev
                red = lm.reduce(x, sizes=st.sizes, **signals)
                if red.mask is not None and not bool(red.mask.all()):
                    raise UniprunerError(f"{m.name!r} returned a ragged batch; the ViT adapter needs equal counts")
                plan = red.plan if red.plan is not None else _plan_from_indices(red.indices, n)
                new_x, sizes = red.tokens, red.sizes
            owner = st.owner
            new_owner = torch.where(owner >= 0, plan.dst.gather(1, owner.clamp(min=0)), owner)
            if st.settings.return_unmerged:
                lost = (owner >= 0) & (new_owner < 0)
                if bool(lost.any()):
                    if st.dense is None:
                        st.dense = x.new_zeros(x.shape[0], st.n0, x.shape[2])
                    st.dense = torch.where(lost.unsqueeze(-1), batched_gather(x, owner.clamp(min=0)), st.dense)
            st.owner = new_owner
            st.sizes = sizes
            st.merged = st.merged or m.reduction != "drop"
        return new_x

    def _spread(self, x: Tensor, st: _State) -> Tensor:
        out = batched_gather(x, st.owner.clamp(min=0))
        if st.dense is not None:
            out = torch.where((st.owner >= 0).unsqueeze(-1), out, st.dense)
        return out

    def unmerge(self, tokens: Tensor) -> Tensor:
        """Spread ``tokens [B, n, C]`` (aligned with the last block's output) over the ``N0`` original tokens.

        ToMe's source-tracking unmerge (Bolya et al., ICLR 2023) for dense outputs, using the
        last finished call's :meth:`stats`. Dropped tokens get zeros here (with
        ``return_unmerged=True`` the model itself fills them with their state at the block that
        dropped them).
        """
        last = self.last_stats
        if last is None:
            raise UniprunerError("run the patched model once before unmerging its outputs")
        owner = last.layers[-1].owner
        if tokens.ndim < 3 or tokens.shape[0] != owner.shape[0] or tokens.shape[1] != last.n_out:
            raise UniprunerError(
                f"unmerge expects [B, n, C] = [{owner.shape[0]}, {last.n_out}, C] from the last call, "
                f"got {tuple(tokens.shape)}"
            )
        out = batched_gather(tokens, owner.clamp(min=0))
        return out * (owner >= 0).reshape(*owner.shape, *([1] * (tokens.ndim - 2))).to(out.dtype)


def _n0(host: Host) -> int:
    """Tokens entering the first block at the model's own image size (prefix tokens + patches)."""
    return host.protected + (host.image_size[0] // host.patch_size[0]) * (host.image_size[1] // host.patch_size[1])


def _plan_args(host: Host, settings: ViTSettings) -> dict[str, Any]:
    """The keywords of :meth:`Schedule.removals` for this host and method."""
    m = settings.method
    return {"n_layers": len(host.layers), "protected": host.protected, "limit": _limit(m), "who": repr(m.name)}


def _removals(host: Host, settings: ViTSettings, n0: int) -> list[int]:
    """Tokens each block removes from an input of ``n0`` tokens."""
    return settings.schedule.removals(n0, **_plan_args(host, settings))


def _counts(host: Host, settings: ViTSettings, n0: int) -> list[tuple[int, int]]:
    """``(tokens in, tokens out)`` of every block for an input of ``n0`` tokens."""
    return settings.schedule.counts(n0, **_plan_args(host, settings))


def _plan_from_indices(indices: Tensor, n: int) -> MergePlan:
    """The plan of a drop (kept -> its slot, others -> -1) or fuse (others -> the last slot)."""
    b, k = indices.shape
    fused = bool((indices[:, -1] < 0).all()) and k > 0
    keep = indices[:, :-1] if fused else indices
    kk = keep.shape[1]
    dst = torch.full((b, n), kk if fused else -1, dtype=torch.long, device=indices.device)
    dst.scatter_(1, keep, torch.arange(kk, device=indices.device).expand(b, kk))
    return MergePlan(dst, kk + (1 if fused else 0))


def _resolve_method(method: str | Method, params: dict[str, Any], host: Host) -> Method:
    if isinstance(method, Method):
        if params:
            raise UniprunerError("pass method parameters either in the Method instance or as keywords, not both")
        m = method
    elif isinstance(method, str):
        if method not in VIT_METHODS:
            raise UniprunerError(f"unknown ViT method {method!r}; supported: {', '.join(VIT_METHODS)}")
        for bad in ("threshold", "protected"):
            if bad in params:
                raise UniprunerError(
                    f"{bad}= is set by the ViT adapter per block; use ratio=, keep=, budget=, schedule= or r= "
                    "(protected tokens come from the host)"
                )
        m = _make_method(method, **params)
    else:
        raise UniprunerError(f"method must be a name or a unipruner Method, got {type(method).__name__}")
    if m.name not in VIT_METHODS:
        raise UniprunerError(f"method {m.name!r} does not run on ViTs; supported: {', '.join(VIT_METHODS)}")
    if isinstance(m, CLSAttention) and not host.has_cls:
        raise UniprunerError(
            f"{m.name!r} scores patches by CLS attention, but {host.cls_name} has no CLS token; "
            "use e.g. 'zero_tprune', 'tome' or 'divprune'"
        )
    if isinstance(m, CLSAttention) and m.cls_index != 0:
        raise UniprunerError("the CLS token is the first token of every supported host; keep cls_index=0")
    return m



def _r_schedule(value: RSpec, n_layers: int) -> Schedule:
    """``r=`` sugar: an int, ``(r, inflection)`` (also written ``(16, -1)``) or one count per block."""
    if isinstance(value, Schedule):
        raise UniprunerError("pass a Schedule as schedule=, not r=")
    if isinstance(value, tuple) and len(value) == 2 and (n_layers != 2 or isinstance(value[1], float)):
        return Schedule.remove(int(value[0]), inflection=float(value[1]))
    if isinstance(value, (list, tuple)):
        return Schedule.remove([int(v) for v in value])
    return Schedule.remove(value)


def _schedule(host: Host, *, r: RSpec | None, ratio: float | None, keep: int | None,
              budget: Budget | float | int | None, schedule: ScheduleSpec | None) -> Schedule | None:
    """The one :class:`Schedule` the budget keywords describe (None when none is given)."""
    given = [k for k, v in (("r", r), ("ratio", ratio), ("keep", keep), ("budget", budget), ("schedule", schedule))
             if v is not None]
    if len(given) > 1:
        raise UniprunerError(f"give one of r=, ratio=, keep=, budget= or schedule=, not {given}")
    n_layers = len(host.layers)
    if r is not None:
        return _r_schedule(r, n_layers)
    if ratio is not None or keep is not None or budget is not None:
        return Schedule.constant(Budget.coerce(budget, ratio=ratio, keep=keep), n_layers)
    if schedule is None:
        return None
    sched = schedule if isinstance(schedule, Schedule) else Schedule(list(schedule))
    if sched.kind == "budgets":
        if len(sched.budgets) != n_layers:
            raise UniprunerError(f"schedule needs one entry per block ({n_layers}), got {len(sched.budgets)}")
        if any(b is not None and (b.data_dependent or b.rows is not None) for b in sched.budgets):
            raise UniprunerError("the ViT adapter needs equal token counts across a batch: use ratio or keep budgets")
    return sched


def _settings(host: Host, current: ViTSettings | None, method: str | Method | None, *, r: RSpec | None,
              ratio: float | None, keep: int | None, budget: Budget | float | int | None,
              schedule: ScheduleSpec | None, prop_attn: bool | None, return_unmerged: bool | None,
              enabled: bool | None, params: dict[str, Any]) -> ViTSettings:
    """Validate :func:`patch` / :meth:`ViTHandle.configure` keywords into one :class:`ViTSettings`."""
    if current is None or method is not None or params:
        name: str | Method = method if method is not None else (current.method.name if current else "tome")
        new_method = _resolve_method(name, params, host)
    else:
        new_method = current.method
    sched = _schedule(host, r=r, ratio=ratio, keep=keep, budget=budget, schedule=schedule)
    if sched is None:
        if current is None:
            raise UniprunerError(
                "say how many tokens to remove or keep: r= (per block), ratio= / keep= / budget= (kept by every "
                "block), or schedule= (one budget per block, or Schedule.geometric(final=...))"
            )
        sched = current.schedule
    flags: dict[str, bool] = {}
    for flag_name, flag in (("prop_attn", prop_attn), ("return_unmerged", return_unmerged), ("enabled", enabled)):
        if flag is not None and not isinstance(flag, bool):
            raise UniprunerError(f"{flag_name} must be a bool, got {flag!r}")
        flags[flag_name] = flag if flag is not None else (
            getattr(current, flag_name) if current is not None else flag_name != "return_unmerged")
    if isinstance(new_method, ToMe) and new_method.reduction != "merge":
        raise UniprunerError(
            "tome merges tokens; reduction must be 'merge' (use 'random' or another method to drop)"
        )
    new = ViTSettings(method=new_method, schedule=sched, **flags)
    _removals(host, new, _n0(host))  # check the budget against the model's own image size now
    return new


def find(model: nn.Module) -> ViTHandle | None:
    """The active :class:`ViTHandle` patching ``model``, or None (found through its hooks)."""
    return find_handle(model, ViTHandle)


def patch(model: nn.Module, method: str | Method = "tome", *, r: RSpec | None = None, ratio: float | None = None,
          keep: int | None = None, budget: Budget | float | int | None = None, schedule: ScheduleSpec | None = None,
          prop_attn: bool = True, return_unmerged: bool = False, enabled: bool = True, **params: Any) -> ViTHandle:
    """Prune or merge tokens between the encoder blocks of one vision-transformer instance.

    Token Merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023), Zero-TPrune
    (Wang et al., CVPR 2024), EViT (Liang et al., ICLR 2022), DivPrune (Alvar et al., CVPR 2025),
    DART (Wen et al., 2025) and the other ViT methods of the registry, on Hugging Face ViT, DeiT,
    CLIP and SigLIP vision towers, DINOv2 (with or without registers) and timm
    ``VisionTransformer``. Block ``l`` reduces its output tokens; the next blocks run on fewer.

    Parameters
    ----------
    model : nn.Module
        One of :data:`~unipruner.adapters.vit.SUPPORTED_HOSTS`.
    method : str or Method
        A name from :data:`VIT_METHODS` or a registry instance (default ``"tome"``).
    ratio : float
        Fraction of its unprotected tokens every block keeps (``ratio=0.9``: each block keeps 90 %).
    keep : int
        Unprotected tokens every block keeps (in practice the first block reduces to ``keep``).
    budget : Budget
        The same, as a :class:`~unipruner.select.Budget` (ratio or keep).
    schedule : Schedule or list
        One budget per block (``None`` = no reduction there), applied to that block's unprotected
        tokens, or a rule: :meth:`Schedule.geometric(final=0.25) <unipruner.select.Schedule.geometric>`
        leaves ``final`` of the unprotected tokens after the last block,
        :meth:`Schedule.remove(16) <unipruner.select.Schedule.remove>` is ToMe's ``r``.
    r : int, (int, float) or list of int
        Sugar for ``schedule=Schedule.remove(...)``: tokens removed by every block (ToMe's ``r``),
        ``(r, inflection)`` for a linearly changing schedule or one count per block. As in ToMe,
        later blocks are capped silently when too few tokens remain; a first reduction that cannot
        be met is an error.
    prop_attn : bool
        Proportional attention for merged tokens (an additive ``log(size)`` mask).
    return_unmerged : bool
        After the last block, spread the tokens back over the full token grid (merged tokens
        are copied to every member, dropped tokens carry their state from the block that
        dropped them), so heads, poolers and dense users see ``N0`` tokens.
    enabled : bool
        False makes the hooks pass everything through (the unpatched model, hooks still in place).
    **params
        Method parameters (e.g. ``reduction="merge"``, ``seed=1``, ``n_pivots=4``).

    Give exactly one of ``ratio``, ``keep``, ``budget``, ``schedule`` or ``r``.

    Returns
    -------
    ViTHandle
        A context manager (leaving it unpatches) with ``configure``, ``stats``, ``describe``.
        Patching an already patched model with identical settings returns the same handle; with
        other settings it raises (use ``configure``).

    Examples
    --------
    >>> import torch, unipruner.adapters.vit as vit
    >>> from transformers import ViTConfig, ViTModel
    >>> m = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...              intermediate_size=64, image_size=32, patch_size=8)).eval()
    >>> with vit.patch(m, "tome", r=4) as h:
    ...     m(torch.randn(1, 3, 32, 32)).last_hidden_state.shape, h.stats().tokens
    (torch.Size([1, 9, 32]), [(17, 13), (13, 9)])
    >>> vit.find(m) is None
    True
    """
    host = find_host(model)
    settings = _settings(host, None, method, r=r, ratio=ratio, keep=keep, budget=budget, schedule=schedule,
                         prop_attn=prop_attn, return_unmerged=return_unmerged, enabled=enabled, params=params)
    existing = reuse_or_refuse(model, ViTHandle, settings)
    if existing is not None:
        return existing
    handle = ViTHandle(model, host, settings)
    handle._install()
    return handle


def unpatch(model: nn.Module) -> bool:
    """Remove every hook :func:`patch` added; returns False when the model was not patched.

    The model's parameters and modules are never touched, so afterwards it computes exactly
    what it computed before patching (Bolya et al. 2023's ToMe has no such undo).
    """
    handle = find(model)
    return handle.unpatch() if handle is not None else False


def kept_tokens(model: nn.Module) -> list[LayerTokens]:
    """Which original tokens survived each block in the last forward call of a patched model.

    Shorthand for ``unipruner.vit.find(model).stats().layers``: the bookkeeping of ToMe's source
    tracking (Bolya et al., ICLR 2023) as an owner map: ``kept_tokens(model)[l].owner[b, i]`` is
    the position, after block ``l``, of the token standing for original token ``i`` (``-1`` if it
    was dropped).
    """
    handle = find(model)
    if handle is None:
        raise UniprunerError(f"{type(model).__name__} is not patched; call unipruner.vit.patch(model, ...) first")
    return list(handle.stats().layers)
