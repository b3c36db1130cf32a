"""Issue 17 part A, the output directory: `--overwrite` deletes only what hybridize wrote; a bad `--out` is one line.

Each case pins the exact line after `hybridize: error: ` and checks that nothing of the user's was touched.
"""
from __future__ import annotations

import copy
import errno
from pathlib import Path

import pytest
import yaml

from hybridize.cli import main
from hybridize.recipes.rundir import MARKER

from conftest import base  # tests/conftest.py: the tiny config on its fixture `files`
from test_bad_input import one_thread  # noqa: F401 - fixture (tests/unit is on sys.path)

USER_FILES = {"data.txt": "my data", "notes.md": "# notes", "cfg.yaml": "a: 1"}


def cli(tmp_path, cfg, capsys, out, *extra, command="run"):
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    code = main([command, str(tmp_path / "run.yaml"), "--out", str(out), "--quiet", *extra])
    return code, capsys.readouterr().err


def error_line(err):
    """The last line, which must be the error (after any progress output), with its prefix removed."""
    line = err.rstrip("\n").split("\n")[-1]
    assert line.startswith("hybridize: error: "), err
    return line[len("hybridize: error: "):]


def user_folder(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    for name, text in USER_FILES.items():
        (path / name).write_text(text)
    return path


def untouched(path: Path) -> bool:
    return all((path / n).read_text() == t for n, t in USER_FILES.items())


def test_empty_out_is_never_the_current_directory(files, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(user_folder(tmp_path / "cwd"))
    for extra in ((), ("--overwrite",)):
        code, err = cli(tmp_path, base(files), capsys, "", *extra)
        assert code == 2
        assert error_line(err) == ("option '--out' must name a directory (an empty value is never taken as the current "
                                   "directory); got ''")
    assert untouched(tmp_path / "cwd") and sorted(p.name for p in (tmp_path / "cwd").iterdir()) == sorted(USER_FILES)


def test_overwrite_refuses_a_folder_hybridize_did_not_create(files, tmp_path, capsys):
    out = user_folder(tmp_path / "project")
    code, err = cli(tmp_path, base(files), capsys, out, "--overwrite")
    assert code == 2 and untouched(out)
    assert error_line(err) == (f"--overwrite refused: output directory {str(out)!r} was not created by hybridize (it has "
                               f"no {MARKER}); delete it yourself if it is really disposable, or choose another --out")


def test_overwrite_refuses_a_run_directory_holding_foreign_files(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(tmp_path, base(files), capsys, out)[0] == 0
    user_folder(out)
    (out / "checkpoints" / "mine.txt").write_text("keep")
    code, err = cli(tmp_path, base(files), capsys, out, "--overwrite")
    assert code == 2 and untouched(out) and (out / "checkpoints" / "mine.txt").is_file() and (out / "model").is_dir()
    assert error_line(err) == (f"--overwrite refused: output directory {str(out)!r} holds files hybridize did not write "
                               "(cfg.yaml, checkpoints/mine.txt, data.txt, notes.md); move them away or choose another --out")


def test_overwrite_refuses_the_teacher_and_the_data(files, tmp_path, capsys):
    teacher = files / "teacher"
    before = sorted(p.name for p in teacher.iterdir())
    code, err = cli(tmp_path, base(files), capsys, teacher, "--overwrite")
    assert code == 2 and sorted(p.name for p in teacher.iterdir()) == before
    assert error_line(err) == (f"--overwrite refused: output directory {str(teacher)!r} is or holds the teacher (run field "
                               f"'teacher') {str(teacher)!r}; give --out a directory of its own")
    cfg = copy.deepcopy(base(files))
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    (data_dir / "corpus.txt").write_text((files / "corpus.txt").read_text())
    cfg["data"]["train"] = str(data_dir / "corpus.txt")
    code, err = cli(tmp_path, cfg, capsys, data_dir, "--overwrite")
    assert code == 2 and (data_dir / "corpus.txt").is_file()
    assert error_line(err) == (f"--overwrite refused: output directory {str(data_dir)!r} is or holds the data (data field "
                               f"'train') {str(data_dir / 'corpus.txt')!r}; give --out a directory of its own")


def test_overwrite_refuses_the_current_directory_its_parents_and_home(files, tmp_path, capsys, monkeypatch):
    cwd = user_folder(tmp_path / "work" / "here")
    monkeypatch.chdir(cwd)
    for out in (".", str(tmp_path / "work")):
        code, err = cli(tmp_path, base(files), capsys, out, "--overwrite")
        assert code == 2 and untouched(cwd)
        assert error_line(err) == (f"--overwrite refused: output directory {out!r} is the current directory or one of its "
                                   "parents; give --out a directory of its own")
    home = user_folder(tmp_path / "home")
    monkeypatch.setenv("HOME", str(home))
    code, err = cli(tmp_path, base(files), capsys, home, "--overwrite")
    assert code == 2 and untouched(home)
    assert error_line(err) == (f"--overwrite refused: output directory {str(home)!r} is a home directory (or the "
                               "file-system root); give --out a directory of its own")


def test_resume_with_overwrite_is_refused(files, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(tmp_path, base(files), capsys, out)[0] == 0
    result = (out / "result.json").read_text()
    code, err = cli(tmp_path, base(files), capsys, out, "--resume", "--overwrite")
    assert code == 2 and (out / "result.json").read_text() == result
    assert error_line(err) == (f"options '--resume' and '--overwrite' cannot be combined: --resume continues the run in "
                               f"{str(out)!r}, --overwrite deletes it; pass one of them")


def test_resume_refuses_a_folder_that_holds_no_run(files, tmp_path, capsys):
    out = user_folder(tmp_path / "project")
    code, err = cli(tmp_path, base(files), capsys, out, "--resume")
    assert code == 2 and sorted(p.name for p in out.iterdir()) == sorted(USER_FILES)
    assert error_line(err) == (f"--resume refused: output directory {str(out)!r} holds no hybridize run (no {MARKER} or "
                               "run-config.json); give the --out of the run to continue, or another --out to start one")


def test_out_that_is_a_file_or_under_a_file(files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, err = cli(tmp_path, base(files), capsys, tmp_path / "afile")
    assert code == 2 and (tmp_path / "afile").read_text() == "x"
    assert error_line(err) == (f"option '--out' must be a directory; got {str(tmp_path / 'afile')!r}, which is a file: give "
                               "a new or empty directory")
    under = tmp_path / "afile" / "sub" / "out"
    code, err = cli(tmp_path, base(files), capsys, under)
    assert code == 2
    assert error_line(err) == (f"option '--out' must be a directory path; got {str(under)!r}, but "
                               f"{str(tmp_path / 'afile')!r} is a file: choose another --out")


def test_out_on_a_read_only_directory(files, tmp_path, capsys, monkeypatch):
    """As root chmod does not bite: the refusal of the file system is simulated at ``mkdir``."""
    out = tmp_path / "ro" / "out"
    real_mkdir = Path.mkdir

    def mkdir(self, *a, **k):
        if self == out:
            raise OSError(errno.EROFS, "Read-only file system", str(self))
        return real_mkdir(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    code, err = cli(tmp_path, base(files), capsys, out)
    assert code == 2 and not out.exists()
    assert error_line(err) == (f"output directory {str(out)!r} cannot be created or written (Read-only file system); "
                               "choose a writable --out")


def test_eval_out_that_is_a_file_empty_or_foreign(files, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "eval.json").write_text("{}")
    expected = {
        str(tmp_path / "afile"): (f"option '--out' must be a directory; got {str(tmp_path / 'afile')!r}, which is a file: "
                                  "give a new or empty directory"),
        "": "option '--out' must name a directory (an empty value is never taken as the current directory); got ''",
        str(tmp_path / "theirs"): (f"eval --out {str(tmp_path / 'theirs')!r} holds eval.json that hybridize did not write; "
                                   "give a new or empty directory"),
    }
    for out, message in expected.items():
        code = main(["eval", str(files / "teacher"), "--tasks", "niah_single_1", "--out", out, "--quiet"])
        assert code == 2
        assert error_line(capsys.readouterr().err) == message
    assert (tmp_path / "afile").read_text() == "x" and (tmp_path / "theirs" / "eval.json").read_text() == "{}"


def test_no_code_path_deletes_with_a_broad_call():
    """Every rmtree / unlink in the package is one of the reviewed ones (issue 17: each deletes only its own files)."""
    import re

    root = Path(__file__).parents[2]
    reviewed = {
        "core/recipes/rundir.py": 2,        # empty_own_dir, after check_overwrite: OUT's own entries
        # forget_checkpoint (a recorded checkpoint); clean_write (its own temporary file or dir); replace_dir
        # (its own `.NAME.old`, twice); atomic_dir (its own `.NAME.tmp` of a saved hybrid or export: left by an
        # interrupted write, or whose before_rename check failed); atomic_torch_save (its own `.NAME.tmp*` left by a
        # killed process)
        "core/atomic_io.py": 8,
        "core/recipes/quickstart.py": 3,    # ensure_teacher: its own temporary and cached teacher in the cache directory
        "core/selection/fanout.py": 1,      # probe checkpoints: rank directories of another layout, inside checkpoints/selection
        "core/selection/engine.py": 2,      # probe_offload disk: its own probe-<layer>.pt scratch files, then their dir if empty
    }
    found = {}
    for path in sorted((root / "core").rglob("*.py")) + sorted((root / "plugins").rglob("*.py")):
        n = len(re.findall(r"\brmtree\(|\.unlink\(|os\.remove\(|\.rmdir\(", path.read_text()))
        if n:
            found[path.relative_to(root).as_posix()] = n
    assert found == reviewed
