"""What the diffusion adapter applies, validated once: :func:`make_settings` -> :class:`DiffusionSettings`.

``ratio`` is the fraction of the image tokens **kept** at every patched block (for ``todo``: the
fraction of the keys / values kept; the queries stay full). A ``schedule`` varies it over the
denoising steps: a sequence with one ratio per step (the step is found in the pipeline's
``scheduler.timesteps``, or in ``timesteps=``), or a callable ``progress -> ratio`` with
``progress`` = 0 at the first (noisiest) step and 1 at the last. ``levels`` varies it over the
UNet's resolutions (downsample factor -> ratio); ``max_downsample`` says which resolutions are
patched at all.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ...errors import UniprunerError
from ...methods import REGISTRY, MergingMethod, Method, ScoringMethod, ToMeSD, resolve
from ...select import Budget

__all__ = ["DIFFUSION_METHODS", "KINDS", "DiffusionSettings", "kind_of", "make_settings"]

#: Registry methods the diffusion adapter runs: exactly those whose domains include "diffusion".
DIFFUSION_METHODS: tuple[str, ...] = tuple(sorted(n for n, c in REGISTRY.items() if "diffusion" in c.domains))

#: how a method acts on a block: merge -> op -> unmerge around the attention (``merge``), keys /
#: values from a downsampled grid (``kv``), or the block runs on the kept tokens and the pruned
#: ones are recovered after it (``prune``), or the block recomputes the tokens that changed most since
#: the last denoising step and reuses its cached update for the rest (``reuse``, CAT)
KINDS = ("merge", "kv", "prune", "reuse")

Ratio = float
ScheduleSpec = Sequence[float] | Callable[[float], float]


def kind_of(m: Method) -> str:
    """How the adapter applies ``m`` (one of :data:`KINDS`)."""
    if isinstance(m, MergingMethod):
        return "merge"
    if hasattr(m, "kv_tokens"):
        return "kv"
    if "previous" in m.requires:
        return "reuse"
    if isinstance(m, ScoringMethod):
        return "prune"
    raise UniprunerError(f"unipruner.diffusion cannot apply {m.name!r}: it is neither a merge, a K/V reduction "
                         "nor a token scorer")


def _ratio(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise UniprunerError(f"{what} must be a number in (0, 1] (the fraction of tokens kept), got {value!r}")
    r = float(value)
    if not 0.0 < r <= 1.0:
        raise UniprunerError(f"{what} must be in (0, 1] (the fraction of tokens kept), got {r}")
    return r


@dataclass(frozen=True)
class DiffusionSettings:
    """Immutable settings of one patch (compared for idempotent re-patching).

    Attributes
    ----------
    method : Method
        The registry method; its budget's ``ratio`` is the default fraction kept.
    kind : str
        One of :data:`KINDS`.
    ratio : float
    schedule : tuple of float, callable or None
        Per-step ratios (overrides ``ratio``).
    timesteps : tuple of float or None
        The denoising timesteps a sequence schedule is indexed by when no pipeline is patched.
    levels : tuple of (factor, ratio) or None
        Per-resolution ratios (UNet downsample factor -> ratio); factors not listed use ``ratio``.
    max_downsample : int or None
        Resolutions patched: downsample factor <= this (None = the finest level that has attention).
    blocks : tuple of int or None
        Only these block indices (in forward order) are patched (None = all at the patched levels).
    merge_attn, merge_crossattn, merge_mlp : bool
        What a merge wraps (ToMeSD's options): self-attention (default), cross-attention, the MLP.
    seed : int
        Seed of the per-block, per-step generators (random destinations, random scores); the
        global RNG is never touched.
    """

    method: Method
    kind: str
    ratio: float
    schedule: tuple[float, ...] | Callable[[float], float] | None = None
    timesteps: tuple[float, ...] | None = None
    levels: tuple[tuple[int, float], ...] | None = None
    max_downsample: int | None = None
    blocks: tuple[int, ...] | None = None
    merge_attn: bool = True
    merge_crossattn: bool = False
    merge_mlp: bool = False
    seed: int = 0

    def level_ratio(self, factor: int, base: float) -> float:
        """The ratio at a resolution level, given the step's ratio ``base``."""
        if self.levels:
            for f, r in self.levels:
                if f == factor:
                    return r
        return base

    @property
    def keeps_all(self) -> bool:
        """True when no step or level reduces anything (the patched model equals the original)."""
        if self.schedule is not None and callable(self.schedule):
            return False
        ratios = list(self.schedule) if self.schedule is not None else [self.ratio]
        ratios += [r for _, r in self.levels or ()]
        return all(r >= 1.0 for r in ratios)


def _schedule(value: object) -> tuple[float, ...] | Callable[[float], float] | None:
    if value is None:
        return None
    if callable(value):
        return value
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) == 0:
        raise UniprunerError(
            "schedule must be a non-empty sequence of ratios (one per denoising step) or a callable "
            f"progress -> ratio (progress 0 = first step, 1 = last); got {value!r}"
        )
    return tuple(_ratio(v, f"schedule[{i}]") for i, v in enumerate(value))


