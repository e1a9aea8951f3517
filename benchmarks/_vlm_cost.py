"""Cost of visual-token pruning on full-width VLM configs with random weights (issue 11, Evaluation 2).

Called by ``benchmarks/vlm.py --part cost``; standalone: ``python benchmarks/_vlm_cost.py [--rounds N]
[--layers 2|3|4] [--quick]``. Nothing comes from the hub: every model is built from a config, seeded.

1. **LLaVA-1.5 geometry** (``vlm_cost``): CLIP ViT-L/14-336 tower (hidden 1024, 24 layers, 16 heads, MLP 4096,
   576 patch tokens, ``vision_feature_layer=-2``) + projector + a Llama-7B-width language model (hidden 4096, MLP
   11008, 32 heads, vocab 32064) cut to ``--layers`` decoder layers, fp32 (bf16 is ~4x slower than fp32 on this
   CPU: no AVX-512/AMX). Prompt: 5 text tokens, 576 image placeholders, 35 text tokens (616 tokens); batch 1 and
   4 (4 different images, same prompt length: no padding). Configurations: unpruned, ``stage="input"`` with
   ``divprune`` and ``random``, ``stage="llm"`` with ``fastv`` at layer 2 (layer 1 when ``--layers 2``), each
   keeping 64 / 128 / 192 of the 576 visual tokens per image.

   * **FLOPs** — ``torch.utils.flop_counter.FlopCounterMode`` under ``sdpa_kernel(SDPBackend.MATH)`` (CPU SDPA
     counts 0 otherwise), real tensors, one prefill forward (``use_cache=True, logits_to_keep=1``) of the
     language model as it runs, the patched one with the adapter's hooks: DivPrune's selection, FastV's
     recomputed keys and attention rows of layer K-1 are counted because they run. The vision tower + projector
     are counted once while the image features are computed (the input and llm stages do not change them):
     "whole" = tower + LM.
   * **Times** — the images are encoded once; every timed call is ``generate()`` with the pre-encoded features
     (``mm_encoder_outputs``), 16 new tokens (``min_new_tokens = max_new_tokens``, EOS disabled), greedy. A
     logits processor stamps the clock after every forward: prefill = start -> first stamp, decode tokens/s =
     15 steps x batch / (first -> last stamp). Rounds interleave: unpruned, then every configuration, the next
     round's unpruned ...; a configuration's ratio in round r divides the mean of the unpruned runs before and
     after it by its own time; the median over ``--rounds`` is reported.
   * **Theoretical x** = unpruned LM prefill FLOPs / patched LM prefill FLOPs; **realised x** = unpruned LM
     prefill time / patched; realised / theoretical (target >= 0.85).
   * **Overhead** — seconds inside the adapter's hooks during the prefill (every hook the adapter registers,
     wrapped with a clock on the handle class before patching; the hooks do not call each other) / the
     patched prefill time, median over rounds. ``random`` at the same stage and budget is the trivial-selection
     baseline: (divprune - random) / divprune prefill time is in the notes.
   * **KV MB** — bytes of the key and value tensors stored in the cache after the prefill (summed over layers);
     the prompts are equal length and every image keeps the same count, so no slot is padding: stored = real.

2. **SmolVLM-256M-shaped** (``vlm_cost_smolvlm``, approximate: the published base models' shapes, SmolLM2-135M
   text = Llama 576 hidden, MLP 1536, 30 layers, 9 heads / 3 KV heads, vocab 49280, tied embeddings; SigLIP
   B/16-512 vision = 768 hidden, MLP 3072, 12 layers, 12 heads; pixel shuffle ``scale_factor`` 4 -> 64 tokens per
   512 px image; one image a row, no splitting). Input-stage DivPrune at 50 % / 25 % of the visual tokens: the
   same LM-only measurements, and end to end (pixel values in, vision tower timed and counted inside).

   The SmolVLM part runs on ``--smolvlm-threads`` (default 1: with 2 threads on a shared CPU its many small ops
   wait on a descheduled thread and times vary 5x) and ``3 x --rounds`` rounds (its runs are short).

One table, ``benchmarks/results/vlm_cost.json`` / ``.md`` (``vlm_cost_quick`` with ``--quick``); ``--parts`` runs
some parts and keeps the saved rows of the others. Default run on this loaded 2-core CPU (``--layers 2 --rounds
3``): about 35 minutes for the LLaVA part, 6 for SmolVLM; ``--quick`` (tiny widths, same token counts) ~2 minutes.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import RESULTS, Report

import unipruner
from unipruner._threads import limit_threads

KEEPS = (64, 128, 192)
N_NEW = 16
PREFIX, SUFFIX = 5, 35  # text tokens before / after the image (LLaVA-1.5: "USER: <image>\n<question> ASSISTANT:")
COLUMNS = ["batch", "stage", "method", "kept", "LM GFLOPs", "whole GFLOPs", "theoretical x", "realised x",
           "realised/theo", "overhead %", "decode tok/s x", "KV MB", "whole theo x"]
# every hook VLMHandle registers: bound methods, and factories of per-layer closures
_HOOKS = ("_body_pre", "_body_post", "_lm_pre", "_lm_post", "_vision_attn_pre", "_projector_pre", "_projector_post")
_FACTORIES = ("_make_layer_pre", "_make_attn_pre")


@dataclass(frozen=True)
class Config:
    """One patched configuration (``method=None``: unpruned)."""

    stage: str
    method: str | None
    keep: int
    layer: int | None = None

    @property
    def label(self) -> str:
        if self.method is None:
            return "unpruned"
        where = self.stage if self.layer is None else f"{self.stage}@{self.layer}"
        return f"{where}/{self.method}/{self.keep}"

    def patch(self, model: Any) -> Any:
        assert self.method is not None
        kw: dict[str, Any] = {"keep": self.keep, "stage": self.stage}
        if self.layer is not None:
            kw["layer"] = self.layer
        return unipruner.vlm.patch(model, self.method, **kw)


# ------------------------------------------------------------------------------------ models and inputs


@dataclass
class Host:
    """A built model and how to make its inputs."""

    name: str
    model: Any
    image_token: int
    around: int | None  # Idefics3's <fake_token_around_image>, else None
    n_visual: int
    vocab: int
    image_kwargs: Callable[[int, int], dict[str, torch.Tensor]]  # (batch, seed) -> pixel inputs


def _finish(model: Any) -> Any:
    model = model.eval()
    model.set_attn_implementation("sdpa")
    gc_ = model.generation_config
    gc_.eos_token_id, gc_.pad_token_id, gc_.bos_token_id = None, 0, None  # random weights: never stop early
    return model


def build_llava(layers: int, quick: bool) -> Host:
    """LLaVA-1.5 geometry: CLIP ViT-L/14-336 + Llama-7B width with ``layers`` decoder layers (tiny widths if quick)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if quick:
        vc = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2,
                              image_size=336, patch_size=14)
        tc = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=4, vocab_size=1024, max_position_embeddings=2048)
        vocab = 1024
    else:
        vc = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768)
        tc = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers, num_attention_heads=32,
                         num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
        vocab = 32064
    image_token = vocab - 64
    cfg = LlavaConfig(vision_config=vc, text_config=tc, image_token_id=image_token, vision_feature_layer=-2,
                      vision_feature_select_strategy="default")
    torch.manual_seed(0)
    model = _finish(LlavaForConditionalGeneration(cfg))

    def pixels(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 3, 336, 336, generator=g)}

    return Host("llava", model, image_token, None, 576, vocab, pixels)


