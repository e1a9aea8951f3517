"""Pooling and recycling internals behind :mod:`unipruner.reduce`.

* :func:`ward_labels`: exact Ward agglomerative clustering, batched over many sequences at once
  (stored distance matrix, Lance–Williams updates, nearest-neighbour arrays).
* :func:`ward_cosine_labels`: the same merge loop on PyLate's criterion, Ward fed ``1 - cos``.
* :func:`kmeans_labels`: batched Lloyd's k-means with k-means++ seeding (or faiss, one call per row).
* :func:`sequential_labels`: 1-D pooling, equal runs of consecutive tokens.
* :func:`pool` / :func:`pool_plan`: token pooling of multi-vector documents (Clavié, Chaffin &
  Adams 2024): protected leading tokens kept, the rest replaced by cluster means.
* :func:`recycle`: pruned tokens folded into a few aggregate tokens (SparseVLM-style recycling).

Cluster labels are always numbered ``0 .. k_b - 1`` in the order of each cluster's first member
(so pooled outputs keep the sequence order roughly) and are ``-1`` at masked positions.
"""

from __future__ import annotations

import math
from types import SimpleNamespace
from typing import overload

import numpy as np
import torch
from torch import Tensor

from ._merge import MergePlan
from ._ops import batched_gather, l2_normalize, pairwise_sq_dist
from ._threads import limit_threads
from ._validate import check_finite, check_mask, check_tokens
from .errors import UniprunerError

__all__ = ["kmeans_labels", "pool", "pool_plan", "recycle", "sequential_labels", "ward_cosine_labels",
           "ward_labels"]

#: Memory budget of one chunk's ``[chunk, N, N]`` distance matrix in :func:`ward_labels`.
WARD_CHUNK_BYTES = 32 * 2**20

_METHODS = ("ward", "kmeans")
#: k-means solvers of :func:`kmeans_labels`
KMEANS_BACKENDS = ("torch", "faiss")


# ----------------------------------------------------------------------------------------------
# shared helpers
# ----------------------------------------------------------------------------------------------


def _work_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else is clustered in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _cluster_counts(n_clusters: Tensor | int, n_valid: Tensor, n: int) -> Tensor:
    """Validate ``n_clusters`` and clamp it per row to ``[min(1, n_valid), n_valid]``."""
    b = n_valid.shape[0]
    if isinstance(n_clusters, Tensor):
        if n_clusters.shape != (b,) or n_clusters.is_floating_point() or n_clusters.is_complex():
            raise UniprunerError(
                f"per-row n_clusters must be an integer tensor of shape [B] = ({b},), "
                f"got {n_clusters.dtype} {tuple(n_clusters.shape)}"
            )
        k = n_clusters.to(device=n_valid.device, dtype=torch.long)
        if b and (bool((k < 0).any()) or bool((k > n).any())):
            raise UniprunerError(f"per-row n_clusters must lie in [1, {n}], got {k.tolist()}")
    else:
        if isinstance(n_clusters, bool) or not isinstance(n_clusters, int):
            raise UniprunerError(f"n_clusters must be an int or a [B] tensor, got {n_clusters!r}")
        if not 1 <= n_clusters <= n:
            raise UniprunerError(
                f"n_clusters must lie in [1, {n}] (the number of tokens), got {n_clusters}"
            )
        k = torch.full((b,), n_clusters, dtype=torch.long, device=n_valid.device)
    # a row with tokens gets at least one cluster; a row never gets more clusters than tokens
    return torch.minimum(k.clamp(min=1), n_valid)


def _check_finite_tokens(x: Tensor, name: str = "x") -> None:
    """Raise on NaN or inf in ``x [..., D]`` (one cheap reduction: the vector norms)."""
    if x.numel() and not bool(torch.isfinite(torch.linalg.vector_norm(x, dim=-1)).all()):
        raise UniprunerError(f"{name} contains NaN or inf; check the model outputs that produced them")


def _segment_sum(values: Tensor, dst: Tensor, n_out: int) -> Tensor:
    """``out[b, s] = sum of values[b, i] over i with dst[b, i] == s`` (``-1`` = dropped).

    ``values [B, N, C]`` -> contiguous ``[B, n_out, C]``; one ``index_add_`` over the flattened
    batch (dropped tokens go to one spare row), much faster on CPUs than ``scatter_reduce``.
    """
    b, n, ch = values.shape
    slot = dst + torch.arange(b, device=dst.device).unsqueeze(1) * n_out
    slot = slot.masked_fill_(dst < 0, b * n_out)
    out = values.new_zeros(b * n_out + 1, ch)
    out.index_add_(0, slot.reshape(-1), values.reshape(b * n, ch))
    return out[: b * n_out].view(b, n_out, ch)


def _segment_count(dst: Tensor, n_out: int, dtype: torch.dtype) -> Tensor:
    """Members of every slot, ``[B, n_out, 1]`` (``-1`` = dropped)."""
    cnt = torch.zeros(dst.shape[0], n_out + 1, dtype=torch.long, device=dst.device)
    cnt.scatter_add_(1, torch.where(dst < 0, n_out, dst), torch.ones_like(dst))
    return cnt[:, :n_out, None].to(dtype)


def _relabel_by_first_member(raw: Tensor, valid: Tensor, n_slots: int) -> Tensor:
    """Renumber labels ``[B, N]`` in ``[0, n_slots)`` by first-member order (``-1`` if invalid)."""
    b, n = raw.shape
    if n_slots == 0:
        return torch.full_like(raw, -1)
    lab = torch.where(valid, raw, torch.full_like(raw, n_slots))
    pos = torch.arange(n, device=raw.device).expand(b, n)
    first = torch.full((b, n_slots + 1), n, dtype=torch.long, device=raw.device)
    first.scatter_reduce_(1, lab, pos, reduce="amin", include_self=True)
    order = torch.argsort(first[:, :n_slots], dim=1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(n_slots, device=raw.device).expand(b, n_slots))
    out = rank.gather(1, lab.clamp(max=n_slots - 1))
    return out.masked_fill(~valid, -1)


# ----------------------------------------------------------------------------------------------
# Ward
# ----------------------------------------------------------------------------------------------


