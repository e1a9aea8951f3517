"""Token merging on a Stable Diffusion pipeline: patch, stats, live knob, ToDo, unpatch.

Run with ``python examples/diffusion_tomesd.py``. Builds a tiny SD 1.5-layout pipeline offline
(random weights: no diffusion weights can be downloaded here); with a real pipeline
(``StableDiffusionPipeline.from_pretrained(...)``) the calls are the same.
"""

from __future__ import annotations

import time

import torch

import unipruner
from unipruner.models import build_sd_pipeline

torch.set_num_threads(1)
pipe = build_sd_pipeline("tiny", seed=0)  # byte-level CLIP tokenizer, CLIP text tower, VAE, DDIM, 3-level UNet


def generate() -> tuple[torch.Tensor, float]:
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    latent = pipe("a red cube on a wooden table", num_inference_steps=4, output_type="latent", generator=gen).images
    return latent, time.perf_counter() - t0


generate()  # warm-up
ref, t_ref = generate()

# tomesd: our ratio is the fraction KEPT (tomesd 0.1.3's merge ratio 0.5 == ratio=0.5; its 0.3 == ratio=0.7)
h = unipruner.diffusion.patch(pipe, "tomesd", ratio=0.5, seed=0)
print(h.describe())
latent, t = generate()
print(h.stats().table())  # the last denoiser call: tokens, queries and keys per block
dst, (gh, gw) = h.stats().merge_map()  # output slot of every full-resolution latent token (first batch row)
print(f"tomesd 0.5: {gh}x{gw} grid -> {int(dst.max()) + 1} tokens; {t_ref / t:.2f}x; final latent cosine "
      f"{torch.nn.functional.cosine_similarity(latent.flatten(), ref.flatten(), dim=0):.4f}")

h.configure(ratio=0.7)  # live knob: the next call merges less
generate()
print(f"after configure(ratio=0.7): self-attention FLOPs kept {h.stats().flops_ratio:.3f}")
unipruner.diffusion.unpatch(pipe)  # exactly the original pipeline again
assert torch.equal(generate()[0], ref)

# ToDo: queries stay full, keys / values come from a 2x2-downsampled grid (ratio = fraction of K/V kept)
with unipruner.diffusion.patch(pipe.unet, "todo", ratio=0.25) as h:
    latent, t = generate()
    print(f"todo 0.25: self-attention FLOPs kept {h.stats().flops_ratio:.3f}, {t_ref / t:.2f}x")
print("methods for diffusion:", [m.name for m in unipruner.methods(domain="diffusion")])
