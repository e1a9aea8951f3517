"""Recognise the diffusers denoisers by class name and find where their image tokens meet attention.

Host classes are matched by name, never imported at module load, so ``diffusers`` stays an
optional extra. Every supported denoiser reduces to a list of :class:`Site` s, one per
transformer block: the block (its input is the metric ToMeSD matches on), the self-attention over
the image tokens, and the optional cross-attention and MLP a merge may also wrap. How the latent
grid is read from a call's inputs lives here too (:func:`token_grid`), so the hooks never guess
it from ``args[0]``.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UniprunerError

__all__ = ["SUPPORTED_HOSTS", "DiffusionHost", "Site", "find_host", "token_grid", "unet_levels"]

#: Denoiser classes the adapter patches, and what it knows about each.
SUPPORTED_HOSTS: dict[str, str] = {
    "UNet2DConditionModel": "SD 1.x / 2.x / SDXL UNet: BasicTransformerBlock per attention level (grid per level)",
    "PixArtTransformer2DModel": "PixArt-alpha / sigma DiT (ada_norm_single blocks, patch grid)",
    "DiTTransformer2DModel": "DiT (ada_norm_zero blocks, class-conditional, patch grid)",
    "SD3Transformer2DModel": "SD3 / SD3.5 MMDiT (joint image + text attention; SD3.5 image-only attn2)",
    "FluxTransformer2DModel": "Flux (double + single stream blocks, RoPE over [text, image])",
}

#: Block classes and the role of each: ``basic`` (self-attention ``attn1`` over image tokens only),
#: ``joint`` (SD3 / Flux double: image ``hidden_states`` + text ``encoder_hidden_states``),
#: ``single`` (Flux single: ``[text, image]`` concatenated inside the block).
_BLOCKS = {
    "BasicTransformerBlock": "basic",
    "JointTransformerBlock": "joint",
    "FluxTransformerBlock": "joint",
    "FluxSingleTransformerBlock": "single",
}

#: The argument of each denoiser's ``forward`` that carries the latent.
_SAMPLE_ARG = {
    "UNet2DConditionModel": "sample",
    "PixArtTransformer2DModel": "hidden_states",
    "DiTTransformer2DModel": "hidden_states",
    "SD3Transformer2DModel": "hidden_states",
    "FluxTransformer2DModel": "hidden_states",
}


@dataclass
class Site:
    """One transformer block and the modules a reduction wraps inside it.

    Attributes
    ----------
    index : int
        Position among the host's blocks (forward order of registration).
    name : str
        Qualified module name of the block.
    role : str
        ``"basic"``, ``"joint"`` or ``"single"`` (see :data:`_BLOCKS`).
    block : nn.Module
    attn : nn.Module
        The attention over the image tokens (``attn1`` / ``attn``).
    cross : nn.Module or None
        The cross-attention (``attn2`` of UNet / PixArt blocks), wrapped only with ``merge_crossattn``.
    mlp : nn.Module or None
        The feed-forward on image tokens, wrapped only with ``merge_mlp``.
    extra_self : nn.Module or None
        SD3.5's second, image-only self-attention (``attn2`` of a ``JointTransformerBlock``).
    """

    index: int
    name: str
    role: str
    block: nn.Module
    attn: nn.Module
    cross: nn.Module | None = None
    mlp: nn.Module | None = None
    extra_self: nn.Module | None = None

    @property
    def rotary(self) -> bool:
        """Whether the attention receives rotary frequencies over ``[text, image]`` (Flux)."""
        return type(self.block).__name__.startswith("Flux")


@dataclass
class DiffusionHost:
    """What the adapter needs to know about one denoiser instance.

    Attributes
    ----------
    cls_name : str
        The denoiser class (a key of :data:`SUPPORTED_HOSTS`).
    model : nn.Module
    sites : list of Site
    patch_size : int
        Latent pixels per token side (1 for the UNet; the patch embed's for DiTs; Flux packs 2x2
        latent pixels into one token before the model, its grid comes from ``img_ids``).
    sample_arg : str
        Name of the ``forward`` argument holding the latent.
    signature : inspect.Signature
        Of ``model.forward`` (binding positional and keyword calls alike).
    num_train_timesteps : int
        For a schedule's progress when no pipeline scheduler is known.
    """

    cls_name: str
    model: nn.Module
    sites: list[Site]
    patch_size: int
    sample_arg: str
    signature: inspect.Signature
    num_train_timesteps: int = 1000

    @property
    def is_unet(self) -> bool:
        return self.cls_name == "UNet2DConditionModel"

    def bind(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments by name, whether passed positionally or as keywords."""
        try:
            bound = self.signature.bind_partial(*args, **kwargs)
        except TypeError as e:
            raise UniprunerError(f"{self.cls_name} was called with arguments its forward does not take: {e}") from e
        return dict(bound.arguments)


def _denoiser(obj: Any) -> tuple[nn.Module, Any]:
    """``(denoiser, pipeline or None)`` for a denoiser or a diffusers pipeline."""
    if isinstance(obj, nn.Module):
        return obj, None
    for attr in ("unet", "transformer"):
        m = getattr(obj, attr, None)
        if isinstance(m, nn.Module):
            return m, obj
    kind = type(obj).__name__
    raise UniprunerError(
        f"unipruner.diffusion patches a diffusers denoiser ({', '.join(SUPPORTED_HOSTS)}) or a pipeline that has "
        f"one as .unet / .transformer; got a {kind}"
    )


