"""Publishing: every distribution's metadata, the wheelhouse, the plugin template, and
what a user gets in a fresh virtual environment.

The two slow tests make a virtual environment under ``tmp_path`` and install in two steps:

1. the third-party requirements that the wheelhouse's wheels declare (torch, transformers,
   ...), pinned to the versions this environment runs, from the machine's usual source
   (its pip configuration: here the torch CPU wheel on disk and the package index);
2. qcore's own distributions with ``pip install --no-index --find-links WHEELHOUSE``, with
   pip's configuration switched off, so nothing but the wheelhouse can serve them.

Step 2 then also proves that the declared dependencies are complete: anything a wheel
needs but does not declare is missing, and anything of qcore's it declares must be in the
wheelhouse.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import tomllib
import zipfile
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

import qcore
from qcore.cli import main
from qcore.plugin_template import KINDS, PluginNames, create_plugin, qcore_requirement

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "plugins.md"

#: The plugin distribution the wheelhouse test installs, and its pipeline name. Until
#: plugins/awq exists, qcore-plugin-gptq stands in for it.
PLUGIN = (("qcore-plugin-awq", "awq") if (ROOT / "plugins" / "awq" / "pyproject.toml").is_file()
          else ("qcore-plugin-gptq", "gptq"))


def load_build_script():
    spec = importlib.util.spec_from_file_location("build_wheelhouse",
                                                  ROOT / "scripts" / "build_wheelhouse.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


BUILD = load_build_script()
PROJECTS = BUILD.find_projects()


def pyproject(project: Path) -> dict:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]


WORKSPACE_DISTRIBUTIONS = {canonicalize_name(pyproject(p)["name"]) for p in PROJECTS}


# ------------------------------------------------------------------ metadata (fast)


def test_the_build_script_finds_every_distribution() -> None:
    found = {p.relative_to(ROOT).as_posix() for p in PROJECTS}
    assert {"core", "kernels", "plugins/gptq"} <= found
    assert found == {"core", "kernels"} | {p.parent.relative_to(ROOT).as_posix()
                                           for p in ROOT.glob("plugins/*/pyproject.toml")}


@pytest.mark.parametrize("project", PROJECTS, ids=lambda p: p.name)
def test_metadata_of_every_distribution(project: Path) -> None:
    meta = pyproject(project)
    Version(meta["version"])  # a valid version
    assert meta["license"] == "Apache-2.0"
    readme = project / meta["readme"]
    assert readme.is_file() and len(readme.read_text()) > 200, f"{readme} says too little"
    assert readme.read_text().startswith(f"# {meta['name']}\n")
    assert meta["requires-python"] == ">=3.11"
    assert meta.get("description")
    if meta["name"] == "qcore":
        return
    # Every other distribution is a plugin: found by the keyword, loaded by the entry point.
    assert "qcore-plugin" in meta["keywords"]
    entry_points = meta["entry-points"]["qcore"]
    assert len(entry_points) == 1
    requirements = {canonicalize_name(r.name): r for r in map(Requirement, meta["dependencies"])}
    core = requirements["qcore"]
    assert qcore.__version__ in core.specifier, f"{meta['name']} excludes this qcore"
    # A compatible range: this release line and not the next one.
    current = Version(qcore.__version__)
    next_line = (f"0.{current.minor + 1}.0" if current.major == 0 else f"{current.major + 1}.0.0")
    assert next_line not in core.specifier, f"{meta['name']}: {core} has no upper bound"


@pytest.mark.parametrize("project", [p for p in PROJECTS if p.name != "core"],
                         ids=lambda p: p.name)
def test_a_distribution_imported_by_a_plugin_is_declared(project: Path) -> None:
    meta = pyproject(project)
    declared = {canonicalize_name(Requirement(r).name) for r in meta["dependencies"]}
    packages = {canonicalize_name(pyproject(p)["name"]): package_of(p) for p in PROJECTS}
    own = package_of(project)
    for source in (project / "src").rglob("*.py"):
        imported = set(re.findall(r"^\s*(?:from|import)\s+(qcore_\w+)", source.read_text(),
                                  re.M))
        for distribution, package in packages.items():
            if package in imported and package != own:
                assert distribution in declared, (
                    f"{source.relative_to(ROOT)} imports {package} but {meta['name']} does not "
                    f"declare {distribution}")


def package_of(project: Path) -> str:
    (package,) = [p.name for p in (project / "src").iterdir()
                  if p.is_dir() and (p / "__init__.py").is_file()]
    return package


def test_a_component_needing_another_plugins_component_declares_its_distribution() -> None:
    """Statistics a step needs must come from qcore, its own distribution, or one it
    declares: in an environment with only its declared dependencies it must run."""
    from qcore.plugins import PluginManager

    manager = PluginManager()
    manager.load_installed(allowlist=None)
    manager.raise_errors()
    dependencies = {canonicalize_name(pyproject(p)["name"]):
                    {canonicalize_name(Requirement(r).name) for r in pyproject(p)["dependencies"]}
                    for p in PROJECTS}
    checked = 0
    for kind in ("transform", "quantizer"):
        for registration in manager.registry.of_kind(kind):
            owner = canonicalize_name(registration.origin.distribution)
            if owner not in dependencies:
                continue  # not one of this workspace's distributions
            for need in registration.cls.needs:
                provider = manager.registry.find("observer", need)
                if provider is None:
                    continue  # a product of an earlier step, not a component
                source = canonicalize_name(provider.origin.distribution)
                assert source in {owner, "qcore"} | dependencies[owner], (
                    f"{kind} {registration.cls.name!r} of {owner} needs observer {need!r} "
                    f"from {source}, which {owner} does not declare")
                checked += 1
    assert checked, "no workspace component needs an observer?"


# ------------------------------------------------------------------- template (fast)


def test_qcore_requirement_is_the_running_release_line() -> None:
    assert qcore_requirement("0.1.0") == "qcore>=0.1,<0.2"
    assert qcore_requirement("0.3.2") == "qcore>=0.3,<0.4"
    assert qcore_requirement("1.2.3") == "qcore>=1.2,<2"


@pytest.mark.parametrize("kind", KINDS)
def test_new_plugin_writes_a_complete_project(tmp_path: Path, capsys, monkeypatch,
                                             kind: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["new-plugin", "clip-search", "--kind", kind]) == 0
    target = tmp_path / "qcore-plugin-clip-search"
    assert f"created {target.name}" in capsys.readouterr().out
    files = sorted(p.relative_to(target).as_posix() for p in target.rglob("*") if p.is_file())
    assert files == [".gitignore", "README.md", "pyproject.toml",
                     "src/qcore_plugin_clip_search/__init__.py",
                     "src/qcore_plugin_clip_search/hooks.py",
                     f"src/qcore_plugin_clip_search/{kind}.py", f"tests/test_{kind}.py"]
    meta = tomllib.loads((target / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "qcore-plugin-clip-search"
    assert meta["entry-points"]["qcore"] == {"clip-search": "qcore_plugin_clip_search.hooks"}
    assert "qcore-plugin" in meta["keywords"]
    (requirement,) = map(Requirement, meta["dependencies"])
    assert requirement.name == "qcore" and qcore.__version__ in requirement.specifier
    hooks = (target / "src/qcore_plugin_clip_search/hooks.py").read_text()
    assert f'QCORE_CONTRACT_VERSION = "{qcore.CONTRACT_VERSION}"' in hooks
    class_name = PluginNames.of("clip-search", kind).class_name
    assert class_name == f"ClipSearch{kind.capitalize()}"
    assert f"register({class_name})" in hooks
    for path in target.rglob("*"):
        if path.is_file():
            assert "{{" not in path.read_text(), f"{path} has a placeholder left"
            if path.suffix == ".py":
                compile(path.read_text(), str(path), "exec")


def test_new_plugin_needs_neither_pytest_nor_torch(tmp_path: Path) -> None:
    code = ("import sys; sys.modules['pytest'] = None; from qcore.cli import main; "
            f"code = main(['new-plugin', 'myquant', '--dir', {str(tmp_path / 'p')!r}]); "
            "assert 'torch' not in sys.modules, 'new-plugin imported torch'; sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "p" / "src" / "qcore_plugin_myquant" / "quantizer.py").is_file()


@pytest.mark.parametrize("name, message", [
    ("My Quant", "is not valid: use lower-case letters"),
    ("1quant", "is not valid"),
    ("my--quant", "is not valid"),
    ("myquant-", "is not valid"),
    ("qcore-plugin-myquant", "give the short name ('myquant')"),
    ("class", "is a Python keyword"),
    ("rtn", "'rtn' is already the name of a built-in quantizer"),
])
def test_new_plugin_refuses_a_bad_name(tmp_path: Path, capsys, monkeypatch, name: str,
                                       message: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["new-plugin", name]) == 2
    assert message in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_new_plugin_refuses_a_non_empty_directory_and_writes_nothing(tmp_path: Path,
                                                                      capsys) -> None:
    target = tmp_path / "mine"
    target.mkdir()
    (target / "pyproject.toml").write_text("# mine\n")
    assert main(["new-plugin", "myquant", "--dir", str(target)]) == 2
    assert "already exists and is not an empty directory; nothing was written" in \
        capsys.readouterr().err
    assert [p.name for p in target.iterdir()] == ["pyproject.toml"]
    assert (target / "pyproject.toml").read_text() == "# mine\n"
    # An empty directory is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert create_plugin("myquant", empty) == empty
    assert (empty / "pyproject.toml").is_file()


def test_new_plugin_refuses_an_unknown_kind(tmp_path: Path) -> None:
    from qcore.errors import TemplateError

    with pytest.raises(TemplateError, match="unknown component kind 'observer'.*quantizer, "
                                            "transform"):
        create_plugin("myquant", tmp_path / "x", kind="observer")
    assert not (tmp_path / "x").exists()


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without what would leak the workspace's plugins into a child."""
    env = {k: v for k, v in os.environ.items()
           if k not in {"PYTHONPATH", "QCORE_PLUGINS", "QCORE_DISABLE_PLUGINS", "VIRTUAL_ENV"}}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", **extra)
    return env


