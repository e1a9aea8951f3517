"""Per-instance token reduction for diffusers denoisers, through module hooks (no copied forward).

:func:`patch` registers hooks on *this* denoiser's modules only, through a :class:`DiffusionHandle`
(the handle contract of :mod:`unipruner.hosts.patching`):

* a pre-hook on the denoiser binds the call's arguments by name (positional or keyword alike),
  reads the latent grid from them (``sample`` / ``hidden_states``; Flux's ``img_ids``), the
  denoising step from ``timestep``, and begins a per-call state (a context variable: concurrent
  calls never share it); a forward hook (``always_call``) publishes the stats and ends it;
* a pre-hook on every patched transformer block takes the block's input image tokens: the metric
  ToMeSD matches on (Bolya & Hoffman 2023 use the block input, not the normed one) and the grid of
  this resolution level, and makes this block's plan for this call;
* ``merge`` methods (``tomesd``, ``tome``): hooks on the self-attention (and optionally the
  cross-attention and the MLP) merge their input image tokens and unmerge their output, i.e.
  ``x + unmerge(attn(merge(norm(x))))`` exactly as ToMeSD, for ``BasicTransformerBlock`` (SD,
  SDXL, PixArt, DiT), SD3's joint blocks (the text tokens pass untouched) and Flux's double and
  single blocks (the rotary frequencies of ``[text, image]`` are gathered at each merged token's
  representative position; diffusers' Flux attention takes one set of frequencies for the whole
  batch, so Flux blocks use one merge map per batch, matched on the row-averaged features);
* ``kv`` methods (``todo``): the self-attention of ``BasicTransformerBlock`` (UNet, PixArt, DiT)
  receives its keys / values from the downsampled token grid through its own
  ``encoder_hidden_states`` argument, queries full (Smith et al. 2024); SD3 and Flux attend jointly
  over text and image and are refused;
* ``prune`` methods (token scorers: ``atedm``, ``random``): the block runs on the kept tokens only
  and every pruned token is recovered after it from its most similar kept token;
* ``reuse`` methods (``cat``): across the steps of one denoising run, each block recomputes only
  the tokens whose input changed most since the previous step (plus the stalest), and the others
  add the update the block gave them last time to their new input. The run's caches live in a
  context variable (one per thread / task), and a call whose timestep does not decrease starts a
  new run. Deviation from CAT (Cheng et al. 2025): the change is measured on each block's input,
  not on the model's noise prediction, and recomputed tokens attend only to each other.

Nothing is stored on the model; :func:`unpatch` removes the hooks and the model is exactly the
original again.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ... import reduce as _reduce
from ..._ops import batched_gather
from ...errors import UniprunerError
from ...hosts.patching import PatchHandle, find_handle, reuse_or_refuse
from ...methods import Method, ToMeSD
from ...select import Budget
from ._hosts import DiffusionHost, Site, find_host, level_of, site_grid, token_grid
from ._settings import DiffusionSettings, make_settings
from ._stats import DiffusionStats, SiteStats

__all__ = ["DiffusionHandle", "find", "patch", "unpatch"]


@dataclass
class _SiteCall:
    """One block's reduction in one call."""

    grid: tuple[int, int]
    factor: int
    ratio: float
    n: int
    text: int = 0  # leading text tokens inside the attention's hidden_states (Flux single blocks)
    plan: Any = None  # MergePlan (merge)
    rep: Tensor | None = None  # [B, n_out] representative positions (merge)
    keep: Tensor | None = None  # [B, K] kept positions (prune)
    inputs: Tensor | None = None  # [B, N, C] block input (prune recovery)
    kv_grid: tuple[int, int] | None = None
    queries: int = 0
    keys: int = 0
    dim: int = 0


@dataclass
class _Cache:
    """One block's memory of the previous denoising step (CAT-style reuse)."""

    inputs: Tensor  # [B, N, C] block input at the last step
    update: Tensor  # [B, N, C] block output - input at the last step
    staleness: Tensor  # [B, N] steps since each token was recomputed


