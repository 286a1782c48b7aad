"""The import rules of docs/architecture.md, read from the source with ast: layers point one way, no import
circle, no private name or private module imported across modules."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "weightgeo"

# Lowest first. A unit (a module, or a package with everything in it) may import itself and the units of lower
# layers; units of one layer are peers and never import each other.
LAYERS = [
    ["weightgeo.errors", "weightgeo._version", "weightgeo.defaults"],
    [
        "weightgeo.validation",
        "weightgeo.means",
        "weightgeo.devices",
        "weightgeo.distributed",
        "weightgeo.readahead",
        "weightgeo.outputs",
        "weightgeo.jsonfile",
        "weightgeo.memory",
        "weightgeo.interrupts",
        "weightgeo.progress",
    ],
    ["weightgeo.checkpoint", "weightgeo.linalg"],
    ["weightgeo.metrics", "weightgeo.cache", "weightgeo.selection"],
    ["weightgeo.render"],  # how results are shown (tables, grids, panels, SVG, HTML): reads reports, measures nothing
    ["weightgeo.plot"],  # the same panels painted with matplotlib
    ["weightgeo.report", "weightgeo.options"],
    ["weightgeo.stream", "weightgeo.stream_sparsity"],
    ["weightgeo.engine", "weightgeo.trajectory", "weightgeo.track_sparsity"],
    ["weightgeo.api", "weightgeo.track", "weightgeo.follow"],
    ["weightgeo.cli", "weightgeo.integrations", "weightgeo.train"],
    ["weightgeo.__main__"],
    ["weightgeo"],  # the package root: the flat public API
]
# Deprecated names forwarded upward by a module-level __getattr__ (PEP 562), each until the release named.
DEPRECATED_FORWARDS = {}


def _module_name(path: Path) -> str:
    parts = ("weightgeo",) + path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _resolve(module: str, is_package: bool, level: int, target: str | None) -> str:
    if level == 0:
        return target or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (level - 1)]
    return ".".join(base + ([target] if target else []))


def _imports(name: str) -> list[tuple[str, str | None, int, ast.AST | None]]:
    """(imported module, imported name or None, line, enclosing function) for every weightgeo import in ``name``."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    out = []

    def visit(node: ast.AST, func: ast.AST | None) -> None:
        for child in ast.iter_child_nodes(node):
            f = child if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)) else func
            if isinstance(child, ast.Import):
                for alias in child.names:
                    if alias.name.split(".")[0] == "weightgeo":
                        out.append((alias.name, None, child.lineno, f))
            elif isinstance(child, ast.ImportFrom):
                mod = _resolve(name, path.name == "__init__.py", child.level, child.module)
                if mod.split(".")[0] != "weightgeo":
                    continue
                for alias in child.names:
                    sub = f"{mod}.{alias.name}"
                    # `from pkg import submodule` imports the submodule
                    out.append((sub, None, child.lineno, f) if sub in MODULES else (mod, alias.name, child.lineno, f))
            visit(child, f)

    visit(tree, None)
    return out


def _unit(module: str) -> str:
    units = [u for layer in LAYERS for u in layer if module == u or module.startswith(u + ".")]
    assert units, f"{module} is in no layer of tests/test_architecture.py: add it where it belongs"
    return max(units, key=len)


def _layer(unit: str) -> int:
    return next(i for i, layer in enumerate(LAYERS) if unit in layer)


def _forward(src: str, dst: str, func: ast.AST | None) -> bool:
    return (src, _unit(dst)) in DEPRECATED_FORWARDS and getattr(func, "name", None) == "__getattr__"


def test_every_module_has_a_layer():
    for name in MODULES:
        _unit(name)


def test_layers_point_one_way():
    bad = []
    for src in MODULES:
        for dst, _, line, func in _imports(src):
            su, du = _unit(src), _unit(dst)
            if su == du or _forward(src, dst, func):
                continue
            if _layer(du) >= _layer(su):
                what = "a peer" if _layer(du) == _layer(su) else "a higher layer"
                bad.append(f"{src}:{line} imports {dst} ({what}: {du})")
    assert not bad, "\n".join(bad)


