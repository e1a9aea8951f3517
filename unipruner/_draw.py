"""Pictures of kept / merged / dropped patches (torch only; the adapters draw them with matplotlib).

Shared by :mod:`unipruner.vit` and :mod:`unipruner.vlm`: both know, for every patch of an image,
which output token holds it now (``owner``, ``-1`` = dropped).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from .errors import UniprunerError

__all__ = ["merge_image", "save_png"]


def merge_image(image: Tensor, owner: Tensor, patch_size: tuple[int, int]) -> Tensor:
    """Paint every group of merged patches with its mean colour; dropped patches dark grey.

    The picture of Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023 (their Fig. 4),
    with white borders between groups.

    Parameters
    ----------
    image : Tensor ``[C, H, W]``
        The input image (any range; shown min-max normalised). ``C`` is 1 or 3.
    owner : Tensor ``[gh * gw]`` long
        Group of every patch in raster order (``-1`` = dropped), e.g. ``handle.stats()[l].owner[b, prefix:]``.
    patch_size : (int, int)

    Returns
    -------
    Tensor ``[H', W', 3]`` in ``[0, 1]`` (``H' = gh * ph``, ``W' = gw * pw``).

    Examples
    --------
    >>> img = torch.zeros(3, 4, 4); img[:, :, 2:] = 1.0
    >>> out = merge_image(img, torch.tensor([0, 1, 0, -1]), (2, 2))
    >>> out.shape, float(out[3, 3, 0]) < 0.2
    (torch.Size([4, 4, 3]), True)
    """
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise UniprunerError(f"image must be [C, H, W] with C in (1, 3), got {tuple(image.shape)}")
    ph, pw = patch_size
    gh, gw = image.shape[1] // ph, image.shape[2] // pw
    if owner.numel() != gh * gw:
        raise UniprunerError(f"owner has {owner.numel()} patches but the image holds a {gh}x{gw} grid")
    img = image[:, : gh * ph, : gw * pw].detach().float().cpu()
    img = img.expand(3, -1, -1) if img.shape[0] == 1 else img
    img = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    labels = owner.detach().cpu().long().reshape(gh, gw) + 1  # 0 = dropped
    pix = labels.repeat_interleave(ph, 0).repeat_interleave(pw, 1)  # [H', W']
    n_lab = int(labels.max()) + 1
    flat = pix.reshape(-1)
    sums = torch.zeros(n_lab, 3).index_add_(0, flat, img.reshape(3, -1).T)
    counts = torch.zeros(n_lab).index_add_(0, flat, torch.ones_like(flat, dtype=torch.float))
    colours = sums / counts.clamp(min=1).unsqueeze(1)
    colours[0] = 0.15
    out = colours[pix]
    edge = torch.zeros_like(pix, dtype=torch.bool)
    edge[:, :-1] |= pix[:, :-1] != pix[:, 1:]
    edge[:-1, :] |= pix[:-1, :] != pix[1:, :]
    out[edge] = 1.0
    return out


def save_png(fig: Any, path: str | os.PathLike[str], dpi: int = 110) -> Path:
    """Write a matplotlib figure as PNG atomically (temp file + ``os.replace``); returns the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".tmp")
    fig.savefig(tmp, format="png", dpi=dpi)
    os.replace(tmp, target)
    return target
