"""Attention rows recomputed from a Hugging Face decoder layer's input, for every supported family.

Methods that score tokens by attention (SnapKV, TOVA, H2O, FastV, AttentionRAG's focal token)
need a few rows of a layer's attention map while the model itself runs SDPA or flash attention,
which never materialise it. This module recomputes them exactly as the layer does: the layer's
own ``q_proj`` / ``k_proj`` (or Phi-3's fused ``qkv_proj``), the per-head RMS norms of Qwen3 and
Gemma 3 (``q_norm`` / ``k_norm``), the modeling module's own ``apply_rotary_pos_emb`` with the
``position_embeddings`` the layer received, the layer's ``scaling`` (Gemma 3's
``query_pre_attn_scalar``), grouped-query heads, and sliding-window layers' windows. The rows
themselves are :func:`unipruner.scorers.importance.window_attention`.

Used by :mod:`unipruner.kv` (scores inside its cache hooks) and by the RAG focal-attention scorer.
``transformers`` is imported inside the functions that need it, never at module load.

Extension point (multimodal RoPE): a family whose attention applies another rotary function
(Qwen2-VL's M-RoPE, ``apply_multimodal_rotary_pos_emb(q, k, cos, sin, mrope_section)``) registers
a factory with :func:`register_rope`; :func:`attention_layers` then gives its layers that
function instead of ``apply_rotary_pos_emb``, and :func:`queries` / :func:`keys` /
:func:`rotate` need no change. Nothing is registered here (the VLM adapter will).
"""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..errors import UniprunerError
from ..scorers.importance import accumulated_attention, window_attention
from .masks import expand_heads, sliding_key_mask

__all__ = [
    "ATTN_IMPLEMENTATIONS",
    "SUPPORTED_MODEL_TYPES",
    "AttentionLayer",
    "RopeFn",
    "attention_layers",
    "attention_rows",
    "check_static_rope",
    "decoder",
    "input_rows",
    "keys",
    "queries",
    "register_rope",
    "rotary_at",
    "rotate",
    "supported",
    "unrotated_keys",
]

#: ``config.model_type`` -> family name: the decoder families whose attention this module recomputes
#: (tested on tiny configs of each in ``tests/test_kv_cache.py`` and ``tests/test_hosts_attention.py``).
SUPPORTED_MODEL_TYPES: dict[str, str] = {
    "llama": "Llama (SmolLM2, Llama 2/3)",
    "mistral": "Mistral",
    "qwen2": "Qwen2 / Qwen2.5",
    "qwen3": "Qwen3",
    "phi3": "Phi-3",
    "gemma3_text": "Gemma 3 (text)",
}
#: attention implementations whose masks an adapter can replace (``sdpa`` boolean, ``eager`` additive).
ATTN_IMPLEMENTATIONS = ("sdpa", "eager")
_CHUNK_ELEMENTS = 1 << 24  # attention-row chunk for "all rows" (H2O, VATP): 64 MB of float32

#: ``rope(q, k, cos, sin) -> (q', k')``, the signature of HF's ``apply_rotary_pos_emb``.
RopeFn = Callable[[Tensor, Tensor, Tensor, Tensor], tuple[Tensor, Tensor]]
_ROPE_FACTORIES: dict[str, Callable[[nn.Module, Any], RopeFn]] = {}


def register_rope(model_type: str, factory: Callable[[nn.Module, Any], RopeFn]) -> None:
    """Give the layers of ``model_type`` another rotary function (the M-RoPE extension point).

    ``factory(attention_module, config)`` returns a :data:`RopeFn`; e.g. Qwen2-VL:
    ``lambda attn, cfg: lambda q, k, c, s: apply_multimodal_rotary_pos_emb(q, k, c, s,
    cfg.rope_scaling["mrope_section"])``.
    """
    _ROPE_FACTORIES[model_type] = factory


def supported() -> str:
    """The supported families, for error messages."""
    return ", ".join(f"{v} (model_type {k!r})" for k, v in SUPPORTED_MODEL_TYPES.items())


