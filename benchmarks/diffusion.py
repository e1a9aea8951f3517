"""Diffusion token merging benchmark: unipruner.diffusion side by side with tomesd 0.1.3 and diffusers' caches.

No diffusion weights exist on PyPI: every model is a published architecture with seeded random
weights (:func:`unipruner.models.diffusion_model`). Speed and FLOPs do not depend on the weights;
fidelity is measured patched vs unpatched on the same seed and inputs.

1. ``speed`` (``diffusion/speed``): an SD 1.5-size UNet (block_out_channels 320/640/1280/1280,
   cross_attention_dim 768), 64x64 latent, CFG batch 2 (one latent twice, two text embeddings),
   one denoiser call at t = 500, called positionally (tomesd 0.1.3 crashes on ``sample=``).
   tomesd 0.1.3 at its merge ratios 0.3 / 0.5 / 0.7 and our ``tomesd`` at the same fractions kept
   (0.7 / 0.5 / 0.3), our ``todo`` at the FLOPs of tomesd's 0.5 (its K/V ratio found by bisection
   on the meta device), diffusers' ``apply_pyramid_attention_broadcast`` (spatial skip 2: the mean
   of two consecutive steps, one computed, one reused) and ``apply_faster_cache`` (reported when
   it cannot apply). Interleaved rounds (every variant once per round, order rotated); speed-up =
   fastest unpatched / fastest variant; PSNR and cosine of the noise prediction vs unpatched.
2. ``flops`` (``diffusion/flops``): full SD 1.5 and SDXL configs at 64² / 128² latents, batch 1,
   under ``sdpa_kernel(SDPBackend.MATH)`` + ``FlopCounterMode`` (CPU SDPA counts 0 otherwise), on
   the meta device: unpatched, tomesd 0.1.3 at its default (ratio 0.5, max_downsample 1: SDXL is
   unchanged, its issue #50), ours at the same setting (SDXL: its finest attention level). Where a
   patched model cannot run on the meta device, its FLOPs are counted on a CPU copy with random
   weights (the note says which rows).
3. ``fidelity`` (``diffusion/fidelity``): a medium SD 1.5-layout UNet (64/128/256/256 channels),
   64x64 latent, ``--steps`` DDIM steps (default 10) with CFG 7.5: the final latent's PSNR / cosine
   vs the unpatched run, the FLOPs of the whole loop (counted), and the loop's wall time; every
   method of ``unipruner.methods(domain="diffusion")`` the UNet accepts, tomesd 0.1.3, PAB, and
   ours composed with PAB.
4. ``dit`` (``diffusion/dit``): medium SD3 / PixArt / Flux / DiT configs (64x64 latent; DiT 32x32),
   batch 2: time (interleaved rounds) and FLOPs unpatched vs ours.

PSNR = 10 log10(peak-to-peak(ref)² / MSE). Run: ``python benchmarks/diffusion.py`` (``--part
speed|flops|fidelity|dit|all``, ``--rounds``, ``--steps``, ``--quick`` for a 1-minute tiny-model
smoke run). Measured on the project's 2-core CPU under a load of 3-5 from other jobs: flops ~12 min
(our patched calls are counted on CPU copies until they run on the meta device), dit ~5 min,
fidelity ~50 min (10 steps, 14 variants, a FLOPs-counted and a timed loop each), speed ~8 min per
round (an SD 1.5-size step at CFG batch 2 takes ~40 s there). Run the parts separately on a busy
machine and lower ``--steps`` / ``--rounds``.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, Report

import unipruner
from unipruner.adapters.diffusion._demo import latent_psnr as psnr
from unipruner.models import diffusion_inputs, diffusion_model

OUT = RESULTS / "diffusion"
TOMESD_RATIOS = (0.3, 0.5, 0.7)  # tomesd's "fraction merged"; ours is the fraction kept: 1 - r


# ----------------------------------------------------------------------------- helpers


def cosine(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(x.double().flatten(), ref.double().flatten(), dim=0))


def call_unet(unet: torch.nn.Module, kw: dict[str, Any], t: Any = None) -> torch.Tensor:
    """One positional UNet call (tomesd 0.1.3 reads ``args[0]``)."""
    with torch.inference_mode():
        return unet(kw["sample"], kw["timestep"] if t is None else t, kw["encoder_hidden_states"],
                    added_cond_kwargs=kw.get("added_cond_kwargs"), return_dict=False)[0]


def cfg_inputs(name: str, model: torch.nn.Module, latent: int, seed: int = 0) -> dict[str, Any]:
    """A classifier-free-guidance batch: one latent twice, an unconditional and a conditional text row."""
    kw = diffusion_inputs(name, model, batch=2, latent=latent, seed=seed)
    key = "sample" if "sample" in kw else "hidden_states"
    kw[key] = kw[key][:1].expand_as(kw[key]).clone()
    return kw


def count_flops(fn: Callable[[], Any]) -> int:
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return int(fc.get_total_flops())


def _tomesd() -> Any:
    try:
        import tomesd
    except ImportError as err:
        raise SystemExit("error: tomesd is not installed: `.venv/bin/python -m pip install tomesd==0.1.3` "
                         "(or `pip install 'unipruner[bench]'`)") from err
    return tomesd


@dataclass
class Variant:
    """One way of running the denoiser: ``enter(model)`` applies it and returns the undo."""

    label: str
    enter: Callable[[torch.nn.Module], Callable[[], None]]
    ratio: float | None = None  # our ratio (fraction kept), for the table
    calls: int = 1  # consecutive denoiser calls timed together (2 for a cross-step cache)
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@contextlib.contextmanager
def applied(v: Variant, model: torch.nn.Module) -> Iterator[None]:
    undo = v.enter(model)
    try:
        yield
    finally:
        undo()


def unpatched() -> Variant:
    return Variant("unpatched", lambda m: (lambda: None), 1.0)


def ours(method: str, ratio: float, label: str | None = None, **params: Any) -> Variant:
    def enter(m: torch.nn.Module) -> Callable[[], None]:
        h = unipruner.diffusion.patch(m, method, ratio=ratio, **params)
        return lambda: h.unpatch() and None

    return Variant(label or f"ours {method} {ratio}", enter, ratio)


def tomesd_v(merge: float, **params: Any) -> Variant:
    tomesd = _tomesd()

    def enter(m: torch.nn.Module) -> Callable[[], None]:
        tomesd.apply_patch(m, ratio=merge, **params)
        return lambda: tomesd.remove_patch(m) and None

    return Variant(f"tomesd 0.1.3 r={merge}", enter, round(1 - merge, 3))


class StepClock:
    """The current timestep, for diffusers' cache hooks (``current_timestep_callback``)."""

    def __init__(self) -> None:
        self.t = 500

    def __call__(self) -> int:
        return self.t


