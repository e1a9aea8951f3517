"""The one merge mechanism every merging method shares.

A :class:`MergePlan` maps each input token to an output slot (``dst[b, i]``; ``-1`` = the token
is discarded, e.g. padding). Merging is a scatter-reduce over that map, unmerging a gather.
ToMe's bipartite matching, ToMeSD's stride matching, EViT's fusion of inattentive tokens,
Ward / k-means pooling and recycling all produce plans, so sizes, source tracking and dense
unmerging behave the same everywhere.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .errors import UniprunerError

__all__ = ["MergeFn", "MergePlan", "UnmergeFn"]

MergeFn = Callable[..., Tensor]
UnmergeFn = Callable[[Tensor], Tensor]

_MODES = ("mean", "sum", "amax", "amin", "prod")


@dataclass(frozen=True, eq=False)
class MergePlan:
    """Output slot of every input token: ``dst [B, N]`` long in ``[-1, n_out)``.

    ``out_mask [B, n_out]`` marks which output slots are real (ragged batches); ``None`` means
    every slot of every row is real. ``rep [B, n_out]`` (optional) is the input position that
    stands for each slot (the destination a matching kept in place), for callers that carry
    per-position data such as rotary frequencies; matchings that know it set it.
    """

    dst: Tensor
    n_out: int
    out_mask: Tensor | None = None
    rep: Tensor | None = None

    def __post_init__(self) -> None:
        if self.dst.ndim != 2 or self.dst.dtype != torch.long:
            raise UniprunerError(
                f"MergePlan.dst must be a long tensor [B, N], got {self.dst.dtype} {tuple(self.dst.shape)}"
            )

    @property
    def n_in(self) -> int:
        """Number of input tokens."""
        return int(self.dst.shape[1])

    def merge(self, x: Tensor, mode: str = "mean") -> Tensor:
        """Reduce ``x [B, N, ...]`` to ``[B, n_out, ...]`` by ``mode`` over each slot's members."""
        if mode not in _MODES:
            raise UniprunerError(f"merge mode must be one of {_MODES}, got {mode!r}")
        if x.shape[:2] != self.dst.shape:
            raise UniprunerError(
                f"merge expects [B, N, ...] = {tuple(self.dst.shape)} leading dims, got {tuple(x.shape)}"
            )
        b, n = self.dst.shape
        dst = torch.where(self.dst < 0, torch.full_like(self.dst, self.n_out), self.dst)
        idx = dst.reshape(b, n, *([1] * (x.ndim - 2))).expand_as(x)
        out = x.new_zeros((b, self.n_out + 1, *x.shape[2:]))
        if mode == "mean" and x.is_floating_point():
            # sum, then divide by the members: the same mean as scatter_reduce("mean"), ~4x faster on CPU
            out.scatter_add_(1, idx, x)
            count = torch.zeros(b, self.n_out + 1, dtype=x.dtype, device=x.device)
            count.scatter_add_(1, dst, torch.ones_like(dst, dtype=x.dtype))
            count = count.clamp(min=1).reshape(b, self.n_out + 1, *([1] * (x.ndim - 2)))
            return (out / count)[:, : self.n_out]
        out.scatter_reduce_(1, idx, x, reduce=mode, include_self=False)
        return out[:, : self.n_out]

    def unmerge(self, y: Tensor) -> Tensor:
        """Broadcast ``y [B, n_out, ...]`` back to ``[B, N, ...]`` (discarded tokens get zeros)."""
        if y.shape[:2] != (self.dst.shape[0], self.n_out):
            raise UniprunerError(f"unmerge expects [B, {self.n_out}, ...], got {tuple(y.shape)}")
        b, n = self.dst.shape
        idx = self.dst.clamp(min=0)
        out = y.gather(1, idx.reshape(b, n, *([1] * (y.ndim - 2))).expand(b, n, *y.shape[2:]))
        if not self.dst.is_meta and bool((self.dst < 0).any()):
            keep = (self.dst >= 0).reshape(b, n, *([1] * (y.ndim - 2)))
            out = out * keep
        return out

    def closures(self) -> tuple[MergeFn, UnmergeFn]:
        """``(merge, unmerge)`` functions in ToMe's style: ``merge(x, mode="mean")``, ``unmerge(y)``."""

        def merge(x: Tensor, mode: str = "mean") -> Tensor:
            return self.merge(x, mode)

        def unmerge(y: Tensor) -> Tensor:
            return self.unmerge(y)

        merge.plan = self  # type: ignore[attr-defined]
        unmerge.plan = self  # type: ignore[attr-defined]
        return merge, unmerge

    @staticmethod
    def from_fn(merge: MergeFn) -> MergePlan:
        """Recover the plan behind a ``merge`` closure made by :meth:`closures`."""
        plan = getattr(merge, "plan", None)
        if not isinstance(plan, MergePlan):
            raise UniprunerError("this merge function was not made by a unipruner MergePlan")
        return plan