@dataclass
class _Run:
    """State across the denoiser calls of one denoising run (reuse methods only), per context."""

    last_t: float | None = None
    shape: tuple[int, ...] = ()
    blocks: dict[int, _Cache] = field(default_factory=dict)


#: per-context map ``id(handle) -> _Run``: the run spans calls, so it outlives each call's state,
#: but like it belongs to one thread / task (two concurrent runs never mix their caches)
_RUNS: contextvars.ContextVar[dict[int, _Run] | None] = contextvars.ContextVar("unipruner_diffusion_runs",
                                                                             default=None)


@dataclass
class _Call:
    """Per-call state (one denoiser forward)."""

    settings: DiffusionSettings
    grid: tuple[int, int]
    ratio: float
    step: int | None
    progress: float
    seed: int
    batch: int
    sites: dict[int, _SiteCall] = field(default_factory=dict)
    map: tuple[Tensor, tuple[int, int]] | None = None
    token: Any = None
    run: _Run | None = None


def _hidden(args: tuple[Any, ...], kwargs: dict[str, Any], name: str = "hidden_states") -> Tensor:
    x = kwargs.get(name) if name in kwargs else (args[0] if args else None)
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise UniprunerError(f"expected {name} [B, N, C] in a patched block, got {type(x).__name__}")
    return x


def _with_hidden(args: tuple[Any, ...], kwargs: dict[str, Any], x: Tensor,
                 name: str = "hidden_states") -> tuple[tuple[Any, ...], dict[str, Any]]:
    if name in kwargs:
        kw = dict(kwargs)
        kw[name] = x
        return args, kw
    return (x, *args[1:]), kwargs


def _arg(args: tuple[Any, ...], kwargs: dict[str, Any], name: str, pos: int) -> Any:
    if name in kwargs:
        return kwargs[name]
    return args[pos] if len(args) > pos else None


def _self_attention_map(attn: nn.Module, x: Tensor) -> Tensor:
    """``[B, H, N, N]`` self-attention probabilities of ``attn`` (a diffusers ``Attention``) over the
    image tokens ``x``, from its own query / key projections of the layer-normed block input.

    The block's own norm (ada-norm modulation on PixArt / DiT) is not replayed: the scores use a
    plain layer norm of the block input, which keeps the hook free of the block's forward."""
    xn = F.layer_norm(x, (x.shape[-1],))
    q, k = attn.to_q(xn), attn.to_k(xn)  # type: ignore[operator]
    heads = int(getattr(attn, "heads", 1))
    b, n, _ = q.shape
    q = q.view(b, n, heads, -1).transpose(1, 2)
    k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
    scale = float(getattr(attn, "scale", q.shape[-1] ** -0.5))
    return torch.softmax((q @ k.transpose(-1, -2)).float() * scale, dim=-1)


def _timestep(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, Tensor):
        if value.numel() == 0 or value.is_meta:  # meta (FLOP counting): no value; the step is unknown
            return None
        return float(value.reshape(-1)[0])
    if isinstance(value, (int, float)):
        return float(value)
    return None


