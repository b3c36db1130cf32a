"""Plugin manager and registries: loading, origins, duplicates, unknown names, broken plugins."""
from __future__ import annotations

import json
import textwrap
import warnings

import attrs
import pluggy
import pytest

from hybridize import hookimpl
from hybridize.cli import main
from hybridize.errors import (
    ConfigError,
    DuplicateNameError,
    PluginLoadError,
    PluginReturnError,
    UnknownComponentError,
)
from hybridize.registry.manager import get_plugin_manager
from hybridize.registry.entries import KINDS


@attrs.frozen(kw_only=True)
class ThingConfig:
    budget: int = attrs.field(default=2, validator=attrs.validators.ge(1))
    ratio: float = 0.25
    mode: str = "fast"


def make_thing(config):
    return ("thing", config)


class ThirdParty:
    """A third-party plugin registered inside a test."""

    @hookimpl
    def hybridize_register_selectors(self, register):
        register("my-selector", make_thing, ThingConfig, capabilities=frozenset({"deterministic"}))


def fake_distribution(tmp_path, monkeypatch, *, name, version, entry_points, modules):
    """Install a real (tiny) distribution on sys.path: dist-info with entry points + modules."""
    info = tmp_path / f"{name.replace('-', '_')}-{version}.dist-info"  # dist-info names use _
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    eps = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[hybridize]\n{eps}\n")
    for mod, src in modules.items():
        (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
    monkeypatch.syspath_prepend(str(tmp_path))


def test_builtins_load_through_entry_points(pm):
    reg = pm.registry("linear_attention")
    assert {"gdn", "gla"} <= set(reg)
    for name in ("gdn", "gla"):
        origin = reg[name].origin
        assert origin.distribution == "hybridize"
        assert origin.version
        assert origin.module == f"hybridize.plugins.linear_attn.{name}"
        assert origin.plugin == name


def test_hook_hybridize_register_selectors(hybridize_bare_pm):
    pm = hybridize_bare_pm
    pm.register(ThirdParty(), name="third-party")
    entry = pm.registry("selector")["my-selector"]
    assert entry.factory is make_thing
    assert entry.origin.module == __name__
    assert entry.origin.plugin == "third-party"
    assert entry.origin.distribution is None
    assert entry.capabilities == {"deterministic"}
    assert entry.build_config({"budget": 3}) == ThingConfig(budget=3)


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_registration_hook_fills_its_registry(hybridize_bare_pm, kind):
    hook = KINDS[kind]

    class P:
        pass

    setattr(P, hook, hookimpl(lambda self, register: register(f"x-{kind}", make_thing, ThingConfig)))
    hybridize_bare_pm.register(P(), name="p")
    assert list(hybridize_bare_pm.registry(kind)) == [f"x-{kind}"]
    others = [k for k in KINDS if k != kind]
    assert all(len(hybridize_bare_pm.registry(k)) == 0 for k in others)


def test_hook_hybridize_register_linear_attention(pm):
    class Mine:
        @hookimpl
        def hybridize_register_linear_attention(self, register):
            register("mine", make_thing, ThingConfig)

    pm.register(Mine(), name="mine-plugin")
    reg = pm.registry("linear_attention")
    assert {"gdn", "gla", "mine"} <= set(reg)
    assert reg["mine"].origin.plugin == "mine-plugin"


def test_hook_hybridize_register_scorers(hybridize_bare_pm):
    class S:
        @hookimpl
        def hybridize_register_scorers(self, register):
            register("my-scorer", make_thing, ThingConfig)

    hybridize_bare_pm.register(S())
    assert "my-scorer" in hybridize_bare_pm.registry("scorer")


def test_hook_hybridize_register_stop_criteria(hybridize_bare_pm):
    class S:
        @hookimpl
        def hybridize_register_stop_criteria(self, register):
            register("my-stop", make_thing, ThingConfig)

    hybridize_bare_pm.register(S())
    assert "my-stop" in hybridize_bare_pm.registry("stop_criterion")


def test_hook_hybridize_register_evaluators(hybridize_bare_pm):
    class S:
        @hookimpl
        def hybridize_register_evaluators(self, register):
            register("my-eval", make_thing, ThingConfig)

    hybridize_bare_pm.register(S())
    assert "my-eval" in hybridize_bare_pm.registry("evaluator")


def test_registry_rebuilds_after_register_and_unregister(hybridize_bare_pm):
    pm = hybridize_bare_pm
    assert "my-selector" not in pm.registry("selector")
    plugin = ThirdParty()
    pm.register(plugin)
    assert "my-selector" in pm.registry("selector")
    pm.unregister(plugin)
    assert "my-selector" not in pm.registry("selector")


def test_duplicate_name_names_both_origins(pm):
    class Clash:
        @hookimpl
        def hybridize_register_linear_attention(self, register):
            register("gdn", make_thing, ThingConfig)

    pm.register(Clash(), name="clash")
    with pytest.raises(DuplicateNameError) as exc:
        pm.registry("linear_attention")
    msg = str(exc.value)
    assert "'gdn' is registered twice" in msg
    assert "hybridize.plugins.linear_attn.gdn" in msg and "hybridize 0.1.0" in msg
    assert "'clash'" in msg and __name__ in msg


def test_unknown_name_did_you_mean(pm):
    with pytest.raises(UnknownComponentError) as exc:
        pm.registry("linear_attention")["gdm"]
    msg = str(exc.value)
    assert msg.startswith("Unknown linear attention 'gdn'".replace("'gdn'", "'gdm'"))
    assert "Did you mean: gdn?" in msg
    assert "Available: " in msg and "gla" in msg
    assert isinstance(exc.value, KeyError) and isinstance(exc.value, ConfigError)


def test_unknown_config_key_and_wrong_type_are_collected(hybridize_bare_pm):
    hybridize_bare_pm.register(ThirdParty())
    entry = hybridize_bare_pm.registry("selector")["my-selector"]
    with pytest.raises(ConfigError) as exc:
        entry.build_config({"budgett": 3, "ratio": "high"})
    msg = str(exc.value)
    assert "2 configuration problems" in msg
    assert "selector 'my-selector' has no field 'budgett'. Did you mean 'budget'?" in msg
    assert "selector 'my-selector' field 'ratio' must be float; got 'high'" in msg


def test_validator_error_names_field(hybridize_bare_pm):
    hybridize_bare_pm.register(ThirdParty())
    entry = hybridize_bare_pm.registry("selector")["my-selector"]
    with pytest.raises(ConfigError, match=r"selector 'my-selector' field 'budget' must be >= 1; got 0"):
        entry.build_config({"budget": 0})
    assert entry.build_config({"ratio": 1}).ratio == 1.0  # int accepted for float, coerced


def test_bool_is_not_an_int(hybridize_bare_pm):
    hybridize_bare_pm.register(ThirdParty())
    entry = hybridize_bare_pm.registry("selector")["my-selector"]
    with pytest.raises(ConfigError, match="field 'budget' must be int; got True"):
        entry.build_config({"budget": True})


def test_bad_registration_names_plugin_and_hook(hybridize_bare_pm):
    class Bad:
        @hookimpl
        def hybridize_register_selectors(self, register):
            register("bad", make_thing, dict)

    hybridize_bare_pm.register(Bad(), name="bad-plugin")
    with pytest.raises(PluginReturnError) as exc:
        hybridize_bare_pm.registry("selector")
    msg = str(exc.value)
    assert "plugin 'bad-plugin'" in msg and "hybridize_register_selectors" in msg and "expected an attrs class" in msg


def test_broken_entry_point_raises_plugin_load_error(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-broken", version="1.2.3",
        entry_points={"broken": "broken_plugin_mod"},
        modules={"broken_plugin_mod": "raise ImportError('needs libfoo')\n"},
    )
    with pytest.raises(PluginLoadError) as exc:
        get_plugin_manager()
    msg = str(exc.value)
    assert "'broken'" in msg and "hybridize-broken 1.2.3" in msg
    assert "ImportError: needs libfoo" in msg
    assert "HYBRIDIZE_BLOCKED_PLUGINS=broken" in msg


def test_blocked_plugins_env_skips_broken(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-broken", version="1.2.3",
        entry_points={"broken": "broken_plugin_mod2"},
        modules={"broken_plugin_mod2": "raise RuntimeError('boom')\n"},
    )
    monkeypatch.setenv("HYBRIDIZE_BLOCKED_PLUGINS", "broken, other")
    pm = get_plugin_manager()
    assert pm.is_blocked("broken")
    assert "gdn" in pm.registry("linear_attention")


def test_skip_broken_warns(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-broken", version="1.2.3",
        entry_points={"broken": "broken_plugin_mod3"},
        modules={"broken_plugin_mod3": "raise RuntimeError('boom')\n"},
    )
    with pytest.warns(UserWarning, match="'broken'.*RuntimeError: boom"):
        pm = get_plugin_manager(skip_broken=True)
    assert pm.get_plugin("broken") is None
    assert "gdn" in pm.registry("linear_attention")


def test_third_party_distribution_origin(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-thirdparty", version="0.4.2",
        entry_points={"thirdparty": "thirdparty_plugin_mod"},
        modules={"thirdparty_plugin_mod": """
            import attrs
            from hybridize import hookimpl

            @attrs.frozen
            class Cfg:
                k: int = 1

            def build(cfg):
                return cfg

            @hookimpl
            def hybridize_register_selectors(register):
                register("tp-selector", build, Cfg)
        """},
    )
    pm = get_plugin_manager()
    origin = pm.registry("selector")["tp-selector"].origin
    assert (origin.distribution, origin.version, origin.module) == ("hybridize-thirdparty", "0.4.2", "thirdparty_plugin_mod")
    info = {p["name"]: p for p in pm.plugin_info()}
    assert info["thirdparty"]["hooks"] == ["hybridize_register_selectors"]


def test_misspelled_hook_fails_check_pending(tmp_path, monkeypatch):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-typo", version="0.1",
        entry_points={"typo": "typo_plugin_mod"},
        modules={"typo_plugin_mod": """
            from hybridize import hookimpl

            @hookimpl
            def hybridize_register_selector(register):  # missing 's'
                pass
        """},
    )
    with pytest.raises(pluggy.PluginValidationError, match="hybridize_register_selector"):
        get_plugin_manager()


def test_disable_autoload_env(monkeypatch):
    monkeypatch.setenv("HYBRIDIZE_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert len(get_plugin_manager().registry("linear_attention")) == 0


def test_cli_plugins_json(capsys):
    assert main(["plugins", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in payload["components"]["linear_attention"]}
    assert {"gdn", "gla"} <= set(rows)
    assert rows["gdn"]["module"] == "hybridize.plugins.linear_attn.gdn"
    assert rows["gdn"]["distribution"] == "hybridize"
    assert "conv_size" in rows["gdn"]["params"]
    assert set(payload["components"]) == set(KINDS)


def test_cli_plugins_text(capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "linear_attention (" in out and "gdn" in out and "hybridize.plugins.linear_attn.gla" in out


def test_cli_reports_broken_plugin_as_one_error(tmp_path, monkeypatch, capsys):
    fake_distribution(
        tmp_path, monkeypatch, name="hybridize-broken", version="1.2.3",
        entry_points={"broken": "broken_plugin_mod4"},
        modules={"broken_plugin_mod4": "raise ImportError('needs libfoo')\n"},
    )
    assert main(["plugins"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("hybridize: error: Plugin entry point 'broken'")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert main(["--skip-broken-plugins", "plugins"]) == 0
