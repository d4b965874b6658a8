"""The layout rules of shared/DESIGN.md, checked from the sources: no import cycles between
rtkit modules (module-level and function-level imports alike) and no `_private` name imported
from another module (tests included)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"engines": "rtkit.engines", "export": "rtkit.export", "runtime": "rtkit.runtime",
            "datasets": "rtkit.datasets", "train": "rtkit.train", "eval": "rtkit.eval", "cli": "rtkit.cli",
            "experiment": "rtkit.experiment"}


def _modules() -> dict[str, Path]:
    mods = {}
    for folder, pkg in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            rel = path.relative_to(ROOT / folder).with_suffix("")
            parts = [p for p in rel.parts if p != "__init__"]
            mods[".".join([pkg, *parts])] = path
    return mods


def _imports(path: Path, name: str, modules: dict[str, Path]) -> list[tuple[str, list[str], int]]:
    """(imported rtkit module, names imported from it, line) for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                if a.name.startswith("rtkit."):
                    found.append((a.name, [], node.lineno))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[:len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("rtkit"):
                continue
            names = [a.name for a in node.names]
            # "from rtkit.x import y" where y is a module counts as importing rtkit.x.y
            sub = [f"{mod}.{n}" for n in names if f"{mod}.{n}" in modules]
            found.append((mod, [n for n in names if f"{mod}.{n}" not in modules], node.lineno))
            found += [(s, [], node.lineno) for s in sub]
    return found


def _graph():
    modules = _modules()
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for mod, _, _ in _imports(path, name, modules):
            if mod in modules and mod != name:
                graph[name].add(mod)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles():
    graph = _graph()
    # A package's __init__ re-exporting its own modules lazily is not a cycle of the layout.
    for name in graph:
        if (ROOT / name.split(".")[1] / "__init__.py").exists():
            graph[name] = {m for m in graph[name]
                           if not (m == ".".join(name.split(".")[:2]) and name.count(".") >= 2)}
    assert _cycles(graph) == []


def test_no_private_names_imported_across_modules():
    modules = _modules()
    files = dict(modules)
    for path in sorted((ROOT / "tests").glob("*.py")):
        files[f"tests.{path.stem}"] = path
    for path in sorted((ROOT / "benchmarks").glob("*.py")):
        files[f"benchmarks.{path.stem}"] = path
    bad = []
    for name, path in files.items():
        for mod, names, line in _imports(path, name, modules):
            for n in names:
                if n.startswith("_") and not n.startswith("__") and mod != name:
                    bad.append(f"{path.relative_to(ROOT)}:{line} imports {n} from {mod}")
    assert bad == []


def test_the_check_sees_a_cycle():
    """The cycle finder itself works (a test that could not fail would prove nothing)."""
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == [["a", "b", "c"]]
