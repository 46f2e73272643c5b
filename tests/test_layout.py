"""The project's shape: set-up files agree with each other."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _pyproject_deps():
    import tomllib
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    deps = list(data["project"]["dependencies"])
    for extra in data["project"]["optional-dependencies"].values():
        deps += extra
    return sorted(d.replace(" ", "") for d in deps)


def _environment_deps():
    deps = []
    for line in (ROOT / "environment.yml").read_text().splitlines():
        m = re.match(r"^\s{6}- (.+)$", line)
        if m and m.group(1) != "-e .":
            deps.append(m.group(1).replace(" ", ""))
    return sorted(deps)


def test_environment_yml_matches_pyproject():
    assert _environment_deps() == _pyproject_deps()


def test_top_level_layout():
    for name in ("notebooks", "vmlab", "data", "tests", "environment.yml", "pyproject.toml", "Makefile",
                 "README.md", ".ci/run", "apt.txt", "postBuild"):
        assert (ROOT / name).exists(), name
    assert "make test" in (ROOT / ".ci/run").read_text()


def test_readme_opens_with_the_two_commands():
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:sh|bash)?\n(.*?)```", text, re.S).group(1)
    assert [ln.strip() for ln in first_block.strip().splitlines()] == ["make lab", "make test"]


def test_makefile_installs_what_it_needs():
    mk = (ROOT / "Makefile").read_text()
    assert "apt-get install" in mk and "venv" in mk and "image build" in mk
    apt = (ROOT / "apt.txt").read_text().split()
    for pkg in ("qemu-system-x86", "qemu-utils", "busybox-static", "kmod", "gcc", "musl-tools"):
        assert pkg in apt


def test_cli_lists_every_registered_experiment():
    import importlib
    import inspect
    import subprocess
    import sys

    from vmlab import experiments

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "vmlab", "experiment", *args], capture_output=True,
                              text=True, check=True, cwd=ROOT, timeout=120).stdout

    listed = [line.split()[0] for line in cli("list").splitlines() if line.strip()]
    assert listed == list(experiments.REGISTRY)
    helptext = cli("--help")
    for name, module in experiments.REGISTRY.items():
        assert re.search(rf"^\s+{re.escape(name)}\s", helptext, re.M), f"{name} missing from --help"
        run = importlib.import_module(module).run
        assert list(inspect.signature(run).parameters)[:2] == ["quick", "progress"], module
    # every module of vmlab/experiments with a run() entry point is registered
    for path in sorted((ROOT / "vmlab" / "experiments").glob("[!_]*.py")):
        mod = importlib.import_module(f"vmlab.experiments.{path.stem}")
        if callable(getattr(mod, "run", None)):
            assert mod.__name__ in experiments.REGISTRY.values(), f"{mod.__name__} has run() but is not registered"