def _ward_chunk(d: Tensor, valid: Tensor, steps: Tensor) -> Tensor:
    """Agglomerate ``d [C, n, n]`` (symmetric Ward distances, ``inf`` on the diagonal and at
    padding columns).

    Rows are sorted by ``steps`` (merges to perform) in descending order, so the unfinished rows
    at any step are a prefix of the chunk. Returns the union-find parent array ``[C, n]``: every
    merge links the higher index under the lower one, so each root is its cluster's first member.
    """
    c, n, _ = d.shape
    dev = d.device
    inf = math.inf
    gone = torch.finfo(d.dtype).max  # nnd of dead rows: never the minimum, never equal to a distance
    rows_flat = d.view(c * n, n)  # row (b, i) of every matrix
    d_t = d.transpose(1, 2)  # d_t[b, i] is column i of matrix b
    # additive penalty: 0 for live clusters, inf for merged-away ones and padding
    pen = torch.zeros(c, n, dtype=d.dtype, device=dev).masked_fill_(~valid, inf)
    pen_flat = pen.view(-1)
    size = torch.ones(c, n, dtype=d.dtype, device=dev)
    size_flat = size.view(-1)
    parent = torch.arange(n, device=dev).repeat(c, 1)
    parent_flat = parent.view(-1)
    # nnd[b, k]: distance from cluster k to its nearest live cluster (the nearest-neighbour array
    # stores distances only; the neighbour itself is looked up for the one row that merges)
    nnd = d.amin(dim=2).masked_fill_(~valid, gone)
    nnd_flat = nnd.view(-1)
    steps_cpu = steps.cpu()
    n_steps = int(steps_cpu[0]) if c else 0
    # number of rows still merging at step t = count of steps > t (steps sorted descending)
    n_active = torch.searchsorted(-steps_cpu, -torch.arange(n_steps), right=False).tolist()
    rows_all = torch.arange(c, device=dev)
    base_all = rows_all * n
    a_prev = -1
    for t in range(n_steps):
        a = n_active[t]
        if a != a_prev:  # views of the unfinished prefix (a changes only when rows finish)
            rows, base = rows_all[:a], base_all[:a]
            nnd_a, pen_a, s_k = nnd[:a], pen[:a], size[:a]
            a_prev = a
        # 1. every unfinished row merges its closest pair: the row f with the smallest nnd, and
        #    its nearest live neighbour g
        f = nnd_a.argmin(dim=1)
        ff = base + f
        row_f = rows_flat.index_select(0, ff)
        dfg, g = (row_f + pen_a).min(dim=1, keepdim=True)
        g = g.view(-1)
        fg = base + g
        row_g = rows_flat.index_select(0, fg)
        # rows whose nearest neighbour was f or g (ties included) must be searched again;
        # all other rows keep theirs: Ward is reducible, d(k, f+g) >= min(d(k, f), d(k, g))
        stale = (row_f == nnd_a).logical_or_(row_g == nnd_a).view(-1)
        i = torch.minimum(f, g)  # the merged cluster keeps the lower index
        fi = base + i
        fj = torch.maximum(ff, fg)
        # 2. Lance–Williams for Ward on squared Euclidean distances:
        #    d(k, f+g) = ((s_f+s_k) d(k,f) + (s_g+s_k) d(k,g) - s_k d(f,g)) / (s_f+s_g+s_k)
        #              = (s_f d(k,f) + s_g d(k,g) + s_k (d(k,f) + d(k,g) - d(f,g))) / (...)
        s_pair = size_flat.index_select(0, torch.cat([ff, fg])).unsqueeze(1)
        sf, sg = s_pair[:a], s_pair[a:]
        s_fg = sf + sg
        new = (row_f + row_g).sub_(dfg).mul_(s_k)
        new.addcmul_(row_f, sf).addcmul_(row_g, sg).div_(s_k + s_fg)
        pen_flat.index_fill_(0, fj, inf)
        new.add_(pen_a)  # inf at merged-away clusters and on the diagonal
        rows_flat.index_copy_(0, fi, new)  # row i ...
        d_t.index_put_((rows, i), new)  # ... and column i
        size_flat.index_copy_(0, fi, s_fg.view(-1))
        parent_flat.index_copy_(0, fj, i)
        # 3. refresh the stale rows (the merged row i among them), retire j
        stale.index_fill_(0, fj, False)
        idx = stale.nonzero().view(-1)
        cand = rows_flat.index_select(0, idx)
        cand.add_(pen.index_select(0, idx.div(n, rounding_mode="floor")))
        nnd_flat.index_copy_(0, idx, cand.amin(dim=1))
        nnd_flat.index_fill_(0, fj, gone)
    # union-find roots by pointer jumping (chains point to lower indices)
    while True:
        up = parent.gather(1, parent)
        if torch.equal(up, parent):
            return parent
        parent = up


def ward_labels(x: Tensor, n_clusters: Tensor | int, *, mask: Tensor | None = None,
                normalize: bool = True, chunk_size: int | None = None) -> Tensor:
    """Exact Ward agglomerative clustering of every sequence in a batch, cut at ``n_clusters``.

    Ward, "Hierarchical Grouping to Optimize an Objective Function", JASA 1963: repeatedly merge
    the two clusters whose union increases the within-cluster sum of squares least. Distances are
    kept in a stored matrix updated with the Lance–Williams formula (Lance & Williams, "A General
    Theory of Classificatory Sorting Strategies", The Computer Journal 1967), with a
    nearest-neighbour array per row (Anderberg, *Cluster Analysis for Applications*, 1973).
    Ward's criterion is *reducible* (merging two clusters never brings the union closer to a third
    cluster than the nearer of the two), so after a merge only the rows whose nearest neighbour
    was one of the merged clusters need a fresh nearest-neighbour search.

    The whole batch advances in lock-step: at each step every unfinished row merges its globally
    closest pair (argmin of its nearest-neighbour distances), updates one row and column of its
    matrix, deactivates the other cluster and recomputes the nearest-neighbour distance of just
    the rows whose neighbour was one of the pair (found by value: the row's distance to the pair
    equals its nearest-neighbour distance; ties only cause a harmless extra search), all as
    batched tensor ops. Row ``b`` performs ``n_valid_b - k_b`` merges; rows are sorted by that
    count so finished rows drop out of the update as a suffix. Large batches are processed in
    chunks. Since the Lance–Williams coefficients of Ward sum to one, the update commutes with
    shifting and scaling all distances, so on unit vectors the matrix holds ``-cos`` (the squared
    distance ``2 - 2 cos`` up to an affine map): identical merges, one pass cheaper.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
        Token vectors.
    n_clusters : int or Tensor ``[B]``
        Clusters per row (in ``[1, N]``); clamped to the row's number of valid tokens.
    mask : Tensor ``[B, N]``, optional
        Validity mask (True = real token). A row with no valid token gets no cluster.
    normalize : bool
        L2-normalise the vectors first (default). Ward needs a Euclidean geometry, so the
        distances are squared Euclidean distances between unit vectors, ``2 - 2 cos``. PyLate and
        colbert-ai instead hand scipy's Euclidean Ward the ``1 - cos`` matrix itself (each row
        becomes a feature vector), which is not a Ward geometry on the tokens; we deviate on
        purpose. ``normalize=False`` clusters the raw vectors (plain Euclidean Ward).
    chunk_size : int, optional
        Sequences clustered together; default: as many as keep one chunk's ``[chunk, N, N]``
        distance matrix near :data:`WARD_CHUNK_BYTES` (32 MiB: about 260 sequences of 180
        tokens; on CPUs larger chunks were measured slower, as the per-step column writes then
        miss the cache).

    Returns
    -------
    Tensor ``[B, N]`` long
        Cluster labels ``0 .. k_b - 1`` numbered by each cluster's first member, ``-1`` at masked
        positions. The partition equals ``scipy.cluster.hierarchy.linkage(method="ward")`` cut
        with ``fcluster(criterion="maxclust")`` except under exact distance ties. Computation is
        float32 (float64 for float64 input).

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]]])
    >>> ward_labels(x, 2)
    tensor([[0, 1, 0, 1, 0]])
    """
    return _ward_checked(x, n_clusters, mask, chunk_size, normalize=normalize, cosine=False)


