"""kill -9 a `hybridize run` at every stage, `--resume`, and get exactly the uninterrupted result.

The run is killed by ``HYBRIDIZE_FAULT`` (``os.kill(getpid(), SIGKILL)`` at a named point, see
hybridize.faults): one chain of processes, each resuming the previous one's directory and killed at
the next point, ends in a run whose result.json (minus wall time) and weights equal a reference run's.

The reference is a real ``hybridize`` console-script subprocess. The chain's processes are forked from
one warm Python process that has already imported torch and transformers, each running
``hybridize.cli.main(argv)`` (what the console script runs): the same kill -9, without paying ~5 s of
imports ten times.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from hybridize.atomic_io import MANIFEST, IntegrityError, verify_manifest
from hybridize.model.hybrid import load_hybrid
from hybridize.testing.models import save_tiny_teacher

pytestmark = pytest.mark.skipif(not hasattr(os, "fork"), reason="the kill chain forks its processes (POSIX)")

TEXT = "\n\n".join(f"record {i}: key {chr(97 + i % 26)}{chr(97 + (3 * i) % 26)} has value {i % 10}." for i in range(60))

# 4 layers, K=1, kl-greedy-add in 2 groups of 2 probes; every stage has 4 steps of 4 blocks x 16 tokens,
# checkpoints every 2 steps, 2 evaluation windows of 2 probe steps.
CONFIG = {
    "linear_attention": {"name": "gdn"}, "softmax_layers": 1, "device": "cpu", "seed": 3,
    "selection": {"selector": {"name": "kl-greedy-add"}, "stop": {"name": "fixed-budget"}, "probe_tokens": 256,
                  "eval_every": 2, "probe_group_size": 2},
    "distill": {"stage1_tokens": 256, "stage2_tokens": 256, "batch_size": 4, "eval_blocks": 2, "checkpoint_every": 2,
                "eval_every": 2},
}

WARM = textwrap.dedent("""
    import json, os, sys
    import hybridize.cli, hybridize.recipes.run, hybridize.selection.engine, hybridize.model.hybrid, datasets, matplotlib
    from transformers import LlamaForCausalLM
    matplotlib.use("Agg")
    import matplotlib.pyplot
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            os.environ.pop("HYBRIDIZE_FAULT", None)
            os.environ.update(job["env"])
            fd = os.open(job["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
            os.dup2(fd, 1), os.dup2(fd, 2)
            code = 70
            try:
                code = hybridize.cli.main(job["argv"])
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        rc = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        print(json.dumps({"returncode": rc}), flush=True)
""")


class WarmProcess:
    """A Python process with the heavy imports done that forks one child per `hybridize` command."""

    def __init__(self, env: dict[str, str]):
        self.proc = subprocess.Popen([sys.executable, "-c", WARM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def run(self, argv: list[str], log: Path, fault: str | None = None) -> int:
        job = {"argv": argv, "log": str(log), "env": {"HYBRIDIZE_FAULT": fault} if fault else {}}
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, f"the warm process died: {log.read_text()[-2000:] if log.exists() else ''}"
        return json.loads(line)["returncode"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def ckpt_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=True)["step"]


def result_without_wall_time(out: Path) -> dict:
    result = json.loads((out / "result.json").read_text())
    result.pop("wall_seconds")
    result.pop("phases")  # wall times, and the tokens trained since the last resume
    return result


def _after_stage1_kill(out):
    sel = out / "checkpoints" / "selection"
    assert ckpt_step(sel / "stage1.pt") == 2 and not (sel / "probes.pt").exists()


def _after_mid_probe_kill(out):  # window 1: group 1 stepped twice, group 2 once
    assert ckpt_step(out / "checkpoints" / "selection" / "probes.pt") == 0


def _after_between_probes_kill(out):  # window 2: group 1 trained, group 2 not
    assert ckpt_step(out / "checkpoints" / "selection" / "probes.pt") == 2


def _after_window_kill(out):
    state = torch.load(out / "checkpoints" / "selection" / "probes.pt", weights_only=True)
    assert state["step"] == 4 and state["done"] and not (out / "checkpoints" / "final").exists()


def _after_selection_kill(out):
    assert not (out / "checkpoints" / "final").exists()


def _after_stage2_kill(out):
    assert ckpt_step(out / "checkpoints" / "final" / "stage2.pt") == 2


def _after_checkpoint_write_kill(out):  # the step-4 checkpoint is written under its temporary name only
    final = out / "checkpoints" / "final"
    assert ckpt_step(final / "stage2.pt") == 2 and list(final.glob(".stage2.pt.tmp*"))
    assert json.loads((final / MANIFEST).read_text())["files"]["stage2.pt"]["previous"]


def _after_save_model_kill(out):  # weights written, manifest not: never taken for a complete hybrid
    tmp = out / ".model.tmp"
    assert (tmp / "model.safetensors").exists() and not (out / "model").exists()
    with pytest.raises(IntegrityError) as exc:
        load_hybrid(tmp)
    assert str(exc.value) == (
        f"saved hybrid {str(tmp)!r} has no {MANIFEST}: its save did not finish (or it was not written by hybridize); "
        "save it again with hybridize.save_hybrid (or rerun the run with --resume)"
    )


def _after_save_result_kill(out):
    verify_manifest(out / "model")
    assert not (out / "result.json").exists() and not (out / MANIFEST).exists()


#: (HYBRIDIZE_FAULT of one process, what its killed directory must look like), in pipeline order
CHAIN = [
    ("stage1-step:3", _after_stage1_kill),  # shared stage 1, one step past its step-2 checkpoint
    ("probe-step:5", _after_mid_probe_kill),  # mid-probe, inside the first window
    ("probe-group:3", _after_between_probes_kill),  # between probes: one group done, the next not started
    ("probe-window:1", _after_window_kill),  # after the last window's checkpoint
    ("selection-done:1", _after_selection_kill),  # between selection and the final hybrid
    ("stage2-step:3", _after_stage2_kill),  # final distillation, one step past its checkpoint
    ("checkpoint-write:2", _after_checkpoint_write_kill),  # while writing a checkpoint
    ("save-model:1", _after_save_model_kill),  # while saving the hybrid
    ("save-result:1", _after_save_result_kill),  # hybrid saved, result.json not yet
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("crash")
    (root / "corpus.txt").write_text(TEXT)
    cfg = {"teacher": str(save_tiny_teacher(root / "teacher", n_layer=4)), "data": {"train": str(root / "corpus.txt"), "seq_len": 16},
           **CONFIG}
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    return root


def test_kill_9_at_every_stage_then_resume_equals_uninterrupted(setup):
    root = setup
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    env.pop("HYBRIDIZE_FAULT", None)
    hybridize = shutil.which("hybridize") or pytest.skip("the hybridize console script is not installed")
    ref = subprocess.Popen([hybridize, "run", str(root / "run.yaml"), "--out", str(root / "ref"), "--quiet"],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # runs beside the chain
    warm = WarmProcess(env)
    out = root / "chain"
    try:
        for i, (fault, check) in enumerate(CHAIN):
            argv = ["run", str(root / "run.yaml"), "--out", str(out), "--quiet"] + (["--resume"] if i else [])
            rc = warm.run(argv, root / f"log{i}.txt", fault)
            assert rc == -9, f"{fault}: expected SIGKILL, got {rc}: {(root / f'log{i}.txt').read_text()[-3000:]}"
            check(out)
        rc = warm.run(["run", str(root / "run.yaml"), "--out", str(out), "--quiet", "--resume"], root / "log_final.txt")
        assert rc == 0, (root / "log_final.txt").read_text()[-3000:]
    finally:
        warm.close()
    _, err = ref.communicate(timeout=300)
    assert ref.returncode == 0, err[-3000:]

    assert result_without_wall_time(out) == result_without_wall_time(root / "ref")
    a, b = load_file(out / "model" / "model.safetensors"), load_file(root / "ref" / "model" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    verify_manifest(out / "model")
    verify_manifest(out, what="run directory")
    assert not list(out.rglob(".*"))  # no temporary leftovers, also none from the killed checkpoint write


def test_resume_with_a_different_config_is_refused(setup, tmp_path, capsys):
    from hybridize.cli import main

    out = tmp_path / "out"
    out.mkdir()
    (out / "run-config.json").write_text(json.dumps({"seed": 3}))
    assert main(["run", str(setup / "run.yaml"), "--out", str(out), "--quiet", "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"hybridize: error: --resume of {str(out)!r} with a different config: data, device, distill, ")
    assert err.rstrip().endswith("resume with the same config and --set values, or use --overwrite / another --out")