def pab(clock: StepClock, then: Variant | None = None) -> Variant:
    """Pyramid Attention Broadcast (Zhao et al., 2024) on every spatial self-attention: computed every 2nd step."""
    from diffusers import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK

    def enter(m: torch.nn.Module) -> Callable[[], None]:
        undo_first = then.enter(m) if then is not None else (lambda: None)
        cfg = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=2, spatial_attention_timestep_skip_range=(100, 800),
            spatial_attention_block_identifiers=("transformer_blocks", "blocks"), current_timestep_callback=clock)
        apply_pyramid_attention_broadcast(m, cfg)

        def undo() -> None:
            HookRegistry.check_if_exists_or_initialize(m).remove_hook(_PYRAMID_ATTENTION_BROADCAST_HOOK, recurse=True)
            undo_first()

        return undo

    label = "diffusers PAB (skip 2)" if then is None else f"{then.label} + PAB"
    return Variant(label, enter, then.ratio if then else None, calls=2)


def faster_cache_problem(model: torch.nn.Module, kw: dict[str, Any]) -> str | None:
    """Why ``apply_faster_cache`` does not apply to this model (None when it runs and hooks attention)."""
    from diffusers import FasterCacheConfig, apply_faster_cache
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK

    clock = StepClock()
    cfg = FasterCacheConfig(spatial_attention_block_skip_range=2, current_timestep_callback=clock,
                            attention_weight_callback=lambda _: 0.5, tensor_format="BCHW")
    apply_faster_cache(model, cfg)
    try:
        hooked = sum(1 for mod in model.modules()
                     if _FASTER_CACHE_BLOCK_HOOK in getattr(getattr(mod, "_diffusers_hook", None), "hooks", {}))
        try:
            with torch.inference_mode():
                model(**kw)
        except Exception as err:  # the diffusers hook itself fails
            return f"its denoiser hook fails ({type(err).__name__}: {str(err)[:80]})" + (
                "; no attention block matched its identifiers" if hooked == 0 else "")
        if hooked == 0:
            return "no attention block matched its identifiers (anchored at ^transformer_blocks)"
        return None
    finally:
        reg = HookRegistry.check_if_exists_or_initialize(model)
        reg.remove_hook(_FASTER_CACHE_DENOISER_HOOK, recurse=False)
        reg.remove_hook(_FASTER_CACHE_BLOCK_HOOK, recurse=True)


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _load() -> str:
    return "/".join(f"{v:.1f}" for v in os.getloadavg())


