"""The import graph of kneetf, read from the source with `ast`: data flows one way and no
module imports itself back through a circle.

The rules, and the layer table they read:

- Every import of a kneetf module counts: at the top of a file or inside a function (a lazy
  import is an import), under `if TYPE_CHECKING:` too. A package `__init__`'s lazy table
  `_LAZY = {name: "kneetf.<module>"}` counts as imports of those modules by the package.
- Each unit (a top-level module or package of kneetf) has a rank in `LAYERS`. A module may
  import its own unit and units of a lower or the same rank, never a higher one ("an arrow
  up the flow"). Rank 0 holds the base modules, which anyone may import and which import
  only each other.
- `kneetf/__init__.py` is the public facade: it imports base modules eagerly and may name
  modules of any layer in its `_LAZY` table; no kneetf module imports from it (a
  `from kneetf import metrics` names the module `kneetf.metrics`, which is fine).
- No circle between modules.
- kneetf never imports `tools/` or `tests/`; `tools/` may import anything of kneetf.

A failure prints the offending edges as `file:line  importer -> imported (why)`.
"""
from __future__ import annotations

import ast
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

#: (stage, units): the flow io -> preprocess -> data -> models -> training -> inference ->
#: evaluate / export / api -> client -> cli, on top of the base modules.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("base", ("config", "errors", "version", "presets", "protocol", "faults", "workers")),
    ("io", ("io",)),
    ("preprocess", ("preprocess",)),
    ("data", ("data",)),
    ("models", ("models", "metrics", "baselines", "viz")),
    ("training", ("training",)),
    ("inference", ("inference",)),
    ("evaluate / export / api", ("evaluate", "export", "api")),
    ("client", ("client",)),
    ("cli", ("cli",)),
]
RANK = {unit: rank for rank, (_, units) in enumerate(LAYERS) for unit in units}
STAGE = {unit: stage for stage, units in LAYERS for unit in units}
FACADE = ""  # the unit of kneetf/__init__.py


@dataclass(frozen=True)
class Edge:
    source: str   # importing module, e.g. "kneetf.export.savedmodel"
    target: str   # imported module, e.g. "kneetf.protocol"
    file: str
    line: int
    lazy_table: bool = False  # from a package's `_LAZY` table

    def __str__(self) -> str:
        return f"{self.file}:{self.line}  {self.source} -> {self.target}"


