"""What a pruned VLM call kept (``VLMHandle.stats()``)."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["StageStats", "VLMStats"]


@dataclass(frozen=True)
class StageStats:
    """One stage of one call: visual tokens per image (or per row) before and after it.

    ``owner [n_images, N]`` gives, for every original visual token of every image, the slot of
    the pruned sequence that now holds it (``-1`` = dropped): tokens sharing a slot were merged.
    """

    where: str
    layer: int | None
    method: str
    before: tuple[int, ...]
    after: tuple[int, ...]
    owner: Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def kept(self) -> float:
        """Fraction of the visual tokens reaching the stage that it kept."""
        total = sum(self.before)
        return sum(self.after) / total if total else 1.0


@dataclass(frozen=True)
class VLMStats:
    """What the last prefill kept.

    Attributes
    ----------
    stages : tuple of StageStats
        In forward order.
    sequence : tuple of int
        Real tokens of each row entering the language model, before pruning.
    kv_slots : tuple of int
        Stored KV slots per decoder layer after the call (padding slots included; empty without a cache).
    n_layers : int
    """

    stages: tuple[StageStats, ...]
    sequence: tuple[int, ...]
    kv_slots: tuple[int, ...]
    n_layers: int

    @property
    def visual_kept(self) -> tuple[int, ...]:
        """Visual tokens per image after the last stage."""
        return self.stages[-1].after if self.stages else ()

    def __str__(self) -> str:
        parts = [f"{s.method}@{s.where if s.layer is None else f'layer {s.layer}'}: "
                 f"{sum(s.before)} -> {sum(s.after)} visual tokens" for s in self.stages]
        return "; ".join(parts) + (f"; KV slots per layer {list(self.kv_slots)}" if self.kv_slots else "")
