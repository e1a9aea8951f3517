"""``unipruner demo``: the main job on the bundled offline models.

The demo is a list of sections; each domain adapter adds its own. The core section encodes a
short bundled text with the packaged all-MiniLM-L6-v2 and shows, for methods of every family,
which tokens survive at the requested ratio and how well the reduced set still represents the
text (cosine between the mean-pooled embedding before and after).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import torch
from torch import Tensor

from ._ops import cosine_matrix
from .errors import UniprunerError
from .methods import Reduced, method
from .models import model_path, require

__all__ = ["SECTIONS", "CoreResult", "core_token_pruning", "demo_text", "run"]

QUERY = "When was the lighthouse station automated?"

# (family, method, extra parameters) shown by the core section
CORE_METHODS: tuple[tuple[str, dict[str, Any]], ...] = (
    ("evit", {}),
    ("h2o", {}),
    ("hidden_norm", {}),
    ("transprune", {}),
    ("query_similarity", {}),
    ("tome", {"protected": 1}),
    ("dart", {"protected": 1}),
    ("ward_pool", {"protected": 1}),
    ("zero_tprune", {}),
    ("gprune", {}),
    ("divprune", {"protected": 1}),
    ("kcenter", {"protected": 1}),
    ("mmr", {}),
    ("random", {}),
)


def demo_text() -> str:
    """The short text bundled with the package for the demo."""
    return resources.files("unipruner").joinpath("data/demo.txt").read_text(encoding="utf-8").strip()


@dataclass(frozen=True)
class CoreResult:
    """One row of the core demo: a method's survivors and how faithful they are."""

    method: str
    family: str
    kept: int
    total: int
    cosine: float
    coverage: float
    kept_positions: list[int]
    seconds: float


def _encode(model: Any, tok: Any, text: str) -> tuple[Tensor, Tensor, Tensor, list[str], Tensor]:
    enc = tok(text, return_tensors="pt")
    with torch.inference_mode():
        out = model(**enc, output_attentions=True, output_hidden_states=True)
    tokens = tok.convert_ids_to_tokens(enc["input_ids"][0])
    return out.last_hidden_state, out.attentions[-1], out.hidden_states[-2], tokens, enc["input_ids"]