def build_smolvlm(quick: bool) -> Host:
    """SmolVLM-256M-shaped (approximate): SigLIP B/16-512 + SmolLM2-135M shapes, scale_factor 4 -> 64 tokens."""
    from transformers import LlamaConfig, SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMVisionConfig

    if quick:
        vis = SmolVLMVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=512, patch_size=16)
        text = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1024, max_position_embeddings=2048,
                           tie_word_embeddings=True)
        vocab = 1024
    else:
        vis = SmolVLMVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                  num_attention_heads=12, image_size=512, patch_size=16)
        text = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                           num_key_value_heads=3, vocab_size=49280, max_position_embeddings=8192,
                           rope_theta=100000.0, tie_word_embeddings=True)
        vocab = 49280
    image_token, around = vocab - 90, vocab - 91  # SmolVLM-256M: <image> 49190, <fake_token_around_image> 49189
    cfg = SmolVLMConfig(vision_config=vis, text_config=text, image_token_id=image_token, scale_factor=4,
                        pad_token_id=0, tie_word_embeddings=True)
    torch.manual_seed(0)
    model = _finish(SmolVLMForConditionalGeneration(cfg))

    def pixels(batch: int, seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"pixel_values": torch.randn(batch, 1, 3, 512, 512, generator=g),
                "pixel_attention_mask": torch.ones(batch, 1, 512, 512, dtype=torch.long)}

    return Host("smolvlm", model, image_token, around, 64, vocab, pixels)


