"""Tiny random vision-language models of every host unipruner.vlm supports, and their inputs (offline, CPU).

:func:`tiny_vlm` builds a seeded model from configs (no weights, no hub): hidden <= 64, 4 text layers,
2 vision layers, 8 to ~30 visual tokens per image. :func:`inputs` builds the keyword dict of
``model(**inputs)`` / ``model.generate(**inputs)`` for ``n_rows`` rows with different images (pixel
values, and for the dynamic-resolution hosts different sizes) and different text lengths, left-padded
with a 2-D ``attention_mask``; :func:`row_inputs` builds one of those rows alone (same image and text,
no padding), so a test can compare a batch with each row by itself. Row ``i`` depends only on
``(seed, i)``, never on ``n_rows``.

Per host (the placeholder counts every host's forward checks against its features):

* LLaVA: CLIP 56 px / patch 14, "default" strategy (CLS dropped) -> 16 tokens; ``pixel_values [B, 3, H, W]``.
* LLaVA-NeXT (CLIP) / LLaVA-OneVision (SigLIP): 28 px tiles / patch 14 (2x2 tokens a tile), anyres pinpoints
  up to 56 x 56; ``pixel_values [B, max tiles, 3, 28, 28]`` (zero-padded), ``image_sizes [B, 2]``; the count
  (base tile + unpadded tiles + one ``image_newline`` per row of the tile grid) comes from the model's own
  ``get_image_features``.
* Qwen2-VL / Qwen2.5-VL / Qwen3-VL: patch 4, temporal patch 2, merge 2: ``pixel_values [sum t*h*w, 96]``,
  ``image_grid_thw [n_img, 3]`` and ``t*h*w/4`` placeholders between vision start / end tokens;
  ``mm_token_type_ids`` (1 on the placeholders) built by hand (no processor: the Qwen2-VL processor needs
  torchvision for its video processor).
* Idefics3 / SmolVLM: SigLIP 64 px / patch 8 (8x8 patches), pixel shuffle ``scale_factor`` 2 -> 16 tokens;
  one image a row (no splitting): ``pixel_values [B, 1, 3, H, W]``, ``pixel_attention_mask [B, 1, H, W]``.
* Gemma 3: SigLIP 64 px / patch 8 (8x8 patches), the projector's 2x2 average pool -> 16 soft tokens between
  ``BOI`` / ``EOI``; ``pixel_values [B, 3, H, W]`` and ``token_type_ids`` (1 on the soft tokens, as the
  processor returns them). Layers alternate local (sliding window) and global attention, local first;
  ``gemma3`` has a window of 8 tokens (smaller than every prompt: the window is really exercised, image
  blocks included), ``gemma3_wide`` one of 512 (larger than every prompt). The projector's weight is
  drawn at random (Hugging Face initialises it to zeros, which would make every visual token the same).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import transformers
from torch import Tensor

VOCAB = 128
PAD = 0
IMAGE = 100  # image placeholder token of every tiny host
VIDEO = 101
VISION_START = 102
VISION_END = 103
AROUND = 104  # Idefics3's <fake_token_around_image>
BOI, EOI = 105, 106  # Gemma 3's begin / end of image

HOSTS: dict[str, str] = {
    "llava": "LlavaForConditionalGeneration",
    "llava_next": "LlavaNextForConditionalGeneration",
    "llava_onevision": "LlavaOnevisionForConditionalGeneration",
    "qwen2_vl": "Qwen2VLForConditionalGeneration",
    "qwen2_5_vl": "Qwen2_5_VLForConditionalGeneration",
    "qwen3_vl": "Qwen3VLForConditionalGeneration",
    "idefics3": "Idefics3ForConditionalGeneration",
    "smolvlm": "SmolVLMForConditionalGeneration",
    "gemma3": "Gemma3ForConditionalGeneration",
    "gemma3_wide": "Gemma3ForConditionalGeneration",
}
#: Gemma 3's sliding windows: smaller than every tiny prompt (23 to 30 tokens), and larger
GEMMA_WINDOW = {"gemma3": 8, "gemma3_wide": 512}

_TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=512, pad_token_id=PAD,
             bos_token_id=None, eos_token_id=None)
_VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
_TILE, _TILE_PATCH = 28, 14  # LLaVA-NeXT / OneVision tiles: 2x2 tokens each
_PINPOINTS = [[28, 28], [28, 56], [56, 28], [56, 56]]
_QWEN_PATCH = 4
_IDEFICS = dict(image_size=64, patch_size=8)  # 8x8 patches, pixel shuffle 2 -> 16 tokens of 4 * 32 dims
_GEMMA = dict(image_size=64, patch_size=8)  # 8x8 patches, 2x2 average pool -> 16 soft tokens
_GEMMA_TOKENS = 16


def _qwen_vision(host: str) -> dict[str, Any]:
    common = dict(depth=2, num_heads=2, in_channels=3, patch_size=_QWEN_PATCH, spatial_merge_size=2,
                  temporal_patch_size=2)
    if host == "qwen2_vl":
        return dict(embed_dim=32, hidden_size=64, mlp_ratio=2, **common)
    if host == "qwen2_5_vl":
        # window of 2x2 merged tokens (window_size counts pixels: 2 * merge * patch); block 1 attends fully
        return dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, window_size=16,
                    fullatt_block_indexes=[1], **common)
    return dict(hidden_size=32, intermediate_size=64, out_hidden_size=64, num_position_embeddings=64,
                deepstack_visual_indexes=[0, 1], **common)


def tiny_vlm(host: str, attn: str = "sdpa") -> transformers.PreTrainedModel:
    """A seeded tiny model of ``host`` (a key of :data:`HOSTS`), in eval mode, never stopping at an EOS."""
    t = transformers
    text = dict(_TEXT)
    if host == "llava":
        cfg: Any = t.LlavaConfig(vision_config=t.CLIPVisionConfig(image_size=56, patch_size=14, **_VISION),
                                 text_config=t.LlamaConfig(**text), image_token_id=IMAGE, vision_feature_layer=-2)
    elif host == "llava_next":
        cfg = t.LlavaNextConfig(vision_config=t.CLIPVisionConfig(image_size=_TILE, patch_size=_TILE_PATCH, **_VISION),
                                text_config=t.LlamaConfig(**text), image_token_index=IMAGE,
                                image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-2, image_seq_length=4)
    elif host == "llava_onevision":
        cfg = t.LlavaOnevisionConfig(
            vision_config=t.SiglipVisionConfig(image_size=_TILE, patch_size=_TILE_PATCH, **_VISION),
            text_config=t.Qwen2Config(**text), image_token_index=IMAGE, video_token_index=VIDEO,
            image_grid_pinpoints=_PINPOINTS, vision_feature_layer=-1)
    elif host in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
        if host == "qwen3_vl":
            rope["mrope_interleaved"] = True
            text_cfg = t.Qwen3VLTextConfig(head_dim=16, rope_parameters=rope, **text)
            vis_cfg = t.Qwen3VLVisionConfig(**_qwen_vision(host))
            cls_cfg = t.Qwen3VLConfig
        elif host == "qwen2_5_vl":
            text_cfg = t.Qwen2_5_VLTextConfig(rope_parameters=rope, **text)
            vis_cfg = t.Qwen2_5_VLVisionConfig(**_qwen_vision(host))
            cls_cfg = t.Qwen2_5_VLConfig
        else:
            text_cfg = t.Qwen2VLTextConfig(rope_parameters=rope, **text)
            vis_cfg = t.Qwen2VLVisionConfig(**_qwen_vision(host))
            cls_cfg = t.Qwen2VLConfig
        cfg = cls_cfg(text_config=text_cfg, vision_config=vis_cfg, image_token_id=IMAGE, video_token_id=VIDEO,
                      vision_start_token_id=VISION_START, vision_end_token_id=VISION_END)
    elif host in ("idefics3", "smolvlm"):
        vis = (t.Idefics3VisionConfig if host == "idefics3" else t.SmolVLMVisionConfig)(**_VISION, **_IDEFICS)
        cls_cfg = t.Idefics3Config if host == "idefics3" else t.SmolVLMConfig
        cfg = cls_cfg(vision_config=vis, text_config=t.LlamaConfig(**text), image_token_id=IMAGE, scale_factor=2,
                      pad_token_id=PAD)
    elif host in GEMMA_WINDOW:
        text_cfg = t.Gemma3TextConfig(head_dim=16, query_pre_attn_scalar=16, sliding_window=GEMMA_WINDOW[host],
                                      layer_types=["sliding_attention", "full_attention"] * 2, **text)
        cfg = t.Gemma3Config(text_config=text_cfg, vision_config=t.SiglipVisionConfig(**_VISION, **_GEMMA),
                             mm_tokens_per_image=_GEMMA_TOKENS, image_token_index=IMAGE, boi_token_index=BOI,
                             eoi_token_index=EOI)
    else:
        raise ValueError(f"unknown host {host!r}; known: {', '.join(HOSTS)}")
    torch.manual_seed(0)
    model = getattr(t, HOSTS[host])(cfg).eval()
    if host in GEMMA_WINDOW:  # Hugging Face zeroes the projector (all visual tokens equal): draw it, seeded
        with torch.no_grad():
            model.model.multi_modal_projector.mm_input_projection_weight.normal_(0.0, 0.2)
    model.set_attn_implementation(attn)
    gc = model.generation_config
    gc.eos_token_id, gc.pad_token_id, gc.bos_token_id = None, PAD, None  # random weights: never stop early
    return model


def host_of(model: Any) -> str:
    """The :data:`HOSTS` key of a model built by :func:`tiny_vlm`."""
    name = type(model).__name__
    if name == HOSTS["gemma3"]:
        window = model.config.text_config.sliding_window
        return next(k for k, w in GEMMA_WINDOW.items() if w == window)
    return next(k for k, v in HOSTS.items() if v == name)


# ------------------------------------------------------------------------------------ rows


@dataclass
class _Row:
    """One prompt: text before and after the image, and the image's inputs."""

    prefix: list[int]
    suffix: list[int]
    image: dict[str, Tensor]  # per-row image inputs (leading dim 1 where the host batches them)
    n_visual: int  # placeholder tokens
    tokens: list[int]  # the whole row's ids


