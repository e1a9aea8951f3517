"""The ``unipruner demo`` diffusion section: a tiny offline Stable Diffusion pipeline with and without token merging."""

from __future__ import annotations

import math
import tempfile
import time
from pathlib import Path
from typing import Any

from torch import Tensor

__all__ = ["DEMO_PROMPT", "DEMO_STEPS", "demo_section", "latent_psnr"]

DEMO_PROMPT = "a red cube on a wooden table"
DEMO_STEPS = 3


def latent_psnr(x: Tensor, ref: Tensor) -> float:
    """PSNR (dB) of ``x`` against ``ref``, the peak being the reference's peak-to-peak range; ``inf`` when equal.

    Examples
    --------
    >>> import torch
    >>> ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    >>> latent_psnr(ref, ref), round(latent_psnr(ref + 0.03, ref), 1)
    (inf, 40.0)
    """
    mse = float((x.double() - ref.double()).pow(2).mean())
    peak = float(ref.double().max() - ref.double().min())
    return math.inf if mse == 0 else 10 * math.log10(peak * peak / mse)


def _merge_picture(image: Tensor, dst: Tensor, grid: tuple[int, int], path: Path, title: str) -> Path:
    """The decoded image next to the latent tokens painted by group (one colour per merged group)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from ..._draw import merge_image, save_png

    gh, gw = grid
    scale = max(1, 256 // max(image.shape[1:]))  # enough pixels per token for the group borders
    image = torch.nn.functional.interpolate(image[None], scale_factor=scale, mode="nearest")[0]
    patch = (image.shape[1] // gh, image.shape[2] // gw)
    fig, axes = plt.subplots(1, 2, figsize=(6.4, 3.4))
    base = (image - image.min()) / (image.max() - image.min()).clamp(min=1e-12)
    axes[0].imshow(base.permute(1, 2, 0).numpy(), interpolation="nearest")
    axes[0].set_title(f"unpatched ({gh}x{gw} latent tokens)", fontsize=9)
    axes[1].imshow(merge_image(image, dst, patch).numpy(), interpolation="nearest")
    axes[1].set_title(title, fontsize=9)
    for ax in axes:
        ax.set_axis_off()
    fig.tight_layout()
    save_png(fig, path)
    plt.close(fig)
    return path


def demo_section(console: Any, ratio: float = 0.25) -> None:
    """A tiny SD 1.5-layout pipeline (random weights, built offline) denoises with every diffusion method.

    :func:`unipruner.models.build_sd_pipeline` (byte-level CLIP tokenizer, tiny CLIP text tower,
    VAE, DDIM, a 3-level UNet on a 16x16 latent); ``DEMO_STEPS`` DDIM steps with classifier-free
    guidance, unpatched and through :func:`unipruner.diffusion.patch` with each method the adapter
    runs on a UNet (ToMeSD, Bolya & Hoffman 2023; ToDo, Smith et al. 2024; AT-EDM, Wang et al.
    2024; CAT, Cheng et al. 2025; ToMe; random) keeping ``ratio`` of the tokens. Shows the FLOPs of
    the run (``FlopCounterMode`` under math SDPA), the wall time, the final latent's PSNR vs the
    unpatched run and which latent tokens tomesd merged at the second step (a PNG under the temp
    dir). A few seconds on one core.
    """
    import torch
    from rich.table import Table
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ..._threads import limit_threads
    from ...errors import UniprunerError
    from ...models import build_sd_pipeline, require
    from ._patch import patch
    from ._settings import DIFFUSION_METHODS

    require("matplotlib", "vision")
    console.rule(f"[bold]diffusion: a tiny Stable Diffusion pipeline with token merging (keeping {ratio:.0%})")
    picture = Path(tempfile.gettempdir()) / "unipruner-demo" / "diffusion_merged_tokens.png"
    with limit_threads(1), torch.inference_mode():
        pipe = build_sd_pipeline("tiny", seed=0)

        def run(flops: bool = False, callback: Any = None) -> tuple[Tensor, float, int]:
            gen = torch.Generator().manual_seed(0)
            kw = {"num_inference_steps": DEMO_STEPS, "output_type": "latent", "generator": gen,
                  "callback_on_step_end": callback}
            if not flops:
                t0 = time.perf_counter()
                out = pipe(DEMO_PROMPT, **kw).images
                return out, time.perf_counter() - t0, 0
            with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
                out = pipe(DEMO_PROMPT, **kw).images
            return out, 0.0, int(fc.get_total_flops())

        run()  # warm-up: the first call pays one-off costs
        ref, t_ref, _ = run()
        _, _, f_ref = run(flops=True)
        grid = tuple(ref.shape[-2:])
        console.print(f"prompt {DEMO_PROMPT!r}, {DEMO_STEPS} DDIM steps, CFG batch 2, {grid[0]}x{grid[1]} latent "
                      f"({grid[0] * grid[1]} tokens at full resolution); random weights, built offline")
        table = Table()
        for col in ("method", "blocks reduced", "MFLOP", "vs unpatched", "seconds", "latent PSNR dB"):
            table.add_column(col, justify="left" if col == "method" else "right")
        table.add_row("unpatched", "-", f"{f_ref / 1e6:.0f}", "1.000", f"{t_ref:.3f}", "inf")
        drawn: tuple[Tensor, tuple[int, int]] | None = None
        for name in DIFFUSION_METHODS:
            try:
                handle = patch(pipe, name, ratio=ratio)
            except UniprunerError as err:
                table.add_row(name, f"[dim]refused: {str(err)[:60]}[/]", "", "", "", "")
                continue
            with handle:
                maps: list[tuple[Tensor, tuple[int, int]]] = []

                def grab(_pipe: Any, i: int, _t: Any, kwargs: dict[str, Any], h: Any = handle,
                         out: list[tuple[Tensor, tuple[int, int]]] = maps) -> dict[str, Any]:
                    st = h.stats()
                    if i == 1 and st is not None:
                        try:
                            out.append(st.merge_map())
                        except UniprunerError:
                            pass  # this method kept every full-resolution token at this step
                    return kwargs

                latent, seconds, _ = run(callback=grab)
                _, _, fl = run(flops=True)
                st = handle.stats()
                reduced = 0 if st is None else sum(1 for s in st.sites if s.queries < s.tokens or s.keys < s.tokens)
            if name == "tomesd" and maps:
                drawn = maps[0]
            table.add_row(name, str(reduced), f"{fl / 1e6:.0f}", f"{fl / f_ref:.3f}", f"{seconds:.3f}",
                          f"{latent_psnr(latent, ref):.1f}")
        console.print(table)
        if drawn is not None:
            image = pipe.vae.decode(ref / pipe.vae.config.scaling_factor).sample[0].float()
            dst, hw = drawn
            n_out = int(dst.max()) + 1
            _merge_picture(image, dst, hw, picture, f"tomesd at step 2: {dst.numel()} -> {n_out} tokens")
            console.print(f"[dim]latent tokens merged by tomesd at step 2 drawn to {picture}[/]")
    console.print("[dim]random weights: FLOPs and times are real, the PSNR only shows how far the final latent moves "
                  "from the unpatched run (same seed); the tiny UNet's cost is mostly convolutions, so FLOPs drop "
                  "little here. SD 1.5 / SDXL sizes: docs/benchmarks.md.[/]")