def run(args: list[str], *, env: dict[str, str], cwd: Path,
        timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run(args, capture_output=True, text=True, env=env, cwd=cwd,
                            timeout=timeout)
    assert result.returncode == 0, (f"{' '.join(map(str, args))} exited with "
                                    f"{result.returncode}:\n{result.stdout[-4000:]}\n"
                                    f"{result.stderr[-4000:]}")
    return result


@pytest.mark.slow
@pytest.mark.parametrize("kind", KINDS)
def test_generated_project_installs_and_its_tests_pass(tmp_path: Path, kind: str) -> None:
    """pip installs the generated project (into a folder on PYTHONPATH, next to this
    environment's qcore), its own tests pass, and qcore finds and runs it."""
    project = create_plugin("myplug", tmp_path / "myplug", kind)
    site = tmp_path / "site"
    env = clean_env(PYTHONPATH=str(site))
    run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(site), str(project)], env=clean_env(), cwd=tmp_path)
    tests = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"], env=env,
                cwd=project)
    assert re.search(r"\d+ passed", tests.stdout) and "failed" not in tests.stdout

    from qcore.testing.models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama")
    listing = run([sys.executable, "-m", "qcore.cli", "plugins", "--json"],
                  env={**env, "QCORE_PLUGINS": "myplug"}, cwd=tmp_path)
    plugins = {p["name"]: p for p in json.loads(listing.stdout)["plugins"]}
    assert plugins["myplug"]["distribution"] == "qcore-plugin-myplug"
    assert plugins["myplug"]["components"] == {kind: ["myplug"]}
    run([sys.executable, "-m", "qcore.cli", "quantize", str(model), "--pipeline", "myplug",
         "--calib", str(model / "calibration.txt"), "--samples", "4", "--seq-len", "32",
         "--batch-size", "2", "--device", "cpu", "--group-size", "32", "--out",
         str(tmp_path / "ck")], env={**env, "QCORE_PLUGINS": "myplug"}, cwd=tmp_path)
    config = json.loads((tmp_path / "ck" / "config.json").read_text())["quantization_config"]
    assert config["distributions"]["qcore-plugin-myplug"] == "0.1.0"


