"""Pure torch bookkeeping of a pruned multimodal sequence (no host library).

A row of a VLM's input is text tokens, visual tokens (one run per image) and left padding. A
stage scores the visual tokens **per image** (or per row), as ``[n_blocks, N, D]`` blocks with a
validity mask, and the kept tokens — text always, padding never — are packed again into a
left-padded ``[B, K]`` sequence in their original order. Merged tokens replace their
representative; aggregate tokens (a method's fused / contextual tokens with no representative)
go right after their image's last visual token and take its position id.

Everything is vectorised over rows, images and tokens (sorts, gathers, scatters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["Blocks", "Packed", "blocks", "gather_last", "pack", "row_query"]


@dataclass(frozen=True)
class Blocks:
    """Visual tokens grouped per image (or per row), left-padded.

    Attributes
    ----------
    flat : Tensor ``[n, N]`` long
        Index of each block slot into the flattened ``[B * L]`` sequence (``-1`` = padding).
    mask : Tensor ``[n, N]`` bool
        Valid slots.
    row : Tensor ``[n]`` long
        The batch row of each block.
    """

    flat: Tensor
    mask: Tensor
    row: Tensor

    @property
    def counts(self) -> Tensor:
        """Valid tokens per block ``[n]``."""
        return self.mask.sum(-1)

    def take(self, x: Tensor) -> Tensor:
        """``x [B, L, ...]`` -> ``[n, N, ...]`` at the block slots (padding slots hold row 0's token 0)."""
        b, n = x.shape[0], x.shape[1]
        flat = x.reshape(b * n, *x.shape[2:])
        return flat[self.flat.clamp(min=0)]


def blocks(visual: Tensor, group: Tensor) -> Blocks:
    """Group the visual tokens of ``visual [B, L]`` (bool) into blocks.

    ``group [Nv]`` (long) gives the block of every visual token in row-major order, non-decreasing
    (images fill the placeholders in that order; a row's tokens form one block with
    ``group = row``).

    >>> v = torch.tensor([[False, True, True, True], [False, False, True, True]])
    >>> b = blocks(v, torch.tensor([0, 0, 1, 2, 2]))
    >>> b.flat.tolist(), b.row.tolist()
    ([[1, 2], [-1, 3], [6, 7]], [0, 0, 1])
    """
    n = visual.shape[1]
    pos = torch.nonzero(visual.flatten(), as_tuple=False).squeeze(1)
    n_blocks = int(group.max()) + 1 if group.numel() else 0
    counts = torch.bincount(group, minlength=n_blocks)
    nmax = int(counts.max()) if n_blocks else 0
    starts = torch.cumsum(counts, 0) - counts
    rank = torch.arange(group.numel(), device=visual.device) - starts[group]
    col = rank + (nmax - counts)[group]
    flat = torch.full((n_blocks, nmax), -1, dtype=torch.long, device=visual.device)
    flat[group, col] = pos
    row = torch.zeros(n_blocks, dtype=torch.long, device=visual.device)
    row[group] = pos // n
    return Blocks(flat, flat >= 0, row)


@dataclass(frozen=True)
class Packed:
    """A left-padded packing of kept slots: ``index [B, K]`` into the source, ``valid [B, K]``."""

    index: Tensor
    valid: Tensor

    def take(self, x: Tensor, dim: int = 1) -> Tensor:
        """Gather ``x`` (batch at ``dim - 1``, sequence at ``dim``) at the packed slots; padding repeats slot 0."""
        idx = self.index
        shape = [1] * x.ndim
        shape[dim - 1], shape[dim] = idx.shape
        view = idx.reshape(shape)
        expand = list(x.shape)
        expand[dim] = idx.shape[1]
        return x.gather(dim, view.expand(expand))


def pack(keys: Tensor) -> Packed:
    """Pack the finite entries of ``keys [B, M]`` in ascending key order, left-padded to the longest row.

    ``+inf`` marks dropped slots; ties keep source order (stable sort).

    >>> p = pack(torch.tensor([[0., float("inf"), 2., 1.5], [float("inf"), 1., float("inf"), 3.]]))
    >>> p.index.tolist(), p.valid.tolist()
    ([[0, 3, 2], [3, 1, 3]], [[True, True, True], [False, True, True]])
    """
    order = torch.sort(keys, dim=1, stable=True).indices
    count = torch.isfinite(keys).sum(1)
    kmax = int(count.max()) if keys.numel() else 0
    j = torch.arange(kmax, device=keys.device)[None, :]
    src = j - (kmax - count)[:, None]
    valid = src >= 0
    index = order.gather(1, src.clamp(min=0))
    first = index[:, -1:] if kmax else index  # padding points at a real slot (the row's last kept one)
    index = torch.where(valid, index, first.expand_as(index))
    return Packed(index, valid)


def gather_last(x: Tensor, index: Tensor) -> Tensor:
    """``x [..., B, M]`` gathered along its last dim by ``index [B, K]`` (M-RoPE rows share the index)."""
    lead = x.shape[:-2]
    idx = index.reshape((1,) * len(lead) + tuple(index.shape)).expand(*lead, *index.shape)
    return x.gather(-1, idx)


def row_query(hidden: Tensor, text: Tensor) -> Tensor:
    """Mean of each row's text-token states ``[B, D]`` (``text [B, L]`` bool): the query of text-guided methods."""
    w = text.to(hidden.dtype)[..., None]
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1)