def _text(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(1, IMAGE, (n,), generator=g).tolist()


def _row(model: Any, i: int, seed: int, *, uniform: bool) -> _Row:
    """Row ``i``: text lengths and image size vary with ``i`` (unless ``uniform``); pixels vary always."""
    host = host_of(model)
    g = torch.Generator().manual_seed(1000 * seed + i)
    v = 0 if uniform else i
    prefix, suffix = _text(g, 2 + (3 * v) % 5), _text(g, 3 + (2 * v) % 4)
    if host == "llava":
        image = {"pixel_values": torch.randn(1, 3, 56, 56, generator=g)}
        n, mid = 16, [IMAGE] * 16
    elif host in ("llava_next", "llava_onevision"):
        sizes = [(40, 50), (50, 30), (56, 56), (28, 40)]
        hw = sizes[v % len(sizes)]
        n_tiles = transformers.models.llava_next.modeling_llava_next.image_size_to_num_patches(
            hw, _PINPOINTS, _TILE)
        image = {"pixel_values": torch.randn(1, n_tiles, 3, _TILE, _TILE, generator=g),
                 "image_sizes": torch.tensor([hw])}
        with torch.no_grad():
            feats = model.model.get_image_features(pixel_values=image["pixel_values"],
                                                   image_sizes=image["image_sizes"])
        n = int(feats.pooler_output[0].shape[0])
        mid = [IMAGE] * n
    elif host in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        grids = [(1, 8, 6), (1, 6, 10), (1, 8, 8), (1, 4, 10)]
        thw = grids[v % len(grids)]
        patches = thw[0] * thw[1] * thw[2]
        image = {"pixel_values": torch.randn(patches, 3 * 2 * _QWEN_PATCH * _QWEN_PATCH, generator=g),
                 "image_grid_thw": torch.tensor([thw])}
        n = patches // 4
        mid = [VISION_START] + [IMAGE] * n + [VISION_END]
    elif host in GEMMA_WINDOW:
        side = _GEMMA["image_size"]
        image = {"pixel_values": torch.randn(1, 3, side, side, generator=g)}
        n = _GEMMA_TOKENS
        mid = [BOI] + [IMAGE] * n + [EOI]
    else:  # idefics3 / smolvlm: one image (no splitting)
        side = _IDEFICS["image_size"]
        image = {"pixel_values": torch.randn(1, 1, 3, side, side, generator=g),
                 "pixel_attention_mask": torch.ones(1, 1, side, side, dtype=torch.long)}
        n = (side // _IDEFICS["patch_size"]) ** 2 // 4
        mid = [AROUND] + [IMAGE] * n + [AROUND]
    return _Row(prefix, suffix, image, n, prefix + mid + suffix)


def _collate(model: Any, rows: list[_Row]) -> dict[str, Any]:
    """Left-pad ``rows`` into the keyword inputs of ``model``."""
    host = host_of(model)
    b, width = len(rows), max(len(r.tokens) for r in rows)
    ids = torch.full((b, width), PAD, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    for j, r in enumerate(rows):
        ids[j, width - len(r.tokens):] = torch.tensor(r.tokens)
        mask[j, width - len(r.tokens):] = 1
    out: dict[str, Any] = {"input_ids": ids, "attention_mask": mask}
    if host in ("qwen2_vl", "qwen2_5_vl", "qwen3_vl"):
        out["pixel_values"] = torch.cat([r.image["pixel_values"] for r in rows])
        out["image_grid_thw"] = torch.cat([r.image["image_grid_thw"] for r in rows])
        out["mm_token_type_ids"] = (ids == IMAGE).long()
    elif host in ("llava_next", "llava_onevision"):
        tiles = max(r.image["pixel_values"].shape[1] for r in rows)
        pix = torch.zeros(b, tiles, 3, _TILE, _TILE)
        for j, r in enumerate(rows):
            pix[j, : r.image["pixel_values"].shape[1]] = r.image["pixel_values"][0]
        out["pixel_values"] = pix
        out["image_sizes"] = torch.cat([r.image["image_sizes"] for r in rows])
    elif host in GEMMA_WINDOW:
        out["pixel_values"] = torch.cat([r.image["pixel_values"] for r in rows])
        out["token_type_ids"] = (ids == IMAGE).long()
    else:
        for key in rows[0].image:
            out[key] = torch.cat([r.image[key] for r in rows])
    return out


def inputs(model: Any, n_rows: int, *, pad: bool = True, seed: int = 0) -> dict[str, Any]:
    """Keyword inputs of ``n_rows`` rows with different images and (``pad=True``) text lengths, left-padded.

    With ``pad=False`` every row has the same text lengths and image size (different pixels), so no
    row is padded.
    """
    return _collate(model, [_row(model, i, seed, uniform=not pad) for i in range(n_rows)])


def row_inputs(model: Any, i: int, *, pad: bool = True, seed: int = 0) -> dict[str, Any]:
    """Row ``i`` of :func:`inputs` (same arguments) alone: same image and text, no padding."""
    return _collate(model, [_row(model, i, seed, uniform=not pad)])


def visual_counts(model: Any, n_rows: int, *, pad: bool = True, seed: int = 0) -> list[int]:
    """Image placeholder tokens of each row of :func:`inputs` (one image a row)."""
    return [_row(model, i, seed, uniform=not pad).n_visual for i in range(n_rows)]
