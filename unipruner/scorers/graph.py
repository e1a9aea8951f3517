"""Graph scorers: token importance propagated over a graph of tokens.

* :func:`pagerank` — weighted PageRank over the head-averaged attention graph (Zero-TPrune).
* :func:`gwpr` — generalised weighted PageRank, run per attention head and then pooled over the
  heads (AT-EDM's G-WPR, for diffusion self-attention).
* :func:`similarity_propagation` — importance propagated over a k-nearest-neighbour cosine
  similarity graph (G-Prune).

Both return ``[B, N]`` float scores (higher = keep) with ``-inf`` at masked positions, and both
are batched over ``B`` and ``N``; the only Python loop is over the propagation iterations.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

from .._ops import cosine_matrix
from .._validate import check_attention, check_finite, check_mask, check_tokens
from ..errors import UniprunerError

__all__ = ["gwpr", "pagerank", "similarity_propagation"]


def _compute_dtype(x: Tensor) -> torch.dtype:
    """float64 stays float64; everything else (half, bfloat16, float32) runs in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_real(value: object, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or math.isnan(float(value)):
        raise UniprunerError(f"{name} must be a real number, got {value!r}")
    return float(value)


def _check_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise UniprunerError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _row_weights(w: Tensor | None, valid: Tensor, name: str, dtype: torch.dtype) -> Tensor | None:
    """Check an optional per-token tensor ``[B, N]``; return it with masked positions zeroed."""
    if w is None:
        return None
    if not isinstance(w, Tensor) or tuple(w.shape) != tuple(valid.shape):
        shape = tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__
        raise UniprunerError(f"{name} must be a tensor [B, N] = {tuple(valid.shape)}, got {shape}")
    check_finite(w, name)
    w = w.to(device=valid.device, dtype=dtype)
    if not bool(torch.isfinite(w[valid]).all()):
        raise UniprunerError(f"{name} must be finite at valid (unmasked) positions")
    return w.masked_fill(~valid, 0.0)


def pagerank(attn: Tensor, *, damping: float = 0.85, tol: float = 1e-6, max_iter: int = 100,
             mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Weighted PageRank importance over the head-averaged attention graph (Zero-TPrune).

    Wang et al., "Zero-TPrune: Zero-Shot Token Pruning through Leveraging of the Attention
    Graph in Pre-Trained Transformers", CVPR 2024. The attention map is read as a graph whose
    edge ``q -> k`` carries the attention query ``q`` pays to key ``k``; a token is important
    when important tokens attend to it. With ``A`` the head-averaged attention restricted to
    valid tokens and row-renormalised (so every valid query's row sums to 1), the scores are the
    fixed point of

    ``s <- (1 - damping) * v + damping * A^T s``

    found by power iteration from the uniform distribution over the valid tokens, stopped per
    row once the L1 change falls below ``tol`` (a converged row is frozen while the others
    continue) or after ``max_iter`` steps. Each valid row's scores sum to 1.

    Parameters
    ----------
    attn : Tensor ``[B, H, N, N]`` or ``[B, N, N]``
        Attention probabilities (non-negative; rows need not sum to 1 after masking, they are
        renormalised). Heads are averaged uniformly.
    damping : float
        Probability of following an attention edge, in ``(0, 1]``. ``1`` is the paper's plain
        iteration ``s <- A^T s`` (may oscillate instead of converging; then ``max_iter`` stops it).
    tol : float
        Per-row L1 convergence threshold, ``> 0``.
    max_iter : int
        Maximum number of power-iteration steps (``>= 1``).
    mask : Tensor ``[B, N]``, optional
        Validity mask (True = real token). Masked tokens are removed from the graph: their
        rows (as queries) contribute nothing and their columns (as keys) are dropped before the
        rows are renormalised.
    weights : Tensor ``[B, N]``, optional
        Personalisation: a non-negative weight per query node giving the teleport distribution
        ``v`` (normalised over the valid tokens of each row). Use it to bias importance towards,
        e.g., text tokens or the CLS token. Default: uniform ``v``.

    Returns
    -------
    Tensor ``[B, N]``
        PageRank scores (float32, or float64 for float64 input); ``-inf`` at masked positions.

    Notes
    -----
    Deviations from the paper: (1) we add the classic PageRank teleport term (``damping``) so
    the iteration provably converges on any attention graph; ``damping=1`` recovers the
    paper's undamped update. (2) Heads are averaged uniformly; Zero-TPrune's variance-based
    head filter and its emphasis on informative regions are left to the caller (pass only the
    heads you want, or a ``weights`` vector). (3) A valid query whose attention falls entirely
    on masked keys (a dangling node) spreads its mass uniformly over the valid tokens, the
    standard PageRank fix, so the scores of a row always sum to 1.

    Examples
    --------
    >>> a = torch.tensor([[[0.1, 0.9, 0.0], [0.0, 1.0, 0.0], [0.2, 0.6, 0.2]]])
    >>> s = pagerank(a)
    >>> int(s.argmax()), round(float(s.sum()), 4)
    (1, 1.0)
    """
    a = check_attention(attn, square=True)
    if a.shape[-1] == 0:
        raise UniprunerError("attn covers 0 tokens; pagerank needs at least one token")
    if not a.is_floating_point():
        raise UniprunerError(f"attn must be a floating-point tensor, got dtype {a.dtype}")
    d = _check_real(damping, "damping")
    if not 0.0 < d <= 1.0:
        raise UniprunerError(f"damping must lie in (0, 1], got {damping!r}")
    tol_f = _check_real(tol, "tol")
    if not tol_f > 0.0:
        raise UniprunerError(f"tol must be > 0, got {tol!r}")
    n_iter = _check_int(max_iter, "max_iter", 1)
    b, _, n, _ = a.shape
    mask = check_mask(mask, b, n)
    if bool((a < 0).any()):
        raise UniprunerError(
            "attn must hold non-negative attention probabilities (after softmax), "
            "found negative values; pass the softmax output, not the logits"
        )
    dtype = _compute_dtype(a)
    valid = torch.ones(b, n, dtype=torch.bool, device=a.device) if mask is None else mask
    vf = valid.to(dtype)
    nv = valid.sum(dim=1)
    uniform = vf / nv.clamp(min=1).unsqueeze(1).to(dtype)

    graph = a.to(dtype).mean(dim=1) * vf.unsqueeze(2) * vf.unsqueeze(1)
    row = graph.sum(dim=2, keepdim=True)
    has_edges = row > 0
    dangling = ~has_edges & valid.unsqueeze(2)
    graph = torch.where(
        has_edges,
        graph / row.clamp(min=torch.finfo(dtype).tiny),
        torch.where(dangling, uniform.unsqueeze(1), torch.zeros((), dtype=dtype, device=a.device)),
    )

    teleport = uniform
    w = _row_weights(weights, valid, "weights", dtype)
    if w is not None:
        if bool((w < 0).any()):
            raise UniprunerError("weights (the teleport distribution) must be non-negative")
        total = w.sum(dim=1, keepdim=True)
        if bool(((total <= 0) & (nv > 0).unsqueeze(1)).any()):
            raise UniprunerError(
                "weights must put positive mass on at least one valid token of every row"
            )
        teleport = w / total.clamp(min=torch.finfo(dtype).tiny)

    s = uniform
    active = nv > 0
    base = (1.0 - d) * teleport
    for _ in range(n_iter):
        new = base + d * torch.bmm(s.unsqueeze(1), graph).squeeze(1)
        delta = (new - s).abs().sum(dim=1)
        s = torch.where(active.unsqueeze(1), new, s)
        active = active & (delta >= tol_f)
        if not bool(active.any()):
            break
    return s.masked_fill(~valid, -math.inf)


GWPR_HEADS = ("mean", "max")


def gwpr(attn: Tensor, *, damping: float = 1.0, max_iter: int = 30, tol: float = 1e-6, heads: str = "mean",
         mask: Tensor | None = None, weights: Tensor | None = None) -> Tensor:
    """Generalised weighted PageRank (G-WPR) over a self-attention map, per head (AT-EDM).

    Wang et al., "Attention-Driven Training-Free Efficiency Enhancement of Diffusion Models"
    (AT-EDM), CVPR 2024, rank the image tokens of a diffusion self-attention layer with G-WPR, a
    generalisation of Zero-TPrune's weighted PageRank (:func:`pagerank`): a token is important
    when important tokens attend to it, with no CLS token to anchor the ranking. Here every head's
    attention graph is ranked on its own, ``s_h <- (1 - damping) * v + damping * A_h^T s_h`` (the
    same update, masking, dangling-node rule and per-row stopping as :func:`pagerank`), and the
    per-head scores are then pooled over the heads (``heads="mean"`` or ``"max"``).

    How it differs from :func:`pagerank`: (1) ``pagerank`` averages the attention over the heads
    *first* and ranks the one averaged graph; ``gwpr`` ranks each head's graph and pools the
    *scores*, so a token that one head singles out keeps its rank instead of being washed out by
    the other heads' graphs (for one head the two are identical); (2) the defaults are those of
    the undamped WPR iteration (``damping=1``: no teleport term), which converges on the dense,
    strictly positive softmax maps of diffusion self-attention. Each head's scores of a row sum to
    1, so with ``heads="mean"`` the pooled scores do too.

    Parameters
    ----------
    attn : Tensor ``[B, H, N, N]`` or ``[B, N, N]``
        Self-attention probabilities (non-negative).
    damping, max_iter, tol, mask, weights
        As in :func:`pagerank` (``weights`` is the teleport distribution, used when ``damping < 1``).
    heads : str
        How the per-head scores are pooled: ``"mean"`` or ``"max"``.

    Returns
    -------
    Tensor ``[B, N]``
        Scores (float32, or float64 for float64 input); ``-inf`` at masked positions.

    Notes
    -----
    The paper's text was not at hand when this was written; the per-head ranking with score pooling
    is our reading of its "generalisation" of WPR to multi-head maps without a CLS token. AT-EDM
    computes the scores on the self-attention map of each transformer block and prunes after the
    block's feed-forward layer; that placement is the adapter's business.

    Examples
    --------
    >>> a = torch.tensor([[[[0.1, 0.9, 0.0], [0.0, 1.0, 0.0], [0.2, 0.6, 0.2]],
    ...                    [[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.4, 0.4, 0.2]]]])
    >>> s = gwpr(a)
    >>> s.shape, round(float(s.sum()), 4)
    (torch.Size([1, 3]), 1.0)
    >>> bool(torch.allclose(gwpr(a[:, :1]), pagerank(a[:, :1], damping=1.0, max_iter=30)))
    True
    """
    a = check_attention(attn, square=True)
    if heads not in GWPR_HEADS:
        raise UniprunerError(f"heads must be one of {GWPR_HEADS}, got {heads!r}")
    b, h, n, _ = a.shape
    mask = check_mask(mask, b, n)
    flat_mask = None if mask is None else mask.repeat_interleave(h, dim=0)
    flat_w = weights
    if isinstance(weights, Tensor) and tuple(weights.shape) == (b, n):
        flat_w = weights.repeat_interleave(h, dim=0)
    elif weights is not None:
        shape = tuple(weights.shape) if isinstance(weights, Tensor) else type(weights).__name__
        raise UniprunerError(f"weights must be a tensor [B, N] = {(b, n)}, got {shape}")
    s = pagerank(a.reshape(b * h, 1, n, n), damping=damping, tol=tol, max_iter=max_iter, mask=flat_mask,
                 weights=flat_w).reshape(b, h, n)
    return s.mean(dim=1) if heads == "mean" else s.amax(dim=1)


def similarity_propagation(tokens: Tensor, scores: Tensor | None = None, *, k: int = 8,
                           alpha: float = 0.5, n_iter: int = 10,
                           mask: Tensor | None = None) -> Tensor:
    """Importance propagated over a k-nearest-neighbour cosine graph of the tokens (G-Prune).

    Jiang et al., "What Kind of Visual Tokens Do We Need? Training-free Visual Token Pruning
    for Multi-modal Large Language Models from the Perspective of Graph", AAAI 2025. Tokens are
    nodes; each valid token links to its ``k`` most cosine-similar other valid tokens (itself
    and masked tokens excluded), with weight ``max(cos, 0)``; each token's out-links are
    normalised to sum to 1 (``W``, row-stochastic; a token with no positive link sends nothing).
    Starting from ``s0``, importance flows along the links for ``n_iter`` steps:

    ``s <- alpha * W^T s + (1 - alpha) * s0``

    so a token that many (important) tokens count among their nearest neighbours, i.e. a
    representative of a large group, gains importance.

    Parameters
    ----------
    tokens : Tensor ``[B, N, D]``
        Token features (hidden states or keys).
    scores : Tensor ``[B, N]``, optional
        Initial importance ``s0`` (e.g. attention received); must be finite at valid positions
        (``-inf`` at masked positions is fine). Used as given, not renormalised. Default:
        uniform ``1 / n_valid``.
    k : int
        Neighbours per token (``>= 1``; rows with fewer valid tokens use them all).
    alpha : float
        Propagation weight in ``[0, 1]``: ``0`` returns ``s0``, ``1`` is pure propagation.
    n_iter : int
        Propagation steps (``>= 0``).
    mask : Tensor ``[B, N]``, optional
        Validity mask (True = real token).

    Returns
    -------
    Tensor ``[B, N]``
        Propagated scores (float32, or float64 for float64 input); ``-inf`` at masked positions.

    Notes
    -----
    Deviations from the paper: we use a k-NN graph (fixed out-degree, insensitive to the scale
    of the similarities) in place of the paper's similarity-based edge construction, and a
    restart term ``(1 - alpha) * s0`` that keeps the result anchored to the initial importance
    for a fixed number of steps (the paper iterates its information flow a fixed number of
    times too; ``alpha=1`` gives pure propagation). Negative similarities are clipped to 0.
    Among equally similar neighbours the lower index is taken.

    Examples
    --------
    >>> x = torch.tensor([[[1.0, 0.0], [0.9, 0.1], [0.95, 0.05], [0.0, 1.0]]])
    >>> s = similarity_propagation(x, k=2)
    >>> int(s.argmin()), round(float(s[0, 3]), 4)  # no one counts token 3 as a neighbour
    (3, 0.125)
    """
    x = check_tokens(tokens)
    check_finite(x, "tokens")
    if not bool(torch.isfinite(x).all()):
        raise UniprunerError("tokens contains inf; check the model outputs that produced them")
    kk = _check_int(k, "k", 1)
    a = _check_real(alpha, "alpha")
    if not 0.0 <= a <= 1.0:
        raise UniprunerError(f"alpha must lie in [0, 1], got {alpha!r}")
    steps = _check_int(n_iter, "n_iter", 0)
    b, n, _ = x.shape
    mask = check_mask(mask, b, n)
    dtype = _compute_dtype(x)
    valid = torch.ones(b, n, dtype=torch.bool, device=x.device) if mask is None else mask
    vf = valid.to(dtype)
    nv = valid.sum(dim=1)

    s0 = _row_weights(scores, valid, "scores", dtype)
    if s0 is None:
        s0 = vf / nv.clamp(min=1).unsqueeze(1).to(dtype)

    cos = cosine_matrix(x.to(dtype))
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    pair_ok = valid.unsqueeze(2) & valid.unsqueeze(1) & ~eye
    cos = cos.masked_fill(~pair_ok, -math.inf)
    w = torch.zeros(b, n, n, dtype=dtype, device=x.device)
    m = min(kk, n - 1)
    if m > 0:
        order = torch.sort(cos, dim=2, descending=True, stable=True)
        top = order.values[:, :, :m].clamp(min=0.0)  # -inf (self / masked) and negatives -> 0
        w = w.scatter(2, order.indices[:, :, :m], top)
    row = w.sum(dim=2, keepdim=True)
    w = torch.where(row > 0, w / row.clamp(min=torch.finfo(dtype).tiny), torch.zeros_like(w))

    s = s0
    for _ in range(steps):
        s = a * torch.bmm(s.unsqueeze(1), w).squeeze(1) + (1.0 - a) * s0
    return s.masked_fill(~valid, -math.inf)