def find_host(obj: Any) -> tuple[DiffusionHost, Any]:
    """The :class:`DiffusionHost` of a denoiser or pipeline, and the pipeline (or None).

    Raises a :class:`UniprunerError` naming the supported classes for anything else.
    """
    model, pipe = _denoiser(obj)
    cls_name = type(model).__name__
    if cls_name not in SUPPORTED_HOSTS:
        raise UniprunerError(
            f"unipruner.diffusion does not support {cls_name}; supported denoisers: {', '.join(SUPPORTED_HOSTS)}"
        )
    sites: list[Site] = []
    unknown: set[str] = set()
    for name, mod in model.named_modules():
        cname = type(mod).__name__
        role = _BLOCKS.get(cname)
        if role is None:
            if cname.endswith("TransformerBlock") and cname not in _BLOCKS:
                unknown.add(cname)
            continue
        if role == "basic":
            attn, cross = mod.attn1, getattr(mod, "attn2", None)
            if getattr(mod, "only_cross_attention", False):
                unknown.add(f"{cname}(only_cross_attention)")
                continue
            site = Site(len(sites), name, role, mod, attn, cross=cross, mlp=getattr(mod, "ff", None))
        else:
            site = Site(len(sites), name, role, mod, mod.attn, mlp=getattr(mod, "ff", None),
                        extra_self=getattr(mod, "attn2", None) if cname == "JointTransformerBlock" else None)
        sites.append(site)
    if unknown:
        raise UniprunerError(
            f"{cls_name} contains transformer blocks unipruner.diffusion does not know: {', '.join(sorted(unknown))}; "
            f"supported blocks: {', '.join(_BLOCKS)}"
        )
    if not sites:
        raise UniprunerError(f"this {cls_name} has no transformer blocks: there is no attention to reduce")
    cfg = getattr(model, "config", None)
    patch = 1 if cls_name in ("UNet2DConditionModel", "FluxTransformer2DModel") else int(getattr(cfg, "patch_size", 1))
    timesteps = 1000
    if pipe is not None and getattr(pipe, "scheduler", None) is not None:
        timesteps = int(getattr(pipe.scheduler.config, "num_train_timesteps", 1000) or 1000)
    host = DiffusionHost(cls_name, model, sites, patch, _SAMPLE_ARG[cls_name],
                         inspect.signature(model.forward), timesteps)
    return host, pipe


def unet_levels(h: int, w: int, depth: int = 8) -> list[tuple[int, int]]:
    """Token grids of a UNet's resolution levels: ``(h, w)``, then each side ``ceil(/2)`` per level
    (a stride-2, padding-1, 3x3 convolution), factor ``2**level``."""
    out = [(h, w)]
    for _ in range(depth):
        h, w = -(-h // 2), -(-w // 2)
        out.append((h, w))
    return out


def token_grid(host: DiffusionHost, bound: dict[str, Any]) -> tuple[int, int]:
    """The image-token grid ``(h, w)`` at full resolution (level 1), read from the call's inputs."""
    x = bound.get(host.sample_arg)
    if not isinstance(x, Tensor):
        raise UniprunerError(
            f"{host.cls_name} was called without its latent {host.sample_arg}= (positional or keyword)"
        )
    if host.cls_name == "FluxTransformer2DModel":
        ids = bound.get("img_ids")
        if not isinstance(ids, Tensor):
            raise UniprunerError("FluxTransformer2DModel needs img_ids= (the (t, row, col) ids of the packed latent)")
        if ids.ndim == 3:
            ids = ids[0]
        rows, cols = ids[:, 1].long(), ids[:, 2].long()
        h, w = int(rows.max() - rows.min()) + 1, int(cols.max() - cols.min()) + 1
        n = x.shape[1]
        expect = (rows - rows.min()) * w + (cols - cols.min())
        if h * w != n or not bool(torch.equal(expect.cpu(), torch.arange(n))):
            raise UniprunerError(
                f"Flux img_ids do not describe a row-major {h}x{w} grid of the {n} image tokens; "
                "unipruner.diffusion needs the packed latent in raster order (as FluxPipeline builds it)"
            )
        return h, w
    if x.ndim != 4:
        raise UniprunerError(
            f"{host.cls_name} latent {host.sample_arg} must be [B, C, H, W], got shape {tuple(x.shape)}"
        )
    hh, ww = int(x.shape[-2]), int(x.shape[-1])
    p = host.patch_size
    if hh % p or ww % p:
        raise UniprunerError(f"latent {hh}x{ww} does not divide by the patch size {p} of this {host.cls_name}")
    return hh // p, ww // p


def site_grid(host: DiffusionHost, grid: tuple[int, int], n: int) -> tuple[tuple[int, int], int]:
    """``((h, w), downsample factor)`` of a site seeing ``n`` image tokens, given the level-1 grid."""
    if not host.is_unet:
        if grid[0] * grid[1] != n:
            raise UniprunerError(
                f"a {host.cls_name} block saw {n} image tokens but the latent grid is {grid[0]}x{grid[1]}"
            )
        return grid, 1
    for level, (h, w) in enumerate(unet_levels(*grid)):
        if h * w == n:
            return (h, w), 2 ** level
    raise UniprunerError(
        f"a UNet block saw {n} tokens, which matches no resolution level of the {grid[0]}x{grid[1]} latent"
    )


def level_of(host: DiffusionHost, site: Site) -> int | None:
    """The downsample factor of a UNet site from the module path (``down_blocks.i`` / ``up_blocks.i``
    / ``mid_block``), or None for DiTs (always 1). Used at patch time, before any call."""
    if not host.is_unet:
        return 1
    parts = site.name.split(".")
    n_down = len(getattr(host.model, "down_blocks", []))
    if parts[0] == "down_blocks":
        return 2 ** int(parts[1])
    if parts[0] == "up_blocks":
        return 2 ** (n_down - 1 - int(parts[1]))
    if parts[0] == "mid_block":
        return 2 ** (n_down - 1)
    return None

