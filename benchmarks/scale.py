"""Scale-out benchmark of ``colbert compress`` (issue 14): local engine vs Ray, 1 and 2 workers, memory.

On a synthetic raw index (unit vectors, float16, dim 128, 8-56 vectors per document, seed 0) this measures

* throughput (vectors/s of the compress call, engine start excluded and reported apart) and the peak resident
  memory of every worker process, for the local engine (1 worker, in the driver, 1 thread) and Ray (1 and 2
  workers of 1 CPU each, a local Ray instance per run), plus Ray with 2 workers on a 5x smaller index (is the
  worker's memory flat as the index grows?);
* Ray's overhead against the local engine on the same job (same method, one thread per worker);
* that the outputs are the same bytes;
* the driver's peak memory for the IVF rebuild of a PLAID index of the same size (2^16 centroids), counting sort into
  a memory map (what ``compress`` does) vs the in-memory ``torch.unique`` of every (centroid, document) pair.

Every configuration runs in a fresh Python process (its own peak memory). Usage::

    .venv/bin/python benchmarks/scale.py --vectors 5000000 --dir /work/tmp-scale   # ~8 min on 2 cores

The index (~1.3 GB per 5M vectors) and the outputs are deleted at the end unless ``--keep``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

SPEC = {"method": "ward_cosine_pool", "factor": 2.0}


def make_index(path: Path, n_vectors: int, dim: int, seed: int = 0) -> Path:
    """A synthetic raw index of about ``n_vectors`` unit vectors (float16), streamed in chunks."""
    from unipruner.adapters.colbert.formats import Chunk
    from unipruner.adapters.colbert.formats.raw import RawWriter

    if (path / "manifest.json").is_file():
        return path
    g = np.random.default_rng(seed)
    doclens = g.integers(8, 57, size=n_vectors // 32 + 1, dtype=np.int64)
    doclens = doclens[: int(np.searchsorted(np.cumsum(doclens), n_vectors)) + 1]
    tmp = path.with_name(path.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    w = RawWriter(tmp, dim=dim, dtype="float16", ids=[str(i) for i in range(doclens.size)])
    step = 8192
    for c, a in enumerate(range(0, doclens.size, step)):
        dl = doclens[a:a + step]
        v = torch.from_numpy(g.standard_normal((int(dl.sum()), dim), dtype=np.float32))
        w.write(Chunk(c, a, dl, torch.nn.functional.normalize(v, dim=-1)))
    w.close()
    os.replace(tmp, path)
    return path


def _rss_mib() -> float:
    """Peak resident MiB of this process (VmHWM: a child's ru_maxrss starts at its parent's peak)."""
    from unipruner.adapters.colbert._parts import peak_rss

    return peak_rss() / 2**20


def run_one(src: Path, dst: Path, engine: str, workers: int) -> dict[str, float | int | str | list[int]]:
    """One compress in this process; returns its numbers (JSON)."""
    from unipruner._threads import limit_threads
    from unipruner.adapters.colbert._compress import compress
    from unipruner.adapters.colbert._methods import ReduceSpec
    from unipruner.engines import LocalEngine, RayEngine

    spec = ReduceSpec(SPEC["method"], factor=SPEC["factor"])
    t0 = time.perf_counter()
    if engine == "ray":
        eng: LocalEngine | RayEngine = RayEngine(workers=workers, cpus_per_worker=1,
                                                 init_kwargs={"num_cpus": max(2, workers)})
        eng.connect()
    else:
        eng = LocalEngine(workers)
    start = time.perf_counter() - t0
    try:
        with limit_threads(1):
            t1 = time.perf_counter()
            res = compress(src, dst, spec, engine=eng)
            secs = time.perf_counter() - t1
    finally:
        eng.close()
    return {"engine": engine, "workers": workers, "vectors": res.src.n_vectors, "docs": res.src.n_docs,
            "vectors_out": res.dst.n_vectors, "chunks": res.src.n_chunks, "seconds": secs, "start_s": start,
            "vectors_per_s": res.src.n_vectors / secs, "retries": res.retries,
            "worker_peak_mib": [round(b / 2**20) for b in res.worker_peak_rss], "driver_peak_mib": _rss_mib()}


def ivf_one(n_vectors: int, mode: str, work: Path) -> dict[str, float | str]:
    """Driver peak memory of one IVF rebuild over synthetic codes of ``n_vectors`` vectors (2^16 centroids)."""
    from unipruner.adapters.colbert.formats._codec import build_ivf_pairs, ivf_from_pairs, ivf_to_file

    partitions, per_chunk = 1 << 16, 1 << 18
    starts = list(range(0, n_vectors, per_chunk))
    if mode == "gen":  # the synthetic codes, written by a process of its own (its memory is not measured)
        g = np.random.default_rng(1)
        work.mkdir(parents=True, exist_ok=True)
        for c, a in enumerate(starts):
            n = min(per_chunk, n_vectors - a)
            dl = np.full(n // 32, 32, dtype=np.int64)
            dl[-1] += n - int(dl.sum())
            np.save(work / f"{c}.codes.npy", g.integers(0, partitions, size=n, dtype=np.int32))
            np.save(work / f"{c}.doclens.npy", dl)
        return {"mode": mode}
    files = [0]
    for c in range(len(starts) - 1):
        files.append(files[-1] + int(np.load(work / f"{c}.doclens.npy", mmap_mode="r").size))

    def pairs(c: int) -> torch.Tensor:
        codes = torch.from_numpy(np.load(work / f"{c}.codes.npy"))
        return build_ivf_pairs(codes, np.load(work / f"{c}.doclens.npy"), files[c], None)

    base = _rss_mib()
    t0 = time.perf_counter()
    if mode == "counting_sort":
        ivf, lengths = ivf_to_file(pairs, len(files), partitions, work / "ivf.npy", np.int32)
        total = int(lengths.sum())
        del ivf
    else:
        pids, _ = ivf_from_pairs([pairs(c) for c in range(len(files))], partitions)
        total = int(pids.numel())
    peak = _rss_mib()
    return {"mode": mode, "vectors": n_vectors, "pairs": total, "seconds": time.perf_counter() - t0,
            "driver_peak_mib": peak, "peak_over_baseline_mib": peak - base,
            "bytes_per_pair": (peak - base) * 2**20 / max(total, 1)}


def _tree_hash(d: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(d.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(d)).encode())
            with open(p, "rb") as fh:
                for block in iter(lambda: fh.read(1 << 24), b""):
                    h.update(block)
    return h.hexdigest()


def _child(args: list[str]) -> dict[str, object]:
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    out = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env, check=False)
    if out.returncode != 0:
        raise SystemExit(f"{args} failed:\n{out.stderr[-4000:]}")
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vectors", type=int, default=5_000_000)
    ap.add_argument("--dim", type=int, default=128)
    ap.add_argument("--dir", type=Path, default=Path("/work/tmp-scale"))
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--one", nargs=4, metavar=("SRC", "DST", "ENGINE", "WORKERS"), help=argparse.SUPPRESS)
    ap.add_argument("--ivf", nargs=3, metavar=("N", "MODE", "WORK"), help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        print(json.dumps(run_one(Path(a.one[0]), Path(a.one[1]), a.one[2], int(a.one[3]))))
        return
    if a.ivf:
        print(json.dumps(ivf_one(int(a.ivf[0]), a.ivf[1], Path(a.ivf[2]))))
        return
    a.dir.mkdir(parents=True, exist_ok=True)
    os.environ["RAY_TMPDIR"] = str(a.dir)
    t0 = time.perf_counter()
    big = make_index(a.dir / "src", a.vectors, a.dim)
    small = make_index(a.dir / "src-small", a.vectors // 5, a.dim)
    print(f"indexes ready in {time.perf_counter() - t0:.0f} s; {os.cpu_count()} CPUs (shared machine)", flush=True)
    rows = []
    for name, src, engine, workers in (("local-1", big, "local", 1), ("ray-1", big, "ray", 1),
                                       ("ray-2", big, "ray", 2), ("ray-2-small", small, "ray", 2)):
        r = _child(["--one", str(src), str(a.dir / f"out-{name}"), engine, str(workers)])
        r["run"] = name
        rows.append(r)
        print(json.dumps(r), flush=True)
    same = _tree_hash(a.dir / "out-local-1") == _tree_hash(a.dir / "out-ray-1") == _tree_hash(a.dir / "out-ray-2")
    _child(["--ivf", str(a.vectors), "gen", str(a.dir / "ivf")])
    ivf = [_child(["--ivf", str(a.vectors), m, str(a.dir / "ivf")]) for m in ("counting_sort", "in_memory")]
    for r in ivf:
        print(json.dumps(r), flush=True)
    by = {r["run"]: r for r in rows}
    v = {k: float(r["vectors_per_s"]) for k, r in by.items()}  # type: ignore[arg-type]
    print("\nsummary (vectors/s of the compress call; engine start apart):")
    for k, r in by.items():
        print(f"  {k:12s} {r['vectors']:>10,} vectors  {float(r['seconds']):7.1f} s  {v[k]:>9,.0f} vectors/s  "  # type: ignore[arg-type]
              f"start {float(r['start_s']):5.1f} s  worker peak MiB {r['worker_peak_mib']}  "  # type: ignore[arg-type]
              f"driver peak MiB {float(r['driver_peak_mib']):.0f}")  # type: ignore[arg-type]
    print(f"  speed-up ray 1 -> 2 workers: {v['ray-2'] / v['ray-1']:.2f}x")
    print(f"  Ray overhead vs local (1 worker): {v['local-1'] / v['ray-1'] - 1:+.1%} time")
    print(f"  outputs identical (local-1, ray-1, ray-2): {same}")
    for r in ivf:
        print(f"  IVF rebuild {r['mode']:13s} {r['pairs']:,} pairs: {float(r['seconds']):.1f} s, driver peak "  # type: ignore[arg-type]
              f"{float(r['driver_peak_mib']):.0f} MiB (+{float(r['peak_over_baseline_mib']):.0f} MiB over the "  # type: ignore[arg-type]
              f"baseline, {float(r['bytes_per_pair']):.1f} bytes per pair)")  # type: ignore[arg-type]
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)


if __name__ == "__main__":
    main()
