"""The plugin manager: entry points, the allowlist and blocklist, load errors, attribution.

Installed plugins are simulated with real distribution metadata (a ``*.dist-info`` folder
with ``entry_points.txt``) on ``sys.path``, which :mod:`importlib.metadata` reads like any
installed distribution. ``test_third_party_plugin.py`` does the same with pip.
"""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

import qcore
import qcore.plugins
from qcore.errors import PluginLoadError
from qcore.plugins import PluginManager, get_plugin_manager, get_registry, reset_plugin_manager
from qcore.registry import Origin
from qcore.testing import make_plugin

_counter = itertools.count()

QUANTIZER_SOURCE = """
from dataclasses import dataclass
from qcore import hookimpl
from qcore.interfaces import Quantizer


class {cls}(Quantizer):
    \"\"\"A test quantizer.\"\"\"
    name = {name!r}


@hookimpl
def qcore_register_quantizers(register):
    register({cls})
"""


class FakeSite:
    """A folder on ``sys.path`` holding distributions as pip would install them."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        self.root = root
        self.modules: list[str] = []
        root.mkdir(parents=True, exist_ok=True)
        monkeypatch.syspath_prepend(str(root))

    def install(self, distribution: str, version: str, entry_points: dict[str, str],
                sources: dict[str, str], requires: tuple[str, ...] = ()) -> None:
        """``sources``: module name -> its code (a package per top-level name);
        ``requires``: its ``Requires-Dist`` lines."""
        for module, source in sources.items():
            parts = module.split(".")
            folder = self.root.joinpath(*parts[:-1])
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(1, len(parts)):
                init = self.root.joinpath(*parts[:i], "__init__.py")
                if not init.exists():
                    init.write_text("")
            (folder / f"{parts[-1]}.py").write_text(textwrap.dedent(source))
            self.modules.append(parts[0])
        info = self.root / f"{distribution.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {distribution}\n"
                                       f"Version: {version}\n"
                                       + "".join(f"Requires-Dist: {r}\n" for r in requires))
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[qcore]\n{lines}")

    def quantizer_plugin(self, plugin: str, distribution: str, version: str,
                         quantizer: str) -> str:
        """Install a distribution whose plugin registers one quantizer; its module name."""
        package = f"fake_{plugin.replace('-', '_')}_{next(_counter)}"
        self.install(distribution, version, {plugin: f"{package}.hooks"},
                     {f"{package}.hooks": QUANTIZER_SOURCE.format(cls="Q", name=quantizer)})
        return f"{package}.hooks"

    def cleanup(self) -> None:
        for name in list(sys.modules):
            if name.split(".")[0] in self.modules:
                del sys.modules[name]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    # The process-wide manager is rebuilt from the environment in these tests; the
    # monkeypatch puts the previous one back afterwards.
    monkeypatch.setattr(qcore.plugins, "_manager", None)
    monkeypatch.delenv("QCORE_PLUGINS", raising=False)
    monkeypatch.delenv("QCORE_DISABLE_PLUGINS", raising=False)
    fake = FakeSite(tmp_path / "site", monkeypatch)
    yield fake
    fake.cleanup()


#: Components the built-in plugin registers (it may register more).
BUILTINS = [("observer", "minmax"), ("quantizer", "rtn"), ("packer", "int"), ("packer", "vq"),
            ("kernel", "torch"), ("kernel", "torch-lut")]


def loaded(manager: PluginManager) -> set[str]:
    return {name for name, info in manager.plugins.items() if info.error is None}


# ----------------------------------------------------------------------- the built-ins


def test_builtins_load_through_their_entry_point() -> None:
    manager = PluginManager()
    manager.load_installed(allowlist=[])
    assert manager.errors == []
    info = manager.plugins["builtin"]
    assert (info.distribution, info.version) == ("qcore", qcore.__version__)
    assert info.entry_point == "builtin = qcore.builtin.hooks"
    assert info.hooks == ["qcore_register_kernels", "qcore_register_observers",
                          "qcore_register_packers", "qcore_register_quantizers"]
    for kind, name in BUILTINS:
        assert name in info.components[kind]
        origin = manager.registry.get(kind, name).origin
        assert origin == Origin("builtin", "qcore", qcore.__version__)
    # Everything registered is attributed to the built-in plugin, nothing else loaded.
    assert set(manager.plugins) == {"builtin"}
    assert {r.origin.plugin for r in manager.registry} == {"builtin"}


def test_report_is_json_with_name_distribution_version_hooks() -> None:
    manager = PluginManager()
    manager.load_installed(allowlist=[])
    report = json.loads(json.dumps(manager.report()))
    assert report == [{
        "name": "builtin", "distribution": "qcore", "version": qcore.__version__,
        "entry_point": "builtin = qcore.builtin.hooks",
        "hooks": ["qcore_register_kernels", "qcore_register_observers",
                  "qcore_register_packers", "qcore_register_quantizers"],
        "components": manager.plugins["builtin"].components,
        "error": None,
    }]
    # The listing's components are exactly what the registry holds.
    listed = {kind: sorted(names) for kind, names in report[0]["components"].items()}
    assert listed == {kind: manager.registry.names(kind)
                      for kind in ("observer", "quantizer", "packer", "kernel")}
    assert manager.registry.names("transform") == []  # every transform is a plugin's


def test_fixture_manager_is_isolated_from_installed_plugins(site: FakeSite) -> None:
    site.quantizer_plugin("extra", "qcore-plugin-extra", "1.2.3", "extra-q")
    assert "extra-q" in get_registry().names("quantizer")  # installed: autoloaded
    isolated = qcore.testing.isolated_plugin_manager()
    assert set(isolated.plugins) == {"builtin"}
    assert isolated.registry.names("quantizer") == ["rtn"]


def test_qcore_plugin_manager_fixture_is_the_process_wide_one(qcore_plugin_manager) -> None:
    assert get_plugin_manager() is qcore_plugin_manager
    assert set(qcore_plugin_manager.plugins) == {"builtin"}
    assert qcore_plugin_manager.plugins["builtin"].distribution == "qcore"


def test_qcore_register_plugin_fixture(qcore_register_plugin, qcore_registry) -> None:
    from qcore.builtin.rtn import RTNQuantizer

    class Other(RTNQuantizer):
        name = "other"

    manager = qcore_register_plugin(make_plugin("mine", quantizers=[Other]),
                                    distribution="qcore-plugin-mine", version="0.3")
    origin = manager.registry.get("quantizer", "other").origin
    assert origin == Origin("mine", "qcore-plugin-mine", "0.3")
    with pytest.raises(PluginLoadError, match="two quantizers are named 'other'"):
        qcore_register_plugin(make_plugin("again", quantizers=[Other]), distribution="dup")


# ------------------------------------------------------------------------ environment


@pytest.fixture
def two_plugins(site: FakeSite) -> FakeSite:
    site.quantizer_plugin("extra", "qcore-plugin-extra", "1.2.3", "extra-q")
    site.quantizer_plugin("other", "qcore-plugin-other", "0.9", "other-q")
    return site


def test_unset_allowlist_loads_every_installed_plugin(two_plugins: FakeSite) -> None:
    manager = get_plugin_manager()
    assert {"builtin", "extra", "other"} <= loaded(manager)
    assert manager.distribution_of("quantizer", "extra-q") == ("qcore-plugin-extra", "1.2.3")
    assert manager.distribution_of("quantizer", "other-q") == ("qcore-plugin-other", "0.9")


def test_empty_allowlist_loads_builtins_only(two_plugins: FakeSite, monkeypatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "")
    manager = get_plugin_manager()
    assert set(manager.plugins) == {"builtin"}
    assert get_registry().names("quantizer") == ["rtn"]


@pytest.mark.parametrize("allow", ["extra", "qcore-plugin-extra", " extra , "])
def test_allowlist_by_entry_point_or_distribution_name(two_plugins: FakeSite, monkeypatch,
                                                       allow: str) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", allow)
    assert loaded(get_plugin_manager()) == {"builtin", "extra"}
    assert get_registry().names("quantizer") == ["extra-q", "rtn"]


def test_allowlist_naming_an_uninstalled_plugin_is_an_error(two_plugins: FakeSite,
                                                            monkeypatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "extra,no-such-plugin")
    manager = get_plugin_manager()
    assert len(manager.errors) == 1
    message = str(manager.errors[0])
    assert "QCORE_PLUGINS names 'no-such-plugin', which is not installed" in message
    installed = re.search(r"Installed plugins: ([^.]*)\.", message).group(1).split(", ")
    assert {"extra", "other"} <= set(installed) and "builtin" not in installed
    with pytest.raises(PluginLoadError, match="'no-such-plugin', which is not installed"):
        get_registry()
    assert manager.report()[-1] == {"name": None, "error": message}


def test_disable_plugins_blocks_one(two_plugins: FakeSite, monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "other")
    manager = get_plugin_manager()
    assert "other" not in manager.plugins and "extra" in manager.plugins
    assert get_registry().find("quantizer", "other-q") is None
    assert manager.errors == []


def test_disable_by_distribution_name_and_reset_rereads_environment(two_plugins: FakeSite,
                                                                    monkeypatch) -> None:
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "qcore-plugin-extra,qcore-plugin-other")
    assert set(get_plugin_manager().plugins) >= {"builtin"}
    assert get_registry().find("quantizer", "extra-q") is None
    monkeypatch.delenv("QCORE_DISABLE_PLUGINS")
    assert get_registry().find("quantizer", "extra-q") is None  # cached until reset
    reset_plugin_manager()
    assert get_registry().find("quantizer", "extra-q") is not None


# ------------------------------------------------------------------------ load errors


def test_plugin_raising_at_import_is_reported_with_distribution_version_entry_point(
        site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "broken")  # other installed plugins stay out
    site.install("qcore-plugin-broken", "0.4.1", {"broken": "fake_broken.hooks"},
                 {"fake_broken.hooks": "raise RuntimeError('needs a GPU at import')\n"})
    manager = get_plugin_manager()
    assert len(manager.errors) == 1
    error = manager.errors[0]
    message = str(error)
    assert "plugin 'broken' from qcore-plugin-broken 0.4.1 failed to import" in message
    assert "(entry point broken = fake_broken.hooks)" in message
    assert "RuntimeError: needs a GPU at import" in message
    assert isinstance(error.__cause__, RuntimeError)
    assert "needs a GPU at import" in error.details  # the traceback, for `qcore plugins`
    assert manager.plugins["broken"].error == message
    # The others still load; anything that uses the registry raises the error.
    assert manager.registry.find("quantizer", "rtn") is not None
    with pytest.raises(PluginLoadError, match="qcore-plugin-broken 0.4.1") as raised:
        get_registry()
    assert "QCORE_DISABLE_PLUGINS=<plugin>" in str(raised.value)
    from qcore.pipeline import Pipeline

    with pytest.raises(PluginLoadError, match="broken"):
        Pipeline.from_spec({}).validate()


def test_blocking_the_broken_plugin_lets_the_rest_run(site: FakeSite, monkeypatch) -> None:
    site.install("qcore-plugin-broken", "0.4.1", {"broken": "fake_broken2.hooks"},
                 {"fake_broken2.hooks": "import no_such_module_anywhere\n"})
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "broken")
    manager = get_plugin_manager()
    assert "broken" not in manager.plugins
    assert "rtn" in get_registry().names("quantizer")


def test_duplicate_component_names_name_both_distributions(site: FakeSite,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "alpha,beta")
    site.quantizer_plugin("alpha", "qcore-plugin-alpha", "1.0", "shared")
    site.quantizer_plugin("beta", "qcore-plugin-beta", "2.0", "shared")
    manager = get_plugin_manager()
    assert len(manager.errors) == 1
    message = str(manager.errors[0])
    assert "two quantizers are named 'shared'" in message
    assert "qcore-plugin-alpha 1.0" in message and "qcore-plugin-beta 2.0" in message
    # One keeps the name, the other contributes nothing; using the registry raises.
    winner = manager.registry.get("quantizer", "shared").origin.plugin
    loser = ({"alpha", "beta"} - {winner}).pop()
    assert manager.plugins[loser].components == {} and manager.plugins[loser].error == message
    with pytest.raises(PluginLoadError, match="named 'shared'"):
        get_registry()


def test_a_plugin_reusing_a_builtin_name_fails_not_the_builtin(
        site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "copycat")
    site.quantizer_plugin("copycat", "qcore-plugin-copycat", "1.0", "rtn")
    manager = get_plugin_manager()
    assert manager.plugins["builtin"].error is None
    assert manager.registry.get("quantizer", "rtn").origin.distribution == "qcore"
    assert "qcore-plugin-copycat" in manager.plugins["copycat"].error


def test_duplicate_plugin_names_name_both_distributions(site: FakeSite,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "same")
    site.quantizer_plugin("same", "qcore-plugin-same", "1.0", "q-one")
    site.quantizer_plugin("same", "qcore-plugin-same-fork", "1.1", "q-two")
    manager = get_plugin_manager()
    messages = [str(e) for e in manager.errors]
    assert len(messages) == 1
    assert "plugin name 'same' is used by two distributions" in messages[0]
    assert "qcore-plugin-same and qcore-plugin-same-fork" in messages[0] or \
        "qcore-plugin-same-fork and qcore-plugin-same" in messages[0]


def test_misspelled_hook_is_an_error(qcore_plugin_manager) -> None:
    from qcore import hookimpl

    module = make_plugin("typo")

    @hookimpl
    def qcore_register_quantiser(register):  # British spelling: no such hook
        raise AssertionError("never called")

    module.qcore_register_quantiser = qcore_register_quantiser
    qcore_plugin_manager.register_module(module, "typo", "qcore-plugin-typo", "1.0")
    message = str(qcore_plugin_manager.errors[-1])
    assert "plugin 'typo' from qcore-plugin-typo 1.0 is invalid" in message
    assert "qcore_register_quantiser" in message
    assert "qcore_register_quantizers" in message  # the valid names are listed
    assert not qcore_plugin_manager.pm.is_registered(module)
    with pytest.raises(PluginLoadError, match="qcore_register_quantiser"):
        qcore_plugin_manager.checked_registry()


def test_hook_that_raises_names_plugin_distribution_and_hook(qcore_plugin_manager) -> None:
    from qcore import hookimpl
    from qcore.builtin.observers import MinMaxObserver

    class Observed(MinMaxObserver):
        name = "observed"

    module = make_plugin("flaky", observers=[Observed])

    @hookimpl
    def qcore_register_quantizers(register):
        raise KeyError("config.yaml")

    module.qcore_register_quantizers = qcore_register_quantizers
    qcore_plugin_manager.register_module(module, "flaky", "qcore-plugin-flaky", "0.2")
    message = str(qcore_plugin_manager.errors[-1])
    assert message == ("plugin 'flaky' from qcore-plugin-flaky 0.2 raised in "
                       "qcore_register_quantizers: KeyError: 'config.yaml'")
    # A failed plugin contributes nothing, not even what it registered before failing.
    assert qcore_plugin_manager.registry.find("observer", "observed") is None
    assert qcore_plugin_manager.registry.find("observer", "minmax") is not None


@pytest.mark.parametrize("case,match", [
    ("not-a-subclass", "is not a subclass of qcore.interfaces.Quantizer"),
    ("wrong-kind", "is not a subclass of qcore.interfaces.Quantizer"),
    ("no-name", "without a name: set name = '...'"),
    ("mutable-config", r"Config must be a @dataclass\(frozen=True\)"),
])
def test_registering_an_invalid_class_says_what_to_fix(qcore_plugin_manager, case: str,
                                                       match: str) -> None:
    from dataclasses import dataclass

    from qcore.builtin.observers import MinMaxObserver
    from qcore.interfaces import Quantizer

    class Unnamed(Quantizer):
        pass

    class Mutable(Quantizer):
        name = "mutable"

        @dataclass
        class Config:
            damp: float = 0.01

    cls = {"not-a-subclass": object, "wrong-kind": MinMaxObserver, "no-name": Unnamed,
           "mutable-config": Mutable}[case]
    qcore_plugin_manager.register_module(make_plugin("bad", quantizers=[cls]), "bad",
                                         "qcore-plugin-bad", "1.0")
    assert len(qcore_plugin_manager.errors) == 1
    message = str(qcore_plugin_manager.errors[0])
    assert "qcore-plugin-bad" in message
    assert re.search(match, message), message


def test_plugin_built_for_another_contract_is_refused(qcore_plugin_manager) -> None:
    from qcore.builtin.rtn import RTNQuantizer

    class Future(RTNQuantizer):
        name = "future"

    module = make_plugin("future", quantizers=[Future])
    module.QCORE_CONTRACT_VERSION = "2.0"
    qcore_plugin_manager.register_module(module, "future", "qcore-plugin-future", "3.0")
    message = str(qcore_plugin_manager.errors[0])
    assert message == (
        f"plugin 'future' from qcore-plugin-future 3.0 was built for qcore contract 2.0, but "
        f"qcore {qcore.__version__} implements contract 1.4, which is incompatible: install "
        "a release of qcore-plugin-future made for contract 1.4, or a qcore that implements "
        "contract 2.0")
    assert qcore_plugin_manager.registry.find("quantizer", "future") is None
    # Another minor version of the same contract is compatible.
    module = make_plugin("minor", quantizers=[type("Minor", (RTNQuantizer,), {"name": "minor"})])
    module.QCORE_CONTRACT_VERSION = "1.7"
    qcore_plugin_manager.register_module(module, "minor", "qcore-plugin-minor", "1.0")
    assert len(qcore_plugin_manager.errors) == 1
    assert qcore_plugin_manager.registry.find("quantizer", "minor") is not None


def test_plugin_requiring_another_qcore_is_refused_before_import(
        site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "later,fits,extra")
    # Importing it would fail: the version check must come first and say why.
    site.install("qcore-plugin-later", "0.5.0", {"later": "fake_later.hooks"},
                 {"fake_later.hooks": "from qcore import does_not_exist_yet\n"},
                 requires=("qcore<0.3,>=0.2", "torch>=2.4"))
    site.quantizer_plugin("fits", "qcore-plugin-fits", "1.0", "fits-q")
    (site.root / "qcore_plugin_fits-1.0.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: qcore-plugin-fits\nVersion: 1.0\n"
        f"Requires-Dist: qcore<{int(qcore.__version__.split('.')[0]) + 1},>=0.1\n")
    # A requirement behind an extra is not a requirement of the plugin itself.
    site.install("qcore-plugin-extra", "1.0", {"extra": "fake_extra.hooks"},
                 {"fake_extra.hooks": QUANTIZER_SOURCE.format(cls="Q", name="extra-q")},
                 requires=('qcore>=9; extra == "future"',))
    manager = get_plugin_manager()
    assert [str(e) for e in manager.errors] == [
        f"plugin 'later' from qcore-plugin-later 0.5.0 requires qcore<0.3,>=0.2, but qcore "
        f"{qcore.__version__} is installed: install a release of qcore-plugin-later made for "
        f"qcore {qcore.__version__}, or the qcore it was made for "
        "(pip install 'qcore<0.3,>=0.2')"]
    assert "fake_later" not in sys.modules
    assert {"fits-q", "extra-q"} <= set(manager.registry.names("quantizer"))
    with pytest.raises(PluginLoadError, match="requires qcore<0.3,>=0.2"):
        get_registry()


def test_plugin_calling_sys_exit_at_import_is_reported(site: FakeSite,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("QCORE_PLUGINS", "quitter")
    site.install("qcore-plugin-quitter", "0.1", {"quitter": "fake_quitter.hooks"},
                 {"fake_quitter.hooks": "import sys\nsys.exit('no GPU, giving up')\n"})
    manager = get_plugin_manager()
    (error,) = manager.errors
    assert str(error).startswith("plugin 'quitter' from qcore-plugin-quitter 0.1 failed to "
                                 "import (entry point quitter = fake_quitter.hooks): SystemExit: "
                                 "no GPU, giving up")
    assert "rtn" in manager.registry.names("quantizer")


def test_requirements_pin_every_installed_plugin_loaded_or_not(
        site: FakeSite, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    from qcore.cli import main

    site.quantizer_plugin("kept", "qcore-plugin-kept", "1.2.3", "kept-q")
    site.quantizer_plugin("blocked", "qcore-plugin-blocked", "0.4", "blocked-q")
    site.install("qcore-plugin-broken", "2.0", {"broken": "fake_broken3.hooks"},
                 {"fake_broken3.hooks": "raise ImportError('broken on purpose')\n"})
    monkeypatch.setenv("QCORE_DISABLE_PLUGINS", "blocked")
    assert main(["plugins", "--requirements"]) == 0
    pins = capsys.readouterr().out.splitlines()
    assert [p.split("==")[0] for p in pins] == sorted(p.split("==")[0] for p in pins)
    assert {f"qcore=={qcore.__version__}", "qcore-plugin-kept==1.2.3",
            "qcore-plugin-blocked==0.4", "qcore-plugin-broken==2.0"} <= set(pins)


def test_several_errors_are_raised_together(qcore_plugin_manager) -> None:
    from qcore.interfaces import Quantizer

    class Unnamed(Quantizer):
        pass

    for i in range(2):
        qcore_plugin_manager.register_module(make_plugin(f"bad{i}", quantizers=[Unnamed]),
                                             f"bad{i}", f"qcore-plugin-bad{i}", "1.0")
    with pytest.raises(PluginLoadError, match="2 plugins failed to load") as raised:
        qcore_plugin_manager.raise_errors()
    assert "qcore-plugin-bad0" in str(raised.value) and "qcore-plugin-bad1" in str(raised.value)


# ------------------------------------------------------------------- import cost


def test_loading_every_plugin_does_not_import_torch(site: FakeSite) -> None:
    site.quantizer_plugin("extra", "qcore-plugin-extra", "1.2.3", "extra-q")
    code = textwrap.dedent("""
        import json, sys
        import qcore.builtin.hooks
        from qcore.plugins import get_plugin_manager
        manager = get_plugin_manager()
        manager.raise_errors()
        print(json.dumps({"torch": "torch" in sys.modules, "plugins": sorted(manager.plugins),
                          "quantizers": manager.registry.names("quantizer")}))
    """)
    env = {k: v for k, v in __import__("os").environ.items()
           if k not in {"QCORE_PLUGINS", "QCORE_DISABLE_PLUGINS"}}
    env["PYTHONPATH"] = str(site.root)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["torch"] is False
    assert {"builtin", "extra"} <= set(out["plugins"])
    assert {"extra-q", "rtn"} <= set(out["quantizers"])


def test_pytest_start_up_with_the_qcore_plugin_does_not_import_torch(tmp_path: Path) -> None:
    (tmp_path / "test_start.py").write_text(
        "import sys\n\n\n"
        "def test_fixtures_are_there(request):\n"
        "    assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "    assert request.config.pluginmanager.has_plugin('qcore.testing.plugin')\n"
        "    manager = request.getfixturevalue('qcore_plugin_manager')\n"
        "    assert set(manager.plugins) == {'builtin'}\n"
        "    assert 'torch' not in sys.modules\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "-p", "qcore.testing.plugin", "test_start.py"],
                            capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout


def test_the_kit_stays_out_of_test_sessions_that_do_not_ask_for_it(tmp_path: Path) -> None:
    """Having qcore installed adds no fixture or plugin to another project's pytest."""
    (tmp_path / "test_other.py").write_text(
        "def test_no_qcore(request):\n"
        "    assert not request.config.pluginmanager.has_plugin('qcore.testing.plugin')\n"
        "    assert 'qcore_registry' not in request.fixturenames\n"
        "    names = {p.__name__ for p in request.config.pluginmanager.get_plugins()\n"
        "             if hasattr(p, '__name__')}\n"
        "    assert not any(n.startswith('qcore') for n in names), names\n")
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                             "test_other.py"], capture_output=True, text=True, cwd=tmp_path,
                            timeout=60)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 passed" in result.stdout
