"""Diffusion denoisers and the SD pipeline built offline from configs (unipruner.models)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from unipruner import UniprunerError
from unipruner._threads import limit_threads
from unipruner.models import (
    DIFFUSION_MODELS,
    build_sd_pipeline,
    byte_clip_tokenizer,
    diffusion_config,
    diffusion_inputs,
    diffusion_model,
)

NAMES = sorted(DIFFUSION_MODELS)


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    with limit_threads(1):  # tiny models: one thread is many times faster on a shared CPU
        yield


def _out(model: torch.nn.Module, kwargs: dict[str, object]) -> torch.Tensor:
    with torch.no_grad():
        return model(**kwargs, return_dict=False)[0]


@pytest.mark.parametrize("name", NAMES)
def test_tiny_model_builds_and_denoises_a_cfg_batch(name: str) -> None:
    model = diffusion_model(name)
    assert type(model).__name__ == DIFFUSION_MODELS[name] and not model.training
    kwargs = diffusion_inputs(name, model, batch=2, latent=16)
    out = _out(model, kwargs)
    x = kwargs["sample"] if "sample" in kwargs else kwargs["hidden_states"]
    assert isinstance(x, torch.Tensor)
    if name == "flux":  # packed 2x2 latent patches: (16/2)^2 tokens
        assert x.shape[:2] == (2, 64) and out.shape[:2] == (2, 64)
    else:
        assert out.shape[0] == 2 and out.shape[-2:] == (16, 16)
    assert torch.isfinite(out).all() and out.std() > 0
    assert sum(p.numel() for p in model.parameters()) < 1_000_000


@pytest.mark.parametrize("name", NAMES)
def test_seeded_weights_and_inputs_leave_the_global_rng_alone(name: str) -> None:
    state = torch.random.get_rng_state()
    a, b, c = diffusion_model(name, seed=1), diffusion_model(name, seed=1), diffusion_model(name, seed=2)
    ka, kb = diffusion_inputs(name, a, seed=3), diffusion_inputs(name, b, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    assert torch.equal(_out(a, ka), _out(b, kb))


def test_inputs_carry_what_each_family_needs() -> None:
    sdxl = diffusion_model("sdxl")
    cond = diffusion_inputs("sdxl", sdxl, batch=3)["added_cond_kwargs"]
    assert cond["text_embeds"].shape == (3, 16) and cond["time_ids"].shape == (3, 6)
    flux = diffusion_inputs("flux", diffusion_model("flux"), latent=8, text=5)
    assert flux["img_ids"].shape == (16, 3) and flux["txt_ids"].shape == (5, 3)
    assert flux["img_ids"][5].tolist() == [0.0, 1.0, 1.0] and flux["guidance"].shape == (2,)
    sd3 = diffusion_inputs("sd3", diffusion_model("sd3"))
    assert sd3["encoder_hidden_states"].shape[1] == 333 and sd3["pooled_projections"].shape == (2, 16)
    assert diffusion_inputs("dit", diffusion_model("dit"))["class_labels"].dtype == torch.long


def test_architecture_details_the_adapter_relies_on() -> None:
    sdxl = diffusion_model("sdxl")
    assert type(sdxl.down_blocks[0]).__name__ == "DownBlock2D"  # no attention at full resolution
    assert sdxl.config.addition_embed_type == "text_time"
    sd3 = diffusion_model("sd3")
    assert [blk.context_pre_only for blk in sd3.transformer_blocks] == [False, True]
    pixart = diffusion_model("pixart")
    assert pixart.transformer_blocks[0].norm_type == "ada_norm_single"
    flux = diffusion_model("flux")
    assert len(flux.transformer_blocks) == 1 and len(flux.single_transformer_blocks) == 2


def test_full_configs_are_the_published_architectures_on_meta() -> None:
    sd15 = diffusion_model("sd15", "full", device="meta")
    assert next(sd15.parameters()).is_meta
    assert round(sum(p.numel() for p in sd15.parameters()) / 1e6, 1) == 859.5  # SD 1.5's UNet
    sdxl = diffusion_model("sdxl", "full", device="meta")
    assert round(sum(p.numel() for p in sdxl.parameters()) / 1e6) == 2567  # SDXL base 1.0's UNet
    assert diffusion_config("sdxl", "full")["projection_class_embeddings_input_dim"] == 2816
    kwargs = diffusion_inputs("sd15", sd15, batch=1, latent=64)
    assert kwargs["sample"].is_meta
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        sd15(**kwargs)
    assert round(fc.get_total_flops() / 1e9) == 803  # GFLOP per step at a 64x64 latent (REFERENCE.md)


def test_bad_names_sizes_and_latents_are_refused() -> None:
    with pytest.raises(UniprunerError, match="unknown diffusion model 'sd2'"):
        diffusion_model("sd2")
    with pytest.raises(UniprunerError, match="unknown size 'huge'"):
        diffusion_model("sd15", "huge")
    with pytest.raises(UniprunerError, match="even side length"):
        diffusion_inputs("sd15", diffusion_model("sd15"), latent=15)


def test_byte_tokenizer_covers_any_text_offline() -> None:
    tok = byte_clip_tokenizer()
    ids = tok("naïve café", padding="max_length", max_length=77)["input_ids"]
    assert len(ids) == 77 and ids[0] == 512 and ids[-1] == 513 and max(ids) < len(tok) == 514


def test_tiny_pipeline_makes_an_image_offline_in_two_steps() -> None:
    pipe = build_sd_pipeline()
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "DDIMScheduler"

    def run() -> torch.Tensor:
        return pipe("a red cube on a table", num_inference_steps=2, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    img = run()
    assert img.shape == (1, 3, 32, 32) and 0.0 <= float(img.min()) and float(img.max()) <= 1.0
    assert torch.equal(img, run())
    latent = pipe("a cube", num_inference_steps=2, output_type="latent", guidance_scale=1.0).images
    assert latent.shape == (1, 4, 16, 16)
