"""Token pruning and merging for vision transformers (``unipruner.vit``).

Usage::

    import unipruner
    h = unipruner.vit.patch(model, "tome", r=16)      # per instance, reversible
    out = model(pixel_values)
    h.configure(r=8)                                  # live knob: next call uses r=8
    h.stats()                                         # what the last call kept, block by block
    unipruner.vit.visualize(model, pixel_values, "merges.png")
    unipruner.vit.unpatch(model)                      # exactly the original model again

    with unipruner.vit.patch(model, "evit", ratio=0.7, reduction="fuse"):
        out = model(pixel_values)                     # unpatched again after the block

* :func:`patch` / :func:`unpatch` / :func:`find` — forward hooks on *this* model's encoder
  blocks run any registry method with ``"vit"`` in its domains (ToMe, Zero-TPrune, EViT, DivPrune,
  DART, random, k-center, G-Prune, TransPrune, hidden-norm, Ward / k-means pooling), with drop,
  merge or fuse reductions, per-block budgets or :class:`unipruner.Schedule` rules and ToMe's
  proportional attention as an additive mask (SDPA stays on). The :class:`ViTHandle` follows the
  adapter convention (:mod:`unipruner.hosts.patching`): a context manager with ``configure``,
  ``stats`` and ``describe``; one patched model serves concurrent calls.
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
from ._patch import VIT_METHODS, LayerTokens, ViTHandle, ViTSettings, ViTStats, find, kept_tokens, patch, unpatch
from ._visualize import visualize

__all__ = [
    "SUPPORTED_HOSTS",
    "VIT_METHODS",
    "LayerTokens",
    "ViTHandle",
    "ViTSettings",
    "ViTStats",
    "demo_section",
    "find",
    "kept_tokens",
    "patch",
    "unpatch",
    "visualize",
]