def _pooled(hidden: Tensor, sizes: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
    w = torch.ones_like(hidden[..., :1]) if sizes is None else sizes
    if mask is not None:
        w = w * mask.unsqueeze(-1)
    return (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)


def _coverage(hidden: Tensor, red: Reduced) -> float:
    """Mean over the original tokens of the cosine to the closest surviving token."""
    sim = cosine_matrix(hidden, red.tokens)
    if red.mask is not None:
        sim = sim.masked_fill(~red.mask.unsqueeze(1), -1.0)
    return float(sim.amax(dim=-1).mean())


def core_token_pruning(ratio: float = 0.25, text: str | None = None) -> tuple[list[CoreResult], list[str]]:
    """Run the core section's computation; returns the rows and the token strings."""
    transformers = require("transformers", "rag")
    path = str(model_path("all-minilm-l6-v2"))
    tok = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
    model = transformers.AutoModel.from_pretrained(path, local_files_only=True,
                                                   attn_implementation="eager").eval()
    text = demo_text() if text is None else text
    hidden, attn, previous, tokens, _ = _encode(model, tok, text)
    q_hidden, _, _, _, _ = _encode(model, tok, QUERY)
    query = _pooled(q_hidden)
    full = _pooled(hidden)
    signals = {"attn": attn, "previous": previous, "query": query}
    rows = []
    n = hidden.shape[1]
    for name, params in CORE_METHODS:
        m = method(name, ratio=ratio, **params)
        m.reduce(hidden, **signals)  # warm-up: first calls pay one-off allocation costs
        t0 = time.perf_counter()
        red: Reduced = m.reduce(hidden, **signals)
        dt = time.perf_counter() - t0
        cos = torch.nn.functional.cosine_similarity(_pooled(red.tokens, red.sizes, red.mask), full).item()
        kept = [int(i) for i in red.indices[0].tolist() if i >= 0]
        n_out = int(red.tokens.shape[1] if red.mask is None else red.mask[0].sum())
        rows.append(CoreResult(name, m.family, n_out, n, cos, _coverage(hidden, red), kept, dt))
    return rows, tokens


def _render_kept(tokens: list[str], kept: list[int]) -> str:
    keep = set(kept)
    parts = []
    for i, t in enumerate(tokens):
        if t in ("[CLS]", "[SEP]"):
            continue
        word = t[2:] if t.startswith("##") else " " + t
        if i in keep:
            parts.append(f"[bold green]{word}[/]")
        else:
            parts.append("[dim]" + (" \u00b7" if not t.startswith("##") else "\u00b7") + "[/]")
    return "".join(parts).strip()


def _core_section(console: Any, ratio: float) -> None:
    from rich.table import Table

    console.rule(f"[bold]core: token pruning on all-MiniLM-L6-v2, keeping {ratio:.0%}")
    rows, tokens = core_token_pruning(ratio)
    console.print(f"{len(tokens)} tokens; signals: last-layer attention, hidden states, query "
                  f"embedding of {QUERY!r}")
    table = Table(show_lines=False)
    for col in ("family", "method", "kept", "cos(mean) vs full", "coverage", "ms"):
        table.add_column(col, justify="left" if col in ("family", "method") else "right")
    for r in sorted(rows, key=lambda r: (r.family, -r.coverage)):
        table.add_row(r.family, r.method, f"{r.kept}/{r.total}", f"{r.cosine:.4f}",
                      f"{r.coverage:.4f}", f"{r.seconds * 1e3:.1f}")
    console.print(table)
    console.print(
        "[dim]cos(mean): cosine between the (size-weighted) mean of the surviving tokens and of all "
        "tokens; merging methods keep the weighted mean exactly by construction. coverage: mean "
        "over all original tokens of the cosine to the closest surviving token. "
        "Kept words below; \u00b7 marks a dropped (or merged-away) token.[/]"
    )
    for name in ("evit", "tome", "divprune", "query_similarity"):
        r = next(x for x in rows if x.method == name)
        console.print(f"[bold]{name}[/] keeps: {_render_kept(tokens, r.kept_positions)}")


def _kv_section(console: Any, ratio: float) -> None:
    """The KV-cache section: SmolLM2 answers from its full cache and from 50% SnapKV (as issue #3 asks)."""
    from .adapters.kv_cache import demo_section

    demo_section(console, 0.5)


def _vit_section(console: Any, ratio: float) -> None:
    """The ViT section: ToMe and EViT on a ViT-B/16, keeping ``ratio`` of the patches (issue #6)."""
    from .adapters.vit import demo_section

    demo_section(console, ratio)


def _rag_section(console: Any, ratio: float) -> None:
    """The RAG section: a HotpotQA question's paragraphs pruned to ``ratio`` of their tokens (issue #4)."""
    from .adapters.rag import demo_section

    demo_section(console, ratio)


def _colbert_section(console: Any, ratio: float) -> None:
    """The ColBERT section: a Cranfield token-vector index pooled and pruned (issue #5).

    Index pruning beyond ~30% costs retrieval quality, so this section keeps 70% of the vectors
    whatever ``ratio`` the other sections use.
    """
    from .adapters.colbert._demo import demo_section

    demo_section(console, 0.7)


def _vlm_section(console: Any, ratio: float) -> None:
    """The VLM section: the fixture LLaVA answers with all, 25% and 11% of its visual tokens (issue #11)."""
    from .adapters.vlm import demo_section

    demo_section(console, ratio)


def _diffusion_section(console: Any, ratio: float) -> None:
    """The diffusion section: a tiny offline SD pipeline with every diffusion method keeping ``ratio`` (issue #12)."""
    from .adapters.diffusion._demo import demo_section

    demo_section(console, ratio)


SECTIONS: list[tuple[str, Callable[[Any, float], None]]] = [
    ("core", _core_section),
    ("kv", _kv_section),
    ("vit", _vit_section),
    ("rag", _rag_section),
    ("colbert", _colbert_section),
    ("vlm", _vlm_section),
    ("diffusion", _diffusion_section),
]


def run(console: Any, ratio: float = 0.25, sections: list[str] | None = None) -> None:
    """Run the demo sections (all by default) and print to a rich console."""
    known = [name for name, _ in SECTIONS]
    unknown = [name for name in sections or [] if name not in known]
    if unknown:
        raise UniprunerError(f"unknown demo section(s) {unknown}; choose from {known}")
    for name, fn in SECTIONS:
        if sections and name not in sections:
            continue
        fn(console, ratio)