def _levels(value: object) -> tuple[tuple[int, float], ...] | None:
    if value is None:
        return None
    if not isinstance(value, Mapping) or not value:
        raise UniprunerError(f"levels must be a non-empty dict downsample factor -> ratio, e.g. {{1: 0.5, 2: 0.75}}; "
                             f"got {value!r}")
    out = []
    for f, r in value.items():
        if isinstance(f, bool) or not isinstance(f, int) or f < 1 or (f & (f - 1)):
            raise UniprunerError(f"levels keys are downsample factors (1, 2, 4, 8), got {f!r}")
        out.append((f, _ratio(r, f"levels[{f}]")))
    return tuple(sorted(out))


def _flag(value: object, what: str) -> bool:
    if not isinstance(value, bool):
        raise UniprunerError(f"{what} must be True or False, got {value!r}")
    return value


def make_settings(method: str | Method, *, ratio: float | None = None, budget: Budget | None = None,
                  schedule: ScheduleSpec | None = None, timesteps: Sequence[float] | Any = None,
                  levels: Mapping[int, float] | None = None, max_downsample: int | None = None,
                  blocks: Sequence[int] | None = None, merge_attn: bool = True, merge_crossattn: bool = False,
                  merge_mlp: bool = False, seed: int = 0, **params: Any) -> DiffusionSettings:
    """Validate :func:`unipruner.diffusion.patch`'s keywords into :class:`DiffusionSettings`."""
    if ratio is not None:
        ratio = _ratio(ratio, "ratio")
    sched = _schedule(schedule)
    if sched is None and ratio is None and budget is None and not isinstance(method, Method):
        raise UniprunerError("no budget: pass ratio= (fraction of the image tokens kept, in (0, 1]) or schedule=")
    if budget is not None and (budget.ratio is None or budget.data_dependent):
        raise UniprunerError(f"unipruner.diffusion budgets are fractions kept: pass ratio=, not {budget!r}")
    name = method if isinstance(method, str) else getattr(method, "name", None)
    if name not in DIFFUSION_METHODS:
        raise UniprunerError(
            f"method {name!r} does not serve the diffusion domain; unipruner.diffusion runs: "
            f"{', '.join(DIFFUSION_METHODS)}"
        )
    if isinstance(method, Method) and ratio is None and budget is None and sched is None:
        m = resolve(method)  # the instance's own budget
    else:
        m = resolve(method, budget, ratio=None if budget is not None else (1.0 if ratio is None else ratio), **params)
    if m.budget.ratio is None:
        raise UniprunerError(f"unipruner.diffusion budgets are fractions kept: pass ratio=, not {m.budget!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UniprunerError(f"seed must be an int, got {seed!r}")
    if max_downsample is not None and (isinstance(max_downsample, bool) or not isinstance(max_downsample, int)
                                       or max_downsample < 1 or max_downsample & (max_downsample - 1)):
        raise UniprunerError(f"max_downsample must be a power of two >= 1 (1, 2, 4, 8), got {max_downsample!r}")
    steps: tuple[float, ...] | None = None
    if timesteps is not None:
        try:
            steps = tuple(float(t) for t in timesteps)
        except (TypeError, ValueError) as e:
            raise UniprunerError(
                f"timesteps must be a sequence of numbers (scheduler.timesteps), got {timesteps!r}"
            ) from e
    blk: tuple[int, ...] | None = None
    if blocks is not None:
        if isinstance(blocks, (str, bytes)) or not isinstance(blocks, Sequence) or not blocks or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 0 for b in blocks):
            raise UniprunerError(f"blocks must be a non-empty sequence of block indices >= 0, got {blocks!r}")
        blk = tuple(sorted(set(blocks)))
    kind = kind_of(m)
    r = float(m.budget.ratio)
    if isinstance(m, ToMeSD):
        cap = 1.0 / (m.sx * m.sy)  # one destination per window survives
        for rr in [r, *(sched if isinstance(sched, tuple) else ()), *(v for _, v in _levels(levels) or ())]:
            if rr < cap - 1e-12:
                raise UniprunerError(
                    f"tomesd keeps at least one token per {m.sx}x{m.sy} window: ratio must be >= {cap:g}, got {rr:g}"
                )
    return DiffusionSettings(
        method=m, kind=kind, ratio=r, schedule=sched, timesteps=steps, levels=_levels(levels),
        max_downsample=max_downsample, blocks=blk, merge_attn=_flag(merge_attn, "merge_attn"),
        merge_crossattn=_flag(merge_crossattn, "merge_crossattn"), merge_mlp=_flag(merge_mlp, "merge_mlp"),
        seed=seed,
    )
