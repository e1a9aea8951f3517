"""Cross-step scorers: which tokens changed since the previous denoising step.

* :func:`cat_scores` — CAT pruning's relative change magnitude, boosted by staleness and balanced
  over spatial clusters (Cheng et al. 2025), for reusing cached outputs across diffusion steps.

Scores are ``[B, N]`` floats (higher = recompute / keep) with ``-inf`` at masked positions,
batched over ``B`` and ``N`` with no Python loop over tokens.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._validate import check_finite, check_grid, check_mask, check_tokens
from ..errors import UniprunerError

__all__ = ["cat_scores", "cluster_ids"]


def _real(value: object, name: str, minimum: float) -> float:
    if (isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value))
            or float(value) < minimum):
        raise UniprunerError(f"{name} must be a finite real number >= {minimum}, got {value!r}")
    return float(value)


def cluster_ids(n: int, hw: tuple[int, int] | None, cluster: int, device: torch.device | str | None = None
                ) -> Tensor:
    """Spatial cluster of every row-major token ``[N]``: ``cluster x cluster`` windows of the grid.

    With ``hw=(h, w)`` token ``(r, c)`` belongs to window ``(r // cluster, c // cluster)`` (the last
    row / column of windows may be smaller); without a grid, clusters are runs of ``cluster**2``
    consecutive tokens. Ids are ``0 .. n_clusters - 1`` in row-major window order.

    Examples
    --------
    >>> cluster_ids(16, (4, 4), 2).tolist()
    [0, 0, 1, 1, 0, 0, 1, 1, 2, 2, 3, 3, 2, 2, 3, 3]
    >>> cluster_ids(5, None, 1).tolist()
    [0, 1, 2, 3, 4]
    """
    if isinstance(cluster, bool) or not isinstance(cluster, int) or cluster < 1:
        raise UniprunerError(f"cluster must be an int >= 1 (the window side), got {cluster!r}")
    pos = torch.arange(n, device=device)
    if hw is None:
        return torch.div(pos, cluster * cluster, rounding_mode="floor")
    _, w = check_grid(hw, n)
    per_row = -(-w // cluster)
    return torch.div(pos // w, cluster, rounding_mode="floor") * per_row + torch.div(
        pos % w, cluster, rounding_mode="floor")


def cat_scores(current: Tensor, previous: Tensor, staleness: Tensor | None = None, *,
               hw: tuple[int, int] | None = None, staleness_weight: float = 0.1, cluster: int = 4,
               balance: float = 0.5, eps: float = 1e-6, mask: Tensor | None = None) -> Tensor:
    """CAT pruning's token scores: relative change since the last step, staleness, cluster balance.

    Cheng, Chen & Jia, "CAT Pruning: Cluster-Aware Token Pruning For Text-to-Image Diffusion
    Models", 2025: at each denoising step only the tokens whose noise (or latent) changed most are
    recomputed; the others reuse their cached outputs. Per token ``i`` of a row:

    1. relative change ``c_i = ||x_i - p_i|| / (||p_i|| + eps)`` (``x`` = ``current``,
       ``p`` = ``previous``), divided by its mean over the row's valid tokens, so ``1`` is an
       average change whatever the scale of the signal (an unchanged row scores 0);
    2. staleness ``z_i`` (steps since the token was last recomputed) is added:
       ``s_i = c_i + staleness_weight * z_i``, so a token reused long enough is refreshed even if
       its change stays small;
    3. cluster balance: the grid is cut into ``cluster x cluster`` spatial windows
       (:func:`cluster_ids`); with ``m_k`` the mean of ``s`` over the valid tokens of window
       ``k`` and ``m`` its mean over the row, ``score_i = s_i * (m / m_k(i)) ** balance``.
       ``balance=0`` ranks by ``s`` alone; ``balance=1`` ranks every token relative to its own
       window, so the recomputed tokens spread over the image instead of piling into the windows
       that change most.

    Parameters
    ----------
    current, previous : Tensor ``[B, N, C]``
        The tokens (noise prediction or latent) at this step and at the previous one.
    staleness : Tensor ``[B, N]``, optional
        Non-negative steps since each token was last recomputed (default 0).
    hw : (int, int), optional
        Row-major grid of the tokens, for spatial windows; without it, windows are runs of
        ``cluster**2`` consecutive tokens.
    staleness_weight : float
        Weight of one step of staleness, in units of the row's average relative change (>= 0).
    cluster : int
        Window side (``>= 1``; ``1`` disables balancing in effect).
    balance : float
        Exponent of the cluster balance, in ``[0, 1]``.
    eps : float
        Added to ``||p_i||`` (> 0).
    mask : Tensor ``[B, N]``, optional
        Validity mask (True = real token).

    Returns
    -------
    Tensor ``[B, N]``
        Scores (float32, or float64 for float64 input); ``-inf`` at masked positions.

    Notes
    -----
    Deviations from the paper, for a vectorised, deterministic core: CAT clusters the tokens with
    k-means and balances the selection over the clusters; here the clusters are fixed spatial
    windows and the balance is the multiplicative per-window normalisation of step 3. The paper's
    exact combination of noise magnitude and staleness was not at hand; the additive staleness
    term of step 2 is our choice. Running every token for the first steps (CAT's ``t0``) is the
    schedule's business, not the scorer's.

    Examples
    --------
    >>> prev = torch.ones(1, 4, 2)
    >>> cur = prev.clone(); cur[0, 2] += 1.0
    >>> s = cat_scores(cur, prev, hw=(2, 2), cluster=1)
    >>> int(s.argmax()), [round(v, 3) for v in s[0].tolist()]
    (2, [0.0, 0.0, 2.0, 0.0])
    >>> z = torch.tensor([[0.0, 0.0, 0.0, 50.0]])
    >>> int(cat_scores(cur, prev, z, hw=(2, 2), cluster=1).argmax())
    3
    """
    x = check_tokens(current, "current")
    p = check_tokens(previous, "previous")
    if p.shape != x.shape:
        raise UniprunerError(f"previous {tuple(p.shape)} must have the shape of current {tuple(x.shape)}")
    for t, name in ((x, "current"), (p, "previous")):
        check_finite(t, name)
        if not bool(torch.isfinite(t).all()):
            raise UniprunerError(f"{name} contains inf; check the model outputs that produced them")
    w_z = _real(staleness_weight, "staleness_weight", 0.0)
    bal = _real(balance, "balance", 0.0)
    if bal > 1.0:
        raise UniprunerError(f"balance must lie in [0, 1], got {balance!r}")
    e = _real(eps, "eps", 0.0)
    if e <= 0.0:
        raise UniprunerError(f"eps must be > 0, got {eps!r}")
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    vf = valid.to(dtype)
    nv = vf.sum(dim=1, keepdim=True).clamp(min=1.0)
    tiny = torch.finfo(dtype).tiny

    xd, pd = x.to(dtype), p.to(dtype)
    change = (xd - pd).norm(dim=-1) / (pd.norm(dim=-1) + e) * vf
    mean = change.sum(dim=1, keepdim=True) / nv
    s = torch.where(mean > 0, change / mean.clamp(min=tiny), torch.zeros_like(change))
    if staleness is not None:
        if not isinstance(staleness, Tensor) or tuple(staleness.shape) != (b, n):
            shape = tuple(staleness.shape) if isinstance(staleness, Tensor) else type(staleness).__name__
            raise UniprunerError(f"staleness must be a tensor [B, N] = {(b, n)}, got {shape}")
        z = staleness.to(device=x.device, dtype=dtype)
        if not bool(torch.isfinite(z).all()) or bool((z < 0).any()):
            raise UniprunerError("staleness must hold finite, non-negative step counts")
        s = s + w_z * z
    s = s * vf
    ids = cluster_ids(n, hw, cluster, device=x.device)
    if bal > 0.0:
        k = int(ids.max()) + 1
        idx = ids.expand(b, n)
        tot = torch.zeros(b, k, dtype=dtype, device=x.device).scatter_add(1, idx, s)
        cnt = torch.zeros(b, k, dtype=dtype, device=x.device).scatter_add(1, idx, vf)
        m_k = (tot / cnt.clamp(min=1.0)).gather(1, idx)
        m = s.sum(dim=1, keepdim=True) / nv
        factor = torch.where(m_k > 0, (m / m_k.clamp(min=tiny)) ** bal, torch.ones_like(m_k))
        s = s * factor
    return s.masked_fill(~valid, -math.inf)