def _mix(*parts: int) -> int:
    """A deterministic 63-bit seed from integers (splitmix-style), for per-block, per-step generators."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h ^= (p & 0xFFFFFFFFFFFFFFFF) + 0x9E3779B97F4A7C15 + ((h << 6) & 0xFFFFFFFFFFFFFFFF) + (h >> 2)
        h &= 0xFFFFFFFFFFFFFFFF
    return h & 0x7FFFFFFFFFFFFFFF


class DiffusionHandle(PatchHandle):
    """The patch of one denoiser: hooks, settings, stats (see :mod:`unipruner.hosts.patching`).

    Attributes
    ----------
    host : DiffusionHost
        What was found in the denoiser.
    pipeline : object or None
        The pipeline that was patched (its scheduler locates the denoising step), if any.
    """

    domain = "diffusion"

    def __init__(self, target: Any, host: DiffusionHost, pipeline: Any, settings: DiffusionSettings) -> None:
        super().__init__(target, settings)
        self.host = host
        self.pipeline = pipeline
        self._sites: list[Site] = []
        self._plan_sites(settings)
        self._install()

    # -- what is patched ----------------------------------------------------------------------------
    def _plan_sites(self, s: DiffusionSettings) -> None:
        host = self.host
        factors = {site.index: level_of(host, site) or 1 for site in host.sites}
        finest = min(factors.values())
        limit = s.max_downsample if s.max_downsample is not None else finest
        chosen = [site for site in host.sites if factors[site.index] <= limit
                  and (s.blocks is None or site.index in s.blocks)]
        if s.blocks is not None:
            missing = [b for b in s.blocks if b >= len(host.sites)]
            if missing:
                raise UniprunerError(f"blocks {missing} do not exist: this {host.cls_name} has "
                                     f"{len(host.sites)} transformer blocks (0..{len(host.sites) - 1})")
        if not chosen:
            have = sorted(set(factors.values()))
            raise UniprunerError(
                f"nothing to reduce: this {host.cls_name} has attention only at downsample factors {have}, "
                f"and max_downsample={limit}"
                + (f" with blocks={list(s.blocks)}" if s.blocks is not None else "")
                + f"; raise max_downsample to {have[0]} or more (tomesd's default of 1 silently patches nothing "
                "on SDXL; unipruner refuses)"
            )
        if s.kind == "kv":
            # keys / values enter through the attention's own encoder_hidden_states argument, which only
            # the plain processors of BasicTransformerBlock read that way (SD3.5's image-only attn2 runs the
            # joint processor, which would treat them as text)
            usable = [site for site in chosen if site.role == "basic"]
            if not usable:
                raise UniprunerError(
                    f"{s.method.name!r} downsamples the keys / values of an image-only self-attention; this "
                    f"{host.cls_name} attends jointly over text and image tokens in every block (no such attention): "
                    "use 'tomesd' or 'tome' here"
                )
            chosen = usable
        if s.kind in ("prune", "reuse"):
            usable = [site for site in chosen if site.role == "basic"]
            if not usable:
                raise UniprunerError(
                    f"{s.method.name!r} prunes whole blocks' tokens, supported on BasicTransformerBlock hosts "
                    "(UNet, PixArt, DiT); use 'tomesd' or 'tome' on this " + host.cls_name
                )
            chosen = usable
        if s.kind == "merge" and not (s.merge_attn or s.merge_crossattn or s.merge_mlp):
            raise UniprunerError("merge_attn, merge_crossattn and merge_mlp are all False: nothing would be merged")
        self._factors = factors
        self._sites = chosen

    def _install(self) -> None:
        model = self.host.model
        self.add_hook(model, "forward_pre", self._on_call, with_kwargs=True)
        self.add_hook(model, "forward", self._on_return, with_kwargs=True, always_call=True)
        s: DiffusionSettings = self.settings
        for site in self._sites:
            self.add_hook(site.block, "forward_pre", self._block_pre(site), with_kwargs=True)
            if s.kind == "merge":
                wrapped: list[tuple[nn.Module, str]] = []
                if s.merge_attn:
                    wrapped.append((site.attn, "attn"))
                    if site.extra_self is not None:  # SD3.5's image-only attn2
                        wrapped.append((site.extra_self, "self"))
                if s.merge_crossattn and site.cross is not None:
                    wrapped.append((site.cross, "self"))
                if s.merge_mlp and site.mlp is not None:
                    wrapped.append((site.mlp, "self"))
                for mod, how in wrapped:
                    self.add_hook(mod, "forward_pre", self._merge_in(site, how), with_kwargs=True)
                    self.add_hook(mod, "forward", self._merge_out(site, how), with_kwargs=True)
            elif s.kind == "kv":
                self.add_hook(site.attn, "forward_pre", self._kv_in(site), with_kwargs=True)
            elif s.kind == "reuse":
                self.add_hook(site.block, "forward", self._reuse_out(site), with_kwargs=True)
            else:
                self.add_hook(site.block, "forward", self._prune_out(site), with_kwargs=True)

    # -- the call -------------------------------------------------------------------------------------
    def _step(self, s: DiffusionSettings, t: float | None) -> tuple[int | None, float]:
        """``(step index or None, progress in [0, 1])`` of the timestep ``t``."""
        steps: Sequence[float] | None = s.timesteps
        if steps is None and self.pipeline is not None:
            ts = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
            if ts is not None and len(ts):
                steps = [float(v) for v in ts]
        if t is None:
            return None, 0.0
        if steps:
            d = [abs(v - t) for v in steps]
            i = min(range(len(d)), key=d.__getitem__)
            if d[i] <= 1e-3 * max(1.0, abs(t)):
                return i, 0.0 if len(steps) == 1 else i / (len(steps) - 1)
        total = float(self.host.num_train_timesteps)
        tt = t * total if t <= 1.0 and self.host.cls_name == "FluxTransformer2DModel" else t
        return None, min(1.0, max(0.0, 1.0 - tt / total))

    def _ratio_at(self, s: DiffusionSettings, step: int | None, progress: float) -> float:
        sched = s.schedule
        if sched is None:
            return s.ratio
        if callable(sched):
            r = sched(progress)
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 < float(r) <= 1.0:
                raise UniprunerError(f"schedule({progress:.3f}) returned {r!r}; it must return a ratio in (0, 1]")
            return float(r)
        n_steps = self._n_steps(s)
        if n_steps is None or step is None:
            raise UniprunerError(
                "a per-step schedule needs the denoising timesteps: patch the pipeline (its scheduler knows them) "
                "or pass timesteps=scheduler.timesteps; or give schedule=callable(progress)"
            )
        if len(sched) > n_steps:
            raise UniprunerError(
                f"the schedule has {len(sched)} ratios but the scheduler runs {n_steps} steps; give at most one "
                "ratio per step (steps beyond a shorter schedule use its last ratio)"
            )
        return sched[min(step, len(sched) - 1)]

    def _n_steps(self, s: DiffusionSettings) -> int | None:
        if s.timesteps is not None:
            return len(s.timesteps)
        ts = getattr(getattr(self.pipeline, "scheduler", None), "timesteps", None)
        return None if ts is None else len(ts)

    def _on_call(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if self.call_state() is not None:  # re-entrant call of the same denoiser: leave it alone
            return None
        s: DiffusionSettings = self.settings
        bound = self.host.bind(args, kwargs)
        grid = token_grid(self.host, bound)
        x = bound[self.host.sample_arg]
        t = _timestep(bound.get("timestep"))
        step, progress = self._step(s, t)
        ratio = self._ratio_at(s, step, progress)
        tkey = 0 if t is None else round(t * 1000)
        call = _Call(s, grid, ratio, step, progress, _mix(s.seed, tkey), int(x.shape[0]))
        if s.kind == "reuse":
            call.run = self._run_for(t, (*x.shape, *grid))
        call.token = self.begin_call(call)
        return None

    def _run_for(self, t: float | None, shape: tuple[int, ...]) -> _Run:
        """This context's denoising run, or a new one when this call starts another run (the
        timestep did not decrease, or the latent changed shape)."""
        runs = dict(_RUNS.get() or {})
        run = runs.get(id(self))
        if run is None or run.shape != shape or t is None or run.last_t is None or t >= run.last_t:
            run = _Run(shape=shape)
        run.last_t = t
        runs[id(self)] = run
        _RUNS.set(runs)
        return run

    def _on_unpatch(self) -> None:
        runs = _RUNS.get()
        if runs and id(self) in runs:
            rest = dict(runs)
            del rest[id(self)]
            _RUNS.set(rest)

    def _on_return(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
        call: _Call | None = self.call_state()
        if call is None:
            return None
        self.end_call(call.token)
        names = {site.index: site.name for site in self._sites}
        rows = tuple(SiteStats(names[i], sc.factor, sc.grid, sc.n, sc.queries, sc.keys, min(sc.ratio, 1.0), sc.dim)
                     for i, sc in call.sites.items())
        self.publish(DiffusionStats(call.settings.method.name, call.step, call.progress, call.batch, rows, call.map))
        return None

    # -- blocks ---------------------------------------------------------------------------------------
    def _block_pre(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            call: _Call | None = self.call_state()
            if call is None:
                return None
            call.sites.pop(site.index, None)
            x = _hidden(args, kwargs)
            grid, factor = site_grid(self.host, call.grid, x.shape[1])
            s = call.settings
            r = s.level_ratio(factor, call.ratio)
            n = x.shape[1]
            sc = _SiteCall(grid, factor, r, n, queries=n, keys=n, dim=x.shape[-1])
            if site.role == "single":
                enc = _arg(args, kwargs, "encoder_hidden_states", 1)
                sc.text = int(enc.shape[1]) if isinstance(enc, Tensor) else 0
            out = None
            if r < 1.0:
                g = torch.Generator(device="cpu").manual_seed(_mix(call.seed, site.index))
                if s.kind == "merge":
                    self._make_merge(s.method, sc, site, x, g)
                elif s.kind == "kv":
                    sc.kv_grid = grid  # the attention's pre-hook downsamples its own (normed) input
                elif s.kind == "reuse":
                    out = self._make_reuse(s.method, sc, site, x, args, kwargs, call)
                else:
                    out = self._make_prune(s.method, sc, site, x, args, kwargs, call.progress, g.initial_seed())
                if call.map is None and factor == 1 and not x.is_meta and (sc.plan is not None or sc.keep is not None):
                    call.map = self._map(sc)
            call.sites[site.index] = sc
            return out

        return hook

    def _make_merge(self, m: Method, sc: _SiteCall, site: Site, x: Tensor, g: torch.Generator) -> None:
        if isinstance(m, ToMeSD) and (sc.grid[0] % m.sy or sc.grid[1] % m.sx):
            raise UniprunerError(
                f"block {site.name} has a {sc.grid[0]}x{sc.grid[1]} token grid, which {m.sx}x{m.sy} tomesd windows do "
                f"not tile (factor x{sc.factor} of the latent); use a latent whose side divides by "
                f"{max(m.sx, m.sy) * sc.factor * self.host.patch_size}, lower max_downsample, or pass sx= / sy= "
                "that divide it"
            )
        m = dataclasses.replace(m, budget=Budget(ratio=sc.ratio))
        metric = x
        if site.rotary:  # one map for the batch (Flux's rotary frequencies carry no batch dimension)
            metric = F.normalize(x.float(), dim=-1).mean(0, keepdim=True)
        plan, rep = m.plan(metric, hw=sc.grid, generator=g)  # type: ignore[attr-defined]
        if site.rotary and x.shape[0] > 1:
            from ..._merge import MergePlan

            b = x.shape[0]
            plan = MergePlan(plan.dst.expand(b, -1).contiguous(), plan.n_out, rep=rep.expand(b, -1).contiguous())
            rep = plan.rep
        sc.plan, sc.rep = plan, rep
        if self.settings.merge_attn:  # stats count the self-attention's tokens
            sc.queries = sc.keys = plan.n_out

    def _make_prune(self, m: Method, sc: _SiteCall, site: Site, x: Tensor, args: tuple[Any, ...],
                    kwargs: dict[str, Any], progress: float, seed: int) -> Any:
        m = dataclasses.replace(m, budget=Budget(ratio=sc.ratio))
        if any(f.name == "seed" for f in dataclasses.fields(m)):  # a seeded scorer: one draw per block and step
            m = dataclasses.replace(m, seed=seed)  # type: ignore[call-arg]
        signals: dict[str, Any] = {"hw": sc.grid}
        if "attn" in m.requires:
            signals["attn"] = _self_attention_map(site.attn, x)
        if hasattr(m, "ratio_at"):
            signals["progress"] = progress
        keep = m.select(x, **signals)
        sc.keep, sc.inputs = keep, x
        sc.queries = sc.keys = int(keep.shape[1])
        return _with_hidden(args, kwargs, batched_gather(x, keep))

    def _make_reuse(self, m: Method, sc: _SiteCall, site: Site, x: Tensor, args: tuple[Any, ...],
                    kwargs: dict[str, Any], call: _Call) -> Any:
        assert call.run is not None
        sc.inputs = x
        cache = call.run.blocks.get(site.index)
        if cache is None:  # first step of a run: compute every token, remember them
            return None
        m = dataclasses.replace(m, budget=Budget(ratio=sc.ratio))
        keep = m.select(x, previous=cache.inputs, staleness=cache.staleness, hw=sc.grid)
        sc.keep = keep
        sc.queries = sc.keys = int(keep.shape[1])
        return _with_hidden(args, kwargs, batched_gather(x, keep))

    def _reuse_out(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            sc = self._site_call(site)
            call: _Call | None = self.call_state()
            if sc is None or call is None or call.run is None or sc.inputs is None:
                return None
            x = sc.inputs
            cache = call.run.blocks.get(site.index)
            if sc.keep is None or cache is None:
                full = output
                stale = torch.zeros(x.shape[:2], dtype=torch.long, device=x.device)
            else:
                # the tokens not recomputed reuse their cached update on top of their new input
                full = x + cache.update
                idx = sc.keep.unsqueeze(-1).expand(-1, -1, full.shape[-1])
                full = full.scatter(1, idx, output)
                stale = (cache.staleness + 1).scatter(1, sc.keep, 0)
            call.run.blocks[site.index] = _Cache(x.detach(), (full - x).detach(), stale)
            return None if sc.keep is None else full

        return hook

    @staticmethod
    def _map(sc: _SiteCall) -> tuple[Tensor, tuple[int, int]]:
        if sc.plan is not None:
            return sc.plan.dst[0].detach().cpu().clone(), sc.grid
        assert sc.keep is not None
        dst = torch.full((sc.n,), -1, dtype=torch.long)
        k = sc.keep[0].detach().cpu()
        dst[k] = torch.arange(k.numel())
        return dst, sc.grid

    # -- merge around attention / MLP ---------------------------------------------------------------------
    def _site_call(self, site: Site) -> _SiteCall | None:
        call: _Call | None = self.call_state()
        if call is None:
            return None
        return call.sites.get(site.index)

    def _merge_in(self, site: Site, how: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            sc = self._site_call(site)
            if sc is None or sc.plan is None:
                return None
            x = _hidden(args, kwargs)
            if how == "attn" and site.role == "single":
                t = sc.text
                xm = torch.cat([x[:, :t], sc.plan.merge(x[:, t:], "mean")], dim=1)
            else:
                xm = sc.plan.merge(x, "mean")
            args, kwargs = _with_hidden(args, kwargs, xm)
            if how == "attn" and site.rotary:
                kwargs = self._gather_rotary(kwargs, sc, site)
            return args, kwargs

        return hook

    @staticmethod
    def _gather_rotary(kwargs: dict[str, Any], sc: _SiteCall, site: Site) -> dict[str, Any]:
        rot = kwargs.get("image_rotary_emb")
        if rot is None:
            return kwargs
        assert sc.rep is not None
        # [text, image] frequencies; the text length is what precedes the image tokens
        cos, sin = rot
        t = cos.shape[0] - sc.n
        idx = torch.cat([torch.arange(t, device=cos.device), t + sc.rep[0].to(cos.device)])
        kw = dict(kwargs)
        kw["image_rotary_emb"] = (cos.index_select(0, idx), sin.index_select(0, idx))
        return kw

    def _merge_out(self, site: Site, how: str) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            sc = self._site_call(site)
            if sc is None or sc.plan is None:
                return None
            if isinstance(output, tuple):  # joint attention: (image, text[, ip])
                return (sc.plan.unmerge(output[0]), *output[1:])
            if how == "attn" and site.role == "single":
                t = sc.text
                return torch.cat([output[:, :t], sc.plan.unmerge(output[:, t:])], dim=1)
            return sc.plan.unmerge(output)

        return hook

    # -- K/V downsampling ---------------------------------------------------------------------------------
    def _kv_in(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            sc = self._site_call(site)
            if sc is None or sc.kv_grid is None:
                return None
            if _arg(args, kwargs, "encoder_hidden_states", 1) is not None:
                return None  # not a self-attention call
            call: _Call = self.call_state()
            x = _hidden(args, kwargs)
            m = dataclasses.replace(call.settings.method, budget=Budget(ratio=sc.ratio))
            kv, _ = m.kv_tokens(x, sc.grid)  # type: ignore[attr-defined]
            sc.keys = int(kv.shape[1])
            kw = dict(kwargs)
            kw["encoder_hidden_states"] = kv
            if len(args) > 1:
                args = args[:1]
            return args, kw

        return hook

    # -- block pruning ------------------------------------------------------------------------------------
    def _prune_out(self, site: Site) -> Callable[..., Any]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
            sc = self._site_call(site)
            if sc is None or sc.keep is None:
                return None
            assert sc.inputs is not None
            call: _Call = self.call_state()
            m = call.settings.method
            if hasattr(m, "recover"):  # the method's own recovery (AT-EDM: similarity copy)
                return m.recover(output, sc.keep, sc.inputs, inputs=sc.inputs)
            # any other scorer: each pruned token keeps its input plus its most similar kept token's update
            return _reduce.copy_recover(output, sc.keep, sc.inputs, base=sc.inputs)

        return hook

    # -- contract -----------------------------------------------------------------------------------------
    def configure(self, **kwargs: Any) -> DiffusionHandle:
        """Change settings between calls (validated like :func:`patch`); returns the handle."""
        s: DiffusionSettings = self.settings
        base: dict[str, Any] = {
            "ratio": s.ratio, "schedule": s.schedule, "timesteps": s.timesteps,
            "levels": dict(s.levels) if s.levels else None, "max_downsample": s.max_downsample,
            "blocks": s.blocks, "merge_attn": s.merge_attn, "merge_crossattn": s.merge_crossattn,
            "merge_mlp": s.merge_mlp, "seed": s.seed,
        }
        method = kwargs.pop("method", None)
        if method is None:
            params = {f.name: getattr(s.method, f.name) for f in dataclasses.fields(s.method)
                      if f.name not in ("budget",)}
            own = {k: kwargs.pop(k) for k in list(kwargs) if k in params}
            method = dataclasses.replace(s.method, **own) if own else s.method
        base.update(kwargs)
        if "schedule" in kwargs and "ratio" not in kwargs:
            base["ratio"] = None
        new = make_settings(method, **base)
        if {x.kind for x in (new, s)} != {s.kind} or new.max_downsample != s.max_downsample or new.blocks != s.blocks \
                or (new.merge_attn, new.merge_crossattn, new.merge_mlp) != (s.merge_attn, s.merge_crossattn,
                                                                           s.merge_mlp):
            raise UniprunerError(
                "configure changes ratios, schedules, seeds and method parameters; a different method kind, "
                "max_downsample, blocks or merge_* flags re-wires hooks: unpatch and patch again"
            )
        self._set_settings(new)
        return self

    def stats(self) -> DiffusionStats | None:
        """What the last finished call reduced (None before the first call)."""
        stats: DiffusionStats | None = self.last_stats
        return stats

    def describe(self) -> str:
        """What was patched and what was left alone, and why."""
        s: DiffusionSettings = self.settings
        host = self.host
        names = {site.index for site in self._sites}
        lines = [f"unipruner.diffusion: {s.method.name} ({s.kind}) on {host.cls_name}, ratio {s.ratio:g}"
                 + (" with a per-step schedule" if s.schedule is not None else "")]
        for site in host.sites:
            f = self._factors[site.index]
            if site.index in names:
                what = {"merge": "merge -> " + "+".join(
                    w for w, on in (("attn", s.merge_attn), ("crossattn", s.merge_crossattn), ("mlp", s.merge_mlp))
                    if on) + " -> unmerge", "kv": "K/V downsampled", "prune": "pruned + recovered",
                    "reuse": "changed tokens recomputed, cached updates reused"}[s.kind]
                lines.append(f"  [{site.index}] {site.name} (x{f}, {site.role}): {what}")
            else:
                why = "downsample factor above max_downsample" if s.blocks is None or site.index in s.blocks \
                    else "not in blocks"
                if s.kind in ("kv", "prune", "reuse") and site.role != "basic":
                    why = "joint text+image attention"
                lines.append(f"  [{site.index}] {site.name} (x{f}, {site.role}): left alone ({why})")
        return "\n".join(lines)


def patch(pipe_or_model: Any, method: str | Method, *, ratio: float | None = None, budget: Budget | None = None,
          schedule: Sequence[float] | Callable[[float], float] | None = None, timesteps: Any = None,
          levels: dict[int, float] | None = None, max_downsample: int | None = None,
          blocks: Sequence[int] | None = None, merge_attn: bool = True, merge_crossattn: bool = False,
          merge_mlp: bool = False, seed: int = 0, **params: Any) -> DiffusionHandle:
    """Reduce the image tokens of a diffusers denoiser (or a pipeline's) with a registry method.

    Parameters
    ----------
    pipe_or_model : diffusers pipeline or denoiser
        ``UNet2DConditionModel`` (SD 1.x / 2.x / SDXL), ``PixArtTransformer2DModel``,
        ``DiTTransformer2DModel``, ``SD3Transformer2DModel``, ``FluxTransformer2DModel``, or a
        pipeline holding one as ``.unet`` / ``.transformer`` (its scheduler then locates each
        step for per-step schedules).
    method : str or Method
        A registry method with ``"diffusion"`` in its domains (``unipruner methods --domain
        diffusion``): ``tomesd`` (Bolya & Hoffman 2023), ``tome``, ``todo`` (Smith et al. 2024), ...
    ratio : float
        Fraction of the image tokens **kept** (tomesd's ``ratio=0.5`` merges half: ours is 0.5 too;
        tomesd 0.3 == ours 0.7). For ``todo``: the fraction of keys / values kept.
    schedule : sequence of float or callable, optional
        Per-step ratios (one per denoising step), or ``progress -> ratio`` (0 = first step).
    timesteps : sequence, optional
        The scheduler's timesteps, for a sequence schedule on a bare denoiser.
    levels : dict, optional
        Per-resolution ratios for a UNet (downsample factor -> ratio).
    max_downsample : int, optional
        Patch blocks at downsample factors up to this (default: the finest level that has
        attention: 1 on SD 1.x / 2.x, 2 on SDXL — which has no attention at full resolution).
    blocks : sequence of int, optional
        Only these transformer blocks (forward order; e.g. skip the first and last of a DiT).
    merge_attn, merge_crossattn, merge_mlp : bool
        What a merge method wraps (ToMeSD's options; default self-attention only).
    seed : int
        Seed of the per-block, per-step random draws (the global RNG is never used).
    **params
        The method's own parameters (e.g. ``sx=2, sy=2, random_dst=True`` for tomesd).

    Returns
    -------
    DiffusionHandle
        A context manager; ``configure``, ``stats``, ``describe``, ``unpatch``.

    Examples
    --------
    >>> import unipruner
    >>> "tomesd" in unipruner.diffusion.DIFFUSION_METHODS
    True
    """
    host, pipe = find_host(pipe_or_model)
    settings = make_settings(method, ratio=ratio, budget=budget, schedule=schedule, timesteps=timesteps,
                             levels=levels, max_downsample=max_downsample, blocks=blocks, merge_attn=merge_attn,
                             merge_crossattn=merge_crossattn, merge_mlp=merge_mlp, seed=seed, **params)
    existing = reuse_or_refuse(host.model, DiffusionHandle, settings)
    if existing is not None:
        return existing
    return DiffusionHandle(pipe_or_model, host, pipe, settings)


def find(pipe_or_model: Any) -> DiffusionHandle | None:
    """The active :class:`DiffusionHandle` patching this denoiser (or pipeline's), or None."""
    model = pipe_or_model
    if not isinstance(model, nn.Module):
        try:
            model = find_host(pipe_or_model)[0].model
        except UniprunerError:
            return None
    return find_handle(model, DiffusionHandle)


def unpatch(pipe_or_model: Any) -> bool:
    """Remove unipruner.diffusion's hooks; True if something was patched."""
    h = find(pipe_or_model)
    return False if h is None else h.unpatch()

