"""Meta-tests: hooks documented and tested, modules import cleanly, `import hybridize` stays light."""
from __future__ import annotations

import inspect
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import hybridize
import hybridize.plugins
from hybridize import hookspecs

TESTS = Path(__file__).resolve().parents[1]
HOOKS = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("hybridize_")]
MODULES = sorted(
    m.name
    for pkg in (hybridize, hybridize.plugins)
    for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")
    if not m.name.endswith("__main__")
)


def test_hooks_found():
    assert len(HOOKS) >= 9


@pytest.mark.parametrize("name", HOOKS)
def test_hook_is_documented(name):
    fn = getattr(hookspecs, name)
    doc = inspect.getdoc(fn) or ""
    assert doc.splitlines()[0].strip(), f"{name} needs a summary line"
    for param in inspect.signature(fn).parameters:
        assert f":param {param}:" in doc, f"{name} must document :param {param}:"
    assert ":returns:" in doc and ".. versionadded::" in doc


@pytest.mark.parametrize("name", HOOKS)
def test_hook_has_a_test(name):
    sources = "\n".join(p.read_text() for p in TESTS.rglob("test_*.py"))
    assert f"def test_hook_{name}(" in sources, f"add a test named test_hook_{name}"


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_warnings(module):
    proc = subprocess.run([sys.executable, "-W", "error", "-c", f"import {module}"], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def test_import_hybridize_is_light():
    code = "import sys, hybridize; hybridize.get_plugin_manager; print(sorted(m for m in ('torch','transformers','fla','lm_eval','datasets','matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_cli_plugins_does_not_import_fla():
    code = "import sys; from hybridize.cli import main; main(['plugins','--json']); print('fla' in sys.modules, file=sys.stderr)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stderr.strip().endswith("False")
