"""What one patched denoiser call reduced: per block, and the attention FLOPs it saved."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from ...errors import UniprunerError

__all__ = ["DiffusionStats", "SiteStats", "attention_flops"]


def attention_flops(n_q: int, n_kv: int, dim: int) -> int:
    """Multiply-add FLOPs (x2) of one self-attention: q / out projections on ``n_q`` tokens, k / v
    projections on ``n_kv``, ``QK^T`` and ``AV``."""
    return 2 * dim * dim * (2 * n_q + 2 * n_kv) + 4 * n_q * n_kv * dim


@dataclass(frozen=True)
class SiteStats:
    """One block in one call.

    Attributes
    ----------
    name : str
        The block's module name.
    factor : int
        Its downsample factor (1 = full latent resolution; DiTs are always 1).
    grid : tuple of int
        Its image-token grid ``(h, w)``.
    tokens : int
        Image tokens entering the block.
    queries, keys : int
        Image tokens the self-attention computed as queries and attended to as keys / values.
    ratio : float
        The ratio applied (1.0 when the block was left alone in this call).
    dim : int
        Hidden size (for the FLOPs estimate).
    """

    name: str
    factor: int
    grid: tuple[int, int]
    tokens: int
    queries: int
    keys: int
    ratio: float
    dim: int

    @property
    def flops(self) -> int:
        return attention_flops(self.queries, self.keys, self.dim)

    @property
    def flops_full(self) -> int:
        return attention_flops(self.tokens, self.tokens, self.dim)


@dataclass(frozen=True)
class DiffusionStats:
    """What the last patched call reduced.

    Attributes
    ----------
    method : str
    step : int or None
        The denoising step (index into the scheduler's timesteps), when known.
    progress : float
        0 at the first step, 1 at the last (from the timestep).
    batch : int
    sites : tuple of SiteStats
        Every patched block that ran, in call order.
    """

    method: str
    step: int | None
    progress: float
    batch: int
    sites: tuple[SiteStats, ...]
    _map: tuple[Tensor, tuple[int, int]] | None = field(default=None, repr=False)

    @property
    def flops_ratio(self) -> float:
        """Self-attention FLOPs computed / FLOPs of the same blocks unreduced (theoretical, over the
        patched blocks; the benchmark counts the whole model with ``FlopCounterMode``)."""
        full = sum(s.flops_full for s in self.sites)
        return 1.0 if full == 0 else sum(s.flops for s in self.sites) / full

    @property
    def reduced(self) -> bool:
        """Whether any block computed fewer queries or keys than it received."""
        return any(s.queries < s.tokens or s.keys < s.tokens for s in self.sites)

    def merge_map(self) -> tuple[Tensor, tuple[int, int]]:
        """``(dst [N] long, (h, w))`` of the first full-resolution block's reduction in the last call,
        first batch row: the output slot of every latent token (``-1`` = pruned), for drawing."""
        if self._map is None:
            raise UniprunerError("no reduction map recorded: the last call reduced no full-resolution block")
        return self._map

    def table(self) -> str:
        """A plain-text table, one line per block."""
        lines = [f"{'block':<48} {'factor':>6} {'grid':>9} {'tokens':>7} {'queries':>7} {'keys':>7} {'ratio':>6}"]
        for s in self.sites:
            lines.append(f"{s.name:<48} {s.factor:>6} {s.grid[0]:>4}x{s.grid[1]:<4} {s.tokens:>7} {s.queries:>7} "
                         f"{s.keys:>7} {s.ratio:>6.2f}")
        lines.append(f"self-attention FLOPs kept: {self.flops_ratio:.3f}")
        return "\n".join(lines)
