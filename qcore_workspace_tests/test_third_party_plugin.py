"""A third-party plugin as a real distribution: built from its own pyproject.toml with
setuptools, installed by pip, found through its ``qcore`` entry point.

The plugin (``qcore-plugin-clipsearch``) is written against the plugin author's guide
only (docs/plugins.md): an observer of the inputs' mean square and a quantizer that
shrinks each group's range to minimise the input-weighted error, producing the ``"int"``
format so the built-in packer and torch kernels serve it. Three more distributions show
what goes wrong: one raises at import, one reuses the quantizer's name, one misspells a
hook. None of them stops ``qcore plugins`` from saying what is wrong, and
``QCORE_PLUGINS`` runs without them.

pip installs all four (no dependencies, no build isolation, no index: nothing is
downloaded) into one folder with ``--target``; each check runs in a subprocess with that
folder on ``PYTHONPATH``, so this interpreter's plugins are untouched.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

PYPROJECT = """\
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "{dist}"
version = "{version}"
description = "{description}"
requires-python = ">=3.11"
dependencies = ["qcore"]

[project.entry-points.qcore]
{plugin} = "{package}.hooks"

[tool.setuptools.packages.find]
where = ["src"]

[tool.pytest.ini_options]
addopts = "-p qcore.testing.plugin"
"""

CLIPSEARCH_COMPONENTS = '''\
"""Clip search: round-to-nearest on a grid whose range is shrunk, group by group, to
minimise the error weighted by each input channel's mean square."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from qcore.interfaces import Observer, QuantizedWeight, Quantizer

if TYPE_CHECKING:
    import torch

    from qcore.scheme import Scheme


class InputSquareMean(Observer):
    """Mean of each input channel's square over the calibration tokens."""

    name = "input_sqmean"

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.total: torch.Tensor | None = None
        self.tokens = 0

    def update(self, inputs: torch.Tensor, outputs: torch.Tensor | None) -> None:
        x = inputs.detach().double()
        square_sum = (x * x).sum(0)
        self.total = square_sum if self.total is None else self.total + square_sum
        self.tokens += x.shape[0]

    def compute(self) -> torch.Tensor:
        if self.total is None:
            raise RuntimeError("input_sqmean saw no calibration batch")
        return (self.total / self.tokens).float()


class ClipSearch(Quantizer):
    """Round-to-nearest with the range of each group shrunk to minimise the
    input-weighted squared error."""

    name = "clipsearch"
    needs = frozenset({"input_sqmean"})
    produces = "int"
    supported_bits = frozenset({2, 3, 4, 5, 6, 7, 8})

    @dataclass(frozen=True)
    class Config:
        grid_points: int = 20
        min_ratio: float = 0.5

    def quantize(self, weight: torch.Tensor, stats: Mapping[str, Any],
                 scheme: Scheme) -> QuantizedWeight:
        import torch

        out_f, in_f = weight.shape
        group = in_f if scheme.group_size == -1 else scheme.group_size
        importance = stats["input_sqmean"].float()
        top = (1 << scheme.bits) - 1
        ratios = torch.linspace(self.config.min_ratio, 1.0, self.config.grid_points)
        codes = torch.empty(out_f, in_f, dtype=torch.uint8)
        scales, zeros = [], []
        for start in range(0, in_f, group):
            w = weight[:, start:start + group].float()
            imp = importance[start:start + group]
            best_err = best_q = best_scale = best_zero = None
            for r in ratios.tolist():
                if scheme.symmetric:
                    scale = r * w.abs().amax(1) / (top / 2)
                else:
                    lo = r * w.amin(1).clamp(max=0)
                    scale = (r * w.amax(1).clamp(min=0) - lo) / top
                # The format stores float16 scales: choose codes on the stored grid.
                scale = torch.where(scale > 0, scale, torch.ones_like(scale))
                scale = scale.to(torch.float16).float()
                if scheme.symmetric:
                    zero = torch.full_like(scale, float(1 << (scheme.bits - 1)))
                else:
                    zero = torch.round(-lo / scale).clamp(0, top)
                q = torch.clamp(torch.round(w / scale[:, None]) + zero[:, None], 0, top)
                err = ((((q - zero[:, None]) * scale[:, None]) - w) ** 2 * imp).sum(1)
                if best_err is None:
                    best_err, best_q, best_scale, best_zero = err, q, scale, zero
                    continue
                better = err < best_err
                best_err = torch.where(better, err, best_err)
                best_q = torch.where(better[:, None], q, best_q)
                best_scale = torch.where(better, scale, best_scale)
                best_zero = torch.where(better, zero, best_zero)
            codes[:, start:start + group] = best_q.to(torch.uint8)
            scales.append(best_scale)
            zeros.append(best_zero)
        tensors = {"codes": codes, "scales": torch.stack(scales, 1).to(torch.float16)}
        if not scheme.symmetric:
            tensors["zeros"] = torch.stack(zeros, 1).to(torch.uint8)
        return QuantizedWeight(
            format="int", shape=(out_f, in_f), tensors=tensors,
            params={"bits": scheme.bits, "group_size": scheme.group_size,
                    "symmetric": scheme.symmetric, "act_bits": scheme.act_bits,
                    "act_dynamic": scheme.act_dynamic})
