"""The package's import graph (an ast walk of every module): no circle, no adapter importing another,
dependencies pointing one way (cli -> adapters -> hosts -> methods -> select/reduce -> scorers), and no
host library imported by the core at all or by ``unipruner.hosts`` at module load."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "unipruner"

#: lower layers never import higher ones; a module may import its own layer and the ones below.
#: ``select`` (Budget, Schedule, topk) and ``_merge`` (MergePlan) are value types every layer speaks, so they
#: sit at the bottom with the input checks: the greedy selectors among the scorers (DivPrune, DART) take a
#: Budget and ToMe's matching returns a MergePlan.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("unipruner.errors", "unipruner._validate", "unipruner._ops", "unipruner._threads", "unipruner.models",
     "unipruner._merge", "unipruner.select", "unipruner._draw"),
    ("unipruner.scorers", "unipruner._pooling", "unipruner.reduce"),
    ("unipruner.methods",),
    ("unipruner.hosts", "unipruner.engines"),
    ("unipruner.adapters",),
    ("unipruner.demo", "unipruner.cli", "unipruner.__main__", "unipruner"),
)
HOST_LIBRARIES = ("transformers", "diffusers", "timm", "sentence_transformers", "langchain_core", "langchain",
                  "llama_index", "haystack", "faiss", "voyager", "ray")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path, module: str) -> list[tuple[str, bool]]:
    """``(imported module, at module load?)`` for every import outside ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, top: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                continue
            inner = top and not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((a.name, top) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = module.split(".") if is_pkg else module.split(".")[:-1]
                    base = base[: len(base) - (child.level - 1)]
                    target = ".".join(base + ([child.module] if child.module else []))
                else:
                    target = child.module or ""
                if child.module is not None:
                    out.append((target, top))
                for a in child.names:  # "from . import x" may name a submodule
                    out.append((f"{target}.{a.name}", top))
            visit(child, inner)

    visit(tree, True)
    return out


def _graph() -> dict[str, list[tuple[str, bool]]]:
    mods = {_module_name(p): p for p in ROOT.rglob("*.py")}
    graph: dict[str, list[tuple[str, bool]]] = {}
    for name, path in mods.items():
        edges = []
        for target, top in _imports(path, name):
            # resolve to the longest known module prefix (a name imported from a module is not a module)
            parts = target.split(".")
            while parts and ".".join(parts) not in mods:
                parts.pop()
            if parts:
                resolved = ".".join(parts)
                if resolved != name:
                    edges.append((resolved, top))
            else:
                edges.append((target, top))
        graph[name] = edges
    return graph


GRAPH = _graph()


def _layer(module: str) -> int:
    best, depth = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > depth:
                best, depth = i, len(p)
    return best


def test_every_module_has_a_layer() -> None:
    missing = sorted(m for m in GRAPH if _layer(m) < 0)
    assert not missing, f"modules outside the layer table: {missing}"


def test_no_import_circle() -> None:
    internal = {m: sorted({t for t, _ in e if t in GRAPH}) for m, e in GRAPH.items()}
    # a package's __init__ re-exporting its submodules is not a circle: drop edges into one's own package
    for m in internal:
        internal[m] = [t for t in internal[m] if not m.startswith(t + ".")]
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in internal[m]:
            if state.get(t) == 1:
                cycle = [*stack[stack.index(t):], t]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if t not in state:
                dfs(t)
        stack.pop()
        state[m] = 2

    for m in sorted(internal):
        if m not in state:
            dfs(m)


def test_no_adapter_imports_another() -> None:
    bad = []
    for m, edges in GRAPH.items():
        if not m.startswith("unipruner.adapters."):
            continue
        mine = m.split(".")[2]
        for t, _ in edges:
            if t.startswith("unipruner.adapters.") and t.split(".")[2] != mine:
                bad.append(f"{m} -> {t}")
    assert not bad, bad


def test_dependencies_point_one_way() -> None:
    bad = [f"{m} (layer {_layer(m)}) -> {t} (layer {_layer(t)})"
           for m, edges in GRAPH.items() for t, _ in edges
           if t in GRAPH and _layer(t) > _layer(m)]
    assert not bad, bad


def test_core_never_imports_a_host_library() -> None:
    core = [m for m in GRAPH if _layer(m) <= LAYERS.index(("unipruner.methods",))]
    bad = [f"{m} -> {t}" for m in core for t, _ in GRAPH[m] if t.split(".")[0] in HOST_LIBRARIES]
    assert not bad, bad


def test_hosts_package_imports_no_host_library() -> None:
    """``import unipruner.hosts`` (and its host-free modules) stays torch-only; a module that subclasses a
    host class (the cache, a ``DynamicCache``) imports its library when it is itself imported."""
    import subprocess
    import sys

    code = ("import sys, unipruner, unipruner.methods, unipruner.hosts, unipruner.hosts.patching; "
            f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {HOST_LIBRARIES!r}); "
            "assert not bad, bad")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr


def test_only_the_scoped_helper_sets_process_wide_thread_counts() -> None:
    """``torch.set_num_threads`` / ``omp_set_num_threads`` appear only in ``unipruner/_threads.py``."""
    bad = []
    for path in ROOT.rglob("*.py"):
        if path.name == "_threads.py" and path.parent == ROOT:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in ("set_num_threads", "omp_set_num_threads",
                                                                  "set_num_interop_threads"):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.attr}")
    assert not bad, bad
