"""The ``unipruner demo`` VLM section: the fixture LLaVA answers about a scene with fewer visual tokens."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

__all__ = ["DEMO_METHOD", "demo_section"]

#: (method, stage, parameters) shown by the demo: see docs/benchmarks.md (VLM) for why this one
DEMO_METHOD: tuple[str, str, dict[str, Any]] = ("divprune", "input", {})
_SCENE_INDEX = 20  # a held-out scene whose question needs one small shape (the one in the top right cell)


def _kv_bytes(cache: Any) -> int:
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if t is not None:
                total += t.numel() * t.element_size()
    return total


def demo_section(console: Any, ratio: float = 0.25) -> None:
    """The fixture model answers a held-out question with all 576 visual tokens, then 25% and 11% of them.

    Shows the answer, the tokens the language model received, the prefill time, the KV-cache bytes
    after the prefill and where the picture of the kept patches was written.
    """
    import torch
    from rich.table import Table

    from ..._threads import limit_threads
    from ...models import load_vlm_fixture
    from . import scenes
    from ._patch import patch
    from ._visualize import visualize

    method, where, params = DEMO_METHOD
    console.rule(f"[bold]vlm: a small LLaVA answers about a scene with fewer visual tokens ({method} @ {where})")
    model, processor = load_vlm_fixture()
    sample = scenes.samples(scenes.HELDOUT_SEED, _SCENE_INDEX + 1)[_SCENE_INDEX]
    enc = dict(processor(images=[sample.image], text=[scenes.prompt(sample.question)], return_tensors="pt"))
    n_visual = int((enc["input_ids"] == model.config.image_token_id).sum())
    console.print(f"question: {sample.question!r} (answer: {sample.answer!r}); {n_visual} visual tokens per image")
    table = Table()
    for col in ("visual tokens", "answer", "LM tokens", "prefill s", "KV bytes", "vs all"):
        table.add_column(col, justify="left" if col == "answer" else "right")
    with torch.no_grad():
        model(**enc)  # warm-up: the first call pays one-off costs that are not the prefill's
    full_bytes = 0
    picture = Path(tempfile.gettempdir()) / "unipruner-demo" / "vlm_kept_patches.png"
    for keep in (n_visual, round(n_visual * 0.25), round(n_visual * 64 / 576)):
        with limit_threads(min(2, torch.get_num_threads())), torch.no_grad():
            handle = patch(model, method, stage=where, keep=keep, **params) if keep < n_visual else None
            try:
                t0 = time.perf_counter()
                out = model(**enc, use_cache=True)
                dt = time.perf_counter() - t0
                answer = processor.tokenizer.convert_ids_to_tokens(int(out.logits[0, -1].argmax()))
                size = _kv_bytes(getattr(out, "cache", None))
                full_bytes = full_bytes or size
                if handle is not None and keep == round(n_visual * 64 / 576):
                    visualize(model, enc, picture, image=sample.image)
            finally:
                if handle is not None:
                    handle.unpatch()
        table.add_row(f"{keep} ({keep / n_visual:.0%})", str(answer), str(out.logits.shape[1]), f"{dt:.3f}",
                      f"{size / 1e6:.2f} MB", f"{size / full_bytes:.0%}")
    console.print(table)
    console.print(f"[dim]kept patches at {round(n_visual * 64 / 576)} tokens drawn to {picture}; the scene comes "
                  f"from seed {scenes.HELDOUT_SEED} (held out from training).[/]")
