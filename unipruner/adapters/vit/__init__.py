"""Token pruning and merging for vision transformers (``unipruner.vit``).

Usage::

    import unipruner
    p = unipruner.vit.patch(model, "tome", r=16)      # per instance, reversible
    out = model(pixel_values)
    p.r = 8                                           # live knob: next call uses r=8
    unipruner.vit.kept_tokens(model)                  # which patches survived each block
    unipruner.vit.visualize(model, pixel_values, "merges.png")
    unipruner.vit.unpatch(model)                      # exactly the original model again

* :func:`patch` / :func:`unpatch` / :func:`patched` — forward hooks on *this* model's encoder
  blocks run any registry method with ``"vit"`` in its domains (ToMe, Zero-TPrune, EViT, DivPrune,
  DART, random, k-center, G-Prune, TransPrune, hidden-norm, Ward / k-means pooling), with drop,
  merge or fuse reductions, per-block schedules and ToMe's proportional attention as an additive
  mask (SDPA stays on).
* Hosts (matched by class name; see :data:`SUPPORTED_HOSTS`): transformers ViT, DeiT (CLS and
  distillation token protected), CLIP and SigLIP (no CLS) vision towers, DINOv2 (registers
  protected), and timm ``VisionTransformer``.
* :func:`kept_tokens`, ``return_unmerged=True`` (dense outputs over the full patch grid) and
  :func:`visualize` (PNG of merged / dropped patches over the image).
* :func:`demo_section` — the ``unipruner demo`` ViT section (ViT-B/16, ~10 s).
"""

from __future__ import annotations

from ._demo import demo_section
from ._hosts import SUPPORTED_HOSTS
from ._patch import VIT_METHODS, LayerTokens, ViTPatch, kept_tokens, patch, patched, settings, unpatch
from ._visualize import visualize

__all__ = [
    "SUPPORTED_HOSTS",
    "VIT_METHODS",
    "LayerTokens",
    "ViTPatch",
    "demo_section",
    "kept_tokens",
    "patch",
    "patched",
    "settings",
    "unpatch",
    "visualize",
]
