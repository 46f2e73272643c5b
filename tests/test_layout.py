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
    assert [l.strip() for l in first_block.strip().splitlines()] == ["make lab", "make test"]


def test_makefile_installs_what_it_needs():
    mk = (ROOT / "Makefile").read_text()
    assert "apt-get install" in mk and "venv" in mk and "image build" in mk
    apt = (ROOT / "apt.txt").read_text().split()
    for pkg in ("qemu-system-x86", "qemu-utils", "busybox-static", "kmod", "gcc"):
        assert pkg in apt