'''

CLIPSEARCH_HOOKS = '''\
"""Hooks of qcore-plugin-clipsearch: registration only, cheap to import."""

from qcore import hookimpl

from qcore_plugin_clipsearch.components import ClipSearch, InputSquareMean

QCORE_CONTRACT_VERSION = "1.0"


@hookimpl
def qcore_register_observers(register):
    register(InputSquareMean)


@hookimpl
def qcore_register_quantizers(register):
    register(ClipSearch)
'''

CLIPSEARCH_CONFORMANCE = '''\
import pytest

from qcore.testing import BaseObserverTests, BaseQuantizerTests
from qcore_plugin_clipsearch.components import ClipSearch, InputSquareMean


class TestClipSearch(BaseQuantizerTests):
    max_error_steps = None  # a shrunk range moves the extremes by more than half a step

    @pytest.fixture
    def quantizer(self):
        return ClipSearch()

    @pytest.fixture
    def observers(self):
        return {"input_sqmean": InputSquareMean}


class TestInputSquareMean(BaseObserverTests):
    @pytest.fixture
    def observer(self):
        return InputSquareMean()
'''

BROKEN_HOOKS = '''\
raise ImportError("qcore-plugin-broken needs CuPy: pip install cupy-cuda12x")
'''

COPYCAT_HOOKS = '''\
from qcore import hookimpl
from qcore.interfaces import Quantizer


class CopycatClipSearch(Quantizer):
    """Another quantizer that took the name 'clipsearch'."""

    name = "clipsearch"


@hookimpl
def qcore_register_quantizers(register):
    register(CopycatClipSearch)
'''

TYPO_HOOKS = '''\
from qcore import hookimpl
from qcore.builtin.rtn import RTNQuantizer


class Typo(RTNQuantizer):
    """Round-to-nearest under another name, behind a misspelled hook."""

    name = "typo-rtn"


@hookimpl
def qcore_register_quantiser(register):  # British spelling: no such hook
    register(Typo)
'''

#: The three broken distributions, by plugin name.
BROKEN = "broken,copycat,typo"

RUN_PIPELINE = '''\
import json, sys
from qcore.plugins import get_plugin_manager

manager = get_plugin_manager()
manager.raise_errors()
torch_after_loading = "torch" in sys.modules

import torch
from qcore.pipeline import Pipeline
from qcore.scheme import Scheme

registry = manager.registry
resolved = Pipeline.from_names(
    "clipsearch", scheme=Scheme(bits=3, group_size=32, symmetric=False),
    options={"clipsearch": {"grid_points": "30"}}).validate()
g = torch.Generator().manual_seed(0)
weight = torch.randn(48, 96, generator=g)
inputs = torch.randn(256, 96, generator=g) * torch.linspace(0.1, 4.0, 96)
stats = {}
for name, observer_class in resolved.observers.items():
    observer = observer_class()
    for batch in inputs.split(64):
        observer.update(batch, None)
    stats[name] = observer.compute()
