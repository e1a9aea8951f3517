"""The small harness every benchmark shares.

* :func:`timeit` — repeated runs after warm-up, returns the median (and all samples);
* :class:`Report` — rows of measurements, printed as a rich table and written as JSON and
  Markdown under ``benchmarks/results/`` (ratios, not absolute times, are what we quote);
* :func:`shared_data` / :func:`load_jsonl` — evaluation data from ``../shared/data`` through
  ``datasets.load_dataset("json", ...)`` with a clear error when the folder is missing;
* :func:`plot` — an optional matplotlib line plot.

Machines are noisy: compare within one run, quote medians and ratios.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


def timeit(fn: Callable[[], Any], *, repeat: int = 5, warmup: int = 1,
           min_time: float = 0.0) -> tuple[float, list[float]]:
    """Median wall time of ``fn()`` over ``repeat`` runs (after ``warmup`` runs).

    With ``min_time`` > 0, keeps repeating until the total measured time reaches it.
    """
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    while len(samples) < repeat or sum(samples) < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
        if len(samples) >= 1000:
            break
    return statistics.median(samples), samples


def environment() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d"),
    }


@dataclass
class Report:
    """A table of benchmark rows, printed and saved as JSON + Markdown."""

    name: str
    columns: Sequence[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, **row: Any) -> None:
        missing = [c for c in self.columns if c not in row]
        if missing:
            raise KeyError(f"row lacks columns {missing}")
        self.rows.append(row)

    @staticmethod
    def _fmt(v: Any) -> str:
        if isinstance(v, float):
            if v != 0 and (abs(v) >= 1e4 or abs(v) < 1e-3):
                return f"{v:.3g}"
            return f"{v:.3f}" if abs(v) < 10 else f"{v:.1f}"
        return str(v)

    def markdown(self) -> str:
        head = "| " + " | ".join(self.columns) + " |"
        sep = "|" + "|".join("---" for _ in self.columns) + "|"
        body = ["| " + " | ".join(self._fmt(r[c]) for c in self.columns) + " |" for r in self.rows]
        return "\n".join([head, sep, *body])

    def print(self) -> None:
        try:
            from rich.console import Console
            from rich.table import Table
        except ImportError:  # pragma: no cover - rich is a core dependency
            print(self.markdown())
            return
        table = Table(title=self.name)
        for c in self.columns:
            table.add_column(c)
        for r in self.rows:
            table.add_row(*(self._fmt(r[c]) for c in self.columns))
        Console().print(table)
        for n in self.notes:
            Console().print(f"[dim]{n}[/]")

    def save(self, command: str) -> Path:
        """Write ``results/<name>.json`` and ``.md``; returns the Markdown path."""
        RESULTS.mkdir(parents=True, exist_ok=True)
        env = environment()
        payload = {"name": self.name, "command": command, "environment": env,
                   "columns": list(self.columns), "rows": self.rows, "notes": self.notes}
        js = RESULTS / f"{self.name}.json"
        md = RESULTS / f"{self.name}.md"
        _atomic_write(js, json.dumps(payload, indent=2, default=str))
        text = (f"Command: `{command}`  \nMeasured on: {env}\n\n" + self.markdown() + "\n"
                + "".join(f"\n{n}\n" for n in self.notes))
        _atomic_write(md, text)
        return md


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def shared_data(*parts: str) -> Path:
    """Path under ``../shared/data``; when it is missing, a one-line message and exit status 1 (no traceback).

    Only the benchmarks read ``../shared/data``; the demo and the tests use what the repository contains.
    """
    base = Path(os.environ.get("UNIPRUNER_DATA", ROOT.parent / "shared" / "data"))
    path = base.joinpath(*parts)
    if not path.exists():
        raise SystemExit(f"error: evaluation data {path} is missing: the benchmarks read ../shared/data next to "
                         "the project (or set UNIPRUNER_DATA to its location); make demo / make test do not need it")
    return path


def load_jsonl(*parts: str) -> Any:
    """A JSON-lines file from the shared data as a ``datasets.Dataset`` (offline)."""
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from datasets import load_dataset

    return load_dataset("json", data_files=str(shared_data(*parts)), split="train")


def plot(path: Path, series: dict[str, tuple[Sequence[float], Sequence[float]]], *,
         xlabel: str, ylabel: str, title: str) -> Path | None:
    """Line plot of ``{label: (xs, ys)}`` to a PNG; returns None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, (xs, ys) in series.items():
        ax.plot(xs, ys, marker="o", label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