def module_files(root: Path, package: str) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `root/package` (a package's
    `__init__.py` is the package's own name)."""
    out = {}
    for path in sorted((root / package).rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The longest known module that `name` (dotted) is or lies in."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports(root: Path, package: str) -> tuple[list[Edge], list[tuple[str, str, int]]]:
    """(edges between the package's modules, foreign imports (module, name, line)) of every
    import statement anywhere in each file, plus the `_LAZY` tables of `__init__` files."""
    modules = module_files(root, package)
    edges: list[Edge] = []
    foreign: list[tuple[str, str, int]] = []
    for module, path in modules.items():
        rel = str(path.relative_to(root))
        is_package = path.name == "__init__.py"
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=rel)
        for node in ast.walk(tree):
            names: list[tuple[str, int]] = []
            if isinstance(node, ast.Import):
                names = [(a.name, node.lineno) for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _absolute(node, module, is_package)
                # `from pkg import sub` imports the module pkg.sub when there is one
                names = [(f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base, node.lineno)
                         for a in node.names]
            elif (isinstance(node, ast.Assign) and is_package and isinstance(node.value, ast.Dict)
                  and any(isinstance(t, ast.Name) and t.id == "_LAZY" for t in node.targets)):
                for value in node.value.values:
                    if isinstance(value, ast.Constant) and isinstance(value.value, str):
                        target = _resolve(value.value, modules)
                        if target:
                            edges.append(Edge(module, target, rel, value.lineno, lazy_table=True))
                continue
            for name, line in names:
                if name == package or name.startswith(package + "."):
                    target = _resolve(name, modules)
                    if target and target != module:
                        edges.append(Edge(module, target, rel, line))
                else:
                    foreign.append((module, name, line))
    return sorted(set(edges), key=lambda e: (e.file, e.line, e.target)), foreign


def unit_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else FACADE


def layer_violations(edges: list[Edge], rank: dict[str, int]) -> list[str]:
    """Edges that point up the flow, or into / out of the facade against its rules."""
    out = []
    for e in edges:
        src, dst = unit_of(e.source), unit_of(e.target)
        for unit in (src, dst):
            if unit != FACADE and unit not in rank:
                out.append(f"{e}  (unit {unit!r} has no layer: add it to LAYERS)")
        if src not in rank and src != FACADE or dst not in rank and dst != FACADE:
            continue
        if dst == FACADE:
            out.append(f"{e}  (import the defining module, not the kneetf facade)")
        elif src == FACADE:
            if not e.lazy_table and rank[dst] != 0:
                out.append(f"{e}  (the facade imports only base modules eagerly; name others in _LAZY)")
        elif src != dst and rank[dst] > rank[src]:
            out.append(f"{e}  ({src} may not import {dst}: {STAGE.get(dst, dst)} comes after "
                       f"{STAGE.get(src, src)})")
    return out


def cycles(edges: list[Edge]) -> list[list[Edge]]:
    """The edges inside each circle of the module graph (strongly connected components)."""
    graph: dict[str, set[str]] = {}
    for e in edges:
        graph.setdefault(e.source, set()).add(e.target)
        graph.setdefault(e.target, set())
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []

    def visit(v: str) -> None:  # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(component)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [[e for e in edges if e.source in c and e.target in c] for c in components]


def _report(title: str, lines: list[str]) -> str:
    return title + ":\n  " + "\n  ".join(lines)


# === The project ===

@pytest.fixture(scope="module")
def graph() -> tuple[list[Edge], list[tuple[str, str, int]]]:
    return imports(REPO, "kneetf")


def test_every_unit_has_a_layer(graph) -> None:
    units = {unit_of(m) for m in module_files(REPO, "kneetf")} - {FACADE}
    assert units <= set(RANK), f"units without a layer in LAYERS: {sorted(units - set(RANK))}"


def test_imports_run_down_the_flow(graph) -> None:
    edges, _ = graph
    bad = layer_violations(edges, RANK)
    assert not bad, _report("imports up the flow", bad)


def test_no_import_cycles(graph) -> None:
    edges, _ = graph
    found = cycles(edges)
    assert not found, "\n".join(_report("circle", [str(e) for e in c]) for c in found)


def test_kneetf_never_imports_tools_or_tests(graph) -> None:
    _, foreign = graph
    local = {p.stem for folder in ("tools", "tests") for p in (REPO / folder).rglob("*.py")}
    bad = [f"{m}:{line} imports {name}" for m, name, line in foreign
           if name.split(".")[0] in {"tools", "tests"} | local]
    assert not bad, _report("kneetf imports tools/ or tests/", bad)


# === The checker itself, on a small tree with each kind of fault ===

def _tree(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_checker_finds_arrows_up_the_flow_cycles_and_facade_imports(tmp_path: Path) -> None:
    _tree(tmp_path, {
        "__init__.py": "from pkg import low\n_LAZY = {'Thing': 'pkg.high.thing'}\n",
        "base.py": "",
        "low/__init__.py": "",
        "low/a.py": "from pkg.base import X\n\ndef f():\n    from pkg.high import thing  # lazy: still counts\n",
        "low/b.py": "from . import c\n",
        "low/c.py": "import pkg.low.b\n",
        "high/__init__.py": "_LAZY = {'g': 'pkg.high.thing'}\n",
        "high/thing.py": "from pkg.low import a\nfrom pkg import Thing\n",
    })
    edges, _ = imports(tmp_path, "pkg")
    rank = {"base": 0, "low": 1, "high": 2}
    bad = layer_violations(edges, rank)
    assert any("pkg.low.a -> pkg.high.thing" in b and "low may not import high" in b for b in bad), bad
    assert any("pkg.high.thing -> pkg" in b and "facade" in b for b in bad), bad
    assert any(b.startswith("pkg/__init__.py:1  pkg -> pkg.low ") for b in bad), bad  # eager, not base
    assert not any("pkg.high -> pkg.high.thing" in b for b in bad)  # a package's own lazy table
    assert not any("pkg.low.a -> pkg.base" in b for b in bad)
    circles = [sorted({e.source for e in c}) for c in cycles(edges)]
    assert ["pkg.low.b", "pkg.low.c"] in circles, circles