qweight = resolved.quantizer.quantize(weight, stats, resolved.scheme)
packed = resolved.packer.pack(qweight)
kernel = registry.get("kernel", resolved.kernel).cls()
y = kernel.linear(inputs, kernel.prepare(packed, torch.device("cpu")), None)
dense = resolved.quantizer.dequantize(qweight)
rtn = registry.get("quantizer", "rtn").cls()
dense_rtn = rtn.dequantize(rtn.quantize(weight, {}, resolved.scheme))
exact = inputs @ weight.T
importance = stats["input_sqmean"]
print(json.dumps({
    "weighted_error": float(((dense - weight) ** 2 * importance).sum()),
    "weighted_error_rtn": float(((dense_rtn - weight) ** 2 * importance).sum()),
    "torch_after_loading": torch_after_loading,
    "quantizer": type(resolved.quantizer).__module__,
    "config": resolved.spec()["quantizer"],
    "observers": sorted(resolved.observers),
    "packer": resolved.packer.name, "kernel": resolved.kernel,
    "distributions": resolved.distributions,
    "kernel_vs_dequantize": float((y - inputs @ dense.T).abs().max()),
    "output_error": float((y - exact).norm() / exact.norm()),
    "output_error_rtn": float((inputs @ dense_rtn.T - exact).norm() / exact.norm()),
}))
'''

REPORT = '''\
import json
from qcore.errors import PluginLoadError
from qcore.plugins import get_plugin_manager, get_registry

manager = get_plugin_manager()
try:
    get_registry()
    raised = None
except PluginLoadError as exc:
    raised = str(exc)
print(json.dumps({"report": manager.report(), "errors": [str(e) for e in manager.errors],
                  "raised": raised}))
