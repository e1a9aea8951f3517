"""Draw which patches were merged or dropped, over the input image (PNG via matplotlib)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UniprunerError
from ...models import require
from ._patch import find

__all__ = ["merge_image", "visualize"]


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


def visualize(model: nn.Module, pixel_values: Tensor, path: str | os.PathLike[str] | None = None, *,
              layers: int | list[int] = -1, index: int = 0, **forward_kwargs: Any) -> Any:
    """Run a patched model on ``pixel_values`` and draw the kept / merged patches of one image.

    Visualisation of token merging as in Bolya et al., "Token Merging: Your ViT But Faster",
    ICLR 2023: each group of merged patches is painted with its mean colour, dropped patches are
    dark grey, white lines separate groups.

    Parameters
    ----------
    model : nn.Module
        A model patched with :func:`unipruner.vit.patch`.
    pixel_values : Tensor ``[B, C, H, W]``
        The model's input (as the image processor made it).
    path : str or PathLike, optional
        Where to write the PNG (atomically). Without it, only the figure is returned.
    layers : int or list of int
        Blocks to show (after their reduction); default the last.
    index : int
        Which image of the batch to draw.
    **forward_kwargs
        Extra arguments of the model's forward (e.g. ``interpolate_pos_encoding=True``).

    Returns
    -------
    matplotlib.figure.Figure
    """
    require("matplotlib", "vision")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    handle = find(model)
    if handle is None:
        raise UniprunerError(f"{type(model).__name__} is not patched; call unipruner.vit.patch(model, ...) first")
    if not isinstance(pixel_values, Tensor) or pixel_values.ndim != 4:
        raise UniprunerError("pixel_values must be a tensor [B, C, H, W]")
    if not -pixel_values.shape[0] <= index < pixel_values.shape[0]:
        raise UniprunerError(f"index {index} is outside the batch of {pixel_values.shape[0]}")
    with torch.no_grad():
        model(pixel_values, **forward_kwargs)
    records = handle.stats().layers
    wanted = [layers] if isinstance(layers, int) else list(layers)
    for w in wanted:
        if not -len(records) <= w < len(records):
            raise UniprunerError(f"layer {w} is outside the model's {len(records)} blocks")
    host = handle._host
    image = pixel_values[index]
    fig, axes = plt.subplots(1, 1 + len(wanted), figsize=(3.2 * (1 + len(wanted)), 3.4), squeeze=False)
    ph, pw = host.patch_size
    gh, gw = image.shape[1] // ph, image.shape[2] // pw
    base = image[:, : gh * ph, : gw * pw].detach().float().cpu()
    base = base.expand(3, -1, -1) if base.shape[0] == 1 else base
    base = (base - base.min()) / (base.max() - base.min()).clamp(min=1e-12)
    axes[0, 0].imshow(base.permute(1, 2, 0).numpy())
    axes[0, 0].set_title(f"input ({gh * gw} patches)", fontsize=9)
    for ax, w in zip(axes[0, 1:], wanted, strict=True):
        rec = records[w]
        owner = rec.owner[index, host.protected:]
        ax.imshow(merge_image(image, owner, host.patch_size).numpy())
        ax.set_title(f"{handle.settings.method.name}, after block {rec.layer}: {rec.n_out} tokens", fontsize=9)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.tight_layout()
    if path is not None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(target.name + ".tmp")
        fig.savefig(tmp, format="png", dpi=110)
        os.replace(tmp, target)
    plt.close(fig)
    return fig