def match_ratio(flops_at: Callable[[float], int], target: int, lo: float = 0.02, hi: float = 1.0,
                iters: int = 7) -> tuple[float, int]:
    """The ratio in [lo, hi] whose FLOPs (increasing in the ratio) are closest to ``target``, by bisection."""
    best = (hi, flops_at(hi))
    for _ in range(iters):
        mid = (lo + hi) / 2
        f = flops_at(mid)
        if abs(f - target) < abs(best[1] - target):
            best = (mid, f)
        lo, hi = (mid, hi) if f < target else (lo, mid)
    return round(best[0], 3), best[1]


# ----------------------------------------------------------------------------- 1. speed


def _todo_at_tomesd_flops(size: str, latent: int) -> tuple[float, int, int, int]:
    """todo's K/V ratio at the FLOPs of tomesd 0.1.3 r=0.5 (meta device, batch 1, a python timestep):
    (ratio, its FLOPs, tomesd's, unpatched)."""
    meta = diffusion_model("sd15", size, device="meta")
    mkw = diffusion_inputs("sd15", meta, batch=1, latent=latent)
    tomesd = _tomesd()
    base = count_flops(lambda: call_unet(meta, mkw, 500))
    tomesd.apply_patch(meta, ratio=0.5)
    target = count_flops(lambda: call_unet(meta, mkw, 500))
    tomesd.remove_patch(meta)

    def todo_flops(r: float) -> int:
        with unipruner.diffusion.patch(meta, "todo", ratio=r):
            return count_flops(lambda: call_unet(meta, mkw, 500))

    r, f = match_ratio(todo_flops, target)
    return r, f, target, base


