"""Similarity and duplication: merge or drop the tokens that repeat others.

* :func:`bipartite_soft_matching`: ToMe's alternating A/B matching (Bolya et al., ICLR 2023);
* :func:`stride_matching_2d`: ToMeSD's one-destination-per-window matching (Bolya & Hoffman,
  CVPRW 2023);
* :func:`dart`: DART's duplication-to-pivots selection (Wen et al., 2025).

The two matchers return ``(merge, unmerge)`` closures made by :class:`unipruner._merge.MergePlan`
(the closures carry it as ``.plan``), so size-weighted merging
(:func:`unipruner.reduce.merge_wavg`), source tracking (the plan's ``dst`` map, composed across
layers) and dense unmerging behave the same as for every other merging method. Matching itself is done
without gradients (the plan is integer indices); ``merge`` and ``unmerge`` are differentiable
in their inputs. :func:`dart` is a selector: it returns sorted keep indices like
:func:`unipruner.select.topk`.
"""

from __future__ import annotations

import math
import operator

import torch
from torch import Tensor

from .._merge import MergeFn, MergePlan, UnmergeFn
from .._ops import batched_gather, cosine_matrix
from .._validate import check_finite, check_mask, check_tokens, protected_mask
from ..errors import UniprunerError
from ..select import Budget

__all__ = ["bipartite_soft_matching", "dart", "novelty", "stride_matching_2d"]


# ----------------------------------------------------------------------------- helpers


def _int(value: object, name: str, *, minimum: int) -> int:
    """``value`` as a Python int ``>= minimum`` (bools and floats are refused)."""
    if isinstance(value, bool):
        raise UniprunerError(f"{name} must be an int, got {value!r}")
    try:
        out = operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise UniprunerError(f"{name} must be an int, got {value!r}") from None
    if out < minimum:
        raise UniprunerError(f"{name} must be >= {minimum}, got {out}")
    return out


def _identity(b: int, n: int, mask: Tensor | None, device: torch.device) -> MergePlan:
    """The plan that keeps every token in its place (``merge(x)`` equals ``x``)."""
    dst = torch.arange(n, device=device).expand(b, n).clone()
    out_mask = None if mask is None or bool(mask.all()) else mask.clone()
    return MergePlan(dst, n, out_mask)


def _out_mask(slot: Tensor, keep: Tensor, mask: Tensor | None, n_out: int) -> Tensor | None:
    """Which output slots hold a real token (``None`` when all of them do)."""
    if mask is None:
        return None
    out = torch.zeros(keep.shape[0], n_out + 1, dtype=torch.bool, device=keep.device)
    out.scatter_(1, torch.where(keep, slot, n_out), mask & keep)
    out_mask = out[:, :n_out]
    return None if bool(out_mask.all()) else out_mask


# ----------------------------------------------------------------------------- ToMe


