"""The ``unipruner demo`` ViT section: a ViT-B/16 with and without token merging / pruning."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["demo_section"]


def demo_section(console: Any, ratio: float) -> None:
    """ViT-B/16 (random weights, batch 2, 224x224): ToMe and EViT leaving ``ratio`` of the patches at the end.

    Token Merging (Bolya et al., ICLR 2023) and EViT (Liang et al., ICLR 2022) through
    :func:`unipruner.vit.patch` with ``Schedule.geometric(final=ratio)``; shows tokens per block,
    FLOPs (``torch.utils.flop_counter``), wall time and the cosine between the pruned and unpruned
    CLS embeddings. About 10 s on 2 cores.
    """
    import torch
    from rich.table import Table
    from torch.utils.flop_counter import FlopCounterMode

    from ...models import require
    from ...select import Schedule
    from ._patch import patch

    require("transformers", "vision")
    from transformers import ViTConfig, ViTModel

    console.rule(f"[bold]vit: ViT-B/16 with token merging / pruning (keeping {ratio:.0%} of the patches at the end)")
    torch.manual_seed(0)
    model = ViTModel(ViTConfig(), add_pooling_layer=False).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))

    def run() -> tuple[torch.Tensor, float, float]:
        with torch.inference_mode(), FlopCounterMode(display=False) as fc:
            model(x)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = model(x).last_hidden_state
            dt = time.perf_counter() - t0
        return out, dt, fc.get_total_flops() / 1e9

    ref, t_ref, f_ref = run()
    table = Table()
    for col in ("model", "tokens after block 1 / 6 / 12", "GFLOPs", "seconds", "CLS cosine"):
        table.add_column(col, justify="left" if col == "model" else "right")
    table.add_row("unpatched", "197 / 197 / 197", f"{f_ref:.1f}", f"{t_ref:.2f}", "1.000")
    variants: tuple[tuple[str, dict[str, Any]], ...] = (("tome", {}), ("evit", {"reduction": "fuse"}))
    for name, params in variants:
        with patch(model, name, schedule=Schedule.geometric(final=ratio), **params) as h:
            out, dt, fl = run()
            plan = h.stats().tokens
        cos = float(torch.nn.functional.cosine_similarity(out[:, 0], ref[:, 0], dim=-1).mean())
        label = name + (" (fuse)" if params else "")
        table.add_row(label, f"{plan[0][1]} / {plan[5][1]} / {plan[11][1]}", f"{fl:.1f}", f"{dt:.2f}", f"{cos:.3f}")
    console.print(table)
    console.print("[dim]random weights: speed and FLOPs are real, the cosine only shows how far the "
                  "representation moves; accuracy on a trained model is in docs/benchmarks.md.[/]")
