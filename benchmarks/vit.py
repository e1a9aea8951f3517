"""ViT token pruning/merging benchmark: speed on ViT-B/16, accuracy on the digits-trained ViT.

1. Speed (``vit_speed``): a full-size ViT-B/16 (transformers ``ViTModel``, random weights: speed
   does not depend on them), batch 8, 224x224, ``torch.set_num_threads(2)``. For ToMe at
   r = 8, 13, 16 and every other method at the same token counts: throughput ratio vs the
   unpatched model, FLOPs ratio (``torch.utils.flop_counter``, everything the patched model runs,
   the methods' own scoring included), and realised / theoretical = speed-up x FLOPs ratio. The
   unpatched and patched runs are interleaved (one of each per round, same process); the speed-up
   is the ratio of the fastest runs (load from other processes only adds time); the ratio of process
   CPU times is reported next to it. Also the
   cosine between the pruned and unpruned CLS embeddings (final layer norm output).
2. Fidelity (``vit_digits``): the digits-trained ViT fixture (tests/fixtures/vit_digits.py, 4 blocks,
   65 tokens) on its 500 held-out images: top-1 accuracy vs tokens kept for every method, with
   FLOPs ratios (``Schedule.geometric(final=f)``: ``f`` of the patches left after the last block);
   plot docs/img/vit_accuracy_vs_flops.png and a merge picture docs/img/vit_merges.png.

Run: ``python benchmarks/vit.py`` (``--quick`` for a smoke run, ``--part speed|digits``).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _harness import ROOT, Report

import unipruner.adapters.vit as vit
from unipruner import Schedule

IMG = ROOT / "docs" / "img"
# (label, method, extra params); every entry runs at the same per-block token counts as ToMe r
SPEED_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    ("tome", "tome", {}),
    ("evit (drop)", "evit", {}),
    ("evit (fuse)", "evit", {"reduction": "fuse"}),
    ("zero_tprune", "zero_tprune", {}),
    ("divprune", "divprune", {}),
    ("dart", "dart", {}),
    ("random", "random", {}),
]
DIGIT_METHODS: list[tuple[str, str, dict[str, Any]]] = [
    *SPEED_METHODS,
    ("zero_tprune (merge)", "zero_tprune", {"reduction": "merge"}),
    ("divprune (merge)", "divprune", {"reduction": "merge"}),
    ("random (merge)", "random", {"reduction": "merge"}),
    ("kcenter", "kcenter", {}),
    ("gprune", "gprune", {}),
    ("hidden_norm", "hidden_norm", {}),
    ("transprune", "transprune", {}),
    ("kmeans_pool", "kmeans_pool", {}),
]


def _flops(model: torch.nn.Module, x: torch.Tensor) -> int:
    with torch.inference_mode(), FlopCounterMode(display=False) as fc:
        model(x)
    return int(fc.get_total_flops())


def _timed(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, torch.Tensor]:
    """Wall time, process CPU time (all threads) and the CLS embedding of one forward."""
    with torch.inference_mode():
        c0, t0 = time.process_time(), time.perf_counter()
        out = model(x).last_hidden_state[:, 0]
        return time.perf_counter() - t0, time.process_time() - c0, out


def speed(quick: bool, only: list[str] | None = None, rounds: int = 5) -> Report:
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    model = ViTModel(ViTConfig(), add_pooling_layer=False).eval()  # ViT-B/16, 224, 12 blocks
    x = torch.randn(8 if not quick else 2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    rs = [8, 13, 16] if not quick else [16]
    rounds = rounds if not quick else 1
    base_flops = _flops(model, x)
    _timed(model, x)
    title = "vit_speed" + ("_" + "_".join(o.split()[0] for o in only) if only else "") + (
        f"_t{torch.get_num_threads()}" if torch.get_num_threads() != 2 else "")
    rep = Report(title, ["method", "r", "tokens out", "speed-up", "CPU-time ratio", "FLOPs ratio",
                        "realised/theoretical", "CLS cosine"])
    official = {8: 1.31, 13: 1.66, 16: 1.83}
    load0 = os.getloadavg()
    plans = {}
    for r in rs:  # ToMe's per-block counts (capped where fewer than 2r tokens remain); every method uses them
        with vit.patch(model, "tome", r=r) as h:
            plans[r] = [a - b for a, b in h.tokens_per_layer()]
    for label, name, params in SPEED_METHODS:
        if only and label not in only:
            continue
        for r in rs:
            h = vit.patch(model, name, r=plans[r], **params)
            flops = _flops(model, x)
            tb_all, tp_all, cb_all, cp_all, cos = [], [], [], [], []
            for _ in range(rounds):
                h.configure(enabled=False)
                tb, cb, ref = _timed(model, x)
                h.configure(enabled=True)
                tp, cp, out = _timed(model, x)
                tb_all.append(tb)
                tp_all.append(tp)
                cb_all.append(cb)
                cp_all.append(cp)
                cos.append(float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean()))
            vit.unpatch(model)
            speedup = min(tb_all) / min(tp_all)
            cpu = min(cb_all) / min(cp_all)
            fr = flops / base_flops
            rep.add(**{"method": label, "r": r, "tokens out": h.tokens_per_layer()[-1][1], "speed-up": speedup,
                       "CPU-time ratio": cpu, "FLOPs ratio": fr, "realised/theoretical": speedup * fr,
                       "CLS cosine": statistics.mean(cos)})
            print(f"{label} r={r}: {speedup:.2f}x (CPU time {cpu:.2f}x), FLOPs {fr:.3f}, unpatched "
                  f"{[round(v, 2) for v in tb_all]} s, patched {[round(v, 2) for v in tp_all]} s, "
                  f"load {os.getloadavg()[0]:.1f}", flush=True)
    rep.notes.append("Official ToMe (facebookresearch/ToMe) on timm, same CPU, random ViT-B/16, batch 8 "
                     f"(ENVIRONMENT.md): r=8 {official[8]}x, r=13 {official[13]}x, r=16 {official[16]}x.")
    rep.notes.append(f"torch threads: {torch.get_num_threads()}. Unpatched ViT-B/16: {base_flops / 1e9:.1f} GFLOPs "
                     f"per batch of {x.shape[0]}; "
                     f"{rounds} interleaved rounds (unpatched, patched) per row. speed-up = fastest unpatched / "
                     "fastest patched run (contention from other jobs only adds time, so the minima are the "
                     "cleanest estimate); CPU-time ratio = the same with process CPU time (all threads), "
                     "less sensitive to waiting for a core.")
    rep.notes.append(f"Machine load (1/5/15-min averages, 2 cores shared with other jobs): {load0} at the start, "
                     f"{os.getloadavg()} at the end.")
    return rep


def _digits() -> Any:
    path = ROOT / "tests" / "fixtures" / "vit_digits.py"
    spec = importlib.util.spec_from_file_location("vit_digits_fixture", path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def digits(quick: bool) -> Report:
    fx = _digits()
    model = fx.load_model()
    _, _, x, y = fx.load_data()
    if quick:
        x, y = x[:100], y[:100]
    base_acc = fx.accuracy(model, x, y)
    probe = x[:50]
    base_flops = _flops(model, probe)
    ratios = [0.75, 0.5, 0.35, 0.25, 0.15] if not quick else [0.5]
    rep = Report("vit_digits", ["method", "final", "mean tokens/block", "FLOPs ratio", "accuracy",
                                "Δ accuracy"])
    rep.add(**{"method": "unpatched", "final": 1.0, "mean tokens/block": 65.0, "FLOPs ratio": 1.0,
               "accuracy": base_acc, "Δ accuracy": 0.0})
    series: dict[str, tuple[list[float], list[float]]] = {}
    for label, name, params in DIGIT_METHODS:
        xs, ys = [1.0], [base_acc]
        for ratio in ratios:
            with vit.patch(model, name, schedule=Schedule.geometric(final=ratio), **params) as h:
                acc = fx.accuracy(model, x, y)
                fr = _flops(model, probe) / base_flops
                plan = h.tokens_per_layer()
            mean_tokens = sum(n_in for n_in, _ in plan) / len(plan)
            rep.add(**{"method": label, "final": ratio, "mean tokens/block": mean_tokens, "FLOPs ratio": fr,
                       "accuracy": acc, "Δ accuracy": acc - base_acc})
            xs.append(fr)
            ys.append(acc)
        series[label] = (xs, ys)
        print(f"{label}: {[round(v, 3) for v in ys]}", flush=True)
    rep.notes.append(f"{len(y)} held-out digits; 65 tokens (CLS + 8x8 patches of 4x4 pixels), 4 blocks; "
                     "`final` = fraction of the patch tokens left after the last block, reached geometrically "
                     "(`schedule=Schedule.geometric(final=...)`).")
    if not quick:
        _plot(IMG / "vit_accuracy_vs_flops.png", series)
        with vit.patch(model, "tome", schedule=Schedule.geometric(final=0.25)):
            vit.visualize(model, x[:4], IMG / "vit_merges.png", layers=[0, 1, 3], index=0)
        with vit.patch(model, "evit", schedule=Schedule.geometric(final=0.25)):
            vit.visualize(model, x[:4], IMG / "vit_evit.png", layers=[0, 1, 3], index=0)
    return rep


def _plot(path: Path, series: dict[str, tuple[list[float], list[float]]]) -> None:
    """Accuracy vs FLOPs, one distinguishable line per method (tab20 colours, cycling markers)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    cmap = plt.get_cmap("tab20")
    markers = "osD^v<>px*h"
    for i, (label, (xs, ys)) in enumerate(series.items()):
        ax.plot(xs, ys, marker=markers[i % len(markers)], color=cmap(i % 20), label=label,
                linestyle="-" if i < 10 else "--", markersize=4)
    ax.set_xlabel("FLOPs ratio (patched / unpatched; scoring cost included)")
    ax.set_ylabel("top-1 accuracy (500 held-out digits)")
    ax.set_title("digits ViT (4 blocks, 65 tokens): accuracy vs FLOPs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    fig.savefig(tmp, dpi=120, format="png")
    os.replace(tmp, path)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny smoke run")
    ap.add_argument("--part", choices=["speed", "digits", "all"], default="all")
    ap.add_argument("--methods", nargs="*", help="speed part: only these labels (e.g. tome 'evit (fuse)')")
    ap.add_argument("--rounds", type=int, default=5, help="speed part: interleaved rounds per row")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the issue's setting is 2)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cmd = " ".join(["python", "benchmarks/vit.py", *sys.argv[1:]])
    for part in ("digits", "speed"):
        if args.part in (part, "all"):
            rep = digits(args.quick) if part == "digits" else speed(args.quick, args.methods, args.rounds)
            rep.print()
            if not args.quick:
                print(rep.save(cmd))


if __name__ == "__main__":
    main()