def bipartite_soft_matching(metric: Tensor, r: int, *, protected: int = 0,
                            mask: Tensor | None = None,
                            keep_order: bool = True) -> tuple[MergeFn, UnmergeFn]:
    """Bipartite soft matching (ToMe): merge the ``r`` most redundant tokens.

    Bolya, Fu, Dai, Zhang, Feichtenhofer and Hoffman, "Token Merging: Your ViT But Faster",
    ICLR 2023. The tokens are split alternately into a set A (even positions) and a set B (odd
    positions); each A token finds its most cosine-similar B token on ``metric`` (the paper
    uses the keys averaged over heads), and the ``r`` A tokens with the most similar match are
    merged into it. The whole row is done at once: ``r`` tokens go per call.

    Parameters
    ----------
    metric : Tensor ``[B, N, C]``
        What similarity is measured on (e.g. head-averaged keys, or the hidden states).
    r : int
        Tokens removed. Capped (silently, as in ToMe) at ``(N - protected) // 2``: that many
        A tokens after the protected prefix always exist, and so does at least one B token to
        receive them. With a ``mask`` it is further capped at the smallest number of removable
        A tokens of any row (see below), which only bites for rows with at most one real
        unprotected token.
    protected : int
        Leading tokens (CLS, DeiT's distillation token, DINOv2's registers) that are never
        merged away and never receive merges: their A rows and B columns of the similarity
        matrix are set to ``-inf``.
    mask : Tensor ``[B, N]`` bool, optional
        Validity mask of a ragged batch (True = real token; padding may be anywhere). Padding
        never merges with anything: padded B tokens are never destinations (``-inf``
        columns), and padded A tokens are the first ones removed (their best-match score is
        ``+inf``) and are *discarded* (``plan.dst == -1``), not merged, so they do not pollute
        real tokens in any merge mode and need no zero sizes. Every row therefore still loses
        exactly ``r`` slots (uniform output length ``N - r``); a row with ``m`` padded A tokens
        merges ``max(r - m, 0)`` real ones. Padding that survives passes through unchanged to
        its own slot, and ``merge.plan.out_mask`` marks which output slots hold real tokens.
    keep_order : bool
        True (default): the ``N - r`` survivors stay in their original order, so the protected
        prefix stays at the front (what HF poolers reading token 0 need), and each merged
        token sits at its B destination's place. False: ToMe's layout, the unmerged A tokens
        (sorted by position) then all B tokens, for exact comparison with the paper's code.

    Returns
    -------
    (merge, unmerge)
        ``merge(x, mode="mean")`` maps ``x [B, N, ...]`` to ``[B, N - r, ...]`` (modes:
        ``"mean"``, ``"sum"``, ``"amax"``, ``"amin"``, ``"prod"``); ``unmerge(y)`` gives every
        input token the value of the slot it went to (``[B, N, ...]``; discarded padding gets
        zeros). Both carry the :class:`~unipruner._merge.MergePlan` as ``.plan``. For ToMe's
        size-weighted average use ``unipruner.reduce.merge_wavg(merge, x, size)``, for source
        tracking ``merge.plan.dst`` (composed across layers). ``r == 0`` (after the
        caps) gives the identity plan whatever ``keep_order`` is.

    Notes
    -----
    Deviations from ToMe: the default output keeps the original order (ToMe puts the unmerged
    A tokens, in similarity order unless there is a class token, before B); ``keep_order=False``
    sorts the unmerged A tokens by position in every case. Ties between equally good edges
    go to the lower A position (stable sort), and ragged batches are supported as described.

    Examples
    --------
    >>> metric = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.2, 1.0]]])
    >>> merge, unmerge = bipartite_soft_matching(metric, 1)
    >>> merge.plan.dst
    tensor([[0, 0, 1, 2]])
    >>> merge(metric, mode="sum")
    tensor([[[2.0000, 0.1000],
             [0.0000, 1.0000],
             [0.2000, 1.0000]]])
    >>> unmerge(merge(metric)).shape
    torch.Size([1, 4, 2])
    """
    metric = check_tokens(metric, "metric")
    check_finite(metric, "metric")
    r = _int(r, "r (tokens to merge)", minimum=0)
    p = _int(protected, "protected", minimum=0)
    b, n, _ = metric.shape
    if p > n:
        raise UniprunerError(f"protected={p} leading tokens but the sequence has only {n}")
    mask = check_mask(mask, b, n)
    if mask is not None:
        mask = mask.to(metric.device)
    if not isinstance(keep_order, bool):
        raise UniprunerError(f"keep_order must be a bool, got {keep_order!r}")
    dev = metric.device
    r = min(r, (n - p) // 2)
    a_pos = torch.arange(0, n, 2, device=dev)
    b_pos = torch.arange(1, n, 2, device=dev)
    na, nb = a_pos.numel(), b_pos.numel()
    a_free, b_free = a_pos >= p, b_pos >= p
    if mask is not None and r > 0 and b > 0:
        a_real, b_real = mask[:, ::2], mask[:, 1::2]
        n_pad = (~a_real & a_free).sum(dim=1)
        n_real = (a_real & a_free).sum(dim=1)
        has_dst = (b_real & b_free).any(dim=1)
        removable = n_pad + torch.where(has_dst, n_real, torch.zeros_like(n_real))
        r = min(r, int(removable.min()))
    if r == 0:
        return _identity(b, n, mask, dev).closures()

    with torch.no_grad():
        m = metric.detach()
        scores = cosine_matrix(m[:, ::2], m[:, 1::2])  # [B, na, nb]
        bad_col = ~b_free.expand(b, nb)
        if mask is not None:
            bad_col = bad_col | ~mask[:, 1::2]
        scores = scores.masked_fill(bad_col.unsqueeze(1), -math.inf)
        best, match = scores.max(dim=-1)  # [B, na]
        best = best.masked_fill(~a_free, -math.inf)
        if mask is not None:
            best = best.masked_fill(~mask[:, ::2] & a_free, math.inf)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        removed = torch.zeros(b, na, dtype=torch.bool, device=dev)
        removed.scatter_(1, order[:, :r], True)

        keep = torch.ones(b, n, dtype=torch.bool, device=dev)
        keep[:, ::2] = ~removed
        n_out = n - r
        if keep_order:
            slot = keep.long().cumsum(dim=1) - 1  # meaningful where keep is True
        else:  # ToMe's layout: [unmerged A, B]
            slot = torch.empty(b, n, dtype=torch.long, device=dev)
            slot[:, ::2] = (~removed).long().cumsum(dim=1) - 1
            slot[:, 1::2] = (na - r) + torch.arange(nb, device=dev)
        out_mask = _out_mask(slot, keep, mask, n_out)
        a_dst = torch.where(removed, slot.gather(1, 2 * match + 1), slot[:, ::2])
        dst = slot.clone()
        dst[:, ::2] = a_dst
        if mask is not None:
            dst = dst.masked_fill(~mask & ~keep, -1)
    return MergePlan(dst, n_out, out_mask).closures()


# ----------------------------------------------------------------------------- ToMeSD


def stride_matching_2d(metric: Tensor, w: int, h: int, sx: int, sy: int, r: int, *,
                       random_dst: bool = True,
                       generator: torch.Generator | None = None) -> tuple[MergeFn, UnmergeFn]:
    """2-D stride matching (ToMeSD): one destination per window, merge the most similar sources.

    Bolya and Hoffman, "Token Merging for Fast Stable Diffusion", CVPR Workshops 2023. The
    ``h x w`` token grid (row-major) is tiled by ``sy x sx`` windows; one token per window is a
    destination (chosen at random within the window, or its top-left token), all the others
    are sources. Each source finds its most cosine-similar destination (anywhere on the grid)
    and the ``r`` sources with the most similar match are merged into it. Typical use wraps an
    op: ``y = unmerge(op(merge(x)))``.

    Parameters
    ----------
    metric : Tensor ``[B, N, C]``
        ``N = w * h`` tokens in row-major order (ToMeSD uses the block's input hidden states).
    w, h : int
        Grid width and height.
    sx, sy : int
        Window width and height (ToMeSD's default is 2 x 2).
    r : int
        Tokens removed; capped (silently) at ``N`` minus the number of destinations.
    random_dst : bool
        Random destination within each window (ToMeSD's default) or the top-left token.
    generator : torch.Generator, optional
        Source of the random draw (the same destinations for the whole batch, as in ToMeSD).
        Given a seeded generator the result is deterministic; ``random_dst=False`` always is.
        The draw is ``torch.randint(sx * sy, (ceil(h / sy), ceil(w / sx), 1))`` on the
        generator's device, the same call as ToMeSD's, so on grids divisible by the stride the
        destinations are ToMeSD's for the same generator state.

    Returns
    -------
    (merge, unmerge)
        ``merge(x, mode="mean")`` maps ``[B, N, ...]`` to ``[B, N - r, ...]`` with the
        survivors in original order; ``unmerge(y)`` copies each destination's value back to the
        sources merged into it, restoring ``[B, N, ...]``. Both carry the plan as ``.plan``.

    Notes
    -----
    Grids not divisible by the stride: ToMeSD makes every token outside the full windows a
    source. Here the partial windows at the right and bottom edges get a destination of their
    own as well (``ceil(h / sy) * ceil(w / sx)`` destinations in all), so destinations cover the
    grid evenly up to the border. The drawn window offset is folded into a partial window by a
    modulo, which is slightly non-uniform there. Output order: ToMeSD returns the unmerged
    sources then the destinations; we keep the original order (each merged token sits at its
    destination's place). Ties go to the lower position.

    Examples
    --------
    >>> x = torch.randn(1, 16, 8, generator=torch.Generator().manual_seed(0))
    >>> merge, unmerge = stride_matching_2d(x, 4, 4, 2, 2, 6, random_dst=False)
    >>> y = merge(x)
    >>> y.shape, unmerge(y).shape
    (torch.Size([1, 10, 8]), torch.Size([1, 16, 8]))
    """
    metric = check_tokens(metric, "metric")
    check_finite(metric, "metric")
    w = _int(w, "w (grid width)", minimum=1)
    h = _int(h, "h (grid height)", minimum=1)
    sx = _int(sx, "sx (window width)", minimum=1)
    sy = _int(sy, "sy (window height)", minimum=1)
    r = _int(r, "r (tokens to merge)", minimum=0)
    b, n, _ = metric.shape
    if w * h != n:
        raise UniprunerError(
            f"w * h = {w} * {h} = {w * h} but metric has {n} tokens; pass the width and height "
            "of the token grid (tokens in row-major order)"
        )
    if generator is not None and not isinstance(generator, torch.Generator):
        raise UniprunerError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    dev = metric.device
    gh, gw = -(-h // sy), -(-w // sx)
    n_dst = gh * gw
    r = min(r, n - n_dst)
    if r == 0:
        return _identity(b, n, None, dev).closures()

    # the window bookkeeping depends only on the grid and the draw: done on the CPU when the metric is on
    # the meta device (FLOP counting without weights), where nonzero() has no data
    idev = torch.device("cpu") if metric.is_meta else dev
    with torch.no_grad():
        if random_dst:
            gen_dev = generator.device if generator is not None else idev
            k = torch.randint(sy * sx, (gh, gw, 1), generator=generator, device=gen_dev)
            k = k.to(idev).squeeze(-1)
        else:
            k = torch.zeros(gh, gw, dtype=torch.long, device=idev)
        win_h = (h - torch.arange(gh, device=idev) * sy).clamp(max=sy)  # rows in each window row
        win_w = (w - torch.arange(gw, device=idev) * sx).clamp(max=sx)
        row = torch.arange(gh, device=idev).unsqueeze(1) * sy + (k // sx) % win_h.unsqueeze(1)
        col = torch.arange(gw, device=idev).unsqueeze(0) * sx + (k % sx) % win_w.unsqueeze(0)
        dst_pos = (row * w + col).reshape(-1)  # [n_dst], ascending
        is_dst = torch.zeros(n, dtype=torch.bool, device=idev)
        is_dst[dst_pos] = True
        src_pos = torch.nonzero(~is_dst).squeeze(1).to(dev)  # [n_src], ascending
        dst_pos = dst_pos.to(dev)

        m = metric.detach()
        scores = cosine_matrix(m[:, src_pos], m[:, dst_pos])  # [B, n_src, n_dst]
        best, match = scores.max(dim=-1)
        order = torch.sort(best, dim=1, descending=True, stable=True).indices
        removed = torch.zeros(b, src_pos.numel(), dtype=torch.bool, device=dev)
        removed.scatter_(1, order[:, :r], True)

        keep = torch.ones(b, n, dtype=torch.bool, device=dev)
        keep[:, src_pos] = ~removed
        slot = keep.long().cumsum(dim=1) - 1
        src_slot = torch.where(removed, slot.gather(1, dst_pos[match]), slot[:, src_pos])
        dst = slot.clone()
        dst[:, src_pos] = src_slot
        # the kept tokens in order (slot -> position): a stable sort puts them first
        rep = torch.argsort((~keep).to(torch.uint8), dim=1, stable=True)[:, : n - r]
    return MergePlan(dst, n - r, rep=rep).closures()


# ----------------------------------------------------------------------------- DART


def dart(tokens: Tensor, budget: Budget | int | float, *, keys: Tensor | None = None,
         n_pivots: int = 8, pivot_tokens: Tensor | None = None, mask: Tensor | None = None,
         protected: int | Tensor | None = None) -> Tensor:
    """DART: keep the pivots and the tokens least duplicated with them.

    Wen, Wang, Zhang et al., "Stop Looking for Important Tokens in Multimodal Language Models:
    Duplication Matters More", 2025. Instead of ranking tokens by importance, DART picks a few
    pivot tokens and keeps, for each pivot, the tokens least similar to it, so the survivors
    cover the sequence with little duplication.

    Steps per row (``K`` = the budget's count, at least the number of protected tokens):

    1. protected tokens are kept (they count toward ``K``);
    2. pivots: the ``min(n_pivots, K - n_protected)`` valid, unprotected tokens with the largest
       L1 norm of ``keys`` (default: of the tokens themselves) are kept, in descending norm
       order; the rows of ``pivot_tokens`` (e.g. text tokens) are extra pivots after them;
    3. the remaining ``m = K - n_protected - n_in_sequence_pivots`` picks are split over the
       ``T`` pivots: each gets ``m // T``, and the first ``m % T`` pivots (highest norm first,
       then the extra pivots in order) one more, so the budget is met exactly;
    4. pivot by pivot, its quota of the tokens least cosine-similar to it (on ``tokens``) is
       taken from the pool of valid, unprotected, not yet kept tokens (so no duplicates).

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Hidden states; similarity is cosine on these.
    budget : Budget, int or float
        Tokens kept (an int is a count, a float a ratio), resolved per row on the valid count
        as in :func:`unipruner.select.topk`. Data-dependent budgets are refused.
    keys : Tensor ``[B, N, Dk]``, optional
        What pivots are ranked on (L1 norm; DART uses the layer's keys).
    n_pivots : int
        In-sequence pivots (DART uses a handful, e.g. 4 image + 4 text).
    pivot_tokens : Tensor ``[B, P, D]``, optional
        Extra pivot vectors that are not part of ``tokens`` (not returned).
    mask : Tensor ``[B, N]`` bool, optional
        Validity mask; masked positions are never picked.
    protected : int or bool Tensor ``[N]`` / ``[B, N]``, optional
        Leading-token count or mask of tokens always kept (padding positions are ignored).

    Returns
    -------
    Tensor ``[B, K]`` long
        Sorted keep indices; rows keeping fewer than ``K`` are right-padded with ``-1``.

    Notes
    -----
    Deviations from the paper's code: the remainder of the per-pivot quota is spread over the
    first pivots so the budget holds exactly; pivots are drawn only from valid unprotected
    tokens (protected ones are kept anyway); text pivots are passed in by the caller as
    ``pivot_tokens`` instead of being chosen inside the function. Ties go to the lower
    position.

    Examples
    --------
    >>> x = torch.randn(2, 16, 8, generator=torch.Generator().manual_seed(0))
    >>> dart(x, 6, n_pivots=2).shape
    torch.Size([2, 6])
    >>> dart(x, 6, n_pivots=2, protected=1)[:, 0]
    tensor([0, 0])
    """
    tokens = check_tokens(tokens, "tokens")
    check_finite(tokens, "tokens")
    b, n, d = tokens.shape
    dev = tokens.device
    mask = check_mask(mask, b, n)
    mask = None if mask is None else mask.to(dev)
    n_pivots = _int(n_pivots, "n_pivots", minimum=0)
    if keys is not None:
        keys = check_tokens(keys, "keys")
        if tuple(keys.shape[:2]) != (b, n):
            raise UniprunerError(
                f"keys must have shape [B, N, Dk] with [B, N] = {(b, n)} as the tokens, "
                f"got {tuple(keys.shape)}"
            )
        check_finite(keys, "keys")
    n_extra = 0
    if pivot_tokens is not None:
        pivot_tokens = check_tokens(pivot_tokens, "pivot_tokens", min_tokens=0)
        if pivot_tokens.shape[0] != b or pivot_tokens.shape[2] != d:
            raise UniprunerError(
                f"pivot_tokens must have shape [B, P, D] with B = {b} and D = {d} as the tokens, "
                f"got {tuple(pivot_tokens.shape)}"
            )
        check_finite(pivot_tokens, "pivot_tokens")
        n_extra = pivot_tokens.shape[1]
    if n_pivots == 0 and n_extra == 0:
        raise UniprunerError(
            "DART needs at least one pivot: set n_pivots >= 1 or pass pivot_tokens"
        )
    bud = Budget.coerce(budget)
    if bud.data_dependent:
        raise UniprunerError(f"DART needs a ratio or keep budget, got {bud!r}")

    prot = protected_mask(protected, b, n, dev)
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if mask is None else mask
    prot = torch.zeros_like(valid) if prot is None else prot & valid
    nv = valid.sum(dim=1)
    n_prot = prot.sum(dim=1)
    k = torch.maximum(bud.counts(nv, n_max=n), n_prot)
    rest = k - n_prot  # in-sequence picks beyond the protected tokens

    with torch.no_grad():
        pool = valid & ~prot
        keep = prot.clone()
        # 2. in-sequence pivots by L1 norm of the keys
        npv = min(n_pivots, n)
        n_in = rest.clamp(max=npv)
        norm = (tokens if keys is None else keys).detach().abs().sum(dim=-1)
        norm = norm.masked_fill(~pool, -math.inf)
        piv = torch.sort(norm, dim=1, descending=True, stable=True).indices[:, :npv]  # [B, npv]
        piv_ok = torch.arange(npv, device=dev).unsqueeze(0) < n_in.unsqueeze(1)
        chosen = torch.zeros_like(keep).scatter_(1, piv, piv_ok)
        keep |= chosen
        pool &= ~chosen
        # 3. quotas: pivot t of a row is its rank-th valid pivot
        vecs = batched_gather(tokens.detach(), piv)
        if pivot_tokens is not None and n_extra:
            vecs = torch.cat([vecs, pivot_tokens.detach().to(vecs.dtype)], dim=1)
        n_total = npv + n_extra
        t = torch.arange(n_total, device=dev).unsqueeze(0)
        in_seq = t < npv
        t_ok = torch.where(in_seq, t < n_in.unsqueeze(1), torch.ones_like(in_seq))
        rank = torch.where(in_seq, t, n_in.unsqueeze(1) + t - npv)
        picks = (rest - n_in).unsqueeze(1)
        n_piv = (n_in + n_extra).clamp(min=1).unsqueeze(1)
        quota = picks // n_piv + (rank < picks % n_piv).long()
        quota = quota.masked_fill(~t_ok, 0)  # [B, T]
        # 4. least similar to each pivot, pivot by pivot, out of the shrinking pool
        sim = cosine_matrix(vecs, tokens.detach())  # [B, T, N]
        for j in range(n_total):
            q = quota[:, j]
            qmax = int(q.max()) if b else 0
            if qmax == 0:
                continue
            s = sim[:, j].masked_fill(~pool, math.inf)
            order = torch.sort(s, dim=1, stable=True).indices[:, :qmax]
            take = torch.arange(qmax, device=dev).unsqueeze(0) < q.unsqueeze(1)
            chosen = torch.zeros_like(keep).scatter_(1, order, take)
            keep |= chosen
            pool &= ~chosen

    kmax = int(k.max()) if b else 0
    big = torch.iinfo(torch.long).max
    pos = torch.arange(n, device=dev).expand(b, n)
    idx = torch.sort(pos.masked_fill(~keep, big), dim=1).values[:, :kmax]
    return idx.masked_fill(idx == big, -1)


def novelty(tokens: Tensor, *, mask: Tensor | None = None) -> Tensor:
    """How little each token duplicates the tokens before it: ``1 - max_{j < i} cos(x_i, x_j)``.

    Near-duplicate pruning of multi-vector documents (Acquavia et al., "Static Pruning for
    Multi-Representation Dense Retrieval", DocEng 2023; Lassance et al., "A Study on Token Pruning
    for ColBERT", 2021): a vector almost parallel to an earlier one adds little to MaxSim, so it
    scores low. The first valid token of each row scores 2 (nothing before it); masked positions
    and masked earlier tokens are ignored (masked positions score ``-inf``).

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
    mask : Tensor ``[B, N]``, optional

    Returns
    -------
    Tensor ``[B, N]`` (float32 for half inputs)

    Examples
    --------
    >>> novelty(torch.tensor([[[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]]))
    tensor([[2., 0., 1.]])
    """
    x = check_tokens(tokens, "tokens")
    check_finite(x, "tokens")
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    xw = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    sim = cosine_matrix(xw)  # [B, N, N]
    earlier = torch.ones(n, n, dtype=torch.bool, device=x.device).tril(-1)  # column j < row i
    ok = earlier.unsqueeze(0) if mask is None else earlier.unsqueeze(0) & mask.unsqueeze(1)
    mx = sim.masked_fill(~ok, -math.inf).amax(dim=2)
    s = 1.0 - torch.where(torch.isfinite(mx), mx, torch.full_like(mx, -1.0))
    return s if mask is None else s.masked_fill(~mask, -math.inf)