# --------------------------------------------------------- the wheelhouse (slow)


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheelhouse")
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "build_wheelhouse.py"),
                             "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def wheel_metadata(wheel: Path) -> tuple[dict[str, list[str]], list[str]]:
    """The wheel's METADATA headers (name -> values) and its file list."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (meta_path,) = [n for n in names if n.endswith(".dist-info/METADATA")]
        text = archive.read(meta_path).decode()
    headers: dict[str, list[str]] = {}
    for line in text.split("\n\n", 1)[0].splitlines():
        key, _, value = line.partition(": ")
        headers.setdefault(key, []).append(value)
    return headers, names


def third_party_pins(wheelhouse: Path) -> list[str]:
    """What the wheels require from outside the wheelhouse (no extras), pinned to the
    versions this environment runs."""
    pins = set()
    for wheel in wheelhouse.glob("*.whl"):
        for line in wheel_metadata(wheel)[0].get("Requires-Dist", []):
            requirement = Requirement(line)
            if requirement.marker is not None or \
                    canonicalize_name(requirement.name) in WORKSPACE_DISTRIBUTIONS:
                continue
            pins.add(f"{requirement.name}=={version(requirement.name)}")
    return sorted(pins)


def fresh_venv(path: Path, wheelhouse: Path, *distributions: str,
               also: tuple[str, ...] = ()) -> Path:
    """A new virtual environment with ``distributions`` installed from the wheelhouse
    alone (their third-party dependencies, and ``also``, from the usual source first)."""
    run([sys.executable, "-m", "venv", str(path)], env=clean_env(), cwd=path.parent)
    python = path / "bin" / "python"
    run([str(python), "-m", "pip", "install", "--quiet", *third_party_pins(wheelhouse), *also],
        env=clean_env(), cwd=path.parent)
    offline = {k: v for k, v in clean_env(PIP_CONFIG_FILE=os.devnull).items()
               if not k.startswith("PIP_") or k == "PIP_CONFIG_FILE"}
    run([str(python), "-m", "pip", "install", "--quiet", "--no-index", "--find-links",
         str(wheelhouse), *distributions], env=offline, cwd=path.parent)
    return path


def venv_env(venv: Path, **extra: str) -> dict[str, str]:
    env = clean_env(VIRTUAL_ENV=str(venv), **extra)
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.mark.slow
def test_wheelhouse_installs_a_plugin_in_a_fresh_environment(wheelhouse: Path,
                                                              tmp_path: Path) -> None:
    """Build the wheelhouse, install PLUGIN from it alone into a new virtual environment
    (qcore-plugin-awq; qcore-plugin-gptq until plugins/awq exists), and run it there."""
    distribution, method = PLUGIN
    # Each distribution: one wheel and one sdist, with the metadata of its pyproject.
    for project in PROJECTS:
        meta = pyproject(project)
        prefix = BUILD.file_prefix(meta["name"])
        wheel = wheelhouse / f"{prefix}{meta['version']}-py3-none-any.whl"
        sdist = wheelhouse / f"{prefix}{meta['version']}.tar.gz"
        assert wheel.is_file() and sdist.is_file(), sorted(p.name for p in wheelhouse.iterdir())
        headers, names = wheel_metadata(wheel)
        assert headers["Name"] == [meta["name"]] and headers["Version"] == [meta["version"]]
        assert headers["License-Expression"] == ["Apache-2.0"]
        assert headers["Description-Content-Type"] == ["text/markdown"]
        if meta["name"] != "qcore":
            assert "qcore-plugin" in headers["Keywords"][0].split(",")
        if meta["name"] == "qcore":
            templates = {n for n in names if n.startswith("qcore/templates/plugin/")}
            assert {f"qcore/templates/plugin/{f}" for f in (
                "pyproject.toml.tmpl", "hooks.py.tmpl", "quantizer.py.tmpl",
                "test_quantizer.py.tmpl", "README.md.tmpl")} <= templates

    (plugin_version,) = [pyproject(p)["version"] for p in PROJECTS
                         if pyproject(p)["name"] == distribution]
    venv = fresh_venv(tmp_path / "venv", wheelhouse, distribution)
    env = venv_env(venv)
    where = run([str(venv / "bin" / "python"), "-c", "import qcore; print(qcore.__file__)"],
                env=env, cwd=tmp_path)
    assert where.stdout.startswith(str(venv)), "qcore must come from the wheel"

    listing = json.loads(run(["qcore", "plugins", "--json"], env=env, cwd=tmp_path).stdout)
    assert listing["errors"] == []
    assert {p["name"]: p["distribution"] for p in listing["plugins"]} == {
        "builtin": "qcore", method: distribution}
    pins = run(["qcore", "plugins", "--requirements"], env=env, cwd=tmp_path).stdout.split()
    assert pins == [f"qcore=={qcore.__version__}", f"{distribution}=={plugin_version}"]

    from qcore.testing.models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama")
    checkpoint = tmp_path / f"tiny-llama-{method}"
    run(["qcore", "quantize", str(model), "--pipeline", method, "--bits", "4",
         "--group-size", "32", "--calib", str(model / "calibration.txt"), "--samples", "4",
         "--seq-len", "32", "--batch-size", "2", "--device", "cpu", "--out", str(checkpoint)],
        env=env, cwd=tmp_path)
    info = json.loads(run(["qcore", "inspect", str(checkpoint), "--json"], env=env,
                          cwd=tmp_path).stdout)
    assert info["distributions"] == {"qcore": qcore.__version__, distribution: plugin_version}

    if method == "awq":  # the AWQ issue: alone, it composes with GPTQ only by naming it
        composed = subprocess.run(
            ["qcore", "quantize", str(model), "--pipeline", "awq,gptq", "--samples", "4",
             "--seq-len", "32", "--calib", str(model / "calibration.txt"),
             "--out", str(tmp_path / "never-written")],
            env=env, cwd=tmp_path, capture_output=True, text=True)
        assert composed.returncode != 0
        assert "qcore-plugin-gptq" in composed.stderr, composed.stderr
        assert not (tmp_path / "never-written").exists()

    # Where the plugin is missing, loading the checkpoint names the distribution to install.
    run([str(venv / "bin" / "python"), "-m", "pip", "uninstall", "--quiet", "--yes",
         distribution], env=env, cwd=tmp_path)
    load = subprocess.run([str(venv / "bin" / "python"), "-c",
                           f"import qcore.checkpoint; qcore.checkpoint.load({str(checkpoint)!r})"],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=120)
    assert load.returncode == 1
    assert (f"this checkpoint needs {distribution} (the checkpoint was made with "
            f"{plugin_version}), which is not installed: pip install {distribution}"
            ) in load.stderr


@pytest.mark.slow
def test_wheelhouse_vptq_without_finetune_names_the_missing_distribution(
        wheelhouse: Path, tmp_path: Path) -> None:
    """qcore and qcore-plugin-vptq from the wheelhouse, without qcore-plugin-finetune:
    ``vptq`` runs, and ``--pipeline vptq,finetune`` stops before loading the model, naming
    the distribution to install, and writes nothing."""
    venv = fresh_venv(tmp_path / "venv", wheelhouse, "qcore-plugin-vptq")
    env = venv_env(venv)
    listing = json.loads(run(["qcore", "plugins", "--json"], env=env, cwd=tmp_path).stdout)
    assert listing["errors"] == []
    assert {p["name"]: p["distribution"] for p in listing["plugins"]} == {
        "builtin": "qcore", "vptq": "qcore-plugin-vptq"}

    from qcore.testing.models import save_tiny_model

    model = save_tiny_model(tmp_path / "tiny-llama")
    common = [str(model), "--bits", "2", "--calib", str(model / "calibration.txt"),
              "--samples", "4", "--seq-len", "32", "--batch-size", "2", "--device", "cpu"]
    run(["qcore", "quantize", *common, "--pipeline", "vptq", "--out", str(tmp_path / "vq")],
        env=env, cwd=tmp_path)
    refused = subprocess.run(["qcore", "quantize", *common, "--pipeline", "vptq,finetune",
                              "--out", str(tmp_path / "never-written")],
                             env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0
    assert ("'finetune' is provided by qcore-plugin-finetune: pip install "
            "qcore-plugin-finetune") in refused.stderr, refused.stderr
    assert "Loading" not in refused.stderr and not (tmp_path / "never-written").exists()


def docs_bash_blocks(*sections: str) -> str:
    """The ``bash`` blocks of these sections of docs/plugins.md, in page order."""
    text = DOCS.read_text()
    found = []
    for section in sections:
        body = text.split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
        found += re.findall(r"^```bash\n(.*?)^```", body, re.S | re.M)
    assert len(found) == len(sections), f"expected one bash block per section in {sections}"
    return "\n".join(found)


#: Sections of docs/plugins.md whose bash blocks this module runs (test_docs.py checks
#: that no other section has one).
GUIDE_COMMANDS = ("Start from the template", "Publishing")


@pytest.mark.slow
def test_template_in_a_fresh_environment_as_the_guide_says(wheelhouse: Path,
                                                            tmp_path: Path) -> None:
    """qcore from the wheelhouse in a new virtual environment; then the guide's commands,
    verbatim: ``qcore new-plugin myquant``, pip install it, its tests pass, qcore lists it,
    ``--pipeline myquant`` quantizes a tiny model, and the plugin builds for publishing."""
    pytest_pin = f"pytest=={version('pytest')}"
    venv = fresh_venv(tmp_path / "venv", wheelhouse, "qcore", also=(pytest_pin,))
    commands = docs_bash_blocks(*GUIDE_COMMANDS)
    work = tmp_path / "work"
    work.mkdir()
    result = subprocess.run(["bash", "-euo", "pipefail", "-c", commands], capture_output=True,
                            text=True, env=venv_env(venv), cwd=work, timeout=400)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"the guide's commands failed:\n{output[-6000:]}"
    assert re.search(r"\d+ passed", result.stdout) and " failed" not in result.stdout
    assert "myquant  (qcore-plugin-myquant 0.1.0)" in result.stdout
    assert "checkpoint: " in result.stdout
    project = work / "qcore-plugin-myquant"
    config = json.loads((project / "tiny-llama-myquant" / "config.json").read_text())
    assert config["quantization_config"]["distributions"] == {
        "qcore": qcore.__version__, "qcore-plugin-myquant": "0.1.0"}
    assert (project / "dist" / "qcore_plugin_myquant-0.1.0-py3-none-any.whl").is_file()
    assert (project / "dist" / "qcore_plugin_myquant-0.1.0.tar.gz").is_file()
    assert "qcore-plugin-myquant==0.1.0" in result.stdout.splitlines()
