"""The import layers of the package (from the source, with ast): data flows one way, no cycles."""
from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "pcdistill"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, set[str]]:
    """module -> the pcdistill modules it imports anywhere in its body (function-level imports included)."""
    graph = {}
    for path in SRC.rglob("*.py"):
        name = _module_name(path)
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
                found |= {base} | {f"{base}.{a.name}" for a in node.names}
        graph[name] = {m for m in found if m.startswith("pcdistill")}
    modules = set(graph)
    # `from pkg import name`: the module pkg.name when there is one, else pkg itself
    return {m: {d if d in modules else d.rsplit(".", 1)[0] for d in deps} for m, deps in graph.items()}


def _within(graph, package):
    return {m: deps for m, deps in graph.items() if m == package or m.startswith(package + ".")}


def test_engine_imports_no_task():
    graph = _imports()
    for module, deps in _within(graph, "pcdistill.engine").items():
        bad = {d for d in deps if d.startswith(("pcdistill.tasks.", "pcdistill.detection", "pcdistill.lm",
                                                "pcdistill.hf", "pcdistill.distiller"))}
        assert not bad, f"{module} imports {bad}: the engine reaches tasks only through pcdistill.tasks.build_task"


def test_lower_layers_do_not_import_upper_ones():
    graph = _imports()
    rules = {
        "pcdistill.losses": ("pcdistill.engine", "pcdistill.tasks", "pcdistill.data", "pcdistill.models",
                             "pcdistill.detection", "pcdistill.lm", "pcdistill.hf", "pcdistill.evidence"),
        "pcdistill.models": ("pcdistill.data", "pcdistill.engine", "pcdistill.tasks", "pcdistill.evidence"),
        "pcdistill.data": ("pcdistill.models", "pcdistill.engine", "pcdistill.tasks", "pcdistill.losses"),
        "pcdistill.tasks": ("pcdistill.engine", "pcdistill.evidence", "pcdistill.cli"),
        "pcdistill.detection": ("pcdistill.engine", "pcdistill.tasks", "pcdistill.evidence"),
    }
    for package, banned in rules.items():
        for module, deps in _within(graph, package).items():
            bad = {d for d in deps if d.startswith(banned)}
            assert not bad, f"{module} imports {bad}"


def test_no_import_cycles_between_modules():
    graph = _imports()
    modules = set(graph)
    edges = {m: {d for d in deps if d in modules and d != m} for m, deps in graph.items()}
    # a package importing its own submodules (an __init__ re-export) is not a cycle
    edges = {m: {d for d in ds if not d.startswith(m + ".")} for m, ds in edges.items()}
    state: dict[str, int] = {}

    def visit(node, path):
        state[node] = 1
        for nxt in edges[node]:
            if state.get(nxt) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
