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
* :func:`contextual_merge` (VisionZip's contextual tokens), :func:`knn_merge` (LLaVA-PruMerge's
  attention-weighted k-nearest-neighbour update) and :func:`uniform_picks` (evenly spaced picks).
* :func:`downsample_grid` / :func:`grid_indices` (ToDo's key/value grid downsampling) and
  :func:`copy_recover` (AT-EDM's similarity-copy recovery of pruned tokens) for diffusion.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ._merge import MergeFn, MergePlan, UnmergeFn
from ._ops import batched_gather, cosine_matrix
from ._pooling import kmeans_labels, pool, pool_plan, recycle, sequential_labels, ward_cosine_labels, ward_labels
from ._validate import check_grid, check_mask, check_tokens
from .errors import UniprunerError

__all__ = [
    "MergeFn",
    "MergePlan",
    "UnmergeFn",
    "contextual_merge",
    "copy_recover",
    "downsample_grid",
    "drop",
    "grid_indices",
    "kmeans_labels",
    "knn_merge",
    "merge_pruned",
    "merge_wavg",
    "plan_from_labels",
    "pool",
    "pool_plan",
    "recycle",
    "sequential_labels",
    "uniform_picks",
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


def uniform_picks(candidates: Tensor, counts: Tensor) -> Tensor:
    """Pick ``counts[b]`` of each row's candidate positions, evenly spaced in original order.

    Among the ``R`` candidates of a row (in position order), the ranks ``0, s, 2s, ...`` with
    ``s = max(1, R // c)`` are taken, the first ``c = min(counts[b], R)`` of them: VisionZip's
    uniformly spaced contextual targets (Yang et al., "VisionZip: Longer is Better but Not
    Necessary in Vision Language Models", CVPR 2025) and PruMerge+'s spatially uniform samples
    (Shang et al., "LLaVA-PruMerge", 2024) over a row-major patch grid.

    Parameters
    ----------
    candidates : Tensor ``[B, N]`` bool
    counts : Tensor ``[B]`` integer, non-negative

    Returns
    -------
    Tensor ``[B, N]`` bool
        The picked positions (a subset of ``candidates``).

    Examples
    --------
    >>> uniform_picks(torch.ones(1, 10, dtype=torch.bool), torch.tensor([3])).nonzero()[:, 1].tolist()
    [0, 3, 6]
    """
    if not isinstance(candidates, Tensor) or candidates.ndim != 2 or candidates.dtype != torch.bool:
        raise UniprunerError("candidates must be a bool tensor [B, N]")
    if not isinstance(counts, Tensor) or tuple(counts.shape) != (candidates.shape[0],) or counts.is_floating_point():
        raise UniprunerError(f"counts must be an integer tensor [B] = ({candidates.shape[0]},)")
    if bool((counts < 0).any()):
        raise UniprunerError("counts must be non-negative")
    rank = torch.cumsum(candidates.long(), dim=1) - 1
    n_cand = candidates.sum(dim=1)
    c = torch.minimum(counts.long().to(candidates.device), n_cand)
    step = torch.div(n_cand, c.clamp(min=1), rounding_mode="floor").clamp(min=1).unsqueeze(1)
    return candidates & (rank % step == 0) & (torch.div(rank, step, rounding_mode="floor") < c.unsqueeze(1))


def _pack(order_key: Tensor, chosen: Tensor) -> tuple[Tensor, Tensor, int]:
    """Slots of the chosen positions ordered by ``order_key``: ``(positions [B, K], slot_of [B, N], K)``."""
    b, n = chosen.shape
    big = torch.iinfo(torch.long).max
    k = int(chosen.sum(dim=1).max()) if b else 0
    order = torch.sort(order_key.masked_fill(~chosen, big), dim=1, stable=True).indices[:, :k]
    ok = torch.arange(k, device=chosen.device).unsqueeze(0) < chosen.sum(dim=1, keepdim=True)
    positions = order.masked_fill(~ok, -1)
    slot_of = torch.full((b, n + 1), -1, dtype=torch.long, device=chosen.device)
    slot_of.scatter_(1, torch.where(ok, order, n), torch.arange(k, device=chosen.device).expand(b, k))
    return positions, slot_of[:, :n], k


def _check_select(x: Tensor, flags: Tensor, name: str) -> None:
    if not isinstance(flags, Tensor) or flags.dtype != torch.bool or tuple(flags.shape) != tuple(x.shape[:2]):
        raise UniprunerError(f"{name} must be a bool tensor [B, N] = {tuple(x.shape[:2])}")


def contextual_merge(x: Tensor, dominant: Tensor, n_contextual: Tensor, *, metric: Tensor | None = None,
                     size: Tensor | None = None, mask: Tensor | None = None
                     ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, MergePlan]:
    """VisionZip's reduction: the dominant tokens, then contextual tokens merged from the rest.

    Yang et al., "VisionZip: Longer is Better but Not Necessary in Vision Language Models",
    CVPR 2025. The valid tokens that are not dominant are split into ``n_contextual[b]`` target
    tokens, uniformly spaced in original order (:func:`uniform_picks`), and the others; each
    other token joins the target it is most cosine-similar to (on ``metric``: VisionZip uses the
    layer's keys), and every target becomes the size-weighted mean of itself and its members
    (the plain mean of VisionZip when ``size`` is ``None``). A row with no target drops its
    other tokens.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
    dominant : Tensor ``[B, N]`` bool
        The tokens kept as they are (valid positions only).
    n_contextual : Tensor ``[B]`` integer
        Contextual tokens per row (capped at the number of non-dominant valid tokens).
    metric : Tensor ``[B, N, Dk]``, optional
        What similarity is measured on (default ``x``).
    size : Tensor ``[B, N, 1]``, optional
        Tokens each input already stands for (default 1).
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are discarded.

    Returns
    -------
    (tokens ``[B, K, D]``, mask ``[B, K]`` or None, indices ``[B, K]``, sizes ``[B, K, 1]``, plan)
        Each row holds its dominant tokens (original order) and then its contextual tokens (in
        their targets' order), packed at the front; ``indices`` are the representatives' original
        positions (``-1`` for padding); ``plan`` maps every input to its slot, so the sizes of a
        row sum to its valid count when ``n_contextual >= 1``.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 2.0], [1.0, 0.1]]])
    >>> out, _, idx, sz, _ = contextual_merge(x, torch.tensor([[False, True, False, False]]), torch.tensor([1]))
    >>> idx.tolist(), sz[..., 0].tolist(), out[0, 1].tolist()
    ([[1, 0]], [[1.0, 3.0]], [0.6666666865348816, 0.699999988079071])
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise UniprunerError("x must be a tensor [B, N, D]")
    b, n = x.shape[:2]
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    _check_select(x, dominant, "dominant")
    if bool((dominant & ~valid).any()):
        raise UniprunerError("dominant tokens must be valid (unmasked) positions")
    metric = x if metric is None else metric
    if not isinstance(metric, Tensor) or metric.ndim != 3 or tuple(metric.shape[:2]) != (b, n):
        raise UniprunerError(f"metric must be a tensor [B, N, Dk] with [B, N] = {(b, n)}")
    rest = valid & ~dominant
    targets = uniform_picks(rest, n_contextual)
    others = rest & ~targets
    sim = cosine_matrix(metric, metric).masked_fill(~targets.unsqueeze(1), -torch.inf)  # [B, N(from), N(to)]
    nearest = sim.argmax(dim=-1)  # ties -> the first (lowest) target
    pos = torch.arange(n, device=x.device).expand(b, n)
    chosen = dominant | targets
    positions, slot_of, k = _pack(pos + n * targets.long(), chosen)
    dst = torch.where(chosen, slot_of, slot_of.gather(1, nearest))
    has_target = targets.any(dim=1, keepdim=True)
    dst = torch.where(chosen | (others & has_target), dst, torch.full_like(dst, -1))
    pad = positions < 0
    plan = MergePlan(dst, k, None if not bool(pad.any()) else ~pad)
    merged, sizes = merge_wavg(plan, x, size)
    return merged, plan.out_mask, positions, sizes, plan


def knn_merge(x: Tensor, keep: Tensor, weights: Tensor, *, k: int = 32, metric: Tensor | None = None,
              neighbours: Tensor | None = None, update: Tensor | None = None, size: Tensor | None = None,
              mask: Tensor | None = None, extra: bool = False
              ) -> tuple[Tensor, Tensor | None, Tensor, Tensor, MergePlan]:
    """LLaVA-PruMerge's merge: every kept token absorbs its ``k`` nearest tokens, attention-weighted.

    Shang et al., "LLaVA-PruMerge: Adaptive Token Reduction for Efficient Large Multimodal
    Models", 2024 (Algorithm 1, as in the released code): for a kept token ``p``, ``N_k(p)`` are
    the ``k`` tokens ``j != p`` among ``neighbours`` (the released code: every other token, kept
    or pruned; :class:`unipruner.methods.PruMerge` defaults to the pruned ones) with the largest cosine
    similarity of ``metric`` (the layer's keys), and ``y_p = x_p + sum_{j in N_k(p)} w_j x_j``
    with ``w`` the CLS attention (not renormalised, as released). With ``extra=True`` one more
    token per row, ``sum_{j pruned} w_j x_j``, follows the kept ones (the released code's extra
    token). The neighbourhoods overlap, so the returned ``plan`` is the partition used for sizes
    and unmerging: each pruned valid token belongs to the extra token when there is one, else to
    the kept token most similar to it.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
    keep : Tensor ``[B, K]`` long
        Sorted kept positions, right-padded with ``-1``.
    weights : Tensor ``[B, N]``
        Non-negative merge weights (PruMerge: the CLS attention); ignored at invalid positions.
    k : int
        Neighbours per kept token (capped at the tokens available).
    metric : Tensor ``[B, N, Dk]``, optional
        What similarity is measured on (default ``x``).
    neighbours : Tensor ``[B, N]`` bool, optional
        Tokens that may be merged into kept ones (default: the valid ones); e.g. without the CLS.
    update : Tensor ``[B, K]`` bool, optional
        Which kept slots absorb neighbours (default: all); e.g. not a protected CLS.
    size : Tensor ``[B, N, 1]``, optional
        Tokens each input already stands for (default 1); only the sizes use it.
    mask : Tensor ``[B, N]``, optional
        Validity mask.
    extra : bool
        Append the attention-weighted sum of the pruned tokens.

    Returns
    -------
    (tokens ``[B, K (+1), D]``, mask or None, indices ``[B, K (+1)]``, sizes ``[B, K (+1), 1]``, plan)
        ``indices`` are the kept positions and ``-1`` for the extra token and padding; a row's
        extra token (when it has pruned tokens) sits right after its kept ones.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]])
    >>> out, _, idx, sz, _ = knn_merge(x, torch.tensor([[0]]), torch.tensor([[0.5, 0.25, 0.25]]), k=1)
    >>> out[0, 0].tolist(), sz[..., 0].tolist()
    ([1.225000023841858, 0.02500000037252903], [[3.0]])
    """
    if not isinstance(x, Tensor) or x.ndim != 3:
        raise UniprunerError("x must be a tensor [B, N, D]")
    _check_indices(x, keep)
    b, n = x.shape[:2]
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise UniprunerError(f"k (neighbours per kept token) must be an int >= 1, got {k!r}")
    if not isinstance(weights, Tensor) or tuple(weights.shape) != (b, n) or not weights.is_floating_point():
        raise UniprunerError(f"weights must be a float tensor [B, N] = {(b, n)}")
    w = torch.where(valid, weights, torch.zeros_like(weights))
    if bool(torch.isnan(w).any()) or not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise UniprunerError("PruMerge weights the merged tokens by their attention, which must be finite and >= 0")
    metric = x if metric is None else metric
    if not isinstance(metric, Tensor) or metric.ndim != 3 or tuple(metric.shape[:2]) != (b, n):
        raise UniprunerError(f"metric must be a tensor [B, N, Dk] with [B, N] = {(b, n)}")
    if neighbours is None:
        neighbours = valid
    _check_select(x, neighbours, "neighbours")
    pad = keep < 0
    safe = keep.clamp(min=0)
    if bool((~valid.gather(1, safe) & ~pad).any()):
        raise UniprunerError("keep points at masked (padding) positions")
    kk = keep.shape[1]
    if update is None:
        update = ~pad
    if not isinstance(update, Tensor) or update.dtype != torch.bool or tuple(update.shape) != (b, kk):
        raise UniprunerError(f"update must be a bool tensor [B, K] = {(b, kk)}")
    update = update & ~pad
    pos = torch.arange(n, device=x.device)
    sim = cosine_matrix(batched_gather(metric, safe), metric)  # [B, K, N]
    allowed = neighbours.unsqueeze(1) & (pos.view(1, 1, n) != safe.unsqueeze(-1)) & update.unsqueeze(-1)
    top = sim.masked_fill(~allowed, -torch.inf).topk(min(k, n), dim=-1)
    wk = torch.where(torch.isfinite(top.values), w.unsqueeze(1).expand(b, kk, n).gather(2, top.indices),
                     torch.zeros_like(top.values))
    dense = torch.zeros(b, kk, n, dtype=x.dtype, device=x.device).scatter_(2, top.indices, wk.to(x.dtype))
    kept_x = batched_gather(x, safe)
    tokens = torch.where(pad.unsqueeze(-1), torch.zeros_like(kept_x), kept_x + dense @ x)
    kept = torch.zeros(b, n + 1, dtype=torch.bool, device=x.device)
    kept.scatter_(1, torch.where(pad, n, keep), True)
    pruned = valid & ~kept[:, :n]
    slot = torch.arange(kk, device=x.device).expand(b, kk)
    n_kept = (~pad).sum(dim=1)
    if extra:
        n_out = kk + 1
        agg = (x * w.unsqueeze(-1).to(x.dtype) * pruned.unsqueeze(-1)).sum(dim=1, keepdim=True)
        tokens = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1)
        tokens = tokens.scatter(1, n_kept.view(b, 1, 1).expand(b, 1, x.shape[2]), agg)
        dst = n_kept.unsqueeze(1).expand(b, n).clone()
        has_extra = pruned.any(dim=1)
        out_ok = torch.arange(n_out, device=x.device).unsqueeze(0) < (n_kept + has_extra.long()).unsqueeze(1)
        indices = torch.cat([keep, torch.full((b, 1), -1, dtype=keep.dtype, device=keep.device)], dim=1)
    else:
        n_out = kk
        dst = sim.masked_fill(pad.unsqueeze(-1), -torch.inf).argmax(dim=1)  # [B, N]: most similar kept slot
        out_ok = ~pad
        indices = keep
    dst = torch.cat([torch.where(pruned, dst, torch.full_like(dst, -1)), torch.zeros_like(dst[:, :1])], dim=1)
    dst = dst.scatter(1, torch.where(pad, n, keep), slot)[:, :n]  # kept -> own slot; padding -> spare column
    plan = MergePlan(dst, n_out, None if bool(out_ok.all()) else out_ok)
    if size is None:
        size = torch.ones_like(x[..., :1])
    sizes = plan.merge(size.reshape(b, n, 1).to(x.dtype), mode="sum")
    return tokens * out_ok.unsqueeze(-1).to(tokens.dtype), plan.out_mask, indices, sizes, plan


# ----------------------------------------------------------------------------------------------
# diffusion: key/value grid downsampling (ToDo) and similarity-copy recovery (AT-EDM)
# ----------------------------------------------------------------------------------------------

GRID_MODES = ("nearest", "nearest-exact", "area", "bilinear", "bicubic")


def grid_indices(hw: tuple[int, int], size: tuple[int, int], mode: str = "nearest",
                 device: torch.device | str | None = None) -> Tensor:
    """Row-major positions ``[h2 * w2]`` that nearest-neighbour resampling of an ``h x w`` grid reads.

    ``tokens[:, grid_indices(hw, size, mode)]`` equals ``downsample_grid(tokens, hw, size, mode)``
    for ``mode`` ``"nearest"`` (torch's floor rule, ToDo's default) and ``"nearest-exact"`` (the
    cell-centre rule); it is computed by resampling the index grid itself with
    :func:`torch.nn.functional.interpolate`, so the two agree exactly. The result is strictly
    increasing whenever ``size`` is no larger than ``hw`` on both sides.

    Examples
    --------
    >>> grid_indices((4, 4), (2, 2)).tolist()
    [0, 2, 8, 10]
    >>> grid_indices((4, 4), (2, 2), "nearest-exact").tolist()
    [5, 7, 13, 15]
    """
    if mode not in ("nearest", "nearest-exact"):
        raise UniprunerError(f"grid_indices needs mode 'nearest' or 'nearest-exact', got {mode!r}")
    h, w = check_grid(hw)
    h2, w2 = check_grid(size, name="size")
    pos = torch.arange(h * w, dtype=torch.float64, device=device).reshape(1, 1, h, w)
    return torch.nn.functional.interpolate(pos, size=(h2, w2), mode=mode).reshape(-1).round().long()


def downsample_grid(tokens: Tensor, hw: tuple[int, int], size: tuple[int, int], mode: str = "nearest") -> Tensor:
    """Resample a row-major token grid ``[B, h*w, C]`` to ``[B, h2*w2, C]`` (ToDo's K/V downsampling).

    Smith, Saxena & Saha, "ToDo: Token Downsampling for Efficient Generation of High-Resolution
    Images", 2024: self-attention reads its keys and values from a spatially downsampled copy of
    the token grid while every query stays. The grid is viewed as an image ``[B, C, h, w]`` and
    resized with :func:`torch.nn.functional.interpolate` (``align_corners=False``): ``"nearest"``
    (torch's floor rule, the released code's default), ``"nearest-exact"``, ``"area"`` (average
    pooling over each cell), ``"bilinear"`` or ``"bicubic"``. Every mode is a per-token linear map
    whose weights sum to 1, so downsampling the hidden states before the key / value projections
    equals downsampling the projected keys / values (the bias included). The input is never modified;
    ``size == hw`` returns a copy of the tokens.

    Parameters
    ----------
    tokens : Tensor ``[B, h*w, C]``
        Row-major grid of tokens (floating point).
    hw : (int, int)
        The grid ``(h, w)``; ``h * w`` must equal the token count.
    size : (int, int)
        The output grid ``(h2, w2)``, ``1 <= h2 <= h`` and ``1 <= w2 <= w``.
    mode : str
        One of :data:`GRID_MODES`.

    Returns
    -------
    Tensor ``[B, h2*w2, C]``
        The resampled grid, row-major, in the tokens' dtype.

    Examples
    --------
    >>> x = torch.arange(16.).reshape(1, 16, 1)
    >>> downsample_grid(x, (4, 4), (2, 2)).flatten().tolist()
    [0.0, 2.0, 8.0, 10.0]
    >>> downsample_grid(x, (4, 4), (2, 2), "area").flatten().tolist()
    [2.5, 4.5, 10.5, 12.5]
    """
    tokens = check_tokens(tokens)
    h, w = check_grid(hw, tokens.shape[1])
    if mode not in GRID_MODES:
        raise UniprunerError(f"mode must be one of {GRID_MODES}, got {mode!r}")
    h2, w2 = check_grid(size, name="size")
    if not (h2 <= h and w2 <= w):
        raise UniprunerError(f"size={(h2, w2)} must lie between (1, 1) and the grid {(h, w)} on both sides")
    b, _, c = tokens.shape
    if (h2, w2) == (h, w):
        return tokens.clone()
    img = tokens.reshape(b, h, w, c).permute(0, 3, 1, 2)
    kwargs = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    out = torch.nn.functional.interpolate(img, size=(h2, w2), mode=mode, **kwargs)
    return out.permute(0, 2, 3, 1).reshape(b, h2 * w2, c)


def copy_recover(kept: Tensor, keep: Tensor, features: Tensor, *, base: Tensor | None = None) -> Tensor:
    """Spread ``[B, K, C]`` kept-token outputs back to all ``N`` tokens by similarity copy (AT-EDM).

    Wang et al., "Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models"
    (AT-EDM), CVPR 2024: after an attention block ran on the kept tokens only, the pruned tokens
    are restored before the next convolution, each from the kept token it is most similar to.
    Similarity is the cosine of ``features`` (e.g. the block's input hidden states or its keys);
    among equally similar kept tokens the first (lowest slot) wins. Kept positions get their own
    output back.

    Two variants:

    * plain copy (``base=None``, the paper's): ``out[j] = kept[m(j)]`` for a pruned token ``j``
      whose most similar kept token is ``m(j)``;
    * residual copy (``base=`` the block input ``[B, N, C]``): the pruned token keeps its own
      input and receives the most similar kept token's *update*,
      ``out[j] = base[j] + (kept[m(j)] - base[keep[m(j)]])``; kept positions still get
      ``kept`` exactly. With a block that adds a residual this keeps each pruned token's own
      content and copies only what the block would have added.

    Parameters
    ----------
    kept : Tensor ``[B, K, C]``
        Outputs of the kept tokens, in the order of ``keep``.
    keep : Tensor ``[B, K]`` long
        Original positions of the kept tokens (as from ``select``; ``-1`` padding allowed and
        ignored).
    features : Tensor ``[B, N, D]``
        What similarity is measured on, for all ``N`` tokens.
    base : Tensor ``[B, N, C]``, optional
        The block inputs of all tokens: switches to the residual variant.

    Returns
    -------
    Tensor ``[B, N, C]``
        Dense outputs; nothing is modified in place.

    Examples
    --------
    >>> f = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]]])
    >>> y = torch.tensor([[[10.0], [20.0]]])
    >>> copy_recover(y, torch.tensor([[0, 2]]), f).flatten().tolist()
    [10.0, 10.0, 20.0, 20.0]
    >>> copy_recover(y, torch.tensor([[0, 2]]), f, base=torch.ones(1, 4, 1)).flatten().tolist()
    [10.0, 10.0, 20.0, 20.0]
    """
    features = check_tokens(features, "features")
    kept = check_tokens(kept, "kept", min_tokens=0)
    b, n = features.shape[:2]
    _check_indices(features, keep)
    if tuple(kept.shape[:2]) != tuple(keep.shape):
        raise UniprunerError(f"kept {tuple(kept.shape)} must be [B, K, C] with [B, K] = keep's {tuple(keep.shape)}")
    pad = keep < 0
    if keep.shape[1] == 0 or bool(pad.all(dim=1).any()):
        raise UniprunerError("copy_recover needs at least one kept token per row to copy from")
    safe = keep.clamp(min=0)
    sim = cosine_matrix(features, batched_gather(features, safe)).masked_fill(pad.unsqueeze(1), -torch.inf)
    src = sim.argmax(dim=-1)  # [B, N]: most similar kept slot of every token
    if base is None:
        delta = kept
    else:
        if not isinstance(base, Tensor) or tuple(base.shape) != (b, n, kept.shape[2]):
            shape = tuple(base.shape) if isinstance(base, Tensor) else type(base).__name__
            raise UniprunerError(f"base must be the block inputs [B, N, C] = {(b, n, kept.shape[2])}, got {shape}")
        delta = kept - batched_gather(base, safe).to(kept.dtype)
    out = batched_gather(delta, src)
    if base is not None:
        out = base.to(kept.dtype) + out
    # kept positions get their own output exactly (padding entries write into a spare row)
    out = torch.cat([out, out.new_zeros(b, 1, out.shape[2])], dim=1)
    dst = torch.where(pad, n, keep).unsqueeze(-1).expand(-1, -1, out.shape[2])
    return out.scatter(1, dst, kept)[:, :n]
