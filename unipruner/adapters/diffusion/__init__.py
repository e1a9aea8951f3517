"""Token merging and pruning for diffusers denoisers (``unipruner.diffusion``).

Usage::

    import unipruner
    h = unipruner.diffusion.patch(pipe, "tomesd", ratio=0.5)      # a pipeline or its denoiser; reversible
    image = pipe(prompt, num_inference_steps=20).images[0]
    h.stats().table()                                              # what the last denoiser call reduced
    h.configure(ratio=0.7)                                         # live knob
    unipruner.diffusion.unpatch(pipe)                              # exactly the original model again

    with unipruner.diffusion.patch(unet, "todo", ratio=0.25):      # keys / values from a 2x-downsampled grid
        noise = unet(latents, t, encoder_hidden_states=text).sample

* :func:`patch` / :func:`unpatch` / :func:`find`: module hooks on *this* denoiser (no copied block
  forward), any registry method with ``"diffusion"`` in its domains (:data:`DIFFUSION_METHODS`);
  the :class:`DiffusionHandle` follows the adapter convention (:mod:`unipruner.hosts.patching`).
* Hosts (matched by class name; :data:`SUPPORTED_HOSTS`): ``UNet2DConditionModel`` (SD 1.x / 2.x,
  SDXL), ``PixArtTransformer2DModel``, ``DiTTransformer2DModel``, ``SD3Transformer2DModel``,
  ``FluxTransformer2DModel``.
"""

from __future__ import annotations

from ...models import require

require("diffusers", "diffusion")

from ._hosts import SUPPORTED_HOSTS, DiffusionHost, Site, find_host  # noqa: E402
from ._patch import DiffusionHandle, find, patch, unpatch  # noqa: E402
from ._settings import DIFFUSION_METHODS, DiffusionSettings  # noqa: E402
from ._stats import DiffusionStats, SiteStats  # noqa: E402

__all__ = [
    "DIFFUSION_METHODS",
    "SUPPORTED_HOSTS",
    "DiffusionHandle",
    "DiffusionHost",
    "DiffusionSettings",
    "DiffusionStats",
    "Site",
    "SiteStats",
    "find",
    "find_host",
    "patch",
    "unpatch",
]
