"""Per-instance patching of vision transformers: prune or merge tokens between encoder blocks.

Nothing of the host's code is copied or replaced. :func:`patch` registers forward hooks on
*this* model's modules only:

* a pre-hook on the patch embedding validates the image size;
* a pre-hook on every encoder block resets the per-call state (block 0), keeps the block input
  (for methods that compare layers) and, once tokens have been merged, passes ToMe's
  proportional attention as an additive ``log(size)`` bias through the block's own attention-mask
  argument (a float mask keeps SDPA usable);
* hooks on the query/key projections keep references to the queries and keys the block computes
  anyway (ToMe's metric is the head-averaged keys; EViT and Zero-TPrune rebuild only the attention
  rows they need from them);
* a hook on every block's output reduces its tokens with a :mod:`unipruner.methods` method
  (select + drop / merge / fuse), tracks sizes and which original patches each token stands for,
  and after the last block optionally spreads the tokens back over the full patch grid.

:func:`unpatch` removes the hooks; the model is then exactly the unpatched model again.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ... import reduce as _reduce
from ..._merge import MergePlan
from ..._ops import batched_gather
from ...errors import UniprunerError
from ...methods import REGISTRY, CLSAttention, MergingMethod, Method, ToMe, ZeroTPrune
from ...methods import method as _make_method
from ...select import Budget, Schedule, r_schedule
from ._hosts import Host, find_host

__all__ = ["VIT_METHODS", "LayerTokens", "ViTPatch", "kept_tokens", "patch", "patched", "settings", "unpatch"]

_ATTR = "_unipruner_vit"

#: Registry methods the ViT adapter runs (every method whose domains include "vit", except the
#: 2-D ``tomesd``, whose windows need an intact token grid at every layer).
VIT_METHODS: tuple[str, ...] = tuple(sorted(n for n, c in REGISTRY.items() if "vit" in c.domains and n != "tomesd"))
_KEY_METHODS = ("tome", "dart")  # methods whose similarity metric is the attention keys


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


@dataclass
class _State:
    """Per-forward state (reset by block 0's pre-hook)."""

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


class ViTPatch:
    """The handle :func:`patch` returns: a report of what was patched and the live settings.

    Settings can be changed between calls (``p.r = 8``, ``p.ratio = 0.5``, ``p.method = "evit"``,
    ``p.configure(...)``); each model instance has its own handle, so two patched models never
    interfere. Use :func:`unpatch` (or the :func:`patched` context manager) to restore the model.

    Attributes
    ----------
    host : str
        The host class name.
    blocks : list of str
        Qualified names of the patched encoder blocks.
    protected : int
        Leading tokens that are never pruned (CLS, distillation token, registers).
    prop_attn : bool
        Proportional attention (ToMe): add ``log(size)`` to the attention logits of merged tokens.
    return_unmerged : bool
        Spread the last block's tokens back over the full token grid (dense outputs).
    enabled : bool
        False makes the hooks pass everything through untouched.
    """

    def __init__(self, model: nn.Module, host: Host) -> None:
        self._model = model
        self._host = host
        self._handles: list[Any] = []
        self._method: Method = ToMe()
        self._spec: tuple[str, Any] = ("r", 0)
        self._r_list: list[int] = [0] * len(host.layers)
        self.prop_attn = True
        self.return_unmerged = False
        self.enabled = True
        self._state: _State | None = None
        self._last: list[LayerTokens] = []

    # -- report -------------------------------------------------------------------------------
    @property
    def host(self) -> str:
        return self._host.cls_name

    @property
    def blocks(self) -> list[str]:
        return list(self._host.layer_names)

    @property
    def protected(self) -> int:
        return self._host.protected

    @property
    def n_layers(self) -> int:
        return len(self._host.layers)

    def __repr__(self) -> str:
        kind, value = self._spec
        return (f"ViTPatch(host={self.host}, blocks={self.n_layers}, method={self._method.name!r}, "
                f"reduction={self._method.reduction!r}, {kind}={value!r}, protected={self.protected}, "
                f"prop_attn={self.prop_attn}, return_unmerged={self.return_unmerged})")

    # -- settings -----------------------------------------------------------------------------
    @property
    def method(self) -> Method:
        """The method (a registry instance; its budget is set per layer by the schedule)."""
        return self._method

    @method.setter
    def method(self, value: str | Method) -> None:
        self.configure(method=value)

    @property
    def r(self) -> int | tuple[int, float] | list[int] | None:
        """Tokens removed per block (ToMe's ``r``; an int, ``(r, inflection)`` or a list)."""
        return self._spec[1] if self._spec[0] == "r" else None

    @r.setter
    def r(self, value: int | tuple[int, float] | Sequence[int]) -> None:
        self.configure(r=value)

    @property
    def ratio(self) -> float | None:
        """Fraction of the (unprotected) tokens left after the last block."""
        return self._spec[1] if self._spec[0] == "ratio" else None

    @ratio.setter
    def ratio(self, value: float) -> None:
        self.configure(ratio=value)

    @property
    def schedule(self) -> tuple[Budget | None, ...] | None:
        """One budget per block (applied to that block's unprotected tokens), or None."""
        return self._spec[1] if self._spec[0] == "schedule" else None

    @schedule.setter
    def schedule(self, value: Schedule | Sequence[Budget | float | int | None]) -> None:
        self.configure(schedule=value)

    def configure(self, method: str | Method | None = None, *, r: int | tuple[int, float] | Sequence[int] | None = None,
                  ratio: float | None = None, schedule: Schedule | Sequence[Budget | float | int | None] | None = None,
                  prop_attn: bool | None = None, return_unmerged: bool | None = None,
                  **params: Any) -> ViTPatch:
        """Change settings (validated before anything changes); returns ``self``.

        The live knob of ToMe (Bolya et al., ICLR 2023: ``model.r = ...``), per instance. Parameters
        are those of :func:`patch`; ``None`` keeps the current value.
        """
        new_method = self._method
        if method is not None or params:
            new_method = _resolve_method(self._method.name if method is None else method, params, self._host)
        given = [(k, v) for k, v in (("r", r), ("ratio", ratio), ("schedule", schedule)) if v is not None]
        if len(given) > 1:
            raise UniprunerError(f"give one of r=, ratio= or schedule=, not {[k for k, _ in given]}")
        spec = self._spec if not given else _resolve_spec(*given[0], self.n_layers)
        for name, flag in (("prop_attn", prop_attn), ("return_unmerged", return_unmerged)):
            if flag is not None and not isinstance(flag, bool):
                raise UniprunerError(f"{name} must be a bool, got {flag!r}")
        if isinstance(new_method, ToMe) and new_method.reduction != "merge":
            raise UniprunerError(
                "tome merges tokens; reduction must be 'merge' (use 'random' or another method to drop)"
            )
        self._method, self._spec = new_method, spec
        self._r_list = r_schedule(spec[1], self.n_layers) if spec[0] == "r" else []
        if prop_attn is not None:
            self.prop_attn = prop_attn
        if return_unmerged is not None:
            self.return_unmerged = return_unmerged
        # check the budget against the model's own image size now (not only at the first call)
        n0 = self._host.protected + (self._host.image_size[0] // self._host.patch_size[0]) * (
            self._host.image_size[1] // self._host.patch_size[1])
        self.tokens_per_layer(n0)
        return self

    # -- token plan ---------------------------------------------------------------------------
    def _removals(self, n0: int) -> list[int]:
        p, nl = self._host.protected, self.n_layers
        m = self._method
        bipartite = isinstance(m, ToMe)
        fuse = m.reduction == "fuse" and not isinstance(m, MergingMethod)
        floor = max(p, 1)
        kind, value = self._spec
        out: list[int] = []
        n = n0
        first = True
        for layer in range(nl):
            if kind == "r":
                want = self._r_list[layer]
            elif kind == "ratio":
                target = max(round(float(value) ** ((layer + 1) / nl) * (n0 - p)), 0 if p else 1)
                want = max(n - p - target, 0)
            else:
                b = value[layer]
                want = 0 if b is None else (n - p) - max(b.count(n - p), 0 if p else 1)
            if bipartite:
                cap, why = (n - p) // 2, "bipartite matching merges at most half of the unprotected tokens"
            elif fuse:
                cap, why = n - floor - 1, "fusing keeps the protected tokens plus one fused token"
            else:
                cap, why = n - floor, f"the {floor} protected token(s) always stay"
            cap = max(cap, 0)
            if want > cap and (kind == "schedule" or (kind == "r" and first)):
                raise UniprunerError(
                    f"{kind}={value!r} asks block {layer} to remove {want} of its {n} tokens, but "
                    f"{m.name!r} can remove at most {cap} there ({why}); lower {kind}"
                )
            want = min(max(want, 0), cap)
            if want > 0:
                first = False
            out.append(want)
            n -= want
        return out

    def tokens_per_layer(self, n0: int | None = None) -> list[tuple[int, int]]:
        """``(tokens in, tokens out)`` of every block for an input of ``n0`` tokens.

        ToMe's schedule arithmetic (Bolya et al., ICLR 2023: ``r`` per block, capped at half of the
        unprotected tokens for bipartite matching). ``n0`` defaults to the model's own image size
        (prefix tokens + patches).
        """
        if n0 is None:
            hs, ws = self._host.image_size
            ph, pw = self._host.patch_size
            n0 = self._host.protected + (hs // ph) * (ws // pw)
        out, n = [], n0
        for r in self._removals(n0):
            out.append((n, n - r))
            n -= r
        return out

    @property
    def last(self) -> list[LayerTokens]:
        """Per-block survivors of the last forward call (see :func:`kept_tokens`)."""
        return list(self._last)

    # -- hooks --------------------------------------------------------------------------------
    def _install(self) -> None:
        h = self._host
        self._handles.append(h.embed.register_forward_pre_hook(self._check_image, with_kwargs=True))
        for i, (layer, qs, ks) in enumerate(zip(h.layers, h.q_src, h.k_src, strict=True)):
            self._handles.append(layer.register_forward_pre_hook(self._pre_hook(i), with_kwargs=True))
            self._handles.append(layer.register_forward_hook(self._post_hook(i)))
            self._handles.append(qs.register_forward_hook(self._capture(i, "q")))
            self._handles.append(ks.register_forward_hook(self._capture(i, "k")))

    def _remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._state = None

    def _check_image(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self.enabled:
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

    def _start(self, x: Tensor) -> _State:
        b, n0 = x.shape[:2]
        owner = torch.arange(n0, device=x.device).expand(b, n0)
        return _State(n0=n0, plan=self._removals(n0), n=n0, owner=owner)

    def _pre_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            if not self.enabled:
                return None
            x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
            if not isinstance(x, Tensor):
                return None
            if layer == 0:
                self._state = self._start(x)
            st = self._state
            if st is None:
                return None
            if x.shape[1] != st.n:
                self._state = None
                raise UniprunerError(
                    f"block {layer} received {x.shape[1]} tokens but the patched model expected {st.n}; "
                    "run the whole model (blocks called one by one are not supported while patched)"
                )
            st.q = st.k = None
            st.prev = x if st.plan[layer] > 0 else None
            st.bias = None
            if not (self.prop_attn and st.merged and st.sizes is not None):
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
            st = self._state
            if st is not None and self.enabled and st.plan[layer] > 0:
                setattr(st, which, output)

        return hook

    def _post_hook(self, layer: int) -> Any:
        def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> Any:
            st = self._state
            if st is None or not self.enabled:
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
                if self.return_unmerged and st.n != st.n0:
                    x = self._spread(x, st)
                    changed = True
                self._last = st.records
                self._state = None
            if not changed:
                return None
            return x if isinstance(output, Tensor) else (x, *output[1:])

        return hook

    # -- reduction ----------------------------------------------------------------------------
    def _attention(self, st: _State, full: bool) -> Tensor:
        h = self._host
        if st.q is None or st.k is None:
            raise UniprunerError(f"{self._method.name!r} needs the block's queries and keys, which were not captured")
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
        m = self._method
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
                keep = n - r - (1 if m.reduction == "fuse" and not isinstance(m, MergingMethod) else 0)
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
            if self.return_unmerged:
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

        ToMe's source-tracking unmerge (Bolya et al., ICLR 2023) for dense outputs. Dropped tokens
        get zeros here (with ``return_unmerged=True`` the model itself fills them with their state
        at the block that dropped them).
        """
        if not self._last:
            raise UniprunerError("run the patched model once before unmerging its outputs")
        owner = self._last[-1].owner
        if tokens.ndim < 3 or tokens.shape[0] != owner.shape[0] or tokens.shape[1] != self._last[-1].n_out:
            raise UniprunerError(
                f"unmerge expects [B, n, C] = [{owner.shape[0]}, {self._last[-1].n_out}, C] from the last call, "
                f"got {tuple(tokens.shape)}"
            )
        out = batched_gather(tokens, owner.clamp(min=0))
        return out * (owner >= 0).reshape(*owner.shape, *([1] * (tokens.ndim - 2))).to(out.dtype)


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
        for bad in ("budget", "keep", "threshold", "protected"):
            if bad in params:
                raise UniprunerError(
                    f"{bad}= is set by the ViT adapter per block; use r=, ratio= or schedule= (protected tokens "
                    "come from the host)"
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


def _resolve_spec(kind: str, value: Any, n_layers: int) -> tuple[str, Any]:
    if kind == "r":
        if isinstance(value, tuple) and len(value) == 2 and (n_layers != 2 or isinstance(value[1], float)):
            value = (int(value[0]), float(value[1]))  # (r, inflection), also when written (16, -1)
        elif isinstance(value, (list, tuple)):
            value = [int(v) for v in value]
        r_schedule(value, n_layers)  # validates
        return kind, value
    if kind == "ratio":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < float(value) <= 1.0:
            raise UniprunerError(f"ratio is the fraction of tokens left after the last block, in (0, 1]; got {value!r}")
        return kind, float(value)
    entries = list(value.budgets if isinstance(value, Schedule) else value)
    if len(entries) != n_layers:
        raise UniprunerError(f"schedule needs one entry per block ({n_layers}), got {len(entries)}")
    budgets = tuple(None if b is None else Budget.coerce(b) for b in entries)
    if any(b is not None and b.data_dependent for b in budgets):
        raise UniprunerError("the ViT adapter needs equal token counts across a batch: use ratio or keep budgets")
    return kind, budgets


def _handle(model: object) -> ViTPatch:
    handle = getattr(model, _ATTR, None) if isinstance(model, nn.Module) else None
    if not isinstance(handle, ViTPatch):
        raise UniprunerError(f"{type(model).__name__} is not patched; call unipruner.vit.patch(model, ...) first")
    return handle


def patch(model: nn.Module, method: str | Method = "tome", *, r: int | tuple[int, float] | Sequence[int] | None = None,
          ratio: float | None = None, schedule: Schedule | Sequence[Budget | float | int | None] | None = None,
          prop_attn: bool = True, return_unmerged: bool = False, **params: Any) -> ViTPatch:
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
    r : int, (int, float) or list of int
        Tokens removed by every block (ToMe's ``r``), ``(r, inflection)`` for a linearly changing
        schedule (:func:`unipruner.select.r_schedule`) or one count per block. As in ToMe, later
        blocks are capped silently when too few tokens remain; a first reduction that cannot be
        met is an error.
    ratio : float
        Fraction of the unprotected tokens left after the last block, reached geometrically
        (each block keeps ``ratio ** (1 / L)`` of its tokens).
    schedule : Schedule or list
        One budget per block (``None`` = no reduction there), applied to that block's
        unprotected tokens.
    prop_attn : bool
        Proportional attention for merged tokens (an additive ``log(size)`` mask).
    return_unmerged : bool
        After the last block, spread the tokens back over the full token grid (merged tokens
        are copied to every member, dropped tokens carry their state from the block that
        dropped them), so heads, poolers and dense users see ``N0`` tokens.
    **params
        Method parameters (e.g. ``reduction="merge"``, ``seed=1``, ``n_pivots=4``).

    Returns
    -------
    ViTPatch
        The live handle (report + settings). Patching an already patched model updates its
        settings and returns the same handle.

    Examples
    --------
    >>> import torch, unipruner.adapters.vit as vit
    >>> from transformers import ViTConfig, ViTModel
    >>> m = ViTModel(ViTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
    ...              intermediate_size=64, image_size=32, patch_size=8)).eval()
    >>> p = vit.patch(m, "tome", r=4)
    >>> p.tokens_per_layer()
    [(17, 13), (13, 9)]
    >>> m(torch.randn(1, 3, 32, 32)).last_hidden_state.shape
    torch.Size([1, 9, 32])
    >>> vit.unpatch(m)
    True
    """
    existing = getattr(model, _ATTR, None)
    if isinstance(existing, ViTPatch):
        return existing.configure(method, r=r, ratio=ratio, schedule=schedule, prop_attn=prop_attn,
                                  return_unmerged=return_unmerged, **params)
    host = find_host(model)
    if r is None and ratio is None and schedule is None:
        raise UniprunerError("say how many tokens to remove: r= (per block), ratio= (kept at the end) or schedule=")
    handle = ViTPatch(model, host)
    handle.configure(method, r=r, ratio=ratio, schedule=schedule, prop_attn=prop_attn,
                     return_unmerged=return_unmerged, **params)
    handle._install()
    model.__dict__[_ATTR] = handle
    return handle


def unpatch(model: nn.Module) -> bool:
    """Remove every hook :func:`patch` added; returns False when the model was not patched.

    The model's parameters and modules are never touched, so afterwards it computes exactly
    what it computed before patching (Bolya et al. 2023's ToMe has no such undo).
    """
    handle = getattr(model, _ATTR, None)
    if not isinstance(handle, ViTPatch):
        return False
    handle._remove()
    del model.__dict__[_ATTR]
    return True


@contextmanager
def patched(model: nn.Module, method: str | Method = "tome", **kwargs: Any) -> Iterator[ViTPatch]:
    """``with patched(model, "tome", r=16) as p: ...``: :func:`patch`, then :func:`unpatch` on exit.

    Token merging as in Bolya et al., ICLR 2023 (or any method of :func:`patch`).
    """
    was = isinstance(getattr(model, _ATTR, None), ViTPatch)
    handle = patch(model, method, **kwargs)
    try:
        yield handle
    finally:
        if not was:
            unpatch(model)


def kept_tokens(model: nn.Module) -> list[LayerTokens]:
    """Which original tokens survived each block in the last forward call of a patched model.

    The bookkeeping of ToMe's source tracking (Bolya et al., ICLR 2023) as an owner map:
    ``kept_tokens(model)[l].owner[b, i]`` is the position, after block ``l``, of the token
    standing for original token ``i`` (``-1`` if it was dropped).
    """
    handle = _handle(model)
    if not handle._last:
        raise UniprunerError("run the patched model once; kept_tokens reports the last forward call")
    return handle.last


def settings(model: nn.Module) -> ViTPatch:
    """The live :class:`ViTPatch` handle of a patched model (Bolya et al. 2023's ToMe knobs and more)."""
    return _handle(model)