def _ward_checked(x: Tensor, n_clusters: Tensor | int, mask: Tensor | None, chunk_size: int | None, *,
                  normalize: bool, cosine: bool) -> Tensor:
    """Validate the arguments of :func:`ward_labels` / :func:`ward_cosine_labels`, then run :func:`_ward`."""
    x = check_tokens(x, "x")
    _check_finite_tokens(x)
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    k = _cluster_counts(n_clusters, valid.sum(dim=1), n)
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int)
                                   or chunk_size < 1):
        raise UniprunerError(f"chunk_size must be a positive int, got {chunk_size!r}")
    return _ward(x, k, valid, normalize=normalize, chunk_size=chunk_size, cosine=cosine)


def ward_cosine_labels(x: Tensor, n_clusters: Tensor | int, *, mask: Tensor | None = None,
                       chunk_size: int | None = None) -> Tensor:
    """Ward agglomeration on cosine distances, PyLate's pooling criterion, batched.

    Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal
    Performance Impact via Token Pooling", 2024, as implemented in PyLate's ``pool_factor``:
    scipy's Ward linkage is handed the cosine distances ``1 - cos`` of the (L2-normalised)
    vectors as if they were Euclidean distances, i.e. the Lance–Williams recurrence of Ward runs
    on ``(1 - cos)^2``. That is not a Euclidean geometry on the tokens (unlike
    :func:`ward_labels`), but it favours tight clusters of near-parallel vectors and retained
    more nDCG@10 on Cranfield (docs/benchmarks_colbert.md). The merge loop, chunking and
    validation are those of :func:`ward_labels`.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
    n_clusters : int or Tensor ``[B]``
        Clusters per row, clamped to the row's number of valid tokens.
    mask : Tensor ``[B, N]``, optional
        Validity mask.
    chunk_size : int, optional
        Sequences clustered together (default: by :data:`WARD_CHUNK_BYTES`).

    Returns
    -------
    Tensor ``[B, N]`` long
        Labels ``0 .. k_b - 1`` by first member, ``-1`` at masked positions; the partition of
        ``scipy.cluster.hierarchy.linkage(condensed 1 - cos, method="ward")`` cut with
        ``fcluster(criterion="maxclust")`` except under exact ties.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9], [1.0, 0.05]]])
    >>> ward_cosine_labels(x, 2)
    tensor([[0, 1, 0, 1, 0]])
    """
    return _ward_checked(x, n_clusters, mask, chunk_size, normalize=True, cosine=True)


