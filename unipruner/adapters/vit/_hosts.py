"""Recognise the vision-transformer hosts by class name and find their encoder blocks.

Host classes are matched by name, never imported, so each host library (transformers, timm)
stays optional and the adapter works in an environment that has only one of them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...errors import UniprunerError

__all__ = ["SUPPORTED_HOSTS", "Host", "find_host"]

#: Root model classes the adapter patches, and what it knows about each.
SUPPORTED_HOSTS: dict[str, str] = {
    "ViTModel": "transformers ViT (CLS protected)",
    "ViTForImageClassification": "transformers ViT classifier (CLS protected)",
    "DeiTModel": "transformers DeiT (CLS + distillation token protected)",
    "DeiTForImageClassification": "transformers DeiT classifier (CLS + distillation token protected)",
    "DeiTForImageClassificationWithTeacher": "transformers DeiT with distillation head (CLS + distillation protected)",
    "CLIPVisionModel": "transformers CLIP vision tower (CLS protected)",
    "CLIPVisionModelWithProjection": "transformers CLIP vision tower + projection (CLS protected)",
    "SiglipVisionModel": "transformers SigLIP vision tower (no CLS token: nothing protected)",
    "Dinov2Model": "transformers DINOv2 (CLS protected)",
    "Dinov2ForImageClassification": "transformers DINOv2 classifier (CLS protected)",
    "Dinov2WithRegistersModel": "transformers DINOv2 with registers (CLS + register tokens protected)",
    "Dinov2WithRegistersForImageClassification": "transformers DINOv2-reg classifier (CLS + registers protected)",
    "VisionTransformer": "timm VisionTransformer, timm 1.x (prefix tokens protected)",
}

_HF_LAYERS = {
    "ViTLayer": "attention",
    "DeiTLayer": "attention",
    "CLIPEncoderLayer": "self_attn",
    "SiglipEncoderLayer": "self_attn",
    "Dinov2Layer": "attention",
    "Dinov2WithRegistersLayer": "attention",
}


@dataclass
class Host:
    """What the adapter needs to know about one model instance.

    Attributes
    ----------
    kind : str
        ``"transformers"`` or ``"timm"``.
    cls_name : str
        The root class name (a key of :data:`SUPPORTED_HOSTS`).
    layer_names : list of str
        Qualified names of the encoder blocks, in order.
    layers, attentions : list of nn.Module
        The encoder blocks and their self-attention modules.
    q_src, k_src : list of nn.Module
        Modules whose outputs are the queries / keys of each block (HF ``q_proj`` / ``k_proj``
        ``[B, N, H*Dh]``; timm ``q_norm`` / ``k_norm`` ``[B, H, N, Dh]``).
    embed : nn.Module
        The patch-embedding module (its input is the image).
    num_heads, head_dim : int
    scaling : float
        The attention logit scale.
    protected : int
        Leading tokens never pruned or merged (CLS, distillation, registers).
    has_cls : bool
    patch_size : tuple of int
    image_size : tuple of int
    channels : int
    dynamic_size : bool
        True when the host accepts other image sizes on its own (timm ``dynamic_img_size``).
    """

    kind: str
    cls_name: str
    layer_names: list[str]
    layers: list[nn.Module]
    attentions: list[nn.Module]
    q_src: list[nn.Module]
    k_src: list[nn.Module]
    embed: nn.Module
    num_heads: int
    head_dim: int
    scaling: float
    protected: int
    has_cls: bool
    patch_size: tuple[int, int]
    image_size: tuple[int, int]
    channels: int
    dynamic_size: bool = False

    def split_heads(self, x: torch.Tensor) -> torch.Tensor:
        """Queries/keys captured from ``q_src``/``k_src`` as ``[B, N, H, Dh]``."""
        if self.kind == "timm":  # [B, H, N, Dh]
            return x.transpose(1, 2)
        return x.reshape(x.shape[0], x.shape[1], self.num_heads, self.head_dim)


def _pair(v: Any) -> tuple[int, int]:
    if isinstance(v, (tuple, list)):
        return int(v[0]), int(v[1])
    return int(v), int(v)


def _supported_list() -> str:
    return ", ".join(SUPPORTED_HOSTS)


def find_host(model: object) -> Host:
    """Recognise ``model`` and locate its encoder blocks.

    Raises :class:`~unipruner.errors.UniprunerError` naming the supported classes when the model
    is not one of :data:`SUPPORTED_HOSTS` or has no recognised blocks.
    """
    if not isinstance(model, nn.Module):
        raise UniprunerError(
            f"unipruner.vit patches a torch vision transformer, got {type(model).__name__}; "
            f"supported: {_supported_list()}"
        )
    names = [c.__name__ for c in type(model).__mro__]
    cls_name = next((n for n in names if n in SUPPORTED_HOSTS), None)
    if cls_name is None:
        raise UniprunerError(
            f"{type(model).__name__} is not a supported vision transformer; supported: {_supported_list()} "
            "(for a full CLIP/SigLIP model, patch its vision tower, e.g. model.vision_model's parent "
            "CLIPVisionModel)"
        )
    if cls_name == "VisionTransformer":
        return _timm_host(model, cls_name)
    return _hf_host(model, cls_name)


def _hf_host(model: nn.Module, cls_name: str) -> Host:
    cfg = getattr(model, "config", None)
    if cfg is None:
        raise UniprunerError(f"{cls_name} has no .config; is it a transformers model?")
    cfg = getattr(cfg, "vision_config", cfg)
    layer_names: list[str] = []
    layers: list[nn.Module] = []
    for name, mod in model.named_modules():
        if type(mod).__name__ in _HF_LAYERS:
            layer_names.append(name)
            layers.append(mod)
    if not layers:
        raise UniprunerError(
            f"found no encoder blocks ({', '.join(_HF_LAYERS)}) in {cls_name}; this transformers version "
            "may have renamed them"
        )
    attns = [getattr(m, _HF_LAYERS[type(m).__name__]) for m in layers]
    for a in attns:
        if not all(hasattr(a, p) for p in ("q_proj", "k_proj")):
            raise UniprunerError(
                f"{type(a).__name__} has no q_proj/k_proj; this transformers version is not supported "
                "(transformers >= 5.0 is)"
            )
    embed = next((m for m in model.modules() if type(m).__name__.endswith("Embeddings")
                  and (hasattr(m, "patch_embeddings") or hasattr(m, "patch_embedding"))), None)
    if embed is None:
        raise UniprunerError(f"found no patch embeddings in {cls_name}")
    heads = int(cfg.num_attention_heads)
    head_dim = int(getattr(cfg, "head_dim", None) or cfg.hidden_size // heads)
    a0 = attns[0]
    scaling = float(getattr(a0, "scaling", None) or getattr(a0, "scale", None) or head_dim**-0.5)
    if cls_name.startswith("DeiT"):
        protected, has_cls = 2, True
    elif cls_name.startswith("Siglip"):
        protected, has_cls = 0, False
    elif cls_name.startswith("Dinov2WithRegisters"):
        protected, has_cls = 1 + int(getattr(cfg, "num_register_tokens", 0)), True
    else:
        protected, has_cls = 1, True
    return Host(
        kind="transformers", cls_name=cls_name, layer_names=layer_names, layers=layers, attentions=attns,
        q_src=[a.q_proj for a in attns], k_src=[a.k_proj for a in attns], embed=embed,
        num_heads=heads, head_dim=head_dim, scaling=scaling, protected=protected, has_cls=has_cls,
        patch_size=_pair(cfg.patch_size), image_size=_pair(cfg.image_size),
        channels=int(getattr(cfg, "num_channels", 3)), dynamic_size=cls_name.startswith("Dinov2"),
    )


def _timm_host(model: nn.Module, cls_name: str) -> Host:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise UniprunerError(f"timm {cls_name} has no .blocks to patch")
    layers = list(blocks)
    attns: list[Any] = [getattr(b, "attn", None) for b in layers]
    for a in attns:
        if a is None or not all(hasattr(a, p) for p in ("q_norm", "k_norm", "num_heads", "head_dim")):
            raise UniprunerError(
                f"timm block attention {type(a).__name__} is not the standard timm Attention "
                "(q_norm/k_norm/num_heads/head_dim); supported: timm 1.x VisionTransformer"
            )
    pe: Any = model.patch_embed
    a0 = attns[0]
    return Host(
        kind="timm", cls_name=cls_name, layer_names=[f"blocks.{i}" for i in range(len(layers))], layers=layers,
        attentions=attns, q_src=[a.q_norm for a in attns], k_src=[a.k_norm for a in attns], embed=pe,
        num_heads=int(a0.num_heads), head_dim=int(a0.head_dim), scaling=float(a0.scale),
        protected=int(getattr(model, "num_prefix_tokens", 1)), has_cls=bool(getattr(model, "cls_token", None)
                                                                             is not None),
        patch_size=_pair(pe.patch_size), image_size=_pair(pe.img_size),
        channels=int(pe.proj.in_channels) if hasattr(pe, "proj") else 3,
        dynamic_size=bool(getattr(model, "dynamic_img_size", False)) or not bool(getattr(pe, "strict_img_size", True)),
    )