@dataclass(frozen=True)
class AttentionLayer:
    """What recomputing one attention module's rows needs (read from the model, never set on it).

    Attributes
    ----------
    index : int
        Decoder layer index.
    module : nn.Module
        The layer's ``self_attn``.
    rope : RopeFn
        Its modeling module's rotary function.
    n_heads, n_kv_heads, head_dim : int
    scale : float
        The logit scale the layer uses (``module.scaling``).
    layer_type : str or None
        ``"full_attention"`` / ``"sliding_attention"`` where the model says (Gemma 3).
    sliding_window : int or None
        The window of a sliding-window layer (None = full attention).
    """

    index: int
    module: nn.Module
    rope: RopeFn
    n_heads: int
    n_kv_heads: int
    head_dim: int
    scale: float
    layer_type: str | None
    sliding_window: int | None = None


def decoder(model: Any, *, user: str = "unipruner.kv", implementations: tuple[str, ...] | None = ATTN_IMPLEMENTATIONS
            ) -> nn.Module:
    """The decoder (``model.base_model``, with ``.layers``) of a supported HF causal LM, or a clear error.

    Parameters
    ----------
    model : transformers.PreTrainedModel
    user : str
        Who asks, for the messages (``"unipruner.kv"``).
    implementations : tuple of str, optional
        Attention implementations accepted (None = any: rows are recomputed, masks untouched).
    """
    from transformers import PreTrainedModel

    if not isinstance(model, PreTrainedModel):
        raise UniprunerError(
            f"{user} works on Hugging Face causal LMs (transformers PreTrainedModel), got "
            f"{type(model).__name__}; supported: {supported()}"
        )
    mtype = getattr(model.config, "model_type", None)
    if mtype not in SUPPORTED_MODEL_TYPES:
        raise UniprunerError(
            f"{type(model).__name__} (model_type {mtype!r}) is not supported by {user}; supported: {supported()}"
        )
    base = model.base_model
    if base is model or not hasattr(base, "layers"):
        raise UniprunerError(
            f"{type(model).__name__} has no decoder with .layers; pass the *ForCausalLM model "
            f"(supported: {supported()})"
        )
    impl = getattr(model.config, "_attn_implementation", None)
    if implementations is not None and impl not in implementations:
        raise UniprunerError(
            f"attention implementation {impl!r} is not supported (the adapter builds the attention masks of "
            f"compressed layers); use one of {implementations} (model.set_attn_implementation('sdpa'))"
        )
    return base


