"""The ``unipruner demo`` KV section: SmolLM2 answers from a full and from a compressed cache."""

from __future__ import annotations

import time
from typing import Any

__all__ = ["DEMO_QUESTION", "demo_prompt", "demo_section"]

_PARAGRAPHS = (
    "The harbour town of Elsworth grew up around a narrow inlet on a coast of grey cliffs and long "
    "beaches. For most of its history the town lived from fishing, and the first houses were built "
    "of driftwood and stone carried up from the shore. The old chapel on the hill still has a bell "
    "cast from the bronze fittings of a ship that ran aground in a winter storm.",
    "In the eighteenth century a small shipyard opened at the mouth of the inlet. It built wooden "
    "schooners for the coastal trade, and for a few decades the yard employed more people than the "
    "fishing fleet. When iron hulls replaced wood, the yard closed, and its slipways slowly "
    "disappeared under sand and seaweed.",
    "The railway reached Elsworth late, in the spring of 1889, after years of argument in the county "
    "council about the cost of a bridge over the river Tane. The station was small, with a single "
    "platform and a water tower, but it changed the town: fish could reach the markets of the "
    "capital in a day, and visitors began to arrive in summer.",
    "The lighthouse on Gull Point was first lit in 1851. Its keepers kept a log of every ship that "
    "passed, every storm and every repair, and the logs are now kept in the town museum. The tower "
    "is forty metres tall and its light could be seen from thirty kilometres out at sea on a clear "
    "night.",
    "Life at the lighthouse was hard. Three keepers worked in shifts, trimming the wicks, winding the "
    "clockwork that turned the lens and cleaning the glass after every storm. Supplies came by boat "
    "once a fortnight, and in bad winters the keepers went weeks without news from the town.",
    "The station was automated in 1967, when an electric lamp and a timer replaced the keepers. The "
    "last head keeper, a man named Tomas Reyne, stayed in Elsworth and ran a small bakery near the "
    "harbour for twenty more years. People still call the bakery's round loaf a keeper's loaf.",
    "During the twentieth century the town changed again. The fishing fleet shrank as the catches "
    "fell, and many young people left for the cities. Tourism took the place of fishing: the old "
    "net lofts became cafes and galleries, and the beach huts along the promenade were painted in "
    "bright colours every spring.",
    "Today Elsworth has about four thousand inhabitants. The museum in the old customs house shows "
    "the lighthouse logs, models of the schooners built at the yard and photographs of the railway's "
    "opening day. Every August the town holds a regatta, and the harbour fills with small sailing "
    "boats from all along the coast.",
)
DEMO_QUESTION = "In which year was the lighthouse station automated?"


def demo_prompt() -> tuple[str, str]:
    """The bundled context (plain completion framing, which SmolLM2-135M answers best) and question."""
    context = "Read the following text about a town.\n\n" + "\n\n".join(_PARAGRAPHS * 2) + "\n\n"
    return context, f"Question: {DEMO_QUESTION}\nAnswer: The lighthouse station was automated in"


def demo_section(console: Any, ratio: float) -> None:
    """SmolLM2-135M-Instruct answers a question about a long bundled text, full cache vs SnapKV.

    Shows each answer, the KV-cache bytes actually stored and the wall time. SnapKV runs as in
    the paper: the prompt (text + question) is prefilled, the last 32 tokens (the question) vote
    for the context tokens to keep, and the answer is decoded from the compressed cache.
    """
    import torch
    from rich.table import Table

    from ..._threads import limit_threads
    from ...models import load_smollm2
    from ._generate import generate

    console.rule(f"[bold]kv: SmolLM2-135M answers from a full vs a compressed KV cache (SnapKV, keeping {ratio:.0%})")
    model, tok = load_smollm2()
    context, question = demo_prompt()
    n_tokens = len(tok(context)["input_ids"])
    console.print(f"context: {n_tokens} tokens of bundled text; question: {DEMO_QUESTION!r}")
    table = Table()
    for col in ("cache", "answer", "KV bytes", "vs full", "seconds"):
        table.add_column(col, justify="right" if col in ("KV bytes", "vs full", "seconds") else "left")
    full_bytes = None
    for label, r in (("full", 1.0), (f"snapkv {ratio:.0%}", ratio)):
        t0 = time.perf_counter()
        with limit_threads(min(2, torch.get_num_threads())):  # scoped: the caller's count is restored after
            ans = generate(model, tok, context, question, method="snapkv", ratio=r, max_new_tokens=8, window=32,
                           query_aware=True)
        dt = time.perf_counter() - t0
        size = ans.stats.bytes_after
        full_bytes = full_bytes or ans.stats.bytes_before
        table.add_row(label, ans.texts[0].splitlines()[0] if ans.texts[0] else "", f"{size / 1e6:.2f} MB",
                      f"{size / full_bytes:.0%}", f"{dt:.1f}")
    console.print(table)
    console.print("[dim]ratio 1.0 keeps every token (the full cache); bytes are the keys + values actually "
                  "allocated after answering, summed over the 30 layers.[/]")
