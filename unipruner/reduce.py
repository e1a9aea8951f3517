"""What happens to the tokens that do not survive: drop, merge, pool or recycle.

* :func:`drop` gathers the kept tokens (understands ``-1`` padding from ragged selections).
* :class:`MergePlan` / :func:`merge_wavg`: size-weighted merging (ToMe, Bolya et al. 2023); the
  plan's ``dst`` map is the source tracking (compose it across layers: ``dst2.gather(1, dst1)``)
  and ``plan.unmerge`` the dense unmerging.
* :func:`merge_pruned` folds each pruned token into its most similar kept token (EViT-style
  fusion generalised; ToMe's size-weighted mean).
* :func:`ward_labels`, :func:`ward_cosine_labels` (PyLate's criterion), :func:`kmeans_labels`
  (torch or faiss) and :func:`sequential_labels` cluster the tokens of every sequence of a batch.
* :func:`pool` pools documents by Ward hierarchical clustering or k-means (Clavié et al.,
  "Reducing the Footprint of Multi-Vector Retrieval with Minimal Performance Impact via Token
  Pooling", 2024); :func:`recycle` folds pruned tokens into a few aggregate tokens (SparseVLM).
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._merge import MergeFn, MergePlan, UnmergeFn
from ._ops import batched_gather, cosine_matrix
from ._pooling import kmeans_labels, pool, pool_plan, recycle, sequential_labels, ward_cosine_labels, ward_labels
from ._validate import check_mask
from .errors import UniprunerError

__all__ = [
    "MergeFn",
    "MergePlan",
    "UnmergeFn",
    "drop",
    "kmeans_labels",
    "merge_pruned",
    "merge_wavg",
    "plan_from_labels",
    "pool",
    "pool_plan",
    "recycle",
    "sequential_labels",
    "ward_cosine_labels",
    "ward_labels",
]


def _check_indices(x: Tensor, indices: Tensor) -> None:
    if not isinstance(indices, Tensor) or indices.ndim != 2 or indices.dtype != torch.long:
        raise UniprunerError("indices must be a long tensor [B, K] (as returned by select/topk)")
    if indices.shape[0] != x.shape[0]:
        raise UniprunerError(f"indices have batch size {indices.shape[0]} but x has {x.shape[0]}")
    if indices.numel() and (int(indices.max()) >= x.shape[1] or int(indices.min()) < -1):
        raise UniprunerError(f"indices must lie in [0, {x.shape[1]}) (or -1 for padding)")


def drop(x: Tensor, indices: Tensor, mask: Tensor | None = None) -> tuple[Tensor, Tensor | None]:
    """Keep the tokens at ``indices`` and drop the rest.

    Parameters
    ----------
    x : Tensor ``[B, N, ...]``
    indices : Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1`` in ragged batches.
    mask : Tensor ``[B, N]``, optional
        Validity mask of ``x``; checked against the indices.

    Returns
    -------
    (Tensor ``[B, K, ...]``, Tensor ``[B, K]`` or None)
        The kept tokens (padding rows filled with zeros) and their validity mask (``None`` when
        there is no padding).

    Examples
    --------
    >>> x = torch.arange(12.).reshape(1, 6, 2)
    >>> drop(x, torch.tensor([[0, 3]]))[0]
    tensor([[[0., 1.],
             [6., 7.]]])
    """
    if not isinstance(x, Tensor) or x.ndim < 2:
        raise UniprunerError("x must be a tensor [B, N, ...]")
    _check_indices(x, indices)
    mask = check_mask(mask, x.shape[0], x.shape[1])
    pad = indices < 0
    safe = indices.clamp(min=0)
    if mask is not None and bool((~mask.gather(1, safe) & ~pad).any()):
        raise UniprunerError("indices point at masked (padding) positions")
    out = batched_gather(x, safe)
    if not bool(pad.any()):
        return out, None
    keep = ~pad
    out = out * keep.reshape(keep.shape + (1,) * (x.ndim - 2)).to(out.dtype)
    return out, keep


def merge_wavg(merge: MergeFn | MergePlan, x: Tensor, size: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Size-weighted average merge (ToMe): returns the merged tokens and their new sizes.

    ``size [B, N, 1]`` counts how many original tokens each token already stands for
    (``None`` = all ones). Sizes add up under merging, so ``size.sum(1)`` is invariant.
    """
    m = merge.merge if isinstance(merge, MergePlan) else merge
    if size is None:
        size = torch.ones_like(x[..., :1])
    xs = m(x * size, mode="sum")
    s = m(size, mode="sum")
    return xs / s.clamp(min=torch.finfo(s.dtype).tiny), s


def plan_from_labels(labels: Tensor, n_out: int | None = None) -> MergePlan:
    """A :class:`MergePlan` from cluster labels ``[B, N]`` (``-1`` = discard)."""
    if labels.ndim != 2:
        raise UniprunerError(f"labels must be [B, N], got {tuple(labels.shape)}")
    labels = labels.long()
    k = int(labels.max()) + 1 if n_out is None else n_out
    counts = torch.zeros(labels.shape[0], k + 1, dtype=torch.long, device=labels.device)
    counts.scatter_add_(1, torch.where(labels < 0, k, labels), torch.ones_like(labels))
    occupied = counts[:, :k] > 0
    return MergePlan(labels, k, None if bool(occupied.all()) else occupied)


def merge_pruned(x: Tensor, keep: Tensor, *, metric: Tensor | None = None,
                 size: Tensor | None = None, mask: Tensor | None = None) -> tuple[Tensor, Tensor, MergePlan]:
    """Fold every pruned token into its most similar kept token (size-weighted mean).

    The "merge" variant of any selector: instead of losing the pruned tokens' content, each is
    averaged into the kept token it is closest to (cosine on ``metric``, default ``x``), as in
    ToMe's size-weighted merging. Returns ``(merged [B, K, D], sizes [B, K, 1], plan)``.
    """
    _check_indices(x, keep)
    b, n = x.shape[:2]
    mask = check_mask(mask, b, n)
    metric = x if metric is None else metric
    pad = keep < 0
    safe = keep.clamp(min=0)
    sim = cosine_matrix(metric, batched_gather(metric, safe))  # [B, N, K]
    sim = sim.masked_fill(pad.unsqueeze(1), -torch.inf)
    dst = torch.cat([sim.argmax(dim=-1), torch.zeros_like(keep[:, :1])], dim=1)  # [B, N + 1]
    # kept tokens map to their own slot; padding entries write into the spare last column
    slot = torch.arange(keep.shape[1], device=x.device).expand_as(keep)
    dst.scatter_(1, torch.where(pad, n, keep), slot)
    dst = dst[:, :n]
    if mask is not None:
        dst = dst.masked_fill(~mask, -1)
    plan = MergePlan(dst, keep.shape[1], None if not bool(pad.any()) else ~pad)
    merged, sizes = merge_wavg(plan, x, size)
    return merged, sizes, plan
