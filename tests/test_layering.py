"""The import structure: packages and lottery's layers import only downwards, and nothing in a cycle.

Every import statement counts, also those inside functions (a function-local import hides a cycle
from Python, not from the design). The walk reads source with `ast`; nothing is imported.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "etl", "train", "lottery", "deploy", "bigticket")  # lowest first

# lottery's layers, lowest first: each may import itself and those before it; vae stands beside
# points (it may use prune only).
LOTTERY_LAYERS = ("prune", "points", "grid", "report")
LOTTERY_TOP = "lottery"  # lottery/cli.py, lottery/report_cli.py, lottery/__main__.py
VAE_ALLOWED = {"prune", "vae"}

# The only modules that may use Keras' private API (keras.src.*): named seams with their own tests.
KERAS_INTERNAL_SEAMS = {"lottery.prune.keras_graph", "train.keras_internals"}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _sources(roots) -> dict[str, Path]:
    out = {}
    for root in roots:
        for path in sorted((REPO / root).rglob("*.py")):
            out[_module_name(path)] = path
    return out


def _imports(path: Path, module: str) -> set[str]:
    """Absolute names of every module `path` imports, wherever the statement stands."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[:len(base) - (node.level - 1)]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            names.add(prefix)
            # `from pkg import mod` imports the module pkg.mod when it is one
            names.update(f"{prefix}.{alias.name}" for alias in node.names)
    return names


def _graph(roots=PACKAGES) -> dict[str, set[str]]:
    sources = _sources(roots)
    graph = {}
    for module, path in sources.items():
        targets = set()
        for name in _imports(path, module):
            # resolve to the longest known module prefix (a name may be a function in a module)
            parts = name.split(".")
            for i in range(len(parts), 0, -1):
                candidate = ".".join(parts[:i])
                if candidate in sources:
                    if candidate != module:
                        targets.add(candidate)
                    break
        graph[module] = targets
    return graph


def _lottery_layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) >= 3 or (len(parts) == 2 and parts[1] in LOTTERY_LAYERS + ("vae",)):
        return parts[1]
    return LOTTERY_TOP


def _violation(src: str, dst: str) -> str | None:
    src_pkg, dst_pkg = src.split(".")[0], dst.split(".")[0]
    if PACKAGES.index(dst_pkg) > PACKAGES.index(src_pkg):
        return f"{src} imports {dst}: {dst_pkg} is above {src_pkg}"
    if src_pkg == dst_pkg == "lottery":
        a, b = _lottery_layer(src), _lottery_layer(dst)
        if a == "vae" or b == "vae":
            if a == "vae" and b not in VAE_ALLOWED:
                return f"{src} imports {dst}: the VAE study may use lottery.prune only"
            if b == "vae" and a not in ("vae", LOTTERY_TOP):
                return f"{src} imports {dst}: only the CLI may use the VAE study"
            return None
        order = LOTTERY_LAYERS + (LOTTERY_TOP,)
        if b == LOTTERY_TOP and a != LOTTERY_TOP:
            return f"{src} imports {dst}: the lottery CLI is the top layer"
        if order.index(b) > order.index(a):
            return f"{src} imports {dst}: lottery.{b} is above lottery.{a}"
    return None


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_imports_point_down_the_package_and_layer_order():
    graph = _graph()
    bad = sorted(filter(None, (_violation(src, dst) for src, dsts in graph.items() for dst in dsts)))
    assert not bad, "\n".join(bad)


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_packages_and_benchmarks_never_import_the_tests():
    offenders = sorted(m for m, dsts in _graph(PACKAGES + ("bench", "tests")).items()
                       if not m.startswith("tests") and any(d.startswith("tests") for d in dsts))
    assert offenders == []


def test_keras_internals_are_used_only_by_their_named_seams():
    users = set()
    for module, path in _sources(PACKAGES).items():
        if any(name == "keras.src" or name.startswith("keras.src.") for name in _imports(path, module)):
            users.add(module)
    assert users <= KERAS_INTERNAL_SEAMS, sorted(users - KERAS_INTERNAL_SEAMS)


# The checker itself must be able to fail: a cycle, an upward import, a layer breach.
def test_the_checker_finds_a_cycle_an_upward_import_and_a_layer_breach():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _violation("train.run", "lottery.points.recipe")
    assert _violation("etl.job", "train.data")
    assert _violation("lottery.prune.masks", "lottery.points.task")
    assert _violation("lottery.points.oneshot", "lottery.grid.plan")
    assert _violation("lottery.grid.plan", "lottery.cli")
    assert _violation("lottery.vae.study", "lottery.points.recipe")
    assert _violation("lottery.grid.plan", "lottery.points.task") is None
    assert _violation("lottery.cli", "lottery.vae.cli") is None
    assert _violation("lottery.report.build", "train.checkpoints") is None


@pytest.mark.parametrize("source, expected", [
    ("from . import masks\n", {"lottery.prune", "lottery.prune.masks"}),
    ("def f():\n    from ..grid import plan\n", {"lottery.grid", "lottery.grid.plan"}),
    ("import common.atomic\n", {"common.atomic"}),
])
def test_relative_and_function_local_imports_are_resolved(tmp_path, source, expected):
    path = tmp_path / "x.py"
    path.write_text(source)
    assert _imports(path, "lottery.prune.x") == expected


MAX_MODULE_LINES = 450  # a module longer than a few screens has more than one job


def test_no_package_module_is_longer_than_a_few_screens():
    long = {m: n for m, p in _sources(PACKAGES).items()
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_MODULE_LINES}
    assert long == {}