def speed(quick: bool, rounds: int) -> Report:
    size, latent = ("tiny", 16) if quick else ("full", 64)
    t0 = time.perf_counter()
    unet = diffusion_model("sd15", size)
    print(f"built the {size} SD 1.5 UNet in {time.perf_counter() - t0:.0f} s", flush=True)
    kw = cfg_inputs("sd15", unet, latent)

    todo_r, todo_f, target, base_meta = _todo_at_tomesd_flops(size, latent)
    clock = StepClock()
    variants = [unpatched()]
    for r in TOMESD_RATIOS:
        variants += [tomesd_v(r), ours("tomesd", round(1 - r, 3))]
    variants += [ours("todo", todo_r, label=f"ours todo {todo_r} (FLOPs of r=0.5)"), pab(clock)]
    fc_problem = faster_cache_problem(unet, {"sample": kw["sample"], "timestep": kw["timestep"],
                                             "encoder_hidden_states": kw["encoder_hidden_states"]})
    steps = (500, 480)  # a cache variant runs both: the first computes, the second reuses
    refs: dict[int, torch.Tensor] = {}
    times: dict[str, list[tuple[float, float]]] = {v.label: [] for v in variants}
    outs: dict[str, torch.Tensor] = {}
    load0 = _load()
    for rnd in range(rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            with applied(v, unet):
                w0, c0 = _clock()
                out = None
                for t in steps[: v.calls]:
                    clock.t = t
                    out = call_unet(unet, kw, torch.tensor(float(t)))
                w1, c1 = _clock()
            assert out is not None
            times[v.label].append(((w1 - w0) / v.calls, (c1 - c0) / v.calls))
            outs.setdefault(v.label, out)
            if v.label == "unpatched":
                refs.setdefault(500, out)
            print(f"round {rnd + 1}/{rounds} {v.label}: {(w1 - w0) / v.calls:.1f} s/step, load {_load()}", flush=True)
    clock.t = steps[1]
    refs[480] = call_unet(unet, kw, torch.tensor(float(steps[1])))  # the reference of the reused step
    rep = Report("diffusion/speed", ["variant", "kept", "s/step", "speed-up", "CPU-time ratio",
                                     "noise PSNR dB", "noise cosine"])
    base_w = min(w for w, _ in times["unpatched"])
    base_c = min(c for _, c in times["unpatched"])
    for v in variants:
        w = min(x for x, _ in times[v.label])
        c = min(x for _, x in times[v.label])
        ref = refs[steps[v.calls - 1]]
        rep.add(**{"variant": v.label, "kept": "-" if v.ratio is None else v.ratio, "s/step": w,
                   "speed-up": base_w / w, "CPU-time ratio": base_c / c, "noise PSNR dB": psnr(outs[v.label], ref),
                   "noise cosine": cosine(outs[v.label], ref)})
    rep.add(**{"variant": "diffusers FasterCache", "kept": "-", "s/step": "n/a", "speed-up": "n/a",
               "CPU-time ratio": "n/a", "noise PSNR dB": "n/a", "noise cosine": "n/a"})
    rep.notes.append(
        f"SD 1.5 UNet ({size} config, random weights), {latent}x{latent} latent, CFG batch 2, torch threads "
        f"{torch.get_num_threads()}; {rounds} interleaved rounds (order rotated); speed-up = fastest unpatched / "
        "fastest variant; CPU-time ratio = the same with process CPU time. `kept` = our ratio (fraction of tokens "
        "kept); tomesd's merge ratio r keeps 1 - r.")
    rep.notes.append(
        f"ours todo: K/V ratio {todo_r} matches tomesd 0.1.3 r=0.5's FLOPs (meta device, batch 1: "
        f"{todo_f / 1e9:.0f} vs {target / 1e9:.0f} GFLOP; unpatched {base_meta / 1e9:.0f}).")
    rep.notes.append("PAB: diffusers apply_pyramid_attention_broadcast, spatial_attention_block_skip_range=2 on every "
                     "transformer block's self-attention: s/step is the mean of two consecutive steps (t=500 "
                     "computed, t=480 reused); its PSNR is the reused step's vs unpatched at t=480.")
    rep.notes.append(f"diffusers apply_faster_cache on this UNet: {fc_problem or 'applies'}.")
    rep.notes.append(f"Load average (1/5/15 min, 2 cores shared with other jobs): {load0} at the start, {_load()} at "
                     "the end: absolute times are noisy, ratios within one round less so.")
    return rep


# ----------------------------------------------------------------------------- 2. flops


def _materialise(name: str, size: str, seed: int = 0) -> torch.nn.Module:
    """A CPU copy of a config with cheap seeded random weights (for FLOPs only: no init cost of the real layers)."""
    model = diffusion_model(name, size, device="meta").to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02, generator=g)
    return model


def _mem_available_gb() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return math.inf


def _count_real(real: torch.nn.Module, name: str, latent: int, method: str, r: float) -> tuple[int, Any]:
    rkw = diffusion_inputs(name, real, batch=1, latent=latent)
    with unipruner.diffusion.patch(real, method, ratio=r) as h:
        f = count_flops(lambda: call_unet(real, rkw, 500))
        return f, h.stats()