def _ward(x: Tensor, k: Tensor, valid: Tensor, *, normalize: bool,
          chunk_size: int | None = None, cosine: bool = False) -> Tensor:
    """Unchecked core of :func:`ward_labels` (``k`` already clamped per row); ``cosine``: the
    distances are ``(1 - cos)^2`` (:func:`ward_cosine_labels`)."""
    b, n, dim = x.shape
    dev = x.device
    wdt = _work_dtype(x)
    nv = valid.sum(dim=1)
    pos = torch.arange(n, device=dev).unsqueeze(0)
    cvalid = pos < nv.unsqueeze(1)  # valid positions once compacted to the front
    if b == 0:
        return torch.full((b, n), -1, dtype=torch.long, device=dev)
    # compact valid tokens to the front (stable) so a chunk only needs its longest row's matrix
    compact = not bool(torch.equal(valid, cvalid))
    flat = x.reshape(b * n, dim)
    if compact:
        order = torch.argsort((~valid).to(torch.int8), dim=1, stable=True)
        offset = torch.arange(b, device=dev).unsqueeze(1) * n
        flat = flat.index_select(0, (order + offset).view(-1))
    xs = flat.view(b, n, dim)
    inv = None
    if normalize and not cosine:
        inv = 1.0 / torch.linalg.vector_norm(xs, dim=-1, dtype=wdt).clamp_(min=1e-12)
    steps = nv - k
    # most merges first: finished rows then form a suffix of every chunk
    batch_order = torch.argsort(steps * (n + 1) + nv, descending=True, stable=True)
    steps_s = steps[batch_order]
    nv_s = nv[batch_order]
    nv_cpu = nv_s.cpu()
    # longest row at or after each position bounds the chunk's matrix size
    suffix_max = torch.flip(torch.cummax(torch.flip(nv_cpu, [0]), 0).values, [0]).tolist()
    elem = torch.finfo(wdt).bits // 8
    in_order = bool(torch.equal(batch_order, torch.arange(b, device=dev)))
    # chunk boundaries; each chunk's matrix is sized by its longest row
    bounds: list[tuple[int, int, int]] = []
    start = 0
    while start < b:
        m = max(int(suffix_max[start]), 1)
        stop = min(b, start + (chunk_size or max(1, WARD_CHUNK_BYTES // (m * m * elem))))
        bounds.append((start, stop, max(int(nv_cpu[start:stop].max()), 1)))
        start = stop
    buffers = SimpleNamespace(x=None, d=None)  # reused: fresh large allocations page-fault

    def run(bound: tuple[int, int, int]) -> Tensor:
        start, stop, m = bound
        cc = stop - start
        sel = batch_order[start:stop]
        xc = (xs[start:stop] if in_order else xs.index_select(0, sel))[:, :m].to(wdt)
        if cosine:
            # PyLate: 1 - cos of the normalised vectors, squared by Ward's Lance–Williams form
            u = l2_normalize(xc)
            d = torch.bmm(u, u.transpose(1, 2)).neg_().add_(1.0).clamp_(min=0.0).square_()
        elif inv is not None:
            xbuf = buffers.x
            if xbuf is None or xbuf.numel() < cc * m * dim:
                xbuf = buffers.x = torch.empty(cc * m * dim, dtype=wdt, device=dev)
            dbuf = buffers.d
            if dbuf is None or dbuf.numel() < cc * m * m:
                dbuf = buffers.d = torch.empty(cc * m * m, dtype=wdt, device=dev)
            scale = (inv[start:stop] if in_order else inv.index_select(0, sel))[:, :m, None]
            xc = torch.mul(xc, scale, out=xbuf[: cc * m * dim].view(cc, m, dim))
            # Lance–Williams for Ward is affine-equivariant (its coefficients sum to 1), so
            # -cos = (||u - v||^2 - 2) / 2 for unit vectors yields exactly the merges of the
            # squared Euclidean distances, and costs one pass less
            d = torch.bmm(xc, xc.transpose(1, 2), out=dbuf[: cc * m * m].view(cc, m, m)).neg_()
        else:
            d = pairwise_sq_dist(xc)
        # the merge loop compares a row with a column by value: make the matrix exactly symmetric
        # (GEMM kernels need not round d[k, l] and d[l, k] alike)
        if not bool(torch.equal(d, d.transpose(1, 2))):
            d = torch.minimum(d, d.transpose(1, 2))
        vc = cvalid.index_select(0, sel)[:, :m]
        if not bool(vc.all()):
            d.masked_fill_(~vc.unsqueeze(1), math.inf)
        d.diagonal(dim1=1, dim2=2).fill_(math.inf)
        # a loop of many small ops: extra intra-op threads only synchronise (and, under CPU
        # contention, slow it down more than tenfold); the caller's thread count is restored
        with limit_threads(1 if d.device.type == "cpu" else None):
            return _ward_chunk(d, vc, steps_s[start:stop])

    results = [run(bd) for bd in bounds]
    roots = pos.expand(b, n).clone()
    for (start, stop, m), par in zip(bounds, results, strict=True):
        roots[batch_order[start:stop], :m] = par
    # label = rank of the root among the row's roots; roots are first members (compact order)
    is_root = (roots == pos) & cvalid
    rank = is_root.long().cumsum(dim=1) - 1
    lab_c = rank.gather(1, roots).masked_fill_(~cvalid, -1)
    if not compact:
        return lab_c
    # back to original positions (compaction is stable, so first-member order is preserved)
    return torch.full((b, n), -1, dtype=torch.long, device=dev).scatter_(1, order, lab_c)


# ----------------------------------------------------------------------------------------------
# k-means
# ----------------------------------------------------------------------------------------------


def _sample_rows(weights: Tensor, valid: Tensor, gen: torch.Generator) -> Tensor:
    """One index per row drawn with probability proportional to ``weights`` (uniform over
    ``valid`` where a row's weights are all zero).

    One uniform number from ``gen`` (on the CPU) serves every row, so a row's draw does not
    depend on the other rows of the batch: batched results equal per-sequence results.
    """
    n = weights.shape[1]
    w = weights.double()
    fallback = ~(w.sum(dim=1, keepdim=True) > 0)
    w = torch.where(fallback, valid.double(), w)
    cdf = w.cumsum(dim=1)
    u = torch.rand(1, 1, generator=gen, dtype=torch.float64).to(weights.device)
    idx = torch.searchsorted(cdf, u * cdf[:, -1:], right=True)
    return idx.clamp_(max=n - 1)


def kmeans_labels(x: Tensor, n_clusters: Tensor | int, *, mask: Tensor | None = None,
                  n_iter: int = 20, seed: int = 0, normalize: bool = True,
                  backend: str = "torch") -> Tensor:
    """Batched k-means (Lloyd's algorithm) with k-means++ seeding.

    Lloyd, "Least Squares Quantization in PCM", IEEE Trans. Information Theory 1982; seeding by
    Arthur & Vassilvitskii, "k-means++: The Advantages of Careful Seeding", SODA 2007. All rows
    run together (per-row ``k`` and masks); iterations stop when no row's assignment changes.
    A cluster that empties is re-seeded at the point farthest from its centroid. Random draws
    come from a CPU ``torch.Generator`` seeded with ``seed`` and are shared by all rows, so
    results are deterministic and a sequence gets the same labels alone or in any batch.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
    n_clusters : int or Tensor ``[B]``
        Clusters per row (in ``[1, N]``); clamped to the row's number of valid tokens.
    mask : Tensor ``[B, N]``, optional
        Validity mask (True = real token).
    n_iter : int
        Maximum Lloyd iterations.
    seed : int
        Seed of the k-means++ draws.
    normalize : bool
        L2-normalise the vectors first (default; Euclidean k-means on unit vectors, centroids
        are plain means).
    backend : {"torch", "faiss"}
        ``"torch"``: the batched Lloyd iterations above. ``"faiss"``: one ``faiss.Kmeans`` per
        row (Johnson, Douze & Jégou, "Billion-scale similarity search with GPUs", 2019), the
        same objective on the same (normalised) vectors with the same ``k``, ``n_iter`` Lloyd
        iterations, faiss's random initialisation (seeded with ``seed + 1``) and one OpenMP
        thread; results differ from the torch backend only through the solver's
        initialisation (and faiss may leave a cluster empty: labels then stay compact).
        Needs ``faiss-cpu`` (the ``colbert`` extra).

    Returns
    -------
    Tensor ``[B, N]`` long
        Labels ``0 .. k_b - 1`` numbered by each cluster's first member (every cluster is
        non-empty; with faiss, labels are compact), ``-1`` at masked positions.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.9, 0.1], [0.1, 0.9]]])
    >>> kmeans_labels(x, 2)
    tensor([[0, 1, 0, 1]])
    """
    x = check_tokens(x, "x")
    _check_finite_tokens(x)
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    if isinstance(n_iter, bool) or not isinstance(n_iter, int) or n_iter < 0:
        raise UniprunerError(f"n_iter must be a non-negative int, got {n_iter!r}")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise UniprunerError(f"seed must be an int, got {seed!r}")
    if backend not in KMEANS_BACKENDS:
        raise UniprunerError(f"k-means backend must be one of {KMEANS_BACKENDS}, got {backend!r}")
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    k = _cluster_counts(n_clusters, valid.sum(dim=1), n)
    if backend == "faiss":
        return _faiss_kmeans(x, k, valid, n_iter=n_iter, seed=seed, normalize=normalize)
    return _kmeans(x, k, valid, n_iter=n_iter, seed=seed, normalize=normalize)


def _faiss_kmeans(x: Tensor, k: Tensor, valid: Tensor, *, n_iter: int, seed: int,
                  normalize: bool) -> Tensor:
    """The ``backend="faiss"`` path of :func:`kmeans_labels`: one ``faiss.Kmeans`` per row."""
    from .models import require

    faiss = require("faiss", "colbert")
    b, n, dim = x.shape
    xw = x.detach().to("cpu", torch.float32)
    if normalize:
        xw = l2_normalize(xw)
    pts_all = xw.contiguous().numpy()
    lab = torch.full((b, n), -1, dtype=torch.long)
    valid_cpu = valid.cpu()
    with limit_threads(1, faiss=faiss):  # many small problems: one thread each is fastest
        for i in range(b):  # faiss clusters one point set per call
            idx = valid_cpu[i].nonzero().view(-1)
            m, ki = int(idx.numel()), int(k[i])
            if m == 0:
                continue
            if ki >= m:
                lab[i, idx] = torch.arange(m)
                continue
            pts = np.ascontiguousarray(pts_all[i, idx.numpy()])
            km = faiss.Kmeans(dim, ki, niter=n_iter, seed=seed + 1, min_points_per_centroid=1,
                              max_points_per_centroid=1 << 30, verbose=False)
            km.train(pts)
            _, a = km.index.search(pts, 1)
            lab[i, idx] = torch.from_numpy(a[:, 0].astype(np.int64))
    kmax = int(k.max()) if b else 0
    return _relabel_by_first_member(lab.to(x.device), valid, kmax)


def sequential_labels(n_clusters: Tensor | int, mask: Tensor) -> Tensor:
    """1-D pooling: each row's valid tokens split into ``k`` runs of consecutive tokens.

    The sequential pooling baseline of Clavié, Chaffin & Adams, "Reducing the Footprint of
    Multi-Vector Retrieval with Minimal Performance Impact via Token Pooling", 2024: the
    ``r``-th of a row's ``n`` valid tokens (in order) joins run ``floor(r * k / n)``, so the runs
    have (almost) equal lengths and every run is non-empty.

    Parameters
    ----------
    n_clusters : int or Tensor ``[B]``
        Runs per row, clamped to ``[1, n_valid]``.
    mask : Tensor ``[B, N]`` bool
        Validity mask (the tokens to pool).

    Returns
    -------
    Tensor ``[B, N]`` long
        Labels ``0 .. k_b - 1`` (in sequence order), ``-1`` at masked positions.

    Examples
    --------
    >>> sequential_labels(2, torch.tensor([[True, True, True, True, True, False]]))
    tensor([[ 0,  0,  0,  1,  1, -1]])
    """
    if not isinstance(mask, Tensor) or mask.ndim != 2 or mask.dtype != torch.bool:
        raise UniprunerError("mask must be a bool tensor [B, N]")
    nv = mask.sum(dim=1)
    k = _cluster_counts(n_clusters, nv, mask.shape[1])
    rank = mask.long().cumsum(dim=1) - 1
    lab = torch.div(rank * k.unsqueeze(1), nv.clamp(min=1).unsqueeze(1), rounding_mode="floor")
    return lab.masked_fill(~mask, -1)


def _kmeans(x: Tensor, k: Tensor, valid: Tensor, *, n_iter: int, seed: int,
            normalize: bool) -> Tensor:
    """Unchecked core of :func:`kmeans_labels` (``k`` already clamped per row)."""
    b, n, dim = x.shape
    dev = x.device
    kmax = int(k.max()) if b else 0
    if kmax == 0:
        return torch.full((b, n), -1, dtype=torch.long, device=dev)
    xw = x.to(_work_dtype(x))
    if normalize:
        xw = l2_normalize(xw)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    vw = valid.to(xw.dtype)
    slots = torch.arange(kmax, device=dev)
    cmask = slots.unsqueeze(0) < k.unsqueeze(1)  # [B, kmax] real clusters

    # k-means++ seeding
    centers = xw.new_zeros(b, kmax, dim)
    idx = _sample_rows(torch.zeros_like(vw), valid, gen)
    centers[:, 0] = batched_gather(xw, idx).squeeze(1)
    mind = pairwise_sq_dist(xw, centers[:, :1]).squeeze(2)
    for c in range(1, kmax):
        idx = _sample_rows(mind * vw, valid, gen)
        centers[:, c] = batched_gather(xw, idx).squeeze(1)
        mind = torch.minimum(mind, pairwise_sq_dist(xw, centers[:, c:c + 1]).squeeze(2))

    def assign(cent: Tensor) -> tuple[Tensor, Tensor]:
        dist = pairwise_sq_dist(xw, cent).masked_fill_(~cmask.unsqueeze(1), math.inf)
        md, lab = dist.min(dim=2)
        return lab.masked_fill_(~valid, kmax), md  # padding -> spare slot kmax

    def sizes_of(lab: Tensor) -> Tensor:
        cnt = torch.zeros(b, kmax + 1, dtype=torch.long, device=dev)
        return cnt.scatter_add_(1, lab, torch.ones_like(lab))[:, :kmax]

    lab, md = assign(centers)
    for _ in range(n_iter):
        sums = xw.new_zeros(b, kmax + 1, dim)
        sums.scatter_add_(1, lab.unsqueeze(2).expand(-1, -1, dim), xw)
        cnt = sizes_of(lab)
        centers = sums[:, :kmax] / cnt.clamp(min=1).unsqueeze(2).to(xw.dtype)
        empty = (cnt == 0) & cmask
        if bool(empty.any()):
            # re-seed the r-th empty cluster of a row at the row's r-th farthest point
            far = torch.argsort(md.masked_fill(~valid, -1.0), dim=1, descending=True, stable=True)
            r = (empty.long().cumsum(dim=1) - 1).clamp(min=0).clamp(max=n - 1)
            pts = batched_gather(xw, far.gather(1, r))
            centers = torch.where(empty.unsqueeze(2), pts, centers)
        new_lab, md = assign(centers)
        done = torch.equal(new_lab, lab) and not bool(empty.any())
        lab = new_lab
        if done:
            break
    # guarantee non-empty clusters (only reachable with duplicate points or n_iter exhausted):
    # move the farthest point of a multi-member cluster into each empty cluster, one per round
    for _ in range(kmax):
        cnt = sizes_of(lab)
        empty = (cnt == 0) & cmask
        if not bool(empty.any()):
            break
        row = empty.any(dim=1)
        target = torch.argmax(empty.long(), dim=1)  # first empty cluster of each row
        donor_ok = valid & (cnt.gather(1, lab.clamp(max=kmax - 1)) > 1) & (lab < kmax)
        p = md.masked_fill(~donor_ok, -1.0).argmax(dim=1)
        upd = torch.zeros_like(valid).scatter_(1, p.unsqueeze(1), row.unsqueeze(1))
        lab = torch.where(upd, target.unsqueeze(1).expand(-1, n), lab)
        md = md.masked_fill(upd, 0.0)
    return _relabel_by_first_member(lab, valid, kmax)


# ----------------------------------------------------------------------------------------------
# token pooling
# ----------------------------------------------------------------------------------------------


def _check_factor(factor: object) -> float:
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(
        float(factor)
    ) or float(factor) < 1.0:
        raise UniprunerError(
            f"pool factor must be a finite number >= 1 (2 halves the tokens), got {factor!r}"
        )
    return float(factor)


def pool_plan(x: Tensor, *, factor: float = 2.0, method: str = "ward", protected: int = 0,
              mask: Tensor | None = None, n_clusters: Tensor | int | None = None,
              seed: int = 0) -> MergePlan:
    """The :class:`~unipruner._merge.MergePlan` behind :func:`pool` for ``x [B, N, D]``.

    ``plan.dst[b, i]`` is the output slot of token ``i`` (protected tokens: ``0 .. p_b - 1``;
    pooled tokens: ``p_b + cluster``; padding: ``-1``), ``plan.out_mask`` marks the real slots
    (``None`` when every row has the same count). Cluster sizes are
    ``plan.merge(torch.ones_like(x[..., :1]), "sum")``; the pooled tokens are
    ``plan.merge(x, "mean")``. ``n_clusters`` (int or ``[B]``), when given, replaces the
    factor-derived count per row (global budgets), clamped to ``[1, n_b]``.

    >>> x = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 0.2]]])
    >>> plan = pool_plan(x, factor=2.0, protected=1)
    >>> plan.dst
    tensor([[0, 1, 2, 2, 1]])
    """
    x = check_tokens(x, "x")
    _check_finite_tokens(x)
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    fac = _check_factor(factor)
    if method not in _METHODS:
        raise UniprunerError(f"pool method must be one of {_METHODS}, got {method!r}")
    if isinstance(protected, bool) or not isinstance(protected, int) or protected < 0:
        raise UniprunerError(
            f"protected must be a non-negative int (leading tokens), got {protected!r}"
        )
    dev = x.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    vrank = valid.long().cumsum(dim=1) - 1
    prot = valid & (vrank < protected)  # the first `protected` valid tokens of each row
    rest = valid & ~prot
    n_prot = prot.sum(dim=1)
    n_rest = rest.sum(dim=1)
    if n_clusters is None:
        # PyLate / colbert-ai: max(n // pool_factor, 1) clusters (Python floor division)
        k = n_rest.double().div(fac, rounding_mode="floor").long().clamp(min=1)
        k = torch.minimum(k, n_rest)
    else:
        k = _cluster_counts(n_clusters, n_rest, n)
    if method == "ward":
        labels = _ward(x, k, rest, normalize=True)
    else:
        labels = _kmeans(x, k, rest, n_iter=20, seed=seed, normalize=True)
    dst = torch.where(prot, vrank, n_prot.unsqueeze(1) + labels)
    dst = dst.masked_fill(~valid, -1)
    count = n_prot + k
    n_out = int(count.max()) if b else 0
    out_mask = torch.arange(n_out, device=dev).unsqueeze(0) < count.unsqueeze(1)
    return MergePlan(dst, n_out, None if bool(out_mask.all()) else out_mask)


@overload
def pool(x: list[Tensor], *, factor: float = ..., method: str = ..., protected: int = ...,
         mask: None = ..., renormalize: bool = ..., seed: int = ...) -> list[Tensor]: ...
@overload
def pool(x: Tensor, *, factor: float = ..., method: str = ..., protected: int = ...,
         mask: None = ..., renormalize: bool = ..., seed: int = ...) -> Tensor: ...
@overload
def pool(x: Tensor, *, factor: float = ..., method: str = ..., protected: int = ...,
         mask: Tensor, renormalize: bool = ..., seed: int = ...) -> tuple[Tensor, Tensor]: ...
def pool(x: Tensor | list[Tensor], *, factor: float = 2.0, method: str = "ward", protected: int = 0,
         mask: Tensor | None = None, renormalize: bool = False,
         seed: int = 0) -> Tensor | list[Tensor] | tuple[Tensor, Tensor]:
    """Token pooling of multi-vector documents: cluster the tokens, keep each cluster's mean.

    Clavié, Chaffin & Adams, "Reducing the Footprint of Multi-Vector Retrieval with Minimal
    Performance Impact via Token Pooling", arXiv 2409.14683, 2024 (PyLate's ``pool_factor``).
    The first ``protected`` tokens of each document are kept as they are; the other ``n`` are
    clustered into ``max(n // factor, 1)`` clusters (Ward on L2-normalised vectors by default,
    or k-means) and each cluster is replaced by the plain mean of its members' original vectors.
    All documents are clustered in one batched call. Deviation: Ward runs on squared Euclidean
    distances between unit vectors (see :func:`ward_labels`), not on rows of a cosine-distance
    matrix as in PyLate.

    Parameters
    ----------
    x : Tensor ``[N, D]``, Tensor ``[B, N, D]`` or list of Tensors ``[N_i, D]``
        One document, a padded batch, or documents of different lengths.
    factor : float
        Pool factor (>= 1): about ``n / factor`` vectors remain. ``factor=1`` keeps every vector.
    method : {"ward", "kmeans"}
    protected : int
        Leading tokens kept unpooled (e.g. ``[CLS]``/``[D]`` markers); with a mask, the first
        ``protected`` valid tokens of each row.
    mask : Tensor ``[B, N]``, optional
        Validity mask for a ``[B, N, D]`` batch.
    renormalize : bool
        L2-normalise the pooled means (protected tokens are left untouched).
    seed : int
        Seed of the k-means++ draws (``method="kmeans"``).

    Returns
    -------
    Tensor ``[p + k, D]``
        For a single document ``[N, D]``.
    list of Tensor ``[p_i + k_i, D]``
        For a list of documents.
    Tensor ``[B, p + k, D]``
        For a ``[B, N, D]`` batch without a mask (every row has the same count).
    (Tensor ``[B, K, D]``, Tensor ``[B, K]`` bool)
        For a ``[B, N, D]`` batch with a mask: pooled tokens (zeros in padding slots) and their
        validity mask; each row's real tokens come first.

    Output order: protected tokens, then clusters by their first member. Use :func:`pool_plan`
    for the labels and cluster sizes.

    Examples
    --------
    >>> docs = [torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 0.2], [0.2, 1.0]]), torch.eye(2)]
    >>> [d.shape[0] for d in pool(docs, factor=2.0)]
    [2, 1]
    """
    if isinstance(x, (list, tuple)):
        if mask is not None:
            raise UniprunerError(
                "mask is only for a padded [B, N, D] tensor, not for a list of documents"
            )
        if len(x) == 0:
            raise UniprunerError("pool got an empty list of documents")
        dims = set()
        for i, doc in enumerate(x):
            if not isinstance(doc, Tensor) or doc.ndim != 2 or not doc.is_floating_point():
                what = tuple(doc.shape) if isinstance(doc, Tensor) else type(doc).__name__
                raise UniprunerError(
                    f"document {i} must be a floating-point tensor [N_i, D], got {what}"
                )
            if doc.shape[0] == 0:
                raise UniprunerError(f"document {i} has no tokens")
            dims.add(int(doc.shape[1]))
        if len(dims) != 1:
            raise UniprunerError(
                f"all documents must have the same dimension D, got {sorted(dims)}"
            )
        lengths = torch.tensor([d.shape[0] for d in x])
        padded = torch.nn.utils.rnn.pad_sequence(list(x), batch_first=True)
        pmask = torch.arange(padded.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)
        out, omask = _pool_tensor(padded, pmask.to(padded.device), factor=factor, method=method,
                                  protected=protected, renormalize=renormalize, seed=seed)
        if bool(omask.all()):
            return list(out.unbind(0))
        return list(torch.split(out[omask], omask.sum(dim=1).tolist()))
    if not isinstance(x, Tensor):
        raise UniprunerError(
            f"pool expects a tensor [N, D] or [B, N, D] or a list of [N_i, D] tensors, "
            f"got {type(x).__name__}"
        )
    if x.ndim == 2:
        if mask is not None:
            raise UniprunerError(
                "mask is only for a padded [B, N, D] tensor, not for one [N, D] document"
            )
        out, _ = _pool_tensor(x.unsqueeze(0), None, factor=factor, method=method,
                              protected=protected, renormalize=renormalize, seed=seed)
        return out[0]
    if x.ndim != 3:
        raise UniprunerError(
            f"pool expects a tensor [N, D] or [B, N, D] or a list of [N_i, D] tensors, "
            f"got shape {tuple(x.shape)}"
        )
    out, omask = _pool_tensor(x, mask, factor=factor, method=method, protected=protected,
                              renormalize=renormalize, seed=seed)
    return out if mask is None else (out, omask)


def _pool_tensor(x: Tensor, mask: Tensor | None, *, factor: float, method: str, protected: int,
                 renormalize: bool, seed: int) -> tuple[Tensor, Tensor]:
    plan = pool_plan(x, factor=factor, method=method, protected=protected, mask=mask, seed=seed)
    b = x.shape[0]
    out_mask = plan.out_mask
    if out_mask is None:
        out_mask = torch.ones(b, plan.n_out, dtype=torch.bool, device=x.device)
    xw = x.to(torch.promote_types(x.dtype, torch.float32))
    out = _segment_sum(xw, plan.dst, plan.n_out)
    out.div_(_segment_count(plan.dst, plan.n_out, out.dtype).clamp_(min=1.0))
    if renormalize:
        valid = torch.ones_like(plan.dst, dtype=torch.bool) if mask is None else mask
        vrank = valid.long().cumsum(dim=1) - 1
        n_prot = (valid & (vrank < protected)).sum(dim=1, keepdim=True)
        pooled = torch.arange(plan.n_out, device=x.device).unsqueeze(0) >= n_prot
        out = torch.where(pooled.unsqueeze(2), l2_normalize(out), out)
    return out.to(x.dtype), out_mask


# ----------------------------------------------------------------------------------------------
# recycling
# ----------------------------------------------------------------------------------------------


def recycle(x: Tensor, keep: Tensor, n_aggregate: int, *, scores: Tensor | None = None,
            size: Tensor | None = None, mask: Tensor | None = None, recycle_ratio: float = 1.0,
            weights: Tensor | None = None, n_iter: int = 20, seed: int = 0,
            normalize: bool = True) -> tuple[Tensor, Tensor, Tensor]:
    """Fold the pruned tokens into ``n_aggregate`` aggregate tokens appended after the kept ones.

    Token recycling of SparseVLM (Zhang et al., "SparseVLM: Visual Token Sparsification for
    Efficient Vision-Language Model Inference", ICML 2025) and VFlowOpt ("VFlowOpt: A Token
    Pruning Framework for LMMs with Visual Information Flow-Guided Optimization", ICCV 2025):
    instead of discarding every pruned token, group them and keep one size-weighted mean per
    group. Deviations: the groups come from our batched k-means (:func:`kmeans_labels`) instead
    of SparseVLM's density-peak clustering (DPC-KNN), and by default *all* pruned tokens are
    recycled; ``recycle_ratio < 1`` with ``scores`` recycles only the highest-scoring fraction of
    the pruned tokens (SparseVLM's recycling of the top pruned tokens) and drops the others.

    Parameters
    ----------
    x : Tensor ``[B, N, D]``
    keep : Tensor ``[B, K]`` long
        Sorted keep indices, right-padded with ``-1`` (as from :func:`~unipruner.select.topk`).
    n_aggregate : int
        Aggregate tokens per row (rows with fewer pruned tokens get one per pruned token).
    scores : Tensor ``[B, N]``, optional
        Higher = more important; ranks the pruned tokens when ``recycle_ratio < 1``.
    size : Tensor ``[B, N, 1]`` or ``[B, N]``, optional
        How many original tokens each token stands for (default 1); aggregates are size-weighted
        means and their sizes are the sums of their members' sizes.
    mask : Tensor ``[B, N]``, optional
        Validity mask; masked tokens are neither kept nor recycled.
    recycle_ratio : float
        Fraction (in ``(0, 1]``) of each row's pruned tokens recycled, ``ceil``-rounded.
    weights : Tensor ``[B, N]``, optional
        Extra non-negative weights in the aggregates' means (e.g. EViT's CLS attention); they do
        not change the reported sizes. A group whose weights are all zero falls back to sizes.
    n_iter, seed, normalize
        Passed to the k-means that groups the pruned tokens.

    Returns
    -------
    (Tensor ``[B, K + A, D]``, Tensor ``[B, K + A]`` bool, Tensor ``[B, K + A, 1]``)
        Tokens, validity mask and sizes (``A = n_aggregate``). Each row holds its kept tokens
        (in ``keep`` order) and then its aggregates (ordered by their first member), packed at
        the front; the rest is zero padding with mask False and size 0.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [2.0, 0.0], [0.0, 3.0]]])
    >>> out, m, s = recycle(x, torch.tensor([[0]]), 1)
    >>> out[0, 1], s[0, :, 0]
    (tensor([0.6667, 1.3333]), tensor([1., 3.]))
    """
    x = check_tokens(x, "x")
    check_finite(x, "x")
    b, n, dim = x.shape
    dev = x.device
    mask = check_mask(mask, b, n)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    if not isinstance(keep, Tensor) or keep.ndim != 2 or keep.dtype != torch.long:
        raise UniprunerError("keep must be a long tensor [B, K] of sorted indices (as from topk)")
    if keep.shape[0] != b:
        raise UniprunerError(f"keep has batch size {keep.shape[0]} but x has {b}")
    keep = keep.to(dev)
    if keep.numel() and (int(keep.max()) >= n or int(keep.min()) < -1):
        raise UniprunerError(f"keep indices must lie in [0, {n}) (or -1 for padding)")
    pad = keep < 0
    if keep.shape[1] > 1 and bool((pad[:, :-1] & ~pad[:, 1:]).any()):
        raise UniprunerError("keep must be right-padded: every -1 must come after the real indices")
    safe = keep.clamp(min=0)
    if bool((~valid.gather(1, safe) & ~pad).any()):
        raise UniprunerError("keep points at masked (padding) positions")
    if isinstance(n_aggregate, bool) or not isinstance(n_aggregate, int) or n_aggregate < 0:
        raise UniprunerError(f"n_aggregate must be a non-negative int, got {n_aggregate!r}")
    if isinstance(recycle_ratio, bool) or not isinstance(recycle_ratio, (int, float)) or not (
        0.0 < float(recycle_ratio) <= 1.0
    ):
        raise UniprunerError(f"recycle_ratio must lie in (0, 1], got {recycle_ratio!r}")
    if size is None:
        sz = torch.ones(b, n, 1, dtype=x.dtype, device=dev)
    else:
        if not isinstance(size, Tensor) or size.shape not in ((b, n), (b, n, 1)):
            shape = tuple(size.shape) if isinstance(size, Tensor) else type(size).__name__
            raise UniprunerError(f"size must have shape [B, N, 1] = {(b, n, 1)}, got {shape}")
        sz = size.reshape(b, n, 1).to(dev)
        check_finite(sz, "size")
    for name, t in (("scores", scores), ("weights", weights)):
        if t is not None and (not isinstance(t, Tensor) or tuple(t.shape) != (b, n)):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise UniprunerError(f"{name} must have shape [B, N] = {(b, n)}, got {shape}")
    if weights is not None:
        check_finite(weights, "weights")
        if bool((weights < 0).any()):
            raise UniprunerError("weights must be non-negative")

    kept = torch.zeros(b, n + 1, dtype=torch.bool, device=dev)
    kept.scatter_(1, torch.where(pad, n, keep), True)
    pruned = valid & ~kept[:, :n]
    if recycle_ratio < 1.0:
        if scores is None:
            raise UniprunerError("recycle_ratio < 1 ranks the pruned tokens by score: pass scores=")
        check_finite(scores, "scores")
        n_rec = torch.ceil(pruned.sum(dim=1).double() * float(recycle_ratio)).long()
        s = scores.to(dev).double().masked_fill(~pruned, -math.inf)
        order = torch.argsort(s, dim=1, descending=True, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(n, device=dev).expand(b, n))
        pruned = pruned & (rank < n_rec.unsqueeze(1))
    k = torch.minimum(pruned.sum(dim=1), torch.tensor(n_aggregate, device=dev))
    labels = _kmeans(x, k, pruned, n_iter=n_iter, seed=seed, normalize=normalize)

    n_kept = (~pad).sum(dim=1)
    n_out = keep.shape[1] + n_aggregate
    wdt = torch.promote_types(x.dtype, torch.float32)
    xw = x.to(wdt)
    szw = sz.to(wdt)
    tiny = torch.finfo(wdt).tiny
    agg_sizes = _segment_sum(szw, labels, n_aggregate)  # [B, n_agg, 1]
    agg = _segment_sum(xw * szw, labels, n_aggregate) / agg_sizes.clamp(min=tiny)
    if weights is not None:
        wt = szw * weights.to(dev, wdt).unsqueeze(2)
        den = _segment_sum(wt, labels, n_aggregate)
        weighted = _segment_sum(xw * wt, labels, n_aggregate) / den.clamp(min=tiny)
        agg = torch.where(den > 0, weighted, agg)

    # scatter kept tokens and aggregates into their packed output slots (spare slot n_out)
    kslot = torch.where(pad, n_out, torch.arange(keep.shape[1], device=dev).expand_as(keep))
    r = torch.arange(n_aggregate, device=dev).unsqueeze(0)
    aslot = torch.where(r < k.unsqueeze(1), n_kept.unsqueeze(1) + r, n_out)
    out = xw.new_zeros(b, n_out + 1, dim)
    osz = xw.new_zeros(b, n_out + 1, 1)
    out.scatter_(1, kslot.unsqueeze(2).expand(-1, -1, dim), batched_gather(xw, safe))
    osz.scatter_(1, kslot.unsqueeze(2), batched_gather(szw, safe))
    out.scatter_(1, aslot.unsqueeze(2).expand(-1, -1, dim), agg)
    osz.scatter_(1, aslot.unsqueeze(2), agg_sizes)
    omask = torch.arange(n_out, device=dev).unsqueeze(0) < (n_kept + k).unsqueeze(1)
    return out[:, :n_out].to(x.dtype), omask, osz[:, :n_out].to(sz.dtype)
