"""The import graph keeps the module map honest: stages share their run context through fp8mix.context, never
through the pipeline; no module takes another module's private names; the graph (imports inside functions
included) has no cycle; plans and reports read run files, not the model family's code."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "fp8mix"


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports() -> dict[str, list[tuple[str, list[str]]]]:
    """module -> [(imported module, names taken from it)], every import statement of the file."""
    out = {}
    for path in SRC.rglob("*.py"):
        mod = _module_name(path)
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        found = []
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                found += [(a.name, []) for a in node.names if a.name.startswith("fp8mix")]
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")
                    base = base[:len(base) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                if not target.startswith("fp8mix"):
                    continue
                names = [a.name for a in node.names]
                submodules = [f"{target}.{n}" for n in names if (SRC.parent / f"{target}.{n}".replace(".", "/")).
                              with_suffix(".py").is_file() or (SRC.parent / f"{target}.{n}".replace(".", "/")).is_dir()]
                found += [(s, []) for s in submodules] or [(target, names)]
        out[mod] = found
    return out


def test_no_stage_imports_the_pipeline():
    users = [m for m, deps in _imports().items() for d, _ in deps if d == "fp8mix.pipeline"]
    assert users == ["fp8mix.cli"], users


def test_no_private_name_crosses_a_module():
    """A private name stays in its module, also inside a package: what two modules share is public in one."""
    bad = []
    for mod, deps in _imports().items():
        for dep, names in deps:
            if dep != mod:
                bad += [f"{mod} takes {dep}.{n}" for n in names if n.startswith("_") and not n.startswith("__")]
    assert not bad, bad


def test_import_graph_has_no_cycle():
    graph = {m: {d for d, _ in deps if d in _imports()} for m, deps in _imports().items()}
    graph = {m: {d for d in deps if d != m} for m, deps in graph.items()}
    state: dict[str, int] = {}

    def visit(m, path):
        state[m] = 1
        for d in graph.get(m, ()):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(path[path.index(d):] + [d]))
            if d not in state:
                visit(d, path + [d])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])


def test_plan_and_report_read_run_files_only():
    for mod, deps in _imports().items():
        if mod.startswith(("fp8mix.plan", "fp8mix.report")) and not mod.endswith(".stage"):
            assert not [d for d, _ in deps if d.startswith("fp8mix.models")], mod