def attention_layers(model: Any, base: nn.Module, *, sliding: bool = False
                     ) -> tuple[list[AttentionLayer], dict[int, str]]:
    """The decoder's attention layers, and the sliding-window ones left out with the reason.

    ``sliding=True`` includes sliding-window layers (with their :attr:`AttentionLayer.sliding_window`)
    instead of leaving them out. Layer kinds are read exactly as ``generate()`` builds its cache.
    """
    from transformers.cache_utils import DynamicCache, DynamicLayer

    cfg = model.config
    probe = DynamicCache(config=cfg)
    factory = _ROPE_FACTORIES.get(str(getattr(cfg, "model_type", "")))
    layers: list[AttentionLayer] = []
    skipped: dict[int, str] = {}
    blocks: Any = base.layers
    for i, block in enumerate(blocks):
        attn = getattr(block, "self_attn", None)
        if attn is None or not (hasattr(attn, "q_proj") or hasattr(attn, "qkv_proj")):
            raise UniprunerError(f"layer {i} of {type(model).__name__} has no self_attn with q_proj / qkv_proj")
        kind = probe.layers[i] if i < len(probe.layers) else None
        window = None
        if kind is not None and type(kind) is not DynamicLayer:
            window = getattr(kind, "sliding_window", None)
            if not sliding:
                skipped[i] = (f"sliding-window layer (window {window}): Hugging Face already keeps only the last "
                              f"{window} tokens there, and pruning inside the window would break its positions")
                continue
        rope = factory(attn, cfg) if factory is not None else getattr(
            sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
        if rope is None:
            raise UniprunerError(f"{type(attn).__name__} has no apply_rotary_pos_emb in its modeling module")
        layers.append(AttentionLayer(i, attn, rope, int(cfg.num_attention_heads), int(cfg.num_key_value_heads),
                                     int(attn.head_dim), float(attn.scaling), getattr(attn, "layer_type", None),
                                     None if window is None else int(window)))
    return layers, skipped


def _project(spec: AttentionLayer, hidden: Tensor, which: str) -> Tensor:
    """Pre-RoPE, normed ``[B, heads, T, D]`` queries (``which="q"``) or keys (``"k"``) of ``hidden [B, T, C]``."""
    mod: Any = spec.module
    b, t, _ = hidden.shape
    hq, hk = spec.n_heads * spec.head_dim, spec.n_kv_heads * spec.head_dim
    if hasattr(mod, f"{which}_proj"):
        x = getattr(mod, f"{which}_proj")(hidden)
    else:  # Phi-3: fused qkv, queries first, then keys
        x = mod.qkv_proj(hidden)[..., : hq] if which == "q" else mod.qkv_proj(hidden)[..., hq: hq + hk]
    x = x.view(b, t, -1, spec.head_dim)
    norm = getattr(mod, f"{which}_norm", None)
    if norm is not None:  # Qwen3, Gemma 3: RMSNorm over the head dim, before RoPE
        x = norm(x)
    return x.transpose(1, 2)


def queries(spec: AttentionLayer, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Post-RoPE queries ``[B, H, T, D]`` of ``hidden [B, T, C]`` (``cos``/``sin`` for those T positions)."""
    q = _project(spec, hidden, "q")
    q, _ = spec.rope(q, q, cos, sin)
    return q


def keys(spec: AttentionLayer, hidden: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Post-RoPE keys ``[B, H_kv, T, D]`` of ``hidden [B, T, C]``, as the layer would cache them."""
    k = _project(spec, hidden, "k")
    _, k = spec.rope(k, k, cos, sin)
    return k


def unrotated_keys(spec: AttentionLayer, hidden: Tensor) -> Tensor:
    """Keys ``[B, H_kv, T, D]`` of ``hidden [B, T, C]`` before RoPE (projected and normed): position-free."""
    return _project(spec, hidden, "k")


def rotary_at(rotary: nn.Module | None, spec: AttentionLayer, x: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """``(cos, sin)`` of the decoder's ``rotary_emb`` at ``positions`` (per layer type where the model has several)."""
    if rotary is None:
        raise UniprunerError("this model has no rotary embedding (decoder.rotary_emb)")
    if "layer_type" in inspect.signature(rotary.forward).parameters:
        return rotary(x, positions, spec.layer_type)
    return rotary(x, positions)


def check_static_rope(rotary: nn.Module | None, what: str = "rerotate=True") -> None:
    """An error unless ``rotary`` is a static RoPE without attention scaling (re-rotation by a position delta)."""
    if rotary is None or not callable(rotary):
        raise UniprunerError(f"{what} needs a model whose decoder has a rotary_emb module")
    scaling = getattr(rotary, "attention_scaling", 1.0)
    rope_type = getattr(rotary, "rope_type", "default")
    if scaling != 1.0 or rope_type in ("dynamic", "longrope", "yarn"):
        raise UniprunerError(
            f"{what} re-applies RoPE by a position difference, which needs a static RoPE without attention "
            f"scaling; this model uses rope_type={rope_type!r} (scaling {scaling})"
        )


def rotate(rotary: nn.Module | None, spec: AttentionLayer, k: Tensor, delta: Tensor) -> Tensor:
    """Rotate post-RoPE keys ``[B, H, K, D]`` by ``delta [B, H, K]`` positions (RoPE is additive in position)."""
    b, h, n, d = k.shape
    flat = k.reshape(b * h, 1, n, d)
    cos, sin = rotary_at(rotary, spec, flat, delta.reshape(b * h, n))
    out, _ = spec.rope(flat, flat, cos, sin)
    return out.reshape(b, h, n, d)


def attention_rows(spec: AttentionLayer, hidden: Tensor, pe: tuple[Tensor, Tensor], stored: Tensor,
                   rows: int | str, valid: Tensor | None = None) -> Tensor:
    """Attention rows ``[B, H, R, S]`` of the last ``rows`` new queries over ``S`` stored keys.

    Parameters
    ----------
    spec : AttentionLayer
    hidden : Tensor ``[B, q, C]``
        The layer's input for the ``q`` new tokens (the last ``q`` of the ``S`` keys).
    pe : (cos, sin)
        The ``position_embeddings`` the layer received for them.
    stored : Tensor ``[B, H_kv, S, D]``
        Post-RoPE keys (a cache layer's keys, or :func:`keys`).
    rows : int or "all"
        The last ``rows`` queries (capped at ``q``), or ``"all"``: the column sums of every new
        query's attention as one row ``[B, H, 1, S]`` (H2O's accumulated attention, computed in row
        chunks of at most 64 MB, never the full map).
    valid : Tensor ``[B, H_kv, S]`` bool, optional
        Which keys exist (padding / evicted slots are False).
    """
    s, q = stored.shape[-2], hidden.shape[1]
    cos, sin = pe
    key_mask = None if valid is None else expand_heads(valid, spec.n_heads)
    if rows != "all":
        w = min(int(rows), q)
        qs = queries(spec, hidden[:, -w:], cos[:, -w:], sin[:, -w:])
        return window_attention(qs, stored, scale=spec.scale, causal=True, key_mask=key_mask)
    qs = queries(spec, hidden, cos, sin)
    b, h = qs.shape[0], qs.shape[1]
    total = torch.zeros(b * h, s, dtype=torch.float32 if qs.dtype != torch.float64 else qs.dtype,
                        device=stored.device)
    chunk = max(1, _CHUNK_ELEMENTS // max(1, b * h * s))
    for start in range(0, q, chunk):  # chunks of query rows (bounded memory), not tokens one by one
        end = min(q, start + chunk)
        n = s - q + end  # the rows are the last (end - start) positions of the first n keys
        km = None if key_mask is None else key_mask[..., :n]
        probs = window_attention(qs[:, :, start:end], stored[:, :, :n], scale=spec.scale, causal=True, key_mask=km)
        rmask = None if km is None else km.reshape(b * h, n)
        col = accumulated_attention(probs.reshape(b * h, end - start, n), mask=rmask)
        total[:, :n] += torch.where(torch.isfinite(col), col, torch.zeros_like(col)).to(total.dtype)
    return total.reshape(b, h, 1, s)


def input_rows(spec: AttentionLayer, hidden: Tensor, pe: tuple[Tensor, Tensor], n_queries: int = 1) -> Tensor:
    """Attention rows ``[B, H, Q, T]`` of the last ``Q`` tokens of ``hidden [B, T, C]`` over all its tokens.

    No cache needed: queries and keys are both recomputed from the layer's input (:func:`queries`,
    :func:`keys`), causal, with a sliding-window layer's window applied (Gemma 3's local layers).
    What AttentionRAG's focal token (``n_queries=1``) reads from a forward pre-hook.
    """
    t = hidden.shape[1]
    if not 1 <= n_queries <= t:
        raise UniprunerError(f"n_queries must be in [1, {t}] (the tokens of the input), got {n_queries}")
    cos, sin = pe
    qs = queries(spec, hidden[:, -n_queries:], cos[:, -n_queries:], sin[:, -n_queries:])
    ks = keys(spec, hidden, cos, sin)
    key_mask = None
    if spec.sliding_window is not None and spec.sliding_window < t:
        if n_queries != 1:
            raise UniprunerError("rows of several queries in a sliding-window layer differ in their visible keys; "
                                 "ask for n_queries=1 there")
        key_mask = sliding_key_mask(t, 1, spec.sliding_window, hidden.device)[0].expand(hidden.shape[0], t)
    return window_attention(qs, ks, scale=spec.scale, causal=True, key_mask=key_mask)
