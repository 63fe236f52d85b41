"""The package's import layering, read from the source with `ast` (nothing is imported).

Arrows point down the process diagram (DESIGN.md §1-2): the front-end (`engine/`,
`entrypoints/`) imports the EngineCore's side, never the reverse; the router imports neither
torch nor the engine; and no two modules import each other, directly or round a circle.
Imports inside functions count too (a lazy import is still a dependency).
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PACKAGE_ROOT = Path(__file__).resolve().parent.parent / "lmserve"

# Rooms of the EngineCore side that must not reach into the front-end.
ENGINE_SIDE = ("core", "worker", "model", "attention", "sample")
FRONT_END = ("engine", "entrypoints")
# What the router (a separate, torch-free process) may import of lmserve besides itself.
ROUTER_MAY_IMPORT = (
    "lmserve", "lmserve.envs", "lmserve.entrypoints.openai.errors", "lmserve.prefix_hash",
    "lmserve.engine.chat",  # kv-aware routing renders chat exactly as the engine does
    "lmserve.gguf_tokenizer",  # --tokenizer model.gguf: the engines' tokenizer, no weights
    "lmserve.dashboard", "lmserve.dashboard.sources",  # GET /dashboard (prometheus_client only)
)  # fmt: skip


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the package."""
    modules = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


def imported_modules(name: str, path: Path, modules: dict[str, Path]) -> Iterator[str]:
    """The package's modules that `name` imports: `from a.b import c` names a.b.c when that is
    a module, else a.b; relative imports are resolved."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name in modules)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            for alias in node.names:
                child = f"{target}.{alias.name}"
                if child in modules:
                    yield child
                elif target in modules:
                    yield target


def import_graph(root: Path = PACKAGE_ROOT) -> dict[str, set[str]]:
    modules = module_files(root)
    return {
        name: set(imported_modules(name, path, modules)) - {name} for name, path in modules.items()
    }


def import_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    for start in sorted(graph):
        if start in index:
            continue
        work = [(start, iter(sorted(graph[start])))]
        index[start] = low[start] = len(index)
        stack.append(start)
        on_stack.add(start)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(sorted(component))
    return cycles


def room(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    return import_graph()


def imports_across(graph, importer, imported) -> list[str]:
    """`module -> target` for every import whose sides the two predicates pick."""
    return sorted(
        f"{module} -> {target}"
        for module, targets in graph.items()
        if importer(module)
        for target in targets
        if imported(target)
    )


def test_engine_side_never_imports_the_front_end(graph):
    assert (
        imports_across(graph, lambda m: room(m) in ENGINE_SIDE, lambda t: room(t) in FRONT_END)
        == []
    )


def test_core_never_imports_the_worker(graph):
    assert imports_across(graph, lambda m: room(m) == "core", lambda t: room(t) == "worker") == []


def test_router_imports_only_itself_and_light_shared_modules(graph):
    outside = lambda t: room(t) != "router" and t not in ROUTER_MAY_IMPORT  # noqa: E731
    assert imports_across(graph, lambda m: room(m) == "router", outside) == []


def test_no_import_cycles(graph):
    assert import_cycles(graph) == []


# ---- the checks themselves catch what they are for ------------------------------------------
def _write_package(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "lmserve"
    for name, source in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        for parent in [path.parent, *path.parent.parents]:
            if parent == tmp_path:
                break
            (parent / "__init__.py").touch()
        path.write_text(source)
    return root


def test_cycle_finder_reports_a_circle_through_a_lazy_and_a_relative_import(tmp_path):
    root = _write_package(
        tmp_path,
        {
            "a.py": "from lmserve.b import thing\n",
            "b.py": "def f():\n    from . import c\n",
            "c.py": "import lmserve.a\n",
            "d.py": "from lmserve import a\n",
        },
    )
    graph = import_graph(root)
    assert graph["lmserve.b"] == {"lmserve.c"}
    assert import_cycles(graph) == [["lmserve.a", "lmserve.b", "lmserve.c"]]


def test_graph_sees_a_core_module_importing_the_front_end(tmp_path):
    root = _write_package(
        tmp_path,
        {"core/sched.py": "from lmserve.engine.messages import X\n", "engine/messages.py": ""},
    )
    assert import_graph(root)["lmserve.core.sched"] == {"lmserve.engine.messages"}