def _flops_rows(name: str, size: str, latent: int, fallback: list[str],
                real: dict[str, torch.nn.Module]) -> list[tuple[str, int, int, str]]:
    """(variant, FLOPs, unpatched FLOPs, what was reduced) for one model and latent size; ``real`` caches the
    CPU copy a meta-incapable patched call is counted on."""
    tomesd = _tomesd()
    meta = diffusion_model(name, size, device="meta")
    kw = diffusion_inputs(name, meta, batch=1, latent=latent)
    base = count_flops(lambda: call_unet(meta, kw, 500))
    rows: list[tuple[str, int, int, str]] = [("unpatched", base, base, "-")]
    tomesd.apply_patch(meta, ratio=0.5)
    n_tome = sum(1 for mod in meta.modules() if type(mod).__name__ == "ToMeBlock")
    f = count_flops(lambda: call_unet(meta, kw, 500))
    tomesd.remove_patch(meta)
    rows.append(("tomesd 0.1.3 default (r=0.5, max_downsample=1)", f, base,
                 f"{n_tome} blocks patched, FLOPs {'unchanged' if f == base else 'reduced'}"))
    for method, r in (("tomesd", 0.5), ("todo", 0.25)):
        try:
            with unipruner.diffusion.patch(meta, method, ratio=r) as h:
                f = count_flops(lambda: call_unet(meta, kw, 500))
                st = h.stats()
        except RuntimeError as err:  # data-dependent ops cannot run on the meta device
            need = sum(p.numel() for p in meta.parameters()) * 4 / 2**30 + (2 if latent <= 64 else 7)
            if name not in real and _mem_available_gb() < need + 1:
                fallback.append(f"{name} {latent}² {method}: not counted (needs ~{need:.0f} GB free)")
                continue
            real.setdefault(name, _materialise(name, size))
            f, st = _count_real(real[name], name, latent, method, r)
            fallback.append(f"{name} {latent}² {method} ({str(err).splitlines()[0][:60]})")
        assert st is not None
        hit = [s for s in st.sites if s.queries < s.tokens or s.keys < s.tokens]
        rows.append((f"ours {method} {r}", f, base,
                     f"{len(hit)} blocks reduced, downsample {sorted({s.factor for s in hit})}"))
    return rows


def flops(quick: bool) -> Report:
    size = "tiny" if quick else "full"
    latents = (16, 32) if quick else (64, 128)
    rep = Report("diffusion/flops", ["model", "latent", "variant", "GFLOP", "FLOPs ratio", "blocks reduced"])
    fallback: list[str] = []
    for name in ("sd15", "sdxl"):
        real: dict[str, torch.nn.Module] = {}
        for latent in latents:
            for variant, f, base, what in _flops_rows(name, size, latent, fallback, real):
                rep.add(**{"model": f"{name} ({size})", "latent": f"{latent}x{latent}", "variant": variant,
                           "GFLOP": f / 1e9, "FLOPs ratio": f / base, "blocks reduced": what})
                print(f"{name} {latent}: {variant}: {f / 1e9:.1f} GFLOP ({f / base:.3f}) {what}", flush=True)
        real.clear()
        gc.collect()
    rep.notes.append("Batch 1, one denoiser call, FlopCounterMode under sdpa_kernel(SDPBackend.MATH) (CPU SDPA "
                     "counts 0 otherwise); everything the patched model runs is counted, its merge / matching "
                     "included. Meta device (no weights) unless listed below.")
    if fallback:
        rep.notes.append("Counted on a CPU copy with random weights (the patched call does not run on the meta "
                         "device): " + "; ".join(fallback) + ".")
    return rep


# ----------------------------------------------------------------------------- 3. fidelity


def _ddim_loop(unet: torch.nn.Module, kw: dict[str, Any], steps: int, clock: StepClock,
               guidance: float = 7.5) -> torch.Tensor:
    from diffusers import DDIMScheduler

    sched = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                          set_alpha_to_one=False, steps_offset=1)
    sched.set_timesteps(steps)
    x = kw["sample"][:1].clone()
    for t in sched.timesteps:
        clock.t = int(t)
        eps = call_unet(unet, {**kw, "sample": torch.cat([x, x])}, t)
        uncond, cond = eps.chunk(2)
        x = sched.step(uncond + guidance * (cond - uncond), t, x).prev_sample
    return x


