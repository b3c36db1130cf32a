from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: real teachers and data (absent on a user's machine): $HYBRIDIZE_SHARED, else ../shared beside the checkout
SHARED_ENV = "HYBRIDIZE_SHARED"
SHARED = Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared").resolve()

#: the tiny corpus of the command-line tests (test_preflight, test_bad_input, test_out_dir, test_resume_changes)
TINY_TEXT = "\n\n".join(f"record {i}: key {chr(97 + i % 26)} has value {i % 10}." for i in range(40))


def shared_path(*parts: str) -> Path:
    """``SHARED/parts``, or skip naming the missing path and the variable that points elsewhere."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent (real teachers and data; set {SHARED_ENV} to the shared folder, "
                    f"default ../shared beside the checkout)")
    return path


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The shared folder of real teachers and data; the test skips when it is absent."""
    return shared_path()


def base(files: Path) -> dict:
    """The smallest valid `hybridize run` config on the ``files`` fixture's teacher and corpus."""
    return {"teacher": str(files / "teacher"), "data": {"train": str(files / "corpus.txt"), "seq_len": 16}, "softmax_layers": 1,
            "device": "cpu", "selection": {"selector": "uniform"}, "distill": {"stage1_tokens": 64, "stage2_tokens": 64, "batch_size": 2}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A folder with ``corpus.txt`` (TINY_TEXT) and a 4-layer tiny ``teacher``; one per test module."""
    from hybridize.testing.models import save_tiny_teacher

    root = tmp_path_factory.mktemp("tiny")
    (root / "corpus.txt").write_text(TINY_TEXT)
    save_tiny_teacher(root / "teacher", n_layer=4)
    return root


@pytest.fixture
def pm(hybridize_pm):
    """A fresh plugin manager with the installed plugins (built-ins included)."""
    return hybridize_pm


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models run fastest on one thread, and a shared 2-core CI box only contends with more."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


#: a ``sitecustomize`` that makes hybridize unimportable: what stock tools see on a machine without hybridize
_NO_HYBRIDIZE = '''\
import importlib.abc, sys


class _NoHybridize(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "hybridize" or name.startswith("hybridize."):
            raise ModuleNotFoundError(f"No module named {name!r} (hybridize is blocked in this test)")
        return None


sys.meta_path.insert(0, _NoHybridize())
'''


def run_without_hybridize(argv: list[str], tmp_path: Path, *, timeout: int = 300):
    """Run ``argv`` (a Python process) where ``import hybridize`` fails, offline, with its own module cache."""
    import subprocess

    site = tmp_path / "no_hybridize_site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(_NO_HYBRIDIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "HF_MODULES_CACHE": str(tmp_path / "hf_modules"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run(argv, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=timeout)
