"""Meta-tests: hooks documented and tested, modules import cleanly, `import hybridize` stays light."""
from __future__ import annotations

import inspect
import json
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


#: One interpreter for every import check (one per module cost ~1 min of start-ups on CI). It first checks
#: that `import hybridize` and `hybridize plugins` stay light (so nothing else is imported yet), then imports
#: each module under ``-W error`` after dropping every hybridize module from ``sys.modules``, so each one
#: imports alone as far as the project goes (third-party packages stay cached; one that failed to import is
#: not cached, so its warning is raised again for every module that needs it). Prints one JSON report.
_IMPORT_PROBE = r"""
import contextlib, io, json, sys, traceback, warnings
report = {}
HEAVY = ('torch', 'transformers', 'fla', 'lm_eval', 'datasets', 'matplotlib')
import hybridize
hybridize.get_plugin_manager
report['light'] = sorted(m for m in HEAVY if m in sys.modules)
from hybridize.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(['plugins', '--json'])
report['cli_fla'] = 'fla' in sys.modules
report['modules'] = {}
for module in sys.argv[1:]:
    for name in [n for n in sys.modules if n == 'hybridize' or n.startswith('hybridize.')]:
        del sys.modules[name]
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        try:
            __import__(module)
            report['modules'][module] = None
        except BaseException:
            report['modules'][module] = traceback.format_exc()[-2000:]
print(json.dumps(report))
"""


@pytest.fixture(scope="module")
def import_report():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_PROBE, *MODULES],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("module", MODULES)
def test_module_imports_without_warnings(module, import_report):
    assert module in import_report["modules"], f"{module} was not imported"
    assert import_report["modules"][module] is None, import_report["modules"][module]


def test_import_hybridize_is_light(import_report):
    assert import_report["light"] == []


def test_cli_plugins_does_not_import_fla(import_report):
    assert import_report["cli_fla"] is False