def text_inputs(host: Host, batch: int, seed: int) -> dict[str, torch.Tensor]:
    """``input_ids`` / ``attention_mask``: PREFIX text tokens, the image's placeholders, SUFFIX text tokens."""
    g = torch.Generator().manual_seed(seed)
    low = 1
    high = min(host.image_token, host.around or host.image_token) - 1
    pre = torch.randint(low, high, (batch, PREFIX), generator=g)
    suf = torch.randint(low, high, (batch, SUFFIX), generator=g)
    img = torch.full((batch, host.n_visual), host.image_token)
    parts = [pre, img, suf]
    if host.around is not None:
        fence = torch.full((batch, 1), host.around)
        parts = [pre, fence, img, fence, suf]
    ids = torch.cat(parts, 1)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


# ------------------------------------------------------------------------------------ measuring


class HookClock:
    """Seconds spent inside the hooks of :class:`unipruner.vlm.VLMHandle` (wrapped on the class while active)."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0
        return wrapper

    @contextmanager
    def installed(self) -> Iterator[HookClock]:
        """Wrap the hooks for the block; handles created inside it register the timed versions."""
        cls = unipruner.vlm.VLMHandle
        saved = {n: cls.__dict__[n] for n in (*_HOOKS, *_FACTORIES) if n in cls.__dict__}

        def factory(make: Callable[..., Any]) -> Callable[..., Any]:
            def wrapped(handle: Any, index: int) -> Any:
                return self._timed(make(handle, index))
            return wrapped

        try:
            for n, fn in saved.items():
                setattr(cls, n, factory(fn) if n in _FACTORIES else self._timed(fn))
            yield self
        finally:
            for n, fn in saved.items():
                setattr(cls, n, fn)


class _Stamps:
    """A logits processor that records the clock (and the hook clock) after every forward of ``generate()``."""

    def __init__(self, clock: HookClock) -> None:
        self.clock = clock
        self.times: list[float] = []
        self.hooks: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.times.append(time.perf_counter())
        self.hooks.append(self.clock.seconds)
        return scores


def _kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def _flops(fn: Callable[[], Any]) -> tuple[int, Any]:
    """FLOPs of ``fn()`` with SDPA on the math backend (the flop counter sees no other CPU kernel)."""
    with torch.inference_mode(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        out = fn()
    return int(fc.get_total_flops()), out


def encode(host: Host, pixels: dict[str, torch.Tensor]) -> tuple[Any, int, float]:
    """The projected image features (``get_image_features``), their FLOPs, and the seconds they took (math SDPA)."""
    t0 = time.perf_counter()
    flops, enc = _flops(lambda: host.model.model.get_image_features(**pixels))
    return enc, flops, time.perf_counter() - t0


def _inputs(text: dict[str, torch.Tensor], enc: Any, pixels: dict[str, torch.Tensor] | None) -> dict[str, Any]:
    """Keyword inputs: pre-encoded features (LM-only) or, with ``pixels``, the pixel values (end to end)."""
    if pixels is not None:
        return {**text, **pixels}
    return {**text, "mm_encoder_outputs": {"image": enc}}


def count(host: Host, cfg: Config, text: dict[str, torch.Tensor], enc: Any,
          pixels: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Prefill FLOPs and KV bytes of one configuration (the patched forward counted as it runs)."""
    model = host.model

    def run() -> Any:
        return model(**_inputs(text, enc, pixels), use_cache=True, logits_to_keep=1)

    if cfg.method is None:
        flops, out = _flops(run)
        slots = None
    else:
        with cfg.patch(model) as h:
            flops, out = _flops(run)
            st = h.stats()
            slots = list(st.kv_slots)
            after = list(st.stages[0].after)
            if any(a != cfg.keep for a in after):
                raise RuntimeError(f"{cfg.label}: kept {after} visual tokens per image, expected {cfg.keep}")
    cache = out["cache"] if "cache" in out else out.past_key_values
    return {"flops": flops, "kv_bytes": _kv_bytes(cache), "kv_slots": slots}


