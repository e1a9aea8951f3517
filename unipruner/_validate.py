"""Input checks shared by scorers, selectors and reducers.

Every public function validates at its boundary with these helpers so a user gets one clear
message naming the argument, the shape it had and the shape it needed.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .errors import UniprunerError

__all__ = [
    "check_attention",
    "check_finite",
    "check_grid",
    "check_mask",
    "check_tokens",
    "protected_mask",
    "valid_counts",
]


def check_tokens(x: object, name: str = "tokens", *, min_tokens: int = 1) -> Tensor:
    """Check ``x`` is a float tensor ``[B, N, D]`` with ``N >= min_tokens`` and return it."""
    if not isinstance(x, Tensor):
        raise UniprunerError(f"{name} must be a torch.Tensor of shape [B, N, D], got {type(x).__name__}")
    if x.ndim != 3:
        raise UniprunerError(
            f"{name} must have shape [B, N, D] (batch, tokens, features), got shape {tuple(x.shape)}; "
            f"add a batch dimension with {name}.unsqueeze(0) for a single sequence"
        )
    if not x.is_floating_point():
        raise UniprunerError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    if x.shape[1] < min_tokens:
        raise UniprunerError(f"{name} has {x.shape[1]} tokens; at least {min_tokens} are needed")
    return x


def check_mask(mask: Tensor | None, batch: int, n: int, name: str = "mask") -> Tensor | None:
    """Check an optional validity mask ``[B, N]`` (True = real token) and return it as bool."""
    if mask is None:
        return None
    if not isinstance(mask, Tensor):
        raise UniprunerError(f"{name} must be a torch.Tensor of shape [B, N], got {type(mask).__name__}")
    if tuple(mask.shape) != (batch, n):
        raise UniprunerError(
            f"{name} must have shape [B, N] = {(batch, n)} to match the tokens, got {tuple(mask.shape)}"
        )
    if mask.dtype != torch.bool:
        if mask.is_floating_point() or not torch.all((mask == 0) | (mask == 1)):
            raise UniprunerError(f"{name} must be boolean (or 0/1 integers), got dtype {mask.dtype}")
        mask = mask.bool()
    return mask


def check_finite(x: Tensor, name: str) -> Tensor:
    """Raise if ``x`` contains NaN (infinities are allowed: they encode protection / masking)."""
    if x.is_floating_point() and not x.is_meta and bool(torch.isnan(x).any()):
        raise UniprunerError(f"{name} contains NaN; check the model outputs that produced them")
    return x


def check_attention(attn: object, batch: int | None = None, n: int | None = None,
                    name: str = "attn", square: bool = False) -> Tensor:
    """Check attention probabilities ``[B, H, Q, N]`` or ``[B, Q, N]``; return ``[B, H, Q, N]``."""
    if not isinstance(attn, Tensor):
        raise UniprunerError(f"{name} must be a torch.Tensor, got {type(attn).__name__}")
    if attn.ndim == 3:
        attn = attn.unsqueeze(1)
    if attn.ndim != 4:
        raise UniprunerError(
            f"{name} must have shape [B, H, Q, N] or [B, Q, N] (attention probabilities), "
            f"got {tuple(attn.shape)}"
        )
    if batch is not None and attn.shape[0] != batch:
        raise UniprunerError(f"{name} has batch size {attn.shape[0]} but the tokens have {batch}")
    if n is not None and attn.shape[-1] != n:
        raise UniprunerError(f"{name} attends over {attn.shape[-1]} keys but there are {n} tokens")
    if square and attn.shape[-2] != attn.shape[-1]:
        raise UniprunerError(f"{name} must be a full square attention map, got {tuple(attn.shape)}")
    check_finite(attn, name)
    return attn


def valid_counts(mask: Tensor | None, batch: int, n: int, device: torch.device) -> Tensor:
    """Number of valid tokens per row, ``[B]`` long."""
    if mask is None:
        return torch.full((batch,), n, dtype=torch.long, device=device)
    return mask.sum(dim=1)


def protected_mask(protected: int | Tensor | None, batch: int, n: int,
                   device: torch.device) -> Tensor | None:
    """Turn ``protected`` (a count of leading tokens, or a bool mask ``[N]`` / ``[B, N]``) into ``[B, N]``."""
    if protected is None:
        return None
    if isinstance(protected, int):
        if protected < 0:
            raise UniprunerError(f"protected must be >= 0 leading tokens, got {protected}")
        if protected > n:
            raise UniprunerError(f"protected={protected} leading tokens but the sequence has only {n}")
        if protected == 0:
            return None
        out = torch.zeros(batch, n, dtype=torch.bool, device=device)
        out[:, :protected] = True
        return out
    if not isinstance(protected, Tensor):
        raise UniprunerError(
            f"protected must be an int (leading tokens) or a bool tensor [N] / [B, N], got {type(protected).__name__}"
        )
    p = protected.to(device)
    if p.ndim == 1:
        p = p.unsqueeze(0).expand(batch, -1)
    if tuple(p.shape) != (batch, n):
        raise UniprunerError(
            f"protected mask must have shape [N] or [B, N] = {(batch, n)}, got {tuple(protected.shape)}"
        )
    return p.bool()


def check_grid(hw: object, n: int | None = None, name: str = "hw") -> tuple[int, int]:
    """Check a token grid ``(h, w)`` of positive ints (covering ``n`` row-major tokens when given)."""
    if (not isinstance(hw, (tuple, list)) or len(hw) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in hw)):
        raise UniprunerError(f"{name} must be a pair of positive ints (h, w), got {hw!r}")
    h, w = int(hw[0]), int(hw[1])
    if n is not None and h * w != n:
        raise UniprunerError(
            f"{name}={(h, w)} describes {h * w} tokens but there are {n}; the tokens must be the row-major h x w grid"
        )
    return h, w
