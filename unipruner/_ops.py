"""Small batched tensor helpers at the bottom of the dependency graph (used by every layer)."""

from __future__ import annotations

from torch import Tensor

__all__ = ["batched_gather", "cosine_matrix", "l2_normalize", "pairwise_sq_dist"]


def l2_normalize(x: Tensor, eps: float = 1e-12) -> Tensor:
    """Unit-normalise the last dimension (zero vectors stay zero)."""
    return x / x.norm(dim=-1, keepdim=True).clamp(min=eps)


def cosine_matrix(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Cosine similarities ``[..., N, M]`` between rows of ``a [..., N, D]`` and ``b [..., M, D]``."""
    an = l2_normalize(a.float() if not a.is_floating_point() else a)
    bn = an if b is None else l2_normalize(b)
    return an @ bn.transpose(-1, -2)


def pairwise_sq_dist(a: Tensor, b: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``[..., N, M]`` (clamped at 0 against rounding)."""
    b = a if b is None else b
    aa = (a * a).sum(-1, keepdim=True)
    bb = (b * b).sum(-1).unsqueeze(-2)
    return (aa + bb - 2.0 * (a @ b.transpose(-1, -2))).clamp_(min=0.0)


def batched_gather(x: Tensor, idx: Tensor) -> Tensor:
    """``x[b, idx[b, k], ...]`` for ``x [B, N, ...]`` and ``idx [B, K]`` (no -1 allowed)."""
    if x.ndim == 2:
        return x.gather(1, idx)
    shape = idx.shape + x.shape[2:]
    view = idx.reshape(idx.shape + (1,) * (x.ndim - 2)).expand(shape)
    return x.gather(1, view)
