"""Issue 17 part C, plugins: a hook that raises, a misspelt hook name, a blocked built-in, disabled autoload.

Each case pins the exact message; ``--skip-broken-plugins`` turns a broken plugin into one warning line.
"""
from __future__ import annotations

import json

import pluggy
import pytest

from hybridize.cli import main
from hybridize.errors import PluginHookNameError, PluginLoadError, PluginLoadWarning, UnknownComponentError
from hybridize.registry.manager import get_plugin_manager

from test_plugins import fake_distribution  # tests/unit is on sys.path (pytest's rootdir-relative imports)

RAISING = """
    import attrs
    from hybridize import hookimpl

    @attrs.frozen
    class Cfg:
        pass

    def build(cfg):
        return cfg

    @hookimpl
    def hybridize_register_selectors(register):
        register("half-registered", build, Cfg)
        raise RuntimeError("cannot find libfoo.so\\n(second line)")
"""
RAISING_MSG = ("Plugin 'boom' (hybridize-boom 0.2) failed in its hook hybridize_register_selectors: RuntimeError: cannot "
               "find libfoo.so (second line). Fix or uninstall that distribution, or skip the plugin with "
               "HYBRIDIZE_BLOCKED_PLUGINS=boom.")
TYPO = """
    from hybridize import hookimpl

    @hookimpl
    def hybridize_register_selector(register):  # missing 's'
        pass
"""
TYPO_MSG = ("plugin 'typo' (hybridize-typo 0.1) implements the hook 'hybridize_register_selector', which hybridize does not "
            "define. Did you mean 'hybridize_register_selectors'? Rename it in that plugin, or skip the plugin with "
            "HYBRIDIZE_BLOCKED_PLUGINS=typo.")


def install(tmp_path, monkeypatch, kind):
    if kind == "raising":
        fake_distribution(tmp_path, monkeypatch, name="hybridize-boom", version="0.2", entry_points={"boom": "boom_fault_mod"},
                          modules={"boom_fault_mod": RAISING})
        return RAISING_MSG
    fake_distribution(tmp_path, monkeypatch, name="hybridize-typo", version="0.1", entry_points={"typo": "typo_fault_mod"},
                      modules={"typo_fault_mod": TYPO})
    return TYPO_MSG


def test_registration_hook_that_raises_names_plugin_distribution_and_block(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "raising")
    pm = get_plugin_manager()
    with pytest.raises(PluginLoadError) as exc:
        pm.registry("selector")
    assert str(exc.value) == RAISING_MSG
    assert "gdn" in pm.registry("linear_attention")  # the other kinds still build


def test_registration_hook_that_raises_is_a_warning_with_skip_broken(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "raising")
    pm = get_plugin_manager(skip_broken=True)
    with pytest.warns(PluginLoadWarning) as record:
        selectors = pm.registry("selector")
    assert [str(w.message) for w in record] == [f"skipping a broken plugin: {RAISING_MSG}"]
    assert "half-registered" not in selectors and "uniform" in selectors  # nothing of the broken plugin is kept


def test_misspelt_hook_names_plugin_hook_and_right_name(tmp_path, monkeypatch):
    install(tmp_path, monkeypatch, "typo")
    with pytest.raises(PluginHookNameError) as exc:
        get_plugin_manager()
    assert str(exc.value) == TYPO_MSG
    assert isinstance(exc.value, PluginLoadError) and isinstance(exc.value, pluggy.PluginValidationError)
    with pytest.warns(PluginLoadWarning, match="hybridize_register_selector'"):
        pm = get_plugin_manager(skip_broken=True)
    assert pm.get_plugin("typo") is None and "uniform" in pm.registry("selector")


@pytest.mark.parametrize("kind", ["raising", "typo"])
def test_cli_run_reports_broken_plugin_on_one_line(tmp_path, monkeypatch, capsys, kind):
    expected = install(tmp_path, monkeypatch, kind)
    (tmp_path / "run.yaml").write_text("teacher: t\ndata: {train: d.txt}\ndevice: cpu\n")
    code = main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    assert capsys.readouterr().err == f"hybridize: error: {expected}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["raising", "typo"])
def test_cli_plugins_lists_the_others_and_reports_the_broken(tmp_path, monkeypatch, capsys, kind):
    expected = install(tmp_path, monkeypatch, kind)
    assert main(["plugins"]) == 2
    out, err = capsys.readouterr()
    assert "gdn" in out and "kl-greedy-add" in out and "uniform" in out
    assert err == f"hybridize: error: {expected}\n"
    assert main(["plugins", "--json"]) == 2
    assert json.loads(capsys.readouterr().out)["broken_plugins"] == [expected]
    assert main(["--skip-broken-plugins", "plugins"]) == 0
    assert capsys.readouterr().err == f"hybridize: warning: {expected}\n"


def test_cli_skip_broken_plugins_applies_to_run(tmp_path, monkeypatch, capsys):
    install(tmp_path, monkeypatch, "typo")
    (tmp_path / "run.yaml").write_text("teacher: t\ndata: {train: d.txt}\ndevice: gpu0\n")
    assert main(["--skip-broken-plugins", "run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"hybridize: warning: skipping a broken plugin: {TYPO_MSG}"
    assert err[-1].startswith("hybridize: error: run field 'device' must be auto, cpu, cuda or cuda:N; got 'gpu0'")


def test_blocked_builtin_says_the_variable_blocked_it(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_BLOCKED_PLUGINS", "gdn")
    with pytest.raises(UnknownComponentError) as exc:
        get_plugin_manager().registry("linear_attention")["gdn"]
    assert str(exc.value) == ("Unknown linear attention 'gdn'. Available: gla. HYBRIDIZE_BLOCKED_PLUGINS=gdn blocks the "
                              "installed plugin 'gdn' (hybridize 0.1.0), which may provide it; remove it from "
                              "HYBRIDIZE_BLOCKED_PLUGINS to use 'gdn'")


def test_blocked_plugins_listed_when_none_looks_like_the_name(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_BLOCKED_PLUGINS", "gla,uniform")
    with pytest.raises(UnknownComponentError) as exc:
        get_plugin_manager().registry("linear_attention")["hgrn2"]
    assert str(exc.value).endswith(". HYBRIDIZE_BLOCKED_PLUGINS=gla,uniform blocks the installed plugins 'gla' "
                                   "(hybridize 0.1.0), 'uniform' (hybridize 0.1.0), which may provide it; remove the one "
                                   "that does from HYBRIDIZE_BLOCKED_PLUGINS to use 'hgrn2'")


def test_disabled_autoload_says_the_variable_disabled_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD", "1")
    (tmp_path / "run.yaml").write_text("teacher: t\ndata: {train: d.txt}\nselection: {selector: uniform, stop: fixed-budget}\n"
                                       "linear_attention: gdn\n")
    assert main(["run", str(tmp_path / "run.yaml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert ("  - Unknown linear attention 'gdn'. Available: (none registered). HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD is set, "
            "so no plugin was loaded, not even the built-ins; unset HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD to use 'gdn'\n") in err


def test_explicitly_bare_manager_gives_no_environment_hint(hybridize_bare_pm):
    with pytest.raises(UnknownComponentError) as exc:
        hybridize_bare_pm.registry("linear_attention")["gdn"]
    assert str(exc.value) == "Unknown linear attention 'gdn'. Available: (none registered)"
