"""The rule of direction (DESIGN.md): orchestrator -> workloads -> backends, never backwards.

Every import in the three packages (module level, inside functions, under TYPE_CHECKING alike)
is read with ``ast``; an import of a higher layer from a lower one fails the test with the file,
the line and the module imported. Import cycles inside ``workloads/serving`` fail it too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Higher layers may import lower ones; the number is the layer's height.
LAYERS = {"orchestrator": 2, "workloads": 1, "backends": 0}


def module_name(path: Path) -> str:
    """Dotted module name of a source file under the repository root."""
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _type_checking_only(tree: ast.AST) -> set[int]:
    """ids of the import nodes under ``if TYPE_CHECKING:`` (annotations only, never run)."""
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skipped


def imported_modules(path: Path, runtime_only: bool = False) -> list[tuple[int, str]]:
    """(line, absolute module name) of every import in the file (relative ones resolved);
    ``runtime_only`` leaves out those under ``if TYPE_CHECKING:``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    skipped = _type_checking_only(tree) if runtime_only else set()
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, base] if base else anchor)
            found.append((node.lineno, base))
            # `from pkg import submodule` imports the submodule too.
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def sources(*packages: str) -> list[Path]:
    """Every Python file of the given top-level packages."""
    return sorted(p for package in packages for p in (ROOT / package).rglob("*.py"))


def layering_violations() -> list[str]:
    """'file:line imports module' for each import of a higher layer."""
    bad = []
    for path in sources(*LAYERS):
        own = LAYERS[path.relative_to(ROOT).parts[0]]
        for line, module in imported_modules(path):
            top = module.split(".")[0]
            if top in LAYERS and LAYERS[top] > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {module}")
    return sorted(set(bad))


def test_no_module_imports_against_the_rule_of_direction() -> None:
    assert layering_violations() == []


def test_the_check_sees_a_backwards_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # The same check on a tree with one backend that imports a workload must report exactly it.
    for package in LAYERS:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "backends" / "leaky.py").write_text("def f():\n    from workloads.serving import x\n")
    (tmp_path / "workloads" / "fine.py").write_text("from backends import leaky\n")
    (tmp_path / "orchestrator" / "rel.py").write_text("from . import spec\n")
    monkeypatch.setattr(__import__(__name__, fromlist=["ROOT"]), "ROOT", tmp_path)
    assert layering_violations() == [
        "backends/leaky.py:2 imports workloads.serving",
        "backends/leaky.py:2 imports workloads.serving.x",
    ]


def import_graph(package: str) -> dict[str, set[str]]:
    """Module -> the modules of ``package`` it imports when it runs (type-only imports are no
    dependency at run time; submodules named by `from p import m` count)."""
    files = sources(*package.split(".")[:1])
    modules = {module_name(p): p for p in files if module_name(p).startswith(package)}
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        graph[name] = {m for _, m in imported_modules(path, runtime_only=True) if m in modules and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of the graph (as a path that returns to its start), or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


@pytest.mark.parametrize("package", ["workloads.serving", "backends.kvcache"])
def test_no_import_cycles_between_modules(package: str) -> None:
    # A package's __init__ re-exporting its submodules is not a cycle of ideas: leave it out.
    graph = {m: {d for d in deps if not _is_parent_init(d, m)} for m, deps in import_graph(package).items()}
    assert find_cycle(graph) is None


def _is_parent_init(dep: str, module: str) -> bool:
    return module.startswith(dep + ".")


def test_the_cycle_finder_finds_a_cycle() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