def test_no_private_import_across_modules():
    bad = []
    for src in MODULES:
        for dst, name, line, _ in _imports(src):
            if name is not None and name.startswith("_") and not name.startswith("__") and dst != src:
                bad.append(f"{src}:{line} imports the private name {name} from {dst}")
            # a private module (_files, _version) is for its own package only
            private = [i for i, part in enumerate(dst.split(".")) if part.startswith("_") and part != "__main__"]
            if private:
                owner = ".".join(dst.split(".")[: private[0]])
                if not (src == owner or src.startswith(owner + ".")):
                    bad.append(f"{src}:{line} imports the private module {dst} from outside {owner}")
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    graph: dict[str, set[str]] = {m: set() for m in MODULES}
    for src in MODULES:
        for dst, _, _, func in _imports(src):
            if dst in MODULES and dst != src and not _forward(src, dst, func):
                graph[src].add(dst)
    # a package imports its submodules and they import each other through it: that is not a circle
    state: dict[str, int] = {}
    stack: list[str] = []
    cycles = []

    def dfs(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if nxt.startswith(node + "."):
                continue  # the package's own submodule
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt) :] + [nxt]
                if not all(b.startswith(a + ".") or a.startswith(b + ".") for a, b in zip(cycle, cycle[1:])):
                    cycles.append(" -> ".join(cycle))
            elif nxt not in state:
                dfs(nxt)
        stack.pop()
        state[node] = 2

    for m in sorted(graph):
        if m not in state:
            dfs(m)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("src,dst", sorted(DEPRECATED_FORWARDS))
def test_deprecated_forwards_warn_and_work(src, dst):
    import importlib

    mod = importlib.import_module(src)
    names = mod._MOVED
    target = importlib.import_module(dst)
    for n in names:
        with pytest.warns(DeprecationWarning, match=n):
            assert getattr(mod, n) is getattr(target, n)


def test_the_rules_catch_violations(tmp_path, monkeypatch):
    """The checks themselves can fail: an upward, a private and a circular import are each reported."""
    fake = tmp_path / "weightgeo"
    (fake / "linalg").mkdir(parents=True)
    (fake / "__init__.py").write_text("")
    (fake / "errors.py").write_text("from .validation import check_k\n")  # up, and a circle with validation
    (fake / "validation.py").write_text("from .errors import WeightgeoError\n")
    (fake / "linalg" / "__init__.py").write_text("")
    (fake / "linalg" / "svd.py").write_text("from ..engine import compare\nfrom ..validation import _x\n")
    here = sys.modules[__name__]
    monkeypatch.setattr(here, "SRC", fake)
    monkeypatch.setattr(here, "MODULES", {_module_name(p): p for p in sorted(fake.rglob("*.py"))})
    with pytest.raises(AssertionError, match="weightgeo.errors:1 imports weightgeo.validation"):
        test_layers_point_one_way()
    with pytest.raises(AssertionError, match="private name _x"):
        test_no_private_import_across_modules()
    with pytest.raises(AssertionError, match="weightgeo.errors -> weightgeo.validation -> weightgeo.errors"):
        test_no_import_circle()


def test_the_version_is_written_once():
    """pyproject reads the version from weightgeo/_version.py (the one place), and the changelog keeps a section."""
    root = SRC.parents[1]
    text = (root / "pyproject.toml").read_text()
    project = text[text.index("[project]") : text.index("\n[", text.index("[project]"))]
    assert re.search(r'^dynamic = \["version"\]', project, re.M) and not re.search(r"^version = ", project, re.M)
    assert 'version = { attr = "weightgeo._version.__version__" }' in text
    from setuptools.config.pyprojecttoml import read_configuration

    from weightgeo._version import __version__

    assert read_configuration(root / "pyproject.toml", expand=True)["project"]["version"] == __version__
    assert "## [Unreleased]" in (root / "CHANGELOG.md").read_text()
