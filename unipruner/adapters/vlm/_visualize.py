"""Draw which patches each stage kept, merged or dropped, over the image (PNG via matplotlib)."""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import Tensor, nn

from ..._draw import merge_image, save_png
from ...errors import UniprunerError
from ...models import require
from ._patch import find

__all__ = ["visualize"]


def _as_image(image: Any) -> Tensor:
    """A PIL image or a ``[C, H, W]`` tensor as a float ``[3, H, W]`` tensor."""
    if isinstance(image, Tensor):
        if image.ndim != 3 or image.shape[0] not in (1, 3):
            raise UniprunerError(f"image must be [C, H, W] with C in (1, 3), got {tuple(image.shape)}")
        return image.detach().float().cpu()
    import numpy as np

    try:
        arr = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    except AttributeError as err:
        raise UniprunerError(f"image must be a PIL image or a [C, H, W] tensor, got {type(image).__name__}") from err
    return torch.from_numpy(arr).permute(2, 0, 1)


def visualize(model: nn.Module, inputs: dict[str, Any], path: str | os.PathLike[str] | None = None, *,
              image: Any = None, index: int = 0) -> Any:
    """Run a patched VLM once on ``inputs`` and draw, for one image, what every stage kept.

    The picture of token merging (Bolya et al., "Token Merging: Your ViT But Faster", ICLR 2023,
    Fig. 4) per stage: each group of patches now held by one token is painted with its mean
    colour (a kept patch alone keeps its own), dropped patches are dark grey, white lines
    separate groups.

    Parameters
    ----------
    model : transformers.PreTrainedModel
        A model patched with :func:`unipruner.vlm.patch`.
    inputs : dict
        The model's keyword inputs (as its processor made them).
    path : str or PathLike, optional
        Where to write the PNG (atomically). Without it, only the figure is returned.
    image : PIL.Image or Tensor ``[C, H, W]``, optional
        The picture to draw on (default: the image's ``pixel_values``, min-max normalised).
    index : int
        Which image of the batch (in the order the images fill the prompt).

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
        raise UniprunerError(f"{type(model).__name__} is not patched; call unipruner.vlm.patch(model, ...) first")
    with torch.no_grad():
        model(**inputs)
    stages = handle.stats().stages
    owners = [s.owner for s in stages]
    n_img = owners[0].shape[0] if owners and owners[0] is not None else 0
    if not -n_img <= index < n_img:
        raise UniprunerError(f"index {index} is outside the {n_img} images of this call")
    grids = handle.host.image_grids(inputs, n_img)
    grid = grids[index] if grids else None
    if grid is None:
        raise UniprunerError(f"{handle.host.cls_name}: image {index} has no fixed token grid to draw on")
    if image is None:
        pix = inputs.get("pixel_values")
        if not isinstance(pix, Tensor) or pix.ndim != 4:
            raise UniprunerError("pass image= (the picture to draw on): pixel_values is not [n_images, C, H, W]")
        image = pix[index]
    img = _as_image(image)
    gh, gw = grid
    ph, pw = max(1, img.shape[1] // gh), max(1, img.shape[2] // gw)
    img = img[:, : gh * ph, : gw * pw]
    shown = (img - img.min()) / (img.max() - img.min()).clamp(min=1e-12)
    fig, axes = plt.subplots(1, 1 + len(stages), figsize=(3.2 * (1 + len(stages)), 3.4), squeeze=False)
    axes[0, 0].imshow(shown.expand(3, -1, -1).permute(1, 2, 0).numpy())
    axes[0, 0].set_title(f"input ({gh * gw} visual tokens)", fontsize=9)
    for ax, st, owner in zip(axes[0, 1:], stages, owners, strict=True):
        if owner is None:
            raise UniprunerError("this call recorded no patch owners")
        own = owner[index, : gh * gw]
        ax.imshow(merge_image(img, own, (ph, pw)).numpy())
        where = st.where if st.layer is None else f"layer {st.layer}"
        ax.set_title(f"{st.method} @ {where}: {st.after[index]} kept", fontsize=9)
    for ax in axes[0]:
        ax.set_axis_off()
    fig.tight_layout()
    if path is not None:
        save_png(fig, path)
    plt.close(fig)
    return fig