def timed(host: Host, cfg: Config, text: dict[str, torch.Tensor], enc: Any, clock: HookClock,
          pixels: dict[str, torch.Tensor] | None = None, n_new: int = N_NEW) -> dict[str, float]:
    """One ``generate()``: prefill seconds, decode tokens/s, hook seconds during the prefill."""
    from transformers import LogitsProcessorList

    model = host.model
    b = int(text["input_ids"].shape[0])
    stamps = _Stamps(clock)
    with nullcontext() if cfg.method is None else cfg.patch(model):
        gc.collect()
        h0, t0 = clock.seconds, time.perf_counter()
        with torch.inference_mode():
            model.generate(**_inputs(text, enc, pixels), max_new_tokens=n_new, min_new_tokens=n_new,
                           do_sample=False, logits_processor=LogitsProcessorList([stamps]))
    if len(stamps.times) != n_new:
        raise RuntimeError(f"{cfg.label}: generate() ran {len(stamps.times)} forwards, expected {n_new}")
    return {"prefill_s": stamps.times[0] - t0, "hook_s": stamps.hooks[0] - h0,
            "decode_tps": (n_new - 1) * b / (stamps.times[-1] - stamps.times[0])}


def measure(host: Host, configs: list[Config], batch: int, rounds: int, clock: HookClock, *,
            end_to_end: bool = False, warm: bool = True) -> dict[str, Any]:
    """Counts, then interleaved timed rounds, for one host and batch size."""
    seed = 100 + batch
    text = text_inputs(host, batch, seed)
    pix = host.image_kwargs(batch, seed)
    enc, vis_flops, vis_s = encode(host, pix)
    pixels = pix if end_to_end else None
    plain = Config("-", None, host.n_visual)
    counts = {c: count(host, c, text, enc, pixels) for c in [plain, *configs]}
    print(f"  batch {batch}: counted {len(counts)} configurations (vision {vis_flops / 1e9:.1f} GFLOPs)", flush=True)
    if warm:
        timed(host, plain, text, enc, clock, pixels, n_new=2)
    runs: dict[Config, list[dict[str, float]]] = {c: [] for c in [plain, *configs]}
    plain_runs: list[dict[str, float]] = []
    for r in range(rounds):
        plain_runs.append(timed(host, plain, text, enc, clock, pixels))
        for c in configs:
            runs[c].append(timed(host, c, text, enc, clock, pixels))
        p = plain_runs[-1]["prefill_s"]
        print(f"  batch {batch} round {r + 1}/{rounds}: unpruned prefill {p:.2f}s; "
              + " ".join(f"{c.label} x{p / runs[c][-1]['prefill_s']:.2f}" for c in configs), flush=True)
    plain_runs.append(timed(host, plain, text, enc, clock, pixels))
    runs[plain] = plain_runs
    return {"text": text, "counts": counts, "runs": runs, "plain": plain, "vision_flops": vis_flops,
            "vision_s": vis_s, "batch": batch}


def _median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def rows_of(res: dict[str, Any], configs: list[Config], *, lm_part: bool = True) -> list[dict[str, Any]]:
    """Table rows of one :func:`measure` result (ratios against the unpruned runs around each run)."""
    counts, runs, plain = res["counts"], res["runs"], res["plain"]
    vis = 0 if not lm_part else res["vision_flops"]  # end to end: the counted forward already holds the tower
    base = counts[plain]["flops"]
    pr = runs[plain]
    out = []
    for c in [plain, *configs]:
        f = counts[c]["flops"]
        if c is plain:
            real = [1.0] * (len(pr) - 1)
            dec = [1.0] * (len(pr) - 1)
            over = [0.0]
        else:
            rs = runs[c]
            real = [(pr[r]["prefill_s"] + pr[r + 1]["prefill_s"]) / 2 / x["prefill_s"] for r, x in enumerate(rs)]
            dec = [x["decode_tps"] / ((pr[r]["decode_tps"] + pr[r + 1]["decode_tps"]) / 2) for r, x in enumerate(rs)]
            over = [x["hook_s"] / x["prefill_s"] for x in rs]
        theo = base / f
        realised = _median(real)
        out.append({
            "batch": res["batch"], "stage": c.stage if c.layer is None else f"{c.stage}@{c.layer}",
            "method": c.method or "unpruned", "kept": c.keep,
            "LM GFLOPs": f / 1e9 if lm_part else (f - res["vision_flops"]) / 1e9,
            "whole GFLOPs": (f + vis) / 1e9, "theoretical x": theo, "realised x": realised,
            "realised/theo": realised / theo, "overhead %": 100 * _median(over), "decode tok/s x": _median(dec),
            "KV MB": counts[c]["kv_bytes"] / 2**20, "whole theo x": (base + vis) / (f + vis),
            "prefill_s": _median([x["prefill_s"] for x in runs[c]]),
            "decode_tps": _median([x["decode_tps"] for x in runs[c]]),
            "kv_slots": counts[c]["kv_slots"], "realised_rounds": real,
        })
    return out


