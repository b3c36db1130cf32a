"""Packaging: pyproject's explicit package list matches the tree, and the built wheel works outside the repo."""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import tomllib
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
SETUPTOOLS = PYPROJECT["tool"]["setuptools"]


def tree_packages() -> set[str]:
    """Every directory with an ``__init__.py`` under each package-dir root, as a dotted package name."""
    found = set()
    for name, rel in SETUPTOOLS["package-dir"].items():
        root = ROOT / rel
        for init in root.rglob("__init__.py"):
            parts = init.parent.relative_to(root).parts
            if "__pycache__" in parts or any(p.endswith(".egg-info") for p in parts):
                continue
            found.add(".".join((name, *parts)))
    return found


def test_package_list_matches_the_tree():
    listed = set(SETUPTOOLS["packages"])
    missing = sorted(tree_packages() - listed)
    assert not missing, f"add to [tool.setuptools] packages in pyproject.toml (the wheel would lack them): {missing}"
    stale = sorted(listed - tree_packages())
    assert not stale, f"listed in pyproject.toml but no such directory with an __init__.py: {stale}"
    assert len(SETUPTOOLS["packages"]) == len(listed), "a package is listed twice"


def _build_backend_missing() -> str | None:
    """Why `pip wheel --no-build-isolation` cannot work offline here, or None."""
    try:
        import setuptools  # noqa: F401
    except ImportError:
        return "setuptools (the build backend) is not installed"
    try:  # setuptools < 70.1 needs the `wheel` package for bdist_wheel
        from setuptools.command import bdist_wheel  # noqa: F401
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            return "building a wheel needs the `wheel` package with this setuptools (python -m pip install wheel)"
    return None


@pytest.mark.slow
def test_wheel_installs_and_imports_outside_the_repo(tmp_path):
    reason = _build_backend_missing()
    if reason:
        pytest.skip(reason)
    # built from a copy: setuptools writes build/ and *.egg-info into the tree it builds, never into the repo
    source = tmp_path / "src"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE", "MANIFEST.in", "setup.py", "setup.cfg"):
        if (ROOT / name).is_file():
            shutil.copy2(ROOT / name, source / name)
    for rel in set(SETUPTOOLS["package-dir"].values()):
        shutil.copytree(ROOT / rel, source / rel, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    dist = tmp_path / "dist"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", ".", "--no-deps", "--no-build-isolation", "--no-index",
                            "-q", "-w", str(dist)], cwd=source, capture_output=True, text=True, timeout=300)
    if build.returncode and "invalid command 'bdist_wheel'" in build.stderr:
        pytest.skip("the build backend cannot make wheels here (install the `wheel` package)")
    if build.returncode and "invalid pyproject.toml config: `project.license`" in build.stderr:
        import setuptools

        pytest.skip(f"setuptools {setuptools.__version__} predates the SPDX `license` string of pyproject.toml "
                    "(setuptools>=77 reads it; --no-build-isolation builds with the installed one)")
    assert build.returncode == 0, build.stderr[-3000:]
    wheels = list(dist.glob("hybridize-*.whl"))
    assert len(wheels) == 1, sorted(p.name for p in dist.iterdir())

    env_dir = tmp_path / "venv"
    venv.EnvBuilder(system_site_packages=True, with_pip=False).create(env_dir)
    py = env_dir / ("Scripts/python.exe" if os.name == "nt" else "bin/python")
    # torch, transformers ... come from the system site-packages; where this interpreter is itself a venv, its
    # site-packages are added as plain paths (their .pth files, an editable hybridize's finder among them, not run)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    probe = subprocess.run([str(py), "-c", "import json, sys, sysconfig; print(json.dumps([sysconfig.get_paths()['purelib'], sys.path]))"],
                           capture_output=True, text=True, check=True, env=env, cwd=tmp_path)
    purelib, new_path = json.loads(probe.stdout)
    extra = [p for p in site.getsitepackages() if p not in new_path]
    if extra:
        (Path(purelib) / "_hybridize_test_parent_site.pth").write_text("\n".join(extra) + "\n")
    install = subprocess.run([sys.executable, "-m", "pip", "--python", str(py), "install", "--no-deps", "--no-index",
                              "--ignore-installed", "-q", str(wheels[0])],
                             capture_output=True, text=True, timeout=300, env=env)
    assert install.returncode == 0, install.stderr[-3000:]

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    packages = sorted(SETUPTOOLS["packages"])
    code = ("import importlib, sys\n"
            f"for name in {packages!r}:\n"
            "    m = importlib.import_module(name)\n"
            f"    assert (m.__file__ or '').startswith({str(env_dir)!r}), (name, m.__file__)\n"
            "print('ok', len(sys.argv))\n")
    proc = subprocess.run([str(py), "-c", code], cwd=outside, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
    cli = env_dir / ("Scripts/hybridize.exe" if os.name == "nt" else "bin/hybridize")
    proc = subprocess.run([str(cli), "plugins"], cwd=outside, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "gdn" in proc.stdout and "kl_greedy" in proc.stdout, proc.stdout[-3000:]
