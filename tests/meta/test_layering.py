"""The dependency rule of DESIGN.md ("Inside core/"), checked on the source with ``ast``.

Every import of a hybridize module counts: module-level, function-local and annotation-only
(``TYPE_CHECKING``) ones alike, as any of them is a dependency a reader must follow.
``from hybridize import faults`` is resolved to the submodule ``hybridize.faults``;
``from hybridize import hookimpl`` / ``__version__`` is an import of the package root, a foundation.

Layers, lowest first (a module may import its own layer and lower ones, never a higher one):

=====  ============  ==========================================================================
rank   layer         modules
=====  ============  ==========================================================================
0      foundations   errors, faults, atomic_io, the package root's ``hookimpl`` / ``__version__``
1      registry      registry/*, hookspecs (the hook specs name the registry's types)
2      contracts     linear, evaluate, export, ops/* (the reference kernels and nn blocks are documented
                     public helpers for variant plugins, so they sit beside the contracts)
3      model         model/*
4      training      training/*
5      distill       distill/*
6      selection     selection/*
7      recipes       recipes/*
8      testing       testing/* (conformance suites and tiny models for plugin authors)
9      entry points  cli, __main__, and the package root as an importer (a lazy facade)
=====  ============  ==========================================================================

Within a layer imports must not form a cycle; across the whole of core/ neither.

Plugins (plugins/**) import only the contracts and the documented public helpers in
``PLUGIN_API``, and their own plugin package (``plugins/evals/harness.py`` may import
``hybridize.plugins.evals.network``), never another plugin package's modules.

Size: no module under core/ or plugins/ is over 400 lines, no function over 60 (STYLE.md 6).
"""
from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
PACKAGE = "hybridize"

LAYERS = ["foundations", "registry", "contracts", "model", "training", "distill", "selection", "recipes",
          "testing", "entry points"]
_BY_NAME = {
    "hybridize.errors": "foundations", "hybridize.faults": "foundations", "hybridize.atomic_io": "foundations",
    "hybridize": "foundations",  # as an importee: hookimpl / __version__ only (checked below)
    "hybridize.hookspecs": "registry",
    "hybridize.linear": "contracts", "hybridize.evaluate": "contracts", "hybridize.export": "contracts",
    "hybridize.cli": "entry points", "hybridize.__main__": "entry points",
}
_BY_PACKAGE = {
    "hybridize.registry": "registry", "hybridize.ops": "contracts", "hybridize.model": "model",
    "hybridize.training": "training", "hybridize.distill": "distill", "hybridize.selection": "selection",
    "hybridize.recipes": "recipes", "hybridize.testing": "testing",
}
#: what ``from hybridize import NAME`` may take from the package root (the rest of its names are lazy
#: re-exports for users, not for the package's own modules)
ROOT_NAMES = {"hookimpl", "__version__"}

#: what plugins may import besides their own plugin package: the contracts, and documented public helpers
PLUGIN_API = {
    "hybridize",                    # hookimpl
    "hybridize.errors",             # the error types plugins raise
    "hybridize.hookspecs",
    "hybridize.linear",             # AttentionSpec, LinearAttention, TeacherAttentionWeights
    "hybridize.evaluate",           # EvalTarget, EvalResult, Evaluator
    "hybridize.export",             # Exporter, ExportCheck, Converted
    "hybridize.registry.configs",   # ComponentRef, config helpers
    "hybridize.selection.contract",  # Probe, Needs, ScoreContext, LayerSelector, StopCriterion
    # documented public helpers
    "hybridize.model.teacher",      # load_teacher / inspect_teacher / decoder_layers (hybridize.load_teacher)
    "hybridize.training.data",      # load_documents, tokenize_documents, pack
    "hybridize.training.losses",    # chunked_ce and the distillation losses
}
PLUGIN_API_PACKAGES = ("hybridize.ops",)  # reference kernels and shared nn blocks
#: plugin imports outside PLUGIN_API still to be removed (file -> modules); an entry that is no longer
#: needed fails the test, so the list only shrinks
PLUGIN_EXCEPTIONS = {
    "plugins/scorers/proxies.py": {"hybridize.training.loop"},   # autocast_for
    "plugins/evals/heldout.py": {"hybridize.distill.stages"},    # HeldoutEvaluator
}

MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    parts = [PACKAGE, *rel.parts[1:]] if rel.parts[0] == "core" else [PACKAGE, "plugins", *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _files() -> list[Path]:
    return sorted((ROOT / "core").rglob("*.py")) + sorted((ROOT / "plugins").rglob("*.py"))


MODULES = {_module_name(p): p for p in _files()}


def _imports(name: str, path: Path) -> Iterator[tuple[str, int, str | None]]:
    """(imported module, line, name taken from the package root or None) for each hybridize import."""
    base = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == PACKAGE or alias.name.startswith(PACKAGE + "."):
                    yield alias.name, node.lineno, None
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                module = ".".join(base[: len(base) - node.level + 1] + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            if module != PACKAGE and not module.startswith(PACKAGE + "."):
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                if sub in MODULES:
                    yield sub, node.lineno, None
                else:
                    yield module, node.lineno, alias.name if module == PACKAGE else None


def layer_of(module: str) -> str:
    if module in _BY_NAME:
        return _BY_NAME[module]
    for package, layer in _BY_PACKAGE.items():
        if module == package or module.startswith(package + "."):
            return layer
    raise AssertionError(f"{module} has no layer in tests/meta/test_layering.py; add it to the table")


def _core_edges() -> dict[str, set[str]]:
    """Import graph of core/, the package root's own (lazy, facade) imports left out."""
    edges: dict[str, set[str]] = {}
    for name, path in MODULES.items():
        if name.startswith("hybridize.plugins") or name == PACKAGE:
            continue
        edges[name] = {m for m, _, _ in _imports(name, path) if m != name}
    return edges


def test_every_core_module_has_a_layer():
    for name in _core_edges():
        layer_of(name)


def test_no_upward_imports():
    bad = []
    for name, path in MODULES.items():
        if name.startswith("hybridize.plugins") or name == PACKAGE:
            continue
        own = LAYERS.index(layer_of(name))
        for module, line, root_name in _imports(name, path):
            if module == PACKAGE and root_name is not None and root_name not in ROOT_NAMES:
                bad.append(f"{path.relative_to(ROOT)}:{line} takes {root_name!r} from the package root; "
                           "import it from its module")
            elif module.startswith("hybridize.plugins"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports the plugin {module}")
            elif LAYERS.index(layer_of(module)) > own:
                bad.append(f"{path.relative_to(ROOT)}:{line} ({layer_of(name)}) imports {module} "
                           f"({layer_of(module)})")
    assert not bad, "\n".join(bad)


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in edges:
                continue
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
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycles():
    cycles = _cycles(_core_edges())
    assert not cycles, "import cycles:\n" + "\n".join(" <-> ".join(c) for c in cycles)


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def _plugin_allowed(module: str, own_package: str) -> bool:
    if module == own_package or module.startswith(own_package + "."):
        return True
    return module in PLUGIN_API or any(module == p or module.startswith(p + ".") for p in PLUGIN_API_PACKAGES)


def test_plugins_import_only_the_contracts():
    bad, used = [], {}
    for name, path in MODULES.items():
        if not name.startswith("hybridize.plugins.") and name != "hybridize.plugins":
            continue
        rel = path.relative_to(ROOT).as_posix()
        parts = name.split(".")
        own = ".".join(parts[:3]) if len(parts) > 2 else "hybridize.plugins.<none>"  # hybridize.plugins.<package>
        for module, line, root_name in _imports(name, path):
            if module == PACKAGE and root_name is not None and root_name not in ROOT_NAMES:
                bad.append(f"{rel}:{line} takes {root_name!r} from the package root")
            elif not _plugin_allowed(module, own):
                if module in PLUGIN_EXCEPTIONS.get(rel, ()):
                    used.setdefault(rel, set()).add(module)
                else:
                    bad.append(f"{rel}:{line} imports {module}, which is not a contract or public helper")
    assert not bad, "\n".join(bad)
    assert used == PLUGIN_EXCEPTIONS, "PLUGIN_EXCEPTIONS lists imports no plugin makes any more; remove them"


def _sized() -> list[Path]:
    return _files()


@pytest.mark.parametrize("path", _sized(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_module_size(path):
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_MODULE_LINES, f"{path.relative_to(ROOT)} has {lines} lines (at most {MAX_MODULE_LINES})"


@pytest.mark.parametrize("path", _sized(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_function_size(path):
    long = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            n = node.end_lineno - node.lineno + 1
            if n > MAX_FUNCTION_LINES:
                long.append(f"{node.name} ({n} lines, line {node.lineno})")
    assert not long, f"{path.relative_to(ROOT)}: functions over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def test_imports_are_resolved_to_modules(tmp_path):
    src = tmp_path / "x.py"
    src.write_text("from hybridize import faults, hookimpl\n"
                   "def f():\n    from hybridize.training import parallel as p\n    import hybridize.model.cache\n"
                   "from . import teacher\n")
    found = {(m, n) for m, _, n in _imports("hybridize.model.surgery", src)}
    assert found == {("hybridize.faults", None), ("hybridize", "hookimpl"), ("hybridize.training.parallel", None),
                     ("hybridize.model.cache", None), ("hybridize.model.teacher", None)}
    assert layer_of("hybridize.ops.gla") == "contracts" and layer_of("hybridize.selection.fanout") == "selection"


def _entry_point_modules() -> set[str]:
    import tomllib

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return set(project["entry-points"]["hybridize"].values())


def test_no_plugin_imports_another_plugin():
    """Each entry point is a plugin a user may block; another plugin importing it would break with it.

    Helpers that several plugins share belong to the package's ``__init__`` or to :mod:`hybridize.ops`.
    """
    plugins = _entry_point_modules()
    assert "hybridize.plugins.linear_attn.gdn" in plugins and "hybridize.plugins.linear_attn.gla" in plugins
    bad = [f"{path.relative_to(ROOT).as_posix()}:{line} imports the plugin {module}"
           for name, path in MODULES.items() if name.startswith("hybridize.plugins.")
           for module, line, _ in _imports(name, path) if module in plugins and module != name]
    assert not bad, "\n".join(bad)
