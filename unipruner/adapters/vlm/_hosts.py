"""Recognise the Hugging Face vision-language hosts by class name and find what the hooks need.

Host classes are matched by name (never imported). For each model instance :func:`find_host`
returns a :class:`VLMHost`: the multimodal body (``model.model``), its language model and
decoder layers, the image placeholder token, how many visual tokens each image has, and what
the language model receives besides ``inputs_embeds`` that must follow a pruned sequence
(Qwen3-VL's deepstack inputs, M-RoPE position rows, Gemma 3's per-layer-type masks and rotary
embeddings).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ...errors import UniprunerError

__all__ = ["SUPPORTED_HOSTS", "VLMHost", "find_host"]

#: Root model classes the adapter patches, and what it knows about each.
SUPPORTED_HOSTS: dict[str, str] = {
    "LlavaForConditionalGeneration": "LLaVA 1.5 (CLIP tower, MLP projector, 1-D RoPE LM)",
    "LlavaNextForConditionalGeneration": "LLaVA-NeXT (anyres tiles + image_newline tokens)",
    "LlavaOnevisionForConditionalGeneration": "LLaVA-OneVision (SigLIP tower, anyres tiles + newline)",
    "Qwen2VLForConditionalGeneration": "Qwen2-VL (M-RoPE: 3-row position ids, 2x2 patch merger)",
    "Qwen2_5_VLForConditionalGeneration": "Qwen2.5-VL (M-RoPE, windowed vision attention)",
    "Qwen3VLForConditionalGeneration": "Qwen3-VL (M-RoPE, deepstack visual inputs at the first layers)",
    "Idefics3ForConditionalGeneration": "Idefics3 (SigLIP tower, pixel-shuffle connector, image splitting)",
    "SmolVLMForConditionalGeneration": "SmolVLM (Idefics3 architecture)",
    "Gemma3ForConditionalGeneration": ("Gemma 3 (SigLIP tower, pooled projector; local / global layers, a dict of "
                                       "masks, bidirectional image blocks from token_type_ids)"),
}

#: hosts whose language model takes M-RoPE position ids ``[3 or 4, B, L]``
_MROPE = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration", "Qwen3VLForConditionalGeneration")


@dataclass
class VLMHost:
    """What the adapter needs to know about one VLM instance (read from it, never set on it).

    Attributes
    ----------
    cls_name : str
        The root class name (a key of :data:`SUPPORTED_HOSTS`).
    body : nn.Module
        The multimodal model (``model.model``): its forward sees ``input_ids`` and the image inputs.
    language_model : nn.Module
        The decoder (``body.language_model`` / ``body.text_model``), with ``.layers``.
    layers : list of nn.Module
        Its decoder layers.
    image_token_id : int
        The placeholder token the image features replace.
    mrope : bool
        Position ids are M-RoPE rows ``[3 or 4, B, L]`` (Qwen-VL) rather than ``[B, L]``.
    deepstack : int
        Qwen3-VL: how many first decoder layers receive deepstack visual features (0 elsewhere).
    tokens_per_image : int or None
        Fixed number of visual tokens of one image (LLaVA 1.5, Idefics3 per sub-image), or None when
        it varies (anyres tiles, Qwen's dynamic resolution: read from the inputs).
    grid : tuple of int or None
        The ``(h, w)`` token grid of one image when it is fixed.
    layer_types : tuple of str or None
        Gemma 3: ``"full_attention"`` / ``"sliding_attention"`` of every decoder layer. The language
        model then takes a dict of masks (one per type) and per-type rotary embeddings, and image
        blocks (runs of ``token_type_ids == 1``) attend bidirectionally at prefill. None elsewhere.
    sliding_window : int or None
        Gemma 3: the window of its sliding (local) layers, in positions.
    """

    cls_name: str
    body: nn.Module
    language_model: nn.Module
    layers: list[nn.Module]
    image_token_id: int
    mrope: bool = False
    deepstack: int = 0
    tokens_per_image: int | None = None
    grid: tuple[int, int] | None = None
    text_config: Any = field(default=None, repr=False)
    config: Any = field(default=None, repr=False)
    vision_attn: nn.Module | None = field(default=None, repr=False)
    projector: nn.Module | None = field(default=None, repr=False)
    vision_cls: bool = False
    layer_types: tuple[str, ...] | None = None
    sliding_window: int | None = None
    vision_reason: str = "the vision stage is implemented for LLaVA 1.5 (CLIP / SigLIP towers, per-token projector)"

    @property
    def n_layers(self) -> int:
        """Decoder layers of the language model."""
        return len(self.layers)

    def image_counts(self, n_visual: int, inputs: dict[str, Any]) -> list[int]:
        """Visual tokens of each image, in the order their features fill the placeholders.

        ``n_visual`` is the total number of placeholders in the batch; ``inputs`` the body's
        keyword inputs (``image_grid_thw`` for Qwen-VL). Falls back to one block per run of
        placeholders when the host does not fix the count (see :func:`runs`).
        """
        enc = (inputs.get("mm_encoder_outputs") or {}).get("image")
        pooled = getattr(enc, "pooler_output", None)
        if isinstance(pooled, (list, tuple)) and pooled and all(isinstance(p, Tensor) for p in pooled):
            counts = [int(p.shape[0]) for p in pooled]  # generate() encodes the images before the prefill
            if sum(counts) == n_visual:
                return counts
        thw = inputs.get("image_grid_thw")
        if self.mrope and isinstance(thw, Tensor):
            merge = int(getattr(self.config.vision_config, "spatial_merge_size", 2))
            counts = [int(c) for c in (thw.prod(-1) // (merge * merge)).tolist()]
            if sum(counts) != n_visual:
                raise UniprunerError(
                    f"image_grid_thw describes {sum(counts)} visual tokens but input_ids holds {n_visual} image "
                    "placeholders; build the inputs with the model's processor"
                )
            return counts
        if self.tokens_per_image:
            if n_visual % self.tokens_per_image:
                raise UniprunerError(
                    f"{n_visual} image placeholders are not a whole number of images of {self.tokens_per_image} "
                    f"tokens ({self.cls_name}); the image-token count must match the features"
                )
            return [self.tokens_per_image] * (n_visual // self.tokens_per_image)
        return []

    def image_grids(self, inputs: dict[str, Any], n_images: int) -> list[tuple[int, int] | None]:
        """The ``(h, w)`` token grid of each image where known (None where the layout is not a grid)."""
        thw = inputs.get("image_grid_thw")
        if self.mrope and isinstance(thw, Tensor):
            merge = int(getattr(self.config.vision_config, "spatial_merge_size", 2))
            return [(int(t * h) // merge, int(w) // merge) for t, h, w in thw.tolist()]
        return [self.grid] * n_images


def _supported_list() -> str:
    return ", ".join(SUPPORTED_HOSTS)


def _square(n: int) -> tuple[int, int] | None:
    s = round(n ** 0.5)
    return (s, s) if s * s == n else None


def find_host(model: object) -> VLMHost:
    """Recognise ``model`` and locate its language model, or raise naming the supported hosts."""
    if not isinstance(model, nn.Module):
        raise UniprunerError(
            f"unipruner.vlm patches a Hugging Face vision-language model, got {type(model).__name__}; "
            f"supported: {_supported_list()}"
        )
    names = [c.__name__ for c in type(model).__mro__]
    cls_name = next((n for n in names if n in SUPPORTED_HOSTS), None)
    if cls_name is None:
        hint = ""
        if any(n.endswith("ForCausalLM") for n in names):
            hint = " (a text-only causal LM: use unipruner.kv for its KV cache)"
        raise UniprunerError(
            f"{type(model).__name__} is not a supported vision-language model{hint}; supported: {_supported_list()}"
        )
    body = getattr(model, "model", None)
    lm = getattr(body, "language_model", None) or getattr(body, "text_model", None)
    layers = getattr(lm, "layers", None)
    if body is None or lm is None or layers is None:
        raise UniprunerError(f"{type(model).__name__} has no model.language_model (or text_model) with .layers")
    cfg: Any = model.config
    token = getattr(cfg, "image_token_id", None)
    if token is None:
        token = getattr(cfg, "image_token_index", None)
    if token is None:
        raise UniprunerError(f"{type(model).__name__}'s config has no image_token_id")
    host = VLMHost(cls_name, body, lm, list(layers), int(token), mrope=cls_name in _MROPE,
                   text_config=getattr(cfg, "text_config", cfg), config=cfg)
    if cls_name == "LlavaForConditionalGeneration":
        vc = cfg.vision_config
        side = int(vc.image_size) // int(vc.patch_size)
        # transformers 5.x: CLIPVisionModel / SiglipVisionModel hold embeddings / encoder directly (no .vision_model)
        tower = getattr(body.vision_tower, "vision_model", body.vision_tower)
        has_cls = hasattr(getattr(tower, "embeddings", None), "class_embedding")
        full = cfg.vision_feature_select_strategy == "full"
        host.tokens_per_image = side * side + (1 if full and has_cls else 0)
        host.grid = (side, side) if host.tokens_per_image == side * side else None
        _llava_vision(host, body, cfg, has_cls and not full)
    elif cls_name in ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration"):
        n = int(getattr(cfg, "image_seq_len", 0) or 0)
        if not n:
            vc = cfg.vision_config
            n = (int(vc.image_size) // int(vc.patch_size)) ** 2 // int(cfg.scale_factor) ** 2
        host.tokens_per_image, host.grid = n, _square(n)
    elif cls_name == "Qwen3VLForConditionalGeneration":
        host.deepstack = len(getattr(cfg.vision_config, "deepstack_visual_indexes", ()) or ())
    elif cls_name == "Gemma3ForConditionalGeneration":
        n = int(cfg.mm_tokens_per_image)
        host.tokens_per_image, host.grid = n, _square(n)
        text = host.text_config
        host.layer_types = tuple(text.layer_types[: len(host.layers)])
        host.sliding_window = None if text.sliding_window is None else int(text.sliding_window)
        host.vision_reason = (
            "Gemma 3's projector average-pools the SigLIP patches into its soft tokens (a tower patch is not an "
            "LLM token) and its tower has no CLS: prune the soft tokens at stage='input' or stage='llm'")
    return host


def _llava_vision(host: VLMHost, body: nn.Module, cfg: Any, drop_cls: bool) -> None:
    """The tower layer whose output LLaVA projects, and its projector (what the vision stage hooks)."""
    layer = cfg.vision_feature_layer
    tower: Any = getattr(body.vision_tower, "vision_model", body.vision_tower)
    layers = getattr(getattr(tower, "encoder", None), "layers", None)
    if not isinstance(layer, int) or layers is None:
        host.vision_reason = ("the vision stage needs one vision_feature_layer (an int) and a CLIP / SigLIP encoder; "
                              f"this model has vision_feature_layer={layer!r}")
        return
    idx = layer if layer >= 0 else len(layers) + 1 + layer  # index into hidden_states (0 = embeddings)
    if not 1 <= idx <= len(layers):
        host.vision_reason = f"vision_feature_layer={layer} selects the patch embeddings: no attention to score with"
        return
    attn = getattr(layers[idx - 1], "self_attn", None)
    if attn is None or not hasattr(attn, "q_proj"):
        host.vision_reason = f"{type(layers[idx - 1]).__name__} has no self_attn with q_proj / k_proj"
        return
    host.vision_attn = attn
    projector: Any = body.multi_modal_projector
    host.projector = projector
    host.vision_cls = drop_cls


def runs(visual: Tensor) -> Tensor:
    """Image index of every placeholder when images are contiguous runs of placeholders.

    ``visual [B, L]`` bool; returns a long tensor over the flattened placeholders (row-major),
    a new image starting wherever a run starts.

    >>> runs(torch.tensor([[True, True, False, True], [True, False, False, False]]))
    tensor([0, 0, 1, 2])
    """
    b = visual.shape[0]
    prev = torch.cat([torch.zeros(b, 1, dtype=torch.bool, device=visual.device), visual[:, :-1]], dim=1)
    starts = (visual & ~prev).flatten()
    ids = torch.cumsum(starts.long(), 0) - 1
    return ids[visual.flatten()]
