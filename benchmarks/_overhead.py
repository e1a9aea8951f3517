"""Prefill time overhead measured inside one process: plain and compressed prefills interleaved.

Shared by ``kv_cache.py`` (unipruner, main venv) and ``kvpress_side.py`` (kvpress, ``.venv-kvpress``):
it imports only the standard library and torch, so both venvs can import it.
"""

from __future__ import annotations

import gc
import hashlib
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["hook_seconds", "interleaved_overhead"]


def _clock(fn: Callable[[], Any]) -> tuple[float, float]:
    """Wall and process CPU seconds of ``fn()`` (garbage collected before, outside the clock)."""
    gc.collect()
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def _paired(s: dict[str, list[list[tuple[float, float]]]], r: int) -> float:
    """Round ``r``'s method wall time / its plain wall time, summed over prompts."""
    return sum(x[r][0] for x in s["method"]) / sum(x[r][0] for x in s["plain"])


def interleaved_overhead(plain: Callable[[torch.Tensor], Any], methods: dict[str, Callable[[torch.Tensor], Any]],
                         prompts: list[torch.Tensor], rounds: int, warmup: int = 1) -> dict[str, Any]:
    """(method prefill) / (plain prefill) per method, plain and method interleaved.

    Each round runs, for every prompt and method, a plain prefill then the method's prefill. Per
    method: ``wall`` = sum over prompts of the min-over-rounds method wall time / the same for the
    plain prefills run just before it (``cpu`` likewise with process CPU time); ``wall_median`` = the
    median over rounds of the per-round paired ratio. ``noise`` = spread of the identical plain series
    (max / min - 1 of their min-over-rounds sums): differences below it are not resolved.
    """
    samples: dict[str, dict[str, list[list[tuple[float, float]]]]] = {
        m: {"plain": [[] for _ in prompts], "method": [[] for _ in prompts]} for m in methods}
    for r in range(warmup + rounds):
        for i, ids in enumerate(prompts):
            for name, fn in methods.items():
                a = _clock(lambda ids=ids: plain(ids))
                b = _clock(lambda ids=ids, fn=fn: fn(ids))
                if r >= warmup:
                    samples[name]["plain"][i].append(a)
                    samples[name]["method"][i].append(b)
        if r >= warmup:
            print(f"  round {r - warmup + 1}/{rounds}: "
                  + "  ".join(f"{m} x{_paired(s, r - warmup):.3f}" for m, s in samples.items()), flush=True)
    out: dict[str, Any] = {}
    plain_min: dict[str, float] = {}
    for name, s in samples.items():
        def best(kind: str, k: int, s: dict[str, list[list[tuple[float, float]]]] = s) -> float:
            return sum(min(x[k] for x in per) for per in s[kind])
        paired = sorted(_paired(s, r) for r in range(rounds))
        plain_min[name] = best("plain", 0)
        out[name] = {"wall": best("method", 0) / best("plain", 0), "cpu": best("method", 1) / best("plain", 1),
                     "wall_median": paired[len(paired) // 2], "plain_s": best("plain", 0),
                     "method_s": best("method", 0), "plain_cpu_s": best("plain", 1), "method_cpu_s": best("method", 1)}
    noise = max(plain_min.values()) / min(plain_min.values()) - 1
    return {"methods": out, "noise": noise, "rounds": rounds, "warmup": warmup, "prompts": len(prompts),
            "tokens": [int(p.shape[1]) for p in prompts],
            "ids_sha1": hashlib.sha1(json.dumps([p[0].tolist() for p in prompts]).encode()).hexdigest()}


def hook_seconds(cls: type, names: tuple[str, ...], run: Callable[[], Any], repeats: int = 2) -> float:
    """Seconds spent inside the methods ``names`` of ``cls`` during ``run()``, min over ``repeats``.

    The methods are wrapped with a timer on the class for the duration (benchmark-only; restored
    afterwards), so hooks registered as bound methods while ``run`` is going are timed. The hooks
    must be independent (none calls another), else time is counted twice.
    """
    spent = [0.0]
    originals = {n: cls.__dict__[n] for n in names}

    def timed(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[0] += time.perf_counter() - t0
        return wrapper

    best = math.inf
    try:
        for n, fn in originals.items():
            setattr(cls, n, timed(fn))
        for _ in range(repeats):
            spent[0] = 0.0
            run()
            best = min(best, spent[0])
    finally:
        for n, fn in originals.items():
            setattr(cls, n, fn)
    return best
