"""VLM visual-token pruning benchmark: accuracy of the fixture LLaVA vs visual tokens kept, and cost.

1. Accuracy (``--part accuracy``): the repository's fixture model (``unipruner.models.load_vlm_fixture``:
   a small LLaVA trained by ``scripts/train_vlm_fixture.py`` on synthetic scenes, 576 visual tokens
   per image) on held-out scenes generated from ``scenes.HELDOUT_SEED`` (never from committed
   images): answer accuracy (greedy first answer token == the one-word answer) for every method and
   stage at 192 / 128 / 64 / 32 of 576 visual tokens kept (the same fractions of the fixture's own
   token count when its grid is smaller), random as the floor, per question type.
   Table ``benchmarks/results/vlm_accuracy.md``, plot ``docs/img/vlm_accuracy.png``, and the methods
   that hold >= 95% of the unpruned accuracy at 64 tokens.
2. Cost (``--part cost``): full-width random-weight configs (CLIP ViT-L/14-336 + a Llama-7B-width LM
   with a few layers; a SmolVLM-256M-shaped model): FLOPs, realised vs theoretical prefill speed-up,
   the method's own overhead, decode throughput and KV bytes (``benchmarks/_vlm_cost.py``).

Run: ``python benchmarks/vlm.py`` (``--quick`` for a smoke run; ``--n 300`` questions by default).
Reads nothing from ``../shared``: the scenes come from a seed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Report, plot

import unipruner
from unipruner.adapters.vlm import scenes
from unipruner.models import load_vlm_fixture

IMG = ROOT / "docs" / "img"
#: the literature's budgets of LLaVA-1.5's 576 visual tokens; a fixture with another grid keeps the same fractions
BUDGETS = (192, 128, 64, 32)
#: (label, method, stage, extra parameters); the llm layer is filled in from the model (K = 2 where it fits)
METHODS: list[tuple[str, str, str, dict[str, Any]]] = [
    ("random (input)", "random", "input", {}),
    ("divprune (input)", "divprune", "input", {}),
    ("dart (input)", "dart", "input", {}),
    ("kcenter (input)", "kcenter", "input", {}),
    ("gprune (input)", "gprune", "input", {}),
    ("query_similarity (input)", "query_similarity", "input", {}),
    ("tome (input)", "tome", "input", {}),
    ("visionzip (vision)", "visionzip", "vision", {}),
    ("prumerge+ (vision)", "prumerge_plus", "vision", {}),
    ("holov (vision)", "holov", "vision", {}),
    ("evit (vision)", "evit", "vision", {}),
    ("fastv (llm)", "fastv", "llm", {}),
    ("sparsevlm (llm)", "sparsevlm", "llm", {}),
    ("dart (llm)", "dart", "llm", {}),
]


def _batches(model: Any, processor: Any, samples: list[Any], size: int) -> list[tuple[dict[str, Any], list[Any]]]:
    processor.tokenizer.padding_side = "left"
    out = []
    for i in range(0, len(samples), size):
        chunk = samples[i:i + size]
        enc = processor(images=[s.image for s in chunk], text=[scenes.prompt(s.question) for s in chunk],
                        return_tensors="pt", padding=True)
        out.append((dict(enc), chunk))
    return out


def _answer_ids(processor: Any, samples: list[Any]) -> torch.Tensor:
    ids = [processor.tokenizer.convert_tokens_to_ids(s.answer) for s in samples]
    return torch.tensor(ids)


@torch.no_grad()
def _accuracy(model: Any, processor: Any, batches: list[tuple[dict[str, Any], list[Any]]]
              ) -> tuple[float, dict[str, float], float]:
    right, total = 0, 0
    per: dict[str, list[int]] = {}
    t0 = time.perf_counter()
    for enc, chunk in batches:
        logits = model(**enc).logits[:, -1]
        pred = logits.argmax(-1)
        ok = (pred == _answer_ids(processor, chunk)).tolist()
        right += sum(ok)
        total += len(ok)
        for s, o in zip(chunk, ok, strict=True):
            per.setdefault(s.kind, []).append(int(o))
    return right / total, {k: sum(v) / len(v) for k, v in sorted(per.items())}, time.perf_counter() - t0


def run_accuracy(args: argparse.Namespace) -> Report:
    model, processor = load_vlm_fixture()
    n_layers = len(model.model.language_model.layers)
    layer = min(2, n_layers - 1)
    n = 48 if args.quick else args.n
    samples = scenes.samples(scenes.HELDOUT_SEED, n)
    batches = _batches(model, processor, samples, args.batch)
    n_visual = int((batches[0][0]["input_ids"][0] == model.config.image_token_id).sum())
    full, full_per, _ = _accuracy(model, processor, batches)
    kinds = sorted(full_per)
    rep = Report("vlm_accuracy", ["method", "kept", "accuracy", "relative", *kinds])
    rep.add(method="unpruned", kept=n_visual, accuracy=full, relative=1.0, **full_per)
    budgets = [max(1, round(n_visual * b / 576)) for b in (BUDGETS[2:3] if args.quick else BUDGETS)]
    at64 = max(1, round(n_visual * 64 / 576))
    methods = METHODS[:3] + METHODS[7:8] + METHODS[11:12] if args.quick else METHODS
    series: dict[str, tuple[list[float], list[float]]] = {}
    for label, name, where, extra in methods:
        xs, ys = [], []
        for k in budgets:
            kw = dict(extra, keep=k, stage=where)
            if where == "llm":
                kw["layer"] = layer
            with unipruner.vlm.patch(model, name, **kw):
                acc, per, _ = _accuracy(model, processor, batches)
            rep.add(method=label if where != "llm" else label.replace("llm", f"llm, K={layer}"), kept=k,
                    accuracy=acc, relative=acc / full if full else 0.0, **per)
            xs.append(k)
            ys.append(acc)
            print(f"{label:28s} keep {k:4d}: accuracy {acc:.3f} ({acc / full:.1%} of unpruned)", flush=True)
        series[label] = (xs, ys)
    held = [r["method"] for r in rep.rows if r["kept"] == at64 and r["method"] != "unpruned" and r["relative"] >= 0.95]
    rep.notes.append(f"{n} held-out questions (seed {scenes.HELDOUT_SEED}), unpruned accuracy {full:.3f} with "
                     f"{n_visual} visual tokens; speed is measured by the cost part on full-width configs (the "
                     f"fixture is too small for its timings to mean anything).")
    rep.notes.append(f"Hold >= 95% of the unpruned accuracy at {at64} tokens (64/576 of {n_visual}): "
                     + (", ".join(held) if held else "none"))
    rep.print()
    md = rep.save("python benchmarks/vlm.py --part accuracy" + (" --quick" if args.quick else ""))
    print(f"saved {md}")
    if not args.quick:
        series["unpruned"] = ([min(budgets), n_visual], [full, full])
        plot(IMG / "vlm_accuracy.png", series, xlabel=f"visual tokens kept (of {n_visual})", ylabel="held-out accuracy",
             title="fixture LLaVA: accuracy vs visual tokens kept")
    return rep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=("accuracy", "cost", "all"), default="all")
    ap.add_argument("--n", type=int, default=300, help="held-out questions")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.part in ("accuracy", "all"):
        run_accuracy(args)
    if args.part in ("cost", "all"):
        from _vlm_cost import run_cost

        run_cost(args)


if __name__ == "__main__":
    main()