'''


def write_distribution(root: Path, dist: str, version: str, plugin: str,
                       modules: dict[str, str], tests: dict[str, str] | None = None) -> Path:
    package = dist.replace("-", "_")
    folder = root / dist
    (folder / "src" / package).mkdir(parents=True)
    (folder / "pyproject.toml").write_text(PYPROJECT.format(
        dist=dist, version=version, plugin=plugin, package=package,
        description=f"qcore plugin {plugin}"))
    (folder / "src" / package / "__init__.py").write_text("")
    for name, source in modules.items():
        (folder / "src" / package / f"{name}.py").write_text(source)
    for name, source in (tests or {}).items():
        (folder / "tests").mkdir(exist_ok=True)
        (folder / "tests" / name).write_text(source)
    return folder


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("third_party")
    sources = [
        write_distribution(root, "qcore-plugin-clipsearch", "0.2.0", "clipsearch",
                           {"components": CLIPSEARCH_COMPONENTS, "hooks": CLIPSEARCH_HOOKS},
                           {"test_conformance.py": CLIPSEARCH_CONFORMANCE}),
        write_distribution(root, "qcore-plugin-broken", "1.0.0", "broken",
                           {"hooks": BROKEN_HOOKS}),
        write_distribution(root, "qcore-plugin-copycat", "0.1.0", "copycat",
                           {"hooks": COPYCAT_HOOKS}),
        write_distribution(root, "qcore-plugin-typo", "0.3.0", "typo", {"hooks": TYPO_HOOKS}),
    ]
    target = root / "site-packages"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
         "--no-index", "--disable-pip-version-check", "--no-input", "--quiet",
         "--target", str(target), *map(str, sources)],
        capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, f"pip failed:\n{result.stdout}\n{result.stderr}"
    return {"target": target, "clipsearch": sources[0]}


def run(site: dict[str, Path], args: list[str], *, allow: str | None = None,
        disable: str | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items()
           if k not in {"QCORE_PLUGINS", "QCORE_DISABLE_PLUGINS", "PYTHONPATH"}}
    env["PYTHONPATH"] = str(site["target"])
    # Small tensors: starting a thread pool per op costs more than it saves.
    env["OMP_NUM_THREADS"] = "1"
    if allow is not None:
        env["QCORE_PLUGINS"] = allow
    if disable is not None:
        env["QCORE_DISABLE_PLUGINS"] = disable
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=120, cwd=cwd)


def python_json(site: dict[str, Path], code: str, **kwargs) -> dict:
    result = run(site, ["-c", code], **kwargs)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_pip_installed_the_distributions_with_entry_points(site) -> None:
    info = site["target"] / "qcore_plugin_clipsearch-0.2.0.dist-info" / "entry_points.txt"
    assert info.read_text().split() == ["[qcore]", "clipsearch", "=",
                                        "qcore_plugin_clipsearch.hooks"]


def test_pipeline_naming_the_plugin_validates_and_runs(site) -> None:
    out = python_json(site, RUN_PIPELINE, disable=BROKEN)
    assert out["torch_after_loading"] is False  # loading plugins stays cheap
    assert out["quantizer"] == "qcore_plugin_clipsearch.components"
    assert out["config"] == {"name": "clipsearch", "options": {"grid_points": 30, "min_ratio": 0.5}}
    assert out["observers"] == ["input_sqmean"]
    assert (out["packer"], out["kernel"]) == ("int", "torch")  # the built-ins serve its format
    assert out["distributions"] == {"qcore": "0.1.0", "qcore-plugin-clipsearch": "0.2.0"}
    assert out["kernel_vs_dequantize"] < 1e-4
    # The search includes the plain range (ratio 1) and minimises the weighted error group
    # by group, so it cannot do worse than RTN on that error; here it does better, and
    # the layer's output on the calibration inputs improves with it.
    assert out["weighted_error"] <= 0.9 * out["weighted_error_rtn"], out
    assert out["output_error"] < 0.95 * out["output_error_rtn"] < 0.2, out


def test_allowlist_loads_only_the_named_plugin(site) -> None:
    out = python_json(site, REPORT, allow="clipsearch")
    assert out["errors"] == [] and out["raised"] is None
    plugins = {p["name"]: p for p in out["report"]}
    assert set(plugins) == {"builtin", "clipsearch"}
    assert plugins["clipsearch"]["components"] == {"observer": ["input_sqmean"],
                                                   "quantizer": ["clipsearch"]}


def test_qcore_plugins_json_lists_the_plugin_with_distribution_and_version(site) -> None:
    result = run(site, ["-m", "qcore.cli", "plugins", "--json"], allow="clipsearch")
    assert result.returncode == 0, result.stderr
    listing = json.loads(result.stdout)
    plugins, errors = listing["plugins"], listing["errors"]
    assert errors == []
    entry = next(p for p in plugins if p["name"] == "clipsearch")
    assert entry["distribution"] == "qcore-plugin-clipsearch"
    assert entry["version"] == "0.2.0"
    assert entry["entry_point"] == "clipsearch = qcore_plugin_clipsearch.hooks"
    assert entry["hooks"] == ["qcore_register_observers", "qcore_register_quantizers"]
    assert entry["error"] is None


def test_broken_and_duplicate_distributions_are_reported(site) -> None:
    # The allowlist keeps other plugins installed here out of the picture.
    out = python_json(site, REPORT, allow="broken,clipsearch,copycat")
    plugins = {p["name"]: p for p in out["report"]}
    broken = plugins["broken"]["error"]
    assert broken.startswith("plugin 'broken' from qcore-plugin-broken 1.0.0 failed to import "
                             "(entry point broken = qcore_plugin_broken.hooks): ImportError: "
                             "qcore-plugin-broken needs CuPy")
    duplicate = [e for e in out["errors"] if "two quantizers are named 'clipsearch'" in e]
    assert len(duplicate) == 1
    assert "qcore-plugin-clipsearch 0.2.0" in duplicate[0]
    assert "qcore-plugin-copycat 0.1.0" in duplicate[0]
    assert [plugins[p]["error"] is None for p in ("clipsearch", "copycat")].count(False) == 1
    assert out["raised"].startswith("2 plugins failed to load:")
    assert "QCORE_DISABLE_PLUGINS=<plugin>" in out["raised"]


def test_qcore_plugins_cli_shows_the_errors(site) -> None:
    result = run(site, ["-m", "qcore.cli", "plugins"], allow="broken,clipsearch")
    assert result.returncode == 1
    assert "clipsearch  (qcore-plugin-clipsearch 0.2.0)" in result.stdout
    assert "ERROR: plugin 'broken' from qcore-plugin-broken 1.0.0 failed to import" in result.stdout


def test_the_plugins_own_conformance_tests_pass(site) -> None:
    folder = site["clipsearch"]
    result = run(site, ["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=folder,
                 allow="")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    summary = result.stdout.strip().splitlines()[-1]
    assert " passed" in summary and "failed" not in summary, summary


def test_qcore_plugins_says_what_is_wrong_with_each_broken_plugin(site) -> None:
    # Everything installed loads: this environment's plugins and the four above.
    listing = run(site, ["-m", "qcore.cli", "plugins"])
    assert listing.returncode == 1, listing.stderr
    out = listing.stdout
    assert "clipsearch  (qcore-plugin-clipsearch 0.2.0)" in out
    assert "ERROR: plugin 'broken' from qcore-plugin-broken 1.0.0 failed to import" in out
    assert "two quantizers are named 'clipsearch'" in out and "qcore-plugin-copycat 0.1.0" in out
    assert "ERROR: plugin 'typo' from qcore-plugin-typo 0.3.0 is invalid" in out
    assert "qcore_register_quantiser" in out and "qcore_register_quantizers" in out
    assert listing.stderr == ""

    as_json = run(site, ["-m", "qcore.cli", "plugins", "--json"])
    assert as_json.returncode == 0, as_json.stderr
    report = json.loads(as_json.stdout)
    failed = {p["name"] for p in report["plugins"] if p["error"] is not None}
    assert failed == {"broken", "copycat", "typo"}
    assert len(report["errors"]) == 3

    pins = run(site, ["-m", "qcore.cli", "plugins", "--requirements"])
    assert pins.returncode == 0
    assert {"qcore-plugin-broken==1.0.0", "qcore-plugin-typo==0.3.0"} <= set(pins.stdout.split())


def test_the_allowlist_or_the_blocklist_runs_without_the_broken_plugins(site) -> None:
    for kwargs in ({"allow": "clipsearch"}, {"disable": BROKEN}):
        listing = run(site, ["-m", "qcore.cli", "plugins"], **kwargs)
        assert listing.returncode == 0, listing.stdout
        assert "ERROR" not in listing.stdout and "clipsearch  (" in listing.stdout
    blocked = run(site, ["-m", "qcore.cli", "-p", "broken", "-p", "copycat", "-p", "typo",
                         "plugins"])
    assert blocked.returncode == 0, blocked.stdout


@pytest.mark.slow
def test_quantize_names_the_broken_plugins_and_runs_with_the_allowlist(site, tmp_path) -> None:
    from qcore.testing.models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama")
    args = ["-m", "qcore.cli", "quantize", str(model), "--pipeline", "clipsearch",
            "--calib", str(model / "calibration.txt"), "--samples", "4", "--seq-len", "32",
            "--batch-size", "2", "--device", "cpu", "--bits", "4", "--group-size", "32",
            "--out", str(tmp_path / "ck")]
    refused = run(site, args)
    assert refused.returncode == 2
    assert "3 plugins failed to load" in refused.stderr
    for distribution in ("qcore-plugin-broken", "qcore-plugin-copycat", "qcore-plugin-typo"):
        assert distribution in refused.stderr
    assert "QCORE_DISABLE_PLUGINS=<plugin>" in refused.stderr
    assert not (tmp_path / "ck").exists()

    done = run(site, args, allow="clipsearch")
    assert done.returncode == 0, done.stderr[-3000:]
    config = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert config["distributions"]["qcore-plugin-clipsearch"] == "0.2.0"
