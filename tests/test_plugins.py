"""Plugin discovery: real entry points, in-process registration, name resolution, broken plugins."""

import json
import sys
import textwrap

import attrs
import pytest
import torch
from click.testing import CliRunner

import ddpmkit
from ddpmkit.cli import cli


def test_builtins_come_from_the_entry_point_group():
    mgr = ddpmkit.get_manager()
    _ = mgr.registry  # components are collected when the registry is first built
    for ep_name, kind, comp in [("linear", "schedule", "linear"), ("unet2d", "predictor", "unet2d"),
                                ("losses", "loss", "smoothl1"), ("losses", "loss", "mse"),
                                ("mnist-5k", "dataset", "mnist-5k")]:
        info = mgr.plugins[ep_name]
        assert info.source == "entry point" and info.error is None
        assert info.version == ddpmkit.__version__
        assert info.module.startswith("ddpmkit_plugins.")
        assert (kind, comp) in info.components
        assert ddpmkit.get_component(kind, comp).plugin == ep_name


def test_core_never_imports_builtin_plugins():
    import pathlib

    core = pathlib.Path(ddpmkit.__file__).parent
    for path in core.rglob("*.py"):
        assert "ddpmkit_plugins" not in path.read_text(), path


@attrs.define
class ConstConfig:
    timesteps: int = attrs.field(default=10, validator=attrs.validators.ge(1))
    value: float = 0.01


class ConstSchedule:
    @staticmethod
    @ddpmkit.hookimpl
    def register_schedules(register):
        register("const", lambda c: torch.full((c.timesteps,), c.value, dtype=torch.float64), ConstConfig, "constant β")


def test_in_process_registration_builds_with_options():
    ddpmkit.register_plugin(ConstSchedule(), name="const-plugin", version="9.9")
    comp = ddpmkit.get_component("schedule", "const")
    assert comp.plugin == "const-plugin" and comp.version == "9.9"
    betas = ddpmkit.build("schedule", "const", {"timesteps": "7", "value": "0.5"})
    assert betas.shape == (7,) and torch.all(betas == 0.5)
    ddpmkit.unregister_plugin("const-plugin")
    with pytest.raises(ddpmkit.DdpmkitError):
        ddpmkit.get_component("schedule", "const")


def test_unknown_name_suggests_close_match():
    with pytest.raises(ddpmkit.DdpmkitError) as err:
        ddpmkit.get_component("schedule", "linaer")
    assert str(err.value) == "unknown schedule 'linaer'; did you mean 'linear'? available: cosine, linear, quadratic, sigmoid"
    with pytest.raises(ddpmkit.DdpmkitError, match=r"unknown loss 'zzz' available: hybrid, mse, smoothl1"):
        ddpmkit.get_component("loss", "zzz")


def test_unknown_option_and_bad_value():
    with pytest.raises(ddpmkit.DdpmkitError, match="unknown option 'beta_ned'.*did you mean 'beta_end'"):
        ddpmkit.build("schedule", "linear", {"beta_ned": 0.1})
    with pytest.raises(ddpmkit.DdpmkitError, match="is not a int|invalid value"):
        ddpmkit.build("schedule", "linear", {"timesteps": "ten"})


class Dup:
    @staticmethod
    @ddpmkit.hookimpl
    def register_schedules(register):
        register("linear", lambda c: None)


def test_duplicate_names_name_both_owners():
    """A name clash no longer stops everything: the built-in keeps the name, the newcomer's component is
    dropped with one warning naming both, and `ddpmkit plugins` lists it as failed."""
    ddpmkit.register_plugin(Dup(), name="dup-plugin")
    with pytest.warns(UserWarning, match="schedule 'linear' is registered by two plugins: 'linear' and 'dup-plugin'"):
        comp = ddpmkit.get_component("schedule", "linear")
    assert comp.plugin == "linear" and comp.dist == "ddpmkit"
    assert ddpmkit.get_manager().plugins["dup-plugin"].problems


class Misspelt:
    @staticmethod
    @ddpmkit.hookimpl
    def register_schedulez(register):  # typo
        pass


def test_misspelt_hook_fails_at_load():
    with pytest.raises(ddpmkit.PluginError, match="unknown hook 'register_schedulez'; did you mean 'register_schedules'"):
        ddpmkit.register_plugin(Misspelt(), name="typo")


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """A real installed distribution (dist-info with entry_points.txt) on sys.path."""

    def make(name, modules: dict[str, str], entry_points: dict[str, str]):
        for mod, src in modules.items():
            (tmp_path / f"{mod}.py").write_text(textwrap.dedent(src))
        info = tmp_path / f"{name.replace('-', '_')}-1.2.3.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
        (info / "entry_points.txt").write_text("[ddpmkit]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
        monkeypatch.syspath_prepend(str(tmp_path))
        ddpmkit.reset_manager()

    yield make
    for mod in list(sys.modules):
        if mod.startswith("fakeplug_"):
            del sys.modules[mod]


def test_third_party_entry_point_and_broken_plugin(fake_dist):
    fake_dist("ddpmkit-fake", {
        "fakeplug_good": """
            import torch, ddpmkit
            @ddpmkit.hookimpl
            def register_losses(register):
                register("l1", lambda c=None: torch.nn.functional.l1_loss, None, "L1")
        """,
        "fakeplug_bad": "raise ImportError('needs a package that is not installed')\n",
    }, {"fake-good": "fakeplug_good", "fake-bad": "fakeplug_bad"})
    with pytest.warns(UserWarning, match="ddpmkit plugin 'fake-bad' failed to load: ImportError"):
        mgr = ddpmkit.get_manager()
    assert mgr.plugins["fake-good"].version == "1.2.3"
    assert ddpmkit.get_component("loss", "l1").plugin == "fake-good"
    assert ddpmkit.get_component("schedule", "linear")  # the rest keep working
    result = CliRunner().invoke(cli, ["plugins", "--json"])
    assert result.exit_code == 0, result.output
    rows = {r["name"]: r for r in json.loads(result.stdout)}
    assert "ImportError" in rows["fake-bad"]["error"]
    assert rows["fake-good"]["components"] == {"loss": ["l1"]}


def test_environment_variable_restricts_plugins(monkeypatch):
    monkeypatch.setenv("DDPMKIT_PLUGINS", "linear,losses")
    ddpmkit.reset_manager()
    assert sorted(ddpmkit.get_manager().plugins) == ["linear", "losses"]
    with pytest.raises(ddpmkit.DdpmkitError, match="unknown predictor 'unet2d' available: \\(none installed\\)"):
        ddpmkit.get_component("predictor", "unet2d")
    monkeypatch.setenv("DDPMKIT_PLUGINS", "")
    ddpmkit.reset_manager()
    assert ddpmkit.get_manager().plugins == {}


def test_plugins_command_lists_builtins():
    result = CliRunner().invoke(cli, ["plugins"])
    assert result.exit_code == 0
    for word in ("linear", "unet2d", "smoothl1", "mse", "mnist-5k", "0.1.0"):
        assert word in result.output


def test_every_hook_is_documented():
    """docs/plugins.md documents every hook of the plugin interface."""
    import inspect
    from pathlib import Path

    from ddpmkit.sdk import hookspecs

    doc = (Path(__file__).resolve().parents[1] / "docs" / "plugins.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if hasattr(f, "ddpmkit_spec")]
    assert len(hooks) == len(ddpmkit.KINDS) == 10  # one hook per kind of the kinds table (10 with distiller)
    missing = [h for h in hooks if f"`{h}`" not in doc]
    assert not missing, f"hooks missing from docs/plugins.md: {missing}"