def fidelity(quick: bool, rounds: int, steps: int) -> Report:
    size, latent = ("tiny", 16) if quick else ("medium", 64)
    unet = diffusion_model("sd15", size)
    kw = cfg_inputs("sd15", unet, latent)
    clock = StepClock()
    one = {**kw, "sample": kw["sample"][:1], "encoder_hidden_states": kw["encoder_hidden_states"][:1]}
    tomesd = _tomesd()
    tomesd.apply_patch(unet, ratio=0.5)
    target = count_flops(lambda: call_unet(unet, one, 500))
    tomesd.remove_patch(unet)

    def flops_of(method: str) -> Callable[[float], int]:
        def at(r: float) -> int:
            with unipruner.diffusion.patch(unet, method, ratio=r):
                return count_flops(lambda: call_unet(unet, one, 500))
        return at

    variants = [unpatched()]
    for r in TOMESD_RATIOS:
        variants += [tomesd_v(r), ours("tomesd", round(1 - r, 3))]
    skipped: list[str] = []
    for name in unipruner.diffusion.DIFFUSION_METHODS:
        if name == "tomesd":
            continue
        try:
            if "previous" in unipruner.method(name, ratio=0.5).requires:  # cross-step reuse: FLOPs drop from step 2
                variants.append(ours(name, 0.5))
                continue
            r, f = match_ratio(flops_of(name), target, iters=5)
            if abs(f - target) > 0.05 * target:  # e.g. atedm: its attention map + PageRank cost more than it saves
                skipped.append(f"{name}: cannot reach tomesd r=0.5's FLOPs ({f / target:.2f}x of them at ratio {r}); "
                               "run at ratio 0.5")
                variants.append(ours(name, 0.5))
                continue
            variants.append(ours(name, r, label=f"ours {name} {r} (FLOPs of r=0.5)"))
        except Exception as err:  # a method this UNet does not take (the reason goes to the notes)
            skipped.append(f"{name}: {str(err).splitlines()[0][:100]}")
    variants += [pab(clock), pab(clock, then=ours("tomesd", 0.5))]

    rep = Report("diffusion/fidelity", ["variant", "kept", "loop FLOPs ratio", "loop s", "speed-up",
                                        "latent PSNR dB", "latent cosine"])
    results: dict[str, tuple[int, torch.Tensor]] = {}
    for v in variants:  # pass 0: counted FLOPs of the whole loop, and its final latent (math SDPA for all)
        with applied(v, unet):
            fc = FlopCounterMode(display=False)
            with sdpa_kernel(SDPBackend.MATH), fc:
                final = _ddim_loop(unet, kw, steps, clock)
        results[v.label] = (int(fc.get_total_flops()), final)
        print(f"{v.label}: {fc.get_total_flops() / 1e9:.0f} GFLOP over {steps} steps", flush=True)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for rnd in range(rounds):
        order = variants[rnd % len(variants):] + variants[: rnd % len(variants)]
        for v in order:
            with applied(v, unet):
                w0 = time.perf_counter()
                _ddim_loop(unet, kw, steps, clock)
                times[v.label].append(time.perf_counter() - w0)
        print(f"round {rnd + 1}/{rounds}: " + ", ".join(f"{k} {x[-1]:.1f}s" for k, x in times.items()), flush=True)
    base_f, ref = results["unpatched"]
    base_t = min(times["unpatched"])
    for v in variants:
        f, final = results[v.label]
        t = min(times[v.label])
        rep.add(**{"variant": v.label, "kept": "-" if v.ratio is None else v.ratio, "loop FLOPs ratio": f / base_f,
                   "loop s": t, "speed-up": base_t / t, "latent PSNR dB": psnr(final, ref),
                   "latent cosine": cosine(final, ref)})
    rep.notes.append(
        f"SD 1.5-layout UNet ({size}: block_out_channels {list(unet.config.block_out_channels)}, random weights), "
        f"{latent}x{latent} latent, {steps} DDIM steps, CFG 7.5 (batch 2 per step), same seed and inputs for all; "
        f"the final latent compared with the unpatched run's. Loop FLOPs counted once per variant (math SDPA); "
        f"loop s = fastest of {rounds} interleaved timed loops.")
    rep.notes.append("Methods other than tomesd run at the ratio whose single-call FLOPs match tomesd 0.1.3 r=0.5 "
                     "(bisection), except cross-step reuse (cat: ratio 0.5; its first step is computed in full); "
                     "random is the pruning baseline; PAB = diffusers pyramid attention broadcast, spatial "
                     "self-attention every 2nd step in t in (100, 800).")
    if skipped:
        rep.notes.append("Not matched / not run: " + "; ".join(skipped) + ".")
    return rep


# ----------------------------------------------------------------------------- 4. DiT hosts


