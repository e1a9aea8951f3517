"""``colbert compress`` on the engines (issue 14): the staged pipeline writes what the sequential writer writes, Ray
writes what the local engine writes (byte for byte), and the job survives a killed worker, a lost node, a killed
driver (``--resume``), and fails cleanly on a corrupt chunk — on a local multi-node Ray cluster."""

from __future__ import annotations

import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _ray_cluster import add_node, ray_cluster  # noqa: F401  (the fixture)
from typer.testing import CliRunner

from unipruner.adapters.colbert._compress import _compress_sequential, compress, open_index
from unipruner.adapters.colbert._methods import ReduceSpec
from unipruner.adapters.colbert.formats import raw
from unipruner.cli import app
from unipruner.engines import LocalEngine, RayEngine, make_engine
from unipruner.errors import MissingDependencyError, UniprunerError

FIXTURES = Path(__file__).parent / "fixtures" / "colbert"
SPEC = ReduceSpec("ward_cosine_pool", factor=2)
CHUNK = 64  # raw chunk bound of these tests: 12 chunks of raw_src


def _tree(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _same(a: Path, b: Path) -> None:
    ta, tb = _tree(a), _tree(b)
    assert sorted(ta) == sorted(tb)
    diff = [k for k in ta if ta[k] != tb[k]]
    assert not diff, f"files differ: {diff}"


def _leftovers(dst: Path) -> list[Path]:
    return list(dst.parent.glob(f".{dst.name}.*"))


@pytest.fixture
def small_chunks(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(raw, "CHUNK_VECTORS", CHUNK)


@pytest.fixture(scope="module")
def raw_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    g = torch.Generator().manual_seed(0)
    docs = [torch.randn(int(n), 16, generator=g) for n in torch.randint(3, 20, (60,), generator=g)]
    return raw.write_raw(tmp_path_factory.mktemp("raw") / "src", docs, dtype="float16")


@pytest.fixture(scope="module")
def corrupt_src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    docs = [torch.randn(10, 16) for _ in range(40)]
    docs[25][3, 5] = float("nan")  # chunk 3 of 64-vector chunks; open() does not scan values, the chunk read does
    return raw.write_raw(tmp_path_factory.mktemp("bad") / "src", docs)


# ---------------------------------------------------------------------------------------------- no cluster


def test_missing_ray_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(MissingDependencyError, match=r"pip install 'unipruner\[ray\]'"):
        RayEngine(workers=1).connect()


def test_engine_options_are_checked() -> None:
    with pytest.raises(UniprunerError, match="engine ray"):
        make_engine("local", address="auto")
    with pytest.raises(UniprunerError, match="unknown engine"):
        make_engine("spark")
    with pytest.raises(UniprunerError, match="workers"):
        LocalEngine(0)
    with pytest.raises(UniprunerError, match="some resource"):
        RayEngine(cpus_per_worker=0)


def test_voyager_refuses_ray(tmp_path: Path) -> None:
    with pytest.raises(UniprunerError, match="monolithic"):
        compress(FIXTURES / "voyager" / "cranfield", tmp_path / "v", SPEC, engine="ray")
    assert not (tmp_path / "v").exists()


@pytest.mark.parametrize("fmt", ["plaid", "fast_plaid", "raw"])
def test_staged_pipeline_writes_what_the_sequential_writer_writes(fmt: str, raw_src: Path, tmp_path: Path,
                                                                  small_chunks: None) -> None:
    src = raw_src if fmt == "raw" else FIXTURES / fmt / "cranfield"
    staged = compress(src, tmp_path / "staged", SPEC)
    index = open_index(src)
    (tmp_path / "seq").parent.mkdir(exist_ok=True)
    _compress_sequential(index, index.info(), tmp_path / "seq", SPEC, None, 1, False, None)
    _same(tmp_path / "staged", tmp_path / "seq")
    assert staged.dst.n_vectors < staged.src.n_vectors and not _leftovers(tmp_path / "staged")


def test_ivf_counting_sort_equals_in_memory_ivf(tmp_path: Path) -> None:
    from unipruner.adapters.colbert.formats._codec import build_ivf_pairs, ivf_from_pairs, ivf_to_file

    g = torch.Generator().manual_seed(1)
    chunks = []
    off = 0
    for _ in range(5):
        doclens = torch.randint(1, 9, (30,), generator=g).numpy().astype(np.int64)
        codes = torch.randint(0, 17, (int(doclens.sum()),), generator=g)
        chunks.append(build_ivf_pairs(codes, doclens, off, None))
        off += doclens.size
    pids, lengths = ivf_from_pairs(chunks, 17)
    ivf, lens = ivf_to_file(chunks.__getitem__, 5, 17, tmp_path / "ivf.npy", np.int32, lambda _: 3)
    assert lens.tolist() == lengths.tolist()
    assert ivf[:-3].tolist() == pids.tolist() and ivf[-3:].tolist() == [0, 0, 0]


def test_local_workers_equal_serial(raw_src: Path, tmp_path: Path, small_chunks: None) -> None:
    compress(raw_src, tmp_path / "one", SPEC)
    res = compress(raw_src, tmp_path / "two", SPEC, workers=2)
    assert res.workers == 2 and len(res.worker_peak_rss) >= 1
    _same(tmp_path / "one", tmp_path / "two")


# ---------------------------------------------------------------------------------------------- the cluster


class _Wrapped(RayEngine):
    """A Ray engine whose per-item function is wrapped (fault injection); the wrappers below are shipped by value."""

    def __init__(self, wrap: Any, **kw: Any) -> None:
        super().__init__(**kw)
        self.wrap = wrap

    def map(self, fn: Any, context: Any, items: Any, on_result: Any) -> Any:
        return super().map(functools.partial(self.wrap, fn), context, items, on_result)


def _kill_once(marker: str, fn: Any, job: Any, item: Any) -> Any:
    """Chunk 2 SIGKILLs its own worker process, once (whoever removes the marker first)."""
    if item[0] == 2:
        try:
            os.remove(marker)
        except FileNotFoundError:
            pass
        else:
            os.kill(os.getpid(), signal.SIGKILL)
    return fn(job, item)


def _slow(seconds: float, log: str, fn: Any, job: Any, item: Any) -> Any:
    """Log (chunk, node) at the start, then take ``seconds`` longer."""
    import ray

    Path(log, f"{item[0]}-{ray.get_runtime_context().get_node_id()}").touch()
    time.sleep(seconds)
    return fn(job, item)


@pytest.fixture(scope="module")
def by_value(ray_cluster: Any) -> None:  # noqa: F811
    import ray

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


@pytest.fixture(scope="module")
def local_raw(raw_src: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    mp = pytest.MonkeyPatch()
    mp.setattr(raw, "CHUNK_VECTORS", CHUNK)
    try:
        dst = tmp_path_factory.mktemp("ref") / "local"
        compress(raw_src, dst, SPEC)
    finally:
        mp.undo()
    return dst


def test_ray_equals_local_byte_for_byte(ray_cluster: Any, raw_src: Path, local_raw: Path, tmp_path: Path,  # noqa: F811
                                        small_chunks: None) -> None:
    res = compress(raw_src, tmp_path / "ray", SPEC, engine=RayEngine(workers=2))
    assert (res.engine, res.workers, res.retries) == ("ray", 2, 0) and res.src.n_chunks == 12
    _same(tmp_path / "ray", local_raw)
    src = FIXTURES / "plaid" / "cranfield"
    compress(src, tmp_path / "plaid_local", SPEC)
    compress(src, tmp_path / "plaid_ray", SPEC, engine="ray", workers=2)  # joins the connected cluster
    _same(tmp_path / "plaid_ray", tmp_path / "plaid_local")
    glob = ReduceSpec("hidden_norm", ratio=0.5, scope="global")
    compress(raw_src, tmp_path / "g_local", glob)
    compress(raw_src, tmp_path / "g_ray", glob, engine=RayEngine(workers=2))
    _same(tmp_path / "g_ray", tmp_path / "g_local")


def test_worker_killed_once(ray_cluster: Any, by_value: None, raw_src: Path, local_raw: Path,  # noqa: F811
                            tmp_path: Path, small_chunks: None) -> None:
    marker = tmp_path / "kill-me"
    marker.touch()
    res = compress(raw_src, tmp_path / "dst", SPEC, engine=_Wrapped(functools.partial(_kill_once, str(marker)),
                                                                    workers=2))
    assert not marker.exists() and res.retries == 1
    _same(tmp_path / "dst", local_raw)


def test_node_removed_mid_job(ray_cluster: Any, by_value: None, raw_src: Path, local_raw: Path,  # noqa: F811
                              tmp_path: Path, small_chunks: None) -> None:
    log = tmp_path / "log"
    log.mkdir()
    eng = _Wrapped(functools.partial(_slow, 1.5, str(log)), workers=2)
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["res"] = compress(raw_src, tmp_path / "dst", SPEC, engine=eng)
        except BaseException as err:
            out["err"] = err

    nodes = {n.node_id: n for n in ray_cluster.worker_nodes}
    th = threading.Thread(target=run)
    th.start()
    try:
        victim = None
        deadline = time.time() + 60
        while victim is None and time.time() < deadline:
            for f in log.iterdir():
                victim = victim or nodes.get(f.name.split("-", 1)[1])
            time.sleep(0.05)
        assert victim is not None, "no chunk started on a worker node"
        ray_cluster.remove_node(victim)
        th.join(120)
        assert not th.is_alive(), "compress hung after losing a node"
    finally:
        th.join(120)
        add_node(ray_cluster)  # the next tests get two nodes again
    assert "err" not in out, out.get("err")
    assert out["res"].retries >= 1
    _same(tmp_path / "dst", local_raw)


def test_corrupt_chunk_fails_cleanly(ray_cluster: Any, corrupt_src: Path, tmp_path: Path,  # noqa: F811
                                     small_chunks: None) -> None:
    dst = tmp_path / "dst"
    res = CliRunner().invoke(app, ["colbert", "compress", str(corrupt_src), str(dst), "--engine", "ray",
                                   "--workers", "2", "--method", "first", "--keep", "2"])
    assert res.exit_code == 2, res.output
    assert "NaN" in " ".join(res.output.split())
    assert not dst.exists() and not _leftovers(dst)


_DRIVER = """
import functools, sys, time
import ray
from unipruner.adapters.colbert._compress import compress
from unipruner.adapters.colbert._methods import ReduceSpec
from unipruner.adapters.colbert.formats import raw
from unipruner.engines import RayEngine

def slow(fn, job, item):
    time.sleep(0.7)
    return fn(job, item)

class Slow(RayEngine):
    def map(self, fn, context, items, on_result):
        return super().map(functools.partial(slow, fn), context, items, on_result)

raw.CHUNK_VECTORS = int(sys.argv[4])
ray.init(address=sys.argv[1], log_to_driver=False)
compress(sys.argv[2], sys.argv[3], ReduceSpec("ward_cosine_pool", factor=2), engine=Slow(workers=2))
"""


def test_driver_killed_then_resume(ray_cluster: Any, raw_src: Path, local_raw: Path, tmp_path: Path,  # noqa: F811
                                   small_chunks: None) -> None:
    dst = tmp_path / "dst"
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, ray_cluster.address, str(raw_src), str(dst), str(CHUNK)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if len(list(tmp_path.glob(".dst.tmp-*/parts/*.json"))) >= 3:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(30)
    assert not dst.exists()
    (stage,) = tmp_path.glob(".dst.tmp-*")
    done = len(list(stage.glob("parts/*.json")))
    assert 3 <= done < 12
    res = compress(raw_src, dst, SPEC, engine=RayEngine(workers=2), resume=True)
    assert res.resumed_chunks >= 3
    _same(dst, local_raw)
    assert not _leftovers(dst)


def test_unschedulable_tasks_fail_fast(ray_cluster: Any, raw_src: Path, tmp_path: Path) -> None:  # noqa: F811
    t0 = time.perf_counter()
    with pytest.raises(UniprunerError, match="no node of the Ray cluster"):
        compress(raw_src, tmp_path / "dst", SPEC, engine=RayEngine(workers=1, cpus_per_worker=3))
    assert time.perf_counter() - t0 < 30 and not (tmp_path / "dst").exists() and not _leftovers(tmp_path / "dst")