def _selection_notes(rows: list[dict[str, Any]]) -> list[str]:
    """(divprune - random) / divprune prefill time at the same stage, batch and budget."""
    by = {(r["batch"], r["stage"], r["method"], r["kept"]): r for r in rows}
    parts = []
    for (b, stage, method, kept), r in by.items():
        rnd = by.get((b, stage, "random", kept))
        if method == "divprune" and rnd is not None:
            parts.append(f"B{b}/{kept}: {100 * (r['prefill_s'] - rnd['prefill_s']) / r['prefill_s']:+.1f}%")
    return parts


# ------------------------------------------------------------------------------------ parts


def llava_cost(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """The LLaVA-1.5-geometry rows and notes."""
    host = build_llava(args.layers, args.quick)
    layer = 2 if args.layers >= 3 else 1
    configs = [Config("input", m, k) for m in ("divprune", "random") for k in KEEPS]
    configs += [Config("llm", "fastv", k, layer) for k in KEEPS]
    clock = HookClock()
    rows: list[dict[str, Any]] = []
    results = []
    with clock.installed():
        for i, b in enumerate(args.batches):
            res = measure(host, configs, b, args.rounds, clock, warm=i == 0)
            results.append(res)
            rows += [{"model": "llava", **r} for r in rows_of(res, configs)]
    n_params = sum(p.numel() for p in host.model.parameters())
    vis = results[0]
    notes = [
        f"llava: LLaVA-1.5 geometry, random weights, fp32, {n_params / 1e9:.2f} B parameters: CLIP ViT-L/14-336 "
        f"(576 visual tokens) + Llama-7B width with {args.layers} decoder layers; prompt {PREFIX} + 576 + {SUFFIX} "
        f"= {PREFIX + 576 + SUFFIX} tokens; FastV at layer {layer}"
        + (" (--layers 2: layer 1, not the paper's K=2)" if layer == 1 else "") + "."
        + (" QUICK (tiny widths)." if args.quick else ""),
        "llava: LM GFLOPs = prefill of the language model (use_cache, logits_to_keep=1) counted as it runs (math "
        f"SDPA), adapter work included; whole = + vision tower and projector "
        f"({vis['vision_flops'] / vis['batch'] / 1e9:.1f} GFLOPs per image, {vis['vision_s'] / vis['batch']:.1f} s "
        "per image here), unchanged by the input / llm stages; whole theo x = whole-model FLOPs ratio.",
        "llava: realised x = unpruned / patched LM prefill time inside generate() with pre-encoded images (median of "
        f"{args.rounds} interleaved rounds); decode tok/s x over {N_NEW - 1} greedy decode steps; overhead % = time "
        "inside the adapter's hooks during the prefill / patched prefill; KV MB = key + value bytes after prefill.",
        "llava: DivPrune's selection cost beyond random's (same stage and budget), share of the DivPrune prefill: "
        + ", ".join(_selection_notes(rows)),
        f"llava: torch threads {args.threads}; unpruned LM prefill "
        + ", ".join(f"B{r['batch']} {r['prefill_s']:.2f}s" for r in rows if r["method"] == "unpruned"),
    ]
    del host, results
    gc.collect()
    return rows, notes


def smolvlm_cost(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[str]]:
    """The SmolVLM-256M-shaped rows (LM only and end to end) and notes."""
    host = build_smolvlm(args.quick)
    keeps = (host.n_visual // 2, host.n_visual // 4)
    configs = [Config("input", "divprune", k) for k in keeps]
    clock = HookClock()
    rows: list[dict[str, Any]] = []
    rounds = SMOL_ROUNDS * args.rounds  # short runs: more rounds for the same noise
    with clock.installed(), limit_threads(args.smolvlm_threads):
        for mode in ("LM only", "end to end"):
            e2e = mode == "end to end"
            res = measure(host, configs, 1, rounds, clock, end_to_end=e2e, warm=True)
            for row in rows_of(res, configs, lm_part=not e2e):
                if e2e:  # the counted and timed forwards include the tower: whole-model ratios
                    row["whole theo x"] = row["theoretical x"]
                rows.append({"model": "smolvlm" + (" e2e" if e2e else ""), **row})
    n_params = sum(p.numel() for p in host.model.parameters())
    notes = [
        f"smolvlm: SmolVLM-256M-shaped (approximate), random weights, fp32, {n_params / 1e6:.0f} M parameters: SigLIP "
        "B/16-512 (12 x 768) + pixel shuffle 4 -> 64 tokens per image, Llama 30 x 576 (9 heads / 3 KV heads, MLP "
        f"1536); one 512 px image a row, prompt {PREFIX} + 1 + 64 + 1 + {SUFFIX} tokens, batch 1, input-stage "
        f"DivPrune at 50 % / 25 % of the visual tokens; {rounds} rounds, torch threads {args.smolvlm_threads} (30 "
        "layers of small ops: with 2 threads on this shared CPU every op waits for the descheduled thread and "
        "prefill times vary 5x)." + (" QUICK (tiny widths)." if args.quick else ""),
        "smolvlm: rows as llava (pre-encoded images); 'smolvlm e2e': pixel values into generate(), FLOPs and times of "
        "the whole prefill with the tower inside (theoretical x and realised x there are the whole model's).",
    ]
    del host
    gc.collect()
    return rows, notes


PARTS = ["llava", "smolvlm"]
SMOL_ROUNDS = 3


def run_cost(args: argparse.Namespace) -> dict[str, Any]:
    """Both parts in one table; prints it, saves ``results/vlm_cost.json`` / ``.md``, returns the payload."""
    command = "python benchmarks/_vlm_cost.py " + " ".join(
        [f"--rounds {args.rounds}", f"--layers {args.layers}", "--batches " + " ".join(map(str, args.batches))]
        + (["--quick"] if args.quick else []) + ([f"--parts {' '.join(args.parts)}"] if args.parts != PARTS else []))
    rep = Report("vlm_cost" + ("_quick" if args.quick else ""), ["model", *COLUMNS])
    new: dict[str, tuple[list[dict[str, Any]], list[str]]] = {}
    with limit_threads(args.threads):
        for part, fn in (("llava", llava_cost), ("smolvlm", smolvlm_cost)):
            if part in args.parts:
                print(f"[{part}]", flush=True)
                new[part] = fn(args)
    prev_path = RESULTS / f"{rep.name}.json"
    prev = json.loads(prev_path.read_text(encoding="utf-8")) if prev_path.exists() else None
    for part in PARTS:  # a part not run keeps its rows and notes from the saved results
        if part in new:
            rep.rows += new[part][0]
            rep.notes += new[part][1]
        elif prev is not None and any(r["model"].split()[0] == part for r in prev["rows"]):
            rep.rows += [r for r in prev["rows"] if r["model"].split()[0] == part]
            rep.notes += [n for n in prev["notes"] if not any(n.startswith(p) for p in new)]
            note = f"{part}: rows measured by `{prev['command']}`"
            rep.notes += [] if any(n.startswith(f"{part}: rows measured by") for n in rep.notes) else [note]
    print(rep.markdown())  # the markdown table: rich would squeeze these 14 columns into 80 characters
    for n in rep.notes:
        print(n)
    md = rep.save(command)
    print(f"saved {md}", flush=True)
    return {"name": rep.name, "command": command, "rows": rep.rows, "notes": rep.notes}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="interleaved timed rounds (default 3; SmolVLM 3x)")
    ap.add_argument("--layers", type=int, default=2, choices=(2, 3, 4),
                    help="decoder layers of the 7B-width LM (default 2; FastV runs at layer 2, layer 1 with 2)")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    ap.add_argument("--threads", type=int, default=2, help="torch threads of the LLaVA part (default 2)")
    ap.add_argument("--smolvlm-threads", type=int, default=1, help="torch threads of the SmolVLM part (default 1)")
    ap.add_argument("--quick", action="store_true", help="tiny widths, same token counts: a smoke run in seconds")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.quick and "--rounds" not in (argv if argv is not None else sys.argv[1:]):
        args.rounds = 1
    run_cost(args)


if __name__ == "__main__":
    main()