def _dit_rows(name: str, size: str, latent: int, rounds: int, notes: list[str]) -> list[dict[str, Any]]:
    model = diffusion_model(name, size)
    kw = cfg_inputs(name, model, latent)
    one = diffusion_inputs(name, model, batch=1, latent=latent)
    variants = [unpatched()]
    for method, r in (("tomesd", 0.5), ("tome", 0.5), ("todo", 0.25)):
        try:
            with unipruner.diffusion.patch(model, method, ratio=r):
                pass
            variants.append(ours(method, r))
        except Exception as err:
            notes.append(f"{name} {method}: {str(err).splitlines()[0][:90]}")

    def run(kwargs: dict[str, Any]) -> torch.Tensor:
        with torch.inference_mode():
            return model(**kwargs, return_dict=False)[0]

    fl: dict[str, int] = {}
    outs: dict[str, torch.Tensor] = {}
    for v in variants:
        with applied(v, model):
            fl[v.label] = count_flops(lambda: run(one))
            outs[v.label] = run(kw)
    times: dict[str, list[float]] = {v.label: [] for v in variants}
    for rnd in range(rounds):
        for v in variants[rnd % len(variants):] + variants[: rnd % len(variants)]:
            with applied(v, model):
                w0 = time.perf_counter()
                run(kw)
                times[v.label].append(time.perf_counter() - w0)
    print(f"{name}: " + ", ".join(f"{v.label} {min(times[v.label]):.2f}s" for v in variants), flush=True)
    base_t = min(times["unpatched"])
    return [{"model": f"{name} ({size})", "variant": v.label, "image tokens": (latent // 2) ** 2,
             "GFLOP": fl[v.label] / 1e9, "FLOPs ratio": fl[v.label] / fl["unpatched"],
             "s/call": min(times[v.label]), "speed-up": base_t / min(times[v.label]),
             "PSNR dB": psnr(outs[v.label], outs["unpatched"]), "cosine": cosine(outs[v.label], outs["unpatched"])}
            for v in variants]


def dit(quick: bool, rounds: int) -> Report:
    size = "tiny" if quick else "medium"
    rep = Report("diffusion/dit", ["model", "variant", "image tokens", "GFLOP", "FLOPs ratio", "s/call",
                                   "speed-up", "PSNR dB", "cosine"])
    notes: list[str] = []
    for name, latent in (("sd3", 64), ("pixart", 64), ("flux", 64), ("dit", 32)):
        for row in _dit_rows(name, size, 16 if quick else latent, rounds, notes):
            rep.add(**row)
        gc.collect()
    rep.notes.append(f"Medium configs (random weights): SD3 6 joint blocks x 512, PixArt 8 x 512, Flux 2 double + 4 "
                     f"single x 512, DiT 8 x 512; batch 2, {rounds} interleaved rounds, fastest run; GFLOP at batch "
                     "1 (math SDPA, everything counted). PSNR / cosine of the output vs unpatched.")
    if notes:
        rep.notes.append("Not applicable: " + "; ".join(notes) + ".")
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=["speed", "flops", "fidelity", "dit", "all"], default="all")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved timing rounds (default: speed 2, fidelity 1, dit 2)")
    ap.add_argument("--steps", type=int, default=10, help="fidelity part: DDIM steps")
    ap.add_argument("--threads", type=int, default=2, help="torch threads")
    ap.add_argument("--quick", action="store_true", help="tiny models, one round: a smoke run (nothing saved)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["python", "benchmarks/diffusion.py", *sys.argv[1:]])
    OUT.mkdir(parents=True, exist_ok=True)
    for part in ("flops", "dit", "fidelity", "speed"):
        if args.part not in (part, "all"):
            continue
        rounds = args.rounds or (1 if args.quick else {"speed": 2, "fidelity": 1, "dit": 2}.get(part, 1))
        if part == "speed":
            rep = speed(args.quick, rounds)
        elif part == "flops":
            rep = flops(args.quick)
        elif part == "fidelity":
            rep = fidelity(args.quick, rounds, 3 if args.quick else args.steps)
        else:
            rep = dit(args.quick, rounds)
        rep.print()
        if not args.quick:
            print(rep.save(cmd))


if __name__ == "__main__":
    main()
