"""The lesson kernel (vmlab/image/lessonkernel.py): built from Debian's source package, booted by default;
Debian's packaged kernel one variable away.

The build itself (about 8 minutes) runs once, in `make setup`'s image build; these tests check what it left
and boot real guests on both kernels.
"""

from __future__ import annotations

import json
import shutil

import pytest

from vmlab import VM
from vmlab.errors import SetupError
from vmlab.image import ensure_image
from vmlab.image.lessonkernel import (
    FRAGMENT,
    LOCALVERSION,
    config_options,
    fragment_options,
    lesson_kernel,
    missing_options,
)
from vmlab.image.util import DEFAULT_GUEST_DIR

pytestmark = pytest.mark.integration


def test_fragment_lines_last_one_wins_and_unset_reads_as_n(tmp_path):
    frag = tmp_path / "f.config"
    frag.write_text("# a comment\nCONFIG_MODULES=n\nCONFIG_A=y\nCONFIG_MODULES=y\nCONFIG_S=\"-x\"\n")
    assert fragment_options(frag) == {"CONFIG_MODULES": "y", "CONFIG_A": "y", "CONFIG_S": '"-x"'}
    cfg = tmp_path / ".config"
    cfg.write_text("CONFIG_MODULES=y\n# CONFIG_A is not set\nCONFIG_S=\"-x\"\nCONFIG_B=m\n")
    assert config_options(cfg) == {"CONFIG_MODULES": "y", "CONFIG_A": "n", "CONFIG_S": '"-x"', "CONFIG_B": "m"}
    assert missing_options(fragment_options(frag), config_options(cfg)) == ["CONFIG_A=y (got n)"]
    assert missing_options({"CONFIG_GONE": "n"}, {}) == []          # absent is "not set"


def test_a_guest_kernel_vmlab_does_not_know_is_refused_before_anything_runs(monkeypatch):
    monkeypatch.setenv("VMLAB_GUEST_KERNEL", "gentoo")
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)
    with pytest.raises(SetupError) as ei:
        ensure_image()
    assert "VMLAB_GUEST_KERNEL='gentoo'" in ei.value.message
    assert "lesson" in ei.value.fix and "debian" in ei.value.fix


def test_the_key_follows_the_fragment_and_the_version(tmp_path):
    base = lesson_kernel("6.1.192-3")
    assert base.source_package == "linux-source-6.1" and base.release == "6.1.192" + LOCALVERSION
    assert lesson_kernel("6.1.192-3").key == base.key                     # resolving builds nothing and is stable
    assert lesson_kernel("6.1.193-1").key != base.key
    g = tmp_path / "guest"
    shutil.copytree(DEFAULT_GUEST_DIR, g)
    (g / FRAGMENT).write_text((g / FRAGMENT).read_text() + "CONFIG_HZ_100=y\n")
    assert lesson_kernel("6.1.192-3", g).key != base.key


def test_the_default_image_boots_the_lesson_kernel_built_as_configured(image):
    src = image.manifest["kernel"]
    if src.get("source") != "lesson":
        pytest.skip(f"VMLAB_KERNEL or VMLAB_GUEST_KERNEL chose another kernel ({src.get('source')})")
    k = lesson_kernel(src["package_version"])
    assert k.key == src["lesson_kernel"] and k.built()
    # every line of the fragment is in the kernel that was built, and the build tree is gone
    assert missing_options(fragment_options(k.fragment), config_options(k.dir / "config")) == []
    build = json.loads((k.dir / "build.json").read_text())
    assert build["release"] == image.kernel_version == k.release and build["build_seconds"] > 0
    assert sorted(p.name for p in k.dir.iterdir()) == ["build.json", "config", "lib", "vmlinux"]
    with VM(accel="tcg", image=image, name="lesson-kernel") as vm:
        assert vm.run("uname -r").stdout.strip() == k.release
        # the drivers of modules.txt are modules of this kernel, loaded from the image as with Debian's
        loaded = {line.split()[0] for line in vm.run("cat /proc/modules").stdout.splitlines()}
        assert loaded == set(image.base_modules)


def test_debian_s_packaged_kernel_is_one_variable_away(monkeypatch):
    monkeypatch.delenv("VMLAB_KERNEL", raising=False)
    monkeypatch.setenv("VMLAB_GUEST_KERNEL", "debian")
    deb = ensure_image()
    assert deb.manifest["kernel"]["source"] == "debian" and deb.kernel_version.endswith("-amd64")
    assert ensure_image(guest_kernel="lesson").key != deb.key
    with VM(accel="tcg", image=deb, name="debian-kernel") as vm:
        assert vm.run("uname -r").stdout.strip() == deb.kernel_version
        assert vm.run("echo ok").stdout.strip() == "ok"


def test_only_the_newest_built_kernels_are_kept(tmp_path):     # and busybox builds: the same prune_builds
    import os

    from vmlab.image.util import prune_builds
    for i, name in enumerate(["aaaa", "bbbb", "cccc"]):
        d = tmp_path / name
        (d / "lib").mkdir(parents=True)
        (d / "build.json").write_text("{}")
        os.utime(d / "build.json", (1000 + i, 1000 + i))
        (tmp_path / f"build-{name}.log").write_text("log")
    (tmp_path / ".build-dddd-x").mkdir()                       # a build in progress has no build.json: not touched
    prune_builds(tmp_path, keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == [".build-dddd-x", "bbbb", "build-bbbb.log", "build-cccc.log",
                                                           "cccc"]
