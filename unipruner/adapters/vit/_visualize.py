"""Draw which patches were merged or dropped, over the input image (PNG via matplotlib)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..._draw import merge_image, save_png
from ...errors import UniprunerError
from ...models import require
from ._patch import find

__all__ = ["merge_image", "visualize"]


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
        save_png(fig, path)
    plt.close(fig)
    return fig
