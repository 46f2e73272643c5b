"""Tests of vmlab.image (the guest image builder).

Unit tests use a fake kernel (a tiny ELF with a PVH note) and need only gcc,
libc6-dev and busybox-static. The integration tests build the real image from
Debian's kernel package (downloads ~70 MB once; uses the real cache dir unless
VMLAB_CACHE is set) and boot it under QEMU/TCG.
"""

from __future__ import annotations

import json
import lzma
import os
import shutil
import stat
import struct
import subprocess
import time
from pathlib import Path

import pytest

from vmlab import image as vi
from vmlab.config import cache_dir
from vmlab.errors import ImageError, SetupError
from vmlab.image import util as image_util
from vmlab.image.cpio import LZ4_LEGACY_MAGIC
from vmlab.image.elf import XZ_MAGIC, drop_section_table, elf_info, trim_zero_tails
from vmlab.image.guesttools import check_static
from vmlab.image.modules import module_closure
from vmlab.image.util import sha256_file

REPO_GUEST = image_util.DEFAULT_GUEST_DIR

STUB_AGENT = r"""
#include <stdio.h>
#include <unistd.h>
#include <sys/reboot.h>
static void dump(const char *path) {
    char buf[512];
    FILE *f = fopen(path, "r");
    printf("== %s\n", path);
    if (!f) { printf("(missing)\n"); return; }
    while (fgets(buf, sizeof buf, f)) fputs(buf, stdout);
    fclose(f);
}
int main(void) {
    printf("AGENT-STUB\n");
    dump("/proc/modules");
    dump("/sys/module/libata/parameters/dma");
    printf("AGENT-STUB-END\n");
    fflush(stdout);
    sync();
    reboot(RB_POWER_OFF);
    return 0;
}
"""

HAVE_BUILD_TOOLS = bool(shutil.which("gcc")) and any(
    os.path.isfile(p) for p in ("/bin/busybox", "/usr/bin/busybox"))
needs_build_tools = pytest.mark.skipif(not HAVE_BUILD_TOOLS,
                                       reason="needs gcc, libc6-dev and busybox-static")


def make_guest_dir(path: Path, agent: str = "int main(){return 0;}\n") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    shutil.copy(REPO_GUEST / "init", path / "init")
    shutil.copy(REPO_GUEST / "modules.txt", path / "modules.txt")
    (path / "vmagent.c").write_text(agent)
    (path / "vmbench.c").write_text("int main(){return 0;}\n")
    (path / "hv.c").write_text("int main(){return 0;}\n")
    return path


def fake_elf_kernel(path: Path, version: str = "6.0.0-fake") -> Path:
    """A tiny ELF64 with one PT_NOTE holding the Xen PVH entry note."""
    note = struct.pack("<III", 4, 4, 18) + b"Xen\0" + struct.pack("<I", 0x1000000)
    phoff, noteoff = 64, 64 + 56
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0,
                          64, 56, 1, 64, 0, 0))
    phdr = struct.pack("<IIQQQQQQ", 4, 4, noteoff, 0, 0, len(note), len(note), 4)
    body = ehdr + phdr + note + f"Linux version {version} (fake)\0".encode() + bytes(4096)
    path.write_bytes(body)
    return path


@pytest.fixture
def env(tmp_path, monkeypatch):
    """A private cache and no kernel overrides; the host's busybox-static (a fresh cache has no musl build, and
    these tests are about the image cache, not the guest's busybox: test_busybox.py is)."""
    for var in ("VMLAB_KERNEL", "VMLAB_KERNEL_MODULES", "VMLAB_VERIFY_IMAGE", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("VMLAB_BUSYBOX", "debian")
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture
def fake_kernel(env, monkeypatch):
    k = fake_elf_kernel(env / "vmlinux-fake")
    monkeypatch.setenv("VMLAB_KERNEL", str(k))
    return k


# --------------------------------------------------------------------------- cache dir


def test_cache_dir_honours_vmlab_cache_and_is_0700(env):
    d = cache_dir()
    assert d == env / "cache"
    assert d.is_dir()
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_cache_dir_xdg_and_home(tmp_path, monkeypatch):
    monkeypatch.delenv("VMLAB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "vmlab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "vmlab"
    assert stat.S_IMODE((tmp_path / "home" / ".cache" / "vmlab").stat().st_mode) == 0o700


def test_unusable_cache_dir_names_dir_and_fix(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    monkeypatch.setenv("VMLAB_CACHE", str(blocker / "cache"))
    with pytest.raises(ImageError) as ei:
        cache_dir()
    assert str(blocker / "cache") in str(ei.value)
    assert "VMLAB_CACHE" in ei.value.fix


# --------------------------------------------------------------------------- cpio


def test_cpio_round_trip_and_determinism(tmp_path):
    src = tmp_path / "tree"
    (src / "bin").mkdir(parents=True)
    (src / "etc").mkdir()
    (src / "bin" / "tool").write_bytes(b"\x7fELF" + bytes(range(256)) * 3)
    os.chmod(src / "bin" / "tool", 0o755)
    (src / "etc" / "hostname").write_text("vmlab\n")
    os.symlink("tool", src / "bin" / "alias")
    extra = [vi.CpioEntry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1))]
    a, b = tmp_path / "a.cpio", tmp_path / "b.cpio"
    vi.write_cpio(src, a, extra=extra)
    os.utime(src / "etc" / "hostname", (1, 1))      # mtimes must not matter
    vi.write_cpio(src, b, extra=extra)
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_size % 512 == 0

    entries = vi.read_cpio(a)
    names = [e["name"] for e in entries]
    assert names == ["bin", "bin/alias", "bin/tool", "dev", "dev/console", "etc",
                     "etc/hostname"]
    assert [e["ino"] for e in entries] == list(range(1, len(entries) + 1))
    assert all(e["mtime"] == 0 and e["uid"] == 0 and e["gid"] == 0 for e in entries)
    by = {e["name"]: e for e in entries}
    assert by["bin/tool"]["data"] == (src / "bin" / "tool").read_bytes()
    assert stat.S_IMODE(by["bin/tool"]["mode"]) == 0o755
    assert stat.S_ISLNK(by["bin/alias"]["mode"]) and by["bin/alias"]["data"] == b"tool"
    assert stat.S_ISCHR(by["dev/console"]["mode"]) and by["dev/console"]["rdev"] == (5, 1)
    assert stat.S_ISDIR(by["dev"]["mode"])          # parent added automatically
    assert by["etc/hostname"]["data"] == b"vmlab\n"

    if shutil.which("cpio"):
        with open(a, "rb") as archive:
            out = subprocess.run(["cpio", "-t", "--quiet"], stdin=archive,
                                 capture_output=True, text=True, check=True).stdout.split()
        assert out == names


# --------------------------------------------------------------------------- vmlinux


def test_extract_vmlinux_finds_the_elf_xz_stream(tmp_path):
    elf = fake_elf_kernel(tmp_path / "elf")
    blob = (b"MZ" + bytes(500)
            + lzma.compress(b"not an elf at all", format=lzma.FORMAT_XZ)   # a decoy stream
            + bytes(17) + XZ_MAGIC + b"garbage"                        # a broken one
            + lzma.compress(elf.read_bytes(), format=lzma.FORMAT_XZ)
            + b"trailing data")
    bz = tmp_path / "vmlinuz"
    bz.write_bytes(blob)
    vi.extract_vmlinux(bz, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == elf.read_bytes()
    vi.extract_vmlinux(elf, tmp_path / "out2")                          # ELF: as is
    assert (tmp_path / "out2").read_bytes() == elf.read_bytes()
    assert elf_info(elf)["pvh"]

    bad = tmp_path / "bad"
    bad.write_bytes(b"MZ" + bytes(100) + lzma.compress(b"no elf", format=lzma.FORMAT_XZ))
    with pytest.raises(ImageError) as ei:
        vi.extract_vmlinux(bad, tmp_path / "out3")
    assert ei.value.fix and "VMLAB_KERNEL" in ei.value.fix
    assert not (tmp_path / "out3").exists()


def _load_segments(path: Path) -> list[tuple[int, int, int]]:
    """(p_offset, p_filesz, p_memsz) of each PT_LOAD of an ELF64-LE file."""
    data = path.read_bytes()
    phoff, = struct.unpack_from("<Q", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    rows = [struct.unpack_from("<IIQQQQQQ", data, phoff + i * phentsize) for i in range(phnum)]
    return [(r[2], r[5], r[6]) for r in rows if r[0] == 1]


def test_trim_zero_tails_stores_no_zeros_and_keeps_the_guest_memory(tmp_path):
    """Each PT_LOAD stops at its last non-zero byte (page-rounded); p_memsz, the bytes and the rest stay."""
    code = b"\x90" * 5000 + bytes(3 * 4096)              # 5000 bytes of code, then 12 KiB of stored zeros
    data = b"\x01" + bytes(100) + b"\x02"                 # ends in a non-zero byte: nothing to trim
    phoff, off1 = 64, 4096
    off2 = off1 + len(code)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, 0, 0, 64, 56, 3, 64, 0, 0))
    ph = (struct.pack("<IIQQQQQQ", 1, 5, off1, 0x1000000, 0x1000000, len(code), len(code) + 65536, 4096)
          + struct.pack("<IIQQQQQQ", 1, 6, off2, 0x2000000, 0x2000000, len(data), len(data), 4096)
          + struct.pack("<IIQQQQQQ", 4, 4, 0, 0, 0, 0, 0, 4))
    elf = tmp_path / "vmlinux"
    elf.write_bytes((ehdr + ph).ljust(off1, b"\0") + code + data)
    before = elf.read_bytes()

    assert trim_zero_tails(elf, dry_run=True) == len(code) - 8192 and elf.read_bytes() == before
    assert trim_zero_tails(elf) == len(code) - 8192
    assert _load_segments(elf) == [(off1, 8192, len(code) + 65536), (off2, len(data), len(data))]
    after = elf.read_bytes()
    assert len(after) == len(before) and after[phoff + 3 * 56:] == before[phoff + 3 * 56:]
    assert trim_zero_tails(elf) == 0, "a second pass finds nothing left to trim"

    text = tmp_path / "not-elf"
    text.write_bytes(b"hello" + bytes(9000))
    assert trim_zero_tails(text) == 0 and text.read_bytes() == b"hello" + bytes(9000)


def test_drop_section_table_keeps_every_segment_byte(tmp_path):
    """The symbol table and section headers after the last segment go; the ELF header says there are none;
    every byte a program header points to stays where it was."""
    code = b"\x90" * 5000
    phoff, off1 = 64, 4096
    symtab = b"S" * 3000                                   # .symtab + .strtab: after the segments
    shoff = off1 + len(code) + len(symtab)
    ehdr = (b"\x7fELF" + bytes([2, 1, 1, 0]) + bytes(8)
            + struct.pack("<HHIQQQIHHHHHH", 2, 62, 1, 0x1000000, phoff, shoff, 0, 64, 56, 1, 64, 4, 3))
    ph = struct.pack("<IIQQQQQQ", 1, 5, off1, 0x1000000, 0x1000000, len(code), len(code), 4096)
    elf = tmp_path / "vmlinux"
    elf.write_bytes((ehdr + ph).ljust(off1, b"\0") + code + symtab + bytes(4 * 64))
    before = elf.read_bytes()

    assert drop_section_table(elf) == len(symtab) + 4 * 64
    after = elf.read_bytes()
    assert len(after) == off1 + len(code) and after[64:] == before[64:off1 + len(code)]
    assert struct.unpack_from("<QHHH", after, 0x28)[0] == 0 and struct.unpack_from("<HHH", after, 0x3A) == (0, 0, 0)
    assert _load_segments(elf) == [(off1, len(code), len(code))]
    assert drop_section_table(elf) == 0, "nothing is left to drop"

    inside = tmp_path / "headers-inside"                   # a section table inside a segment: left alone
    inside.write_bytes(before[:0x28] + struct.pack("<Q", off1) + before[0x30:])
    kept = inside.read_bytes()
    assert drop_section_table(inside) == 0 and inside.read_bytes() == kept


def test_dynamic_busybox_is_refused():
    with pytest.raises(SetupError) as ei:
        check_static(Path("/bin/ls"))
    assert "busybox-static" in ei.value.fix


# --------------------------------------------------------------------------- key


@needs_build_tools
def test_key_changes_only_when_guest_files_change(env, fake_kernel):
    g = make_guest_dir(env / "guest")
    k1 = vi.image_status(guest_dir=g)["key"]
    assert k1 and len(k1) == 16
    assert vi.image_status(guest_dir=g)["key"] == k1
    os.utime(g / "init", (1, 1))                   # touching is not a change
    assert vi.image_status(guest_dir=g)["key"] == k1
    (g / "vmbench.c").write_text("int main(){return 1;}\n")
    k2 = vi.image_status(guest_dir=g)["key"]
    assert k2 != k1
    (g / "vmbench.c").write_text("int main(){return 0;}\n")
    assert vi.image_status(guest_dir=g)["key"] == k1
    (g / "extra.txt").write_text("new file")
    assert vi.image_status(guest_dir=g)["key"] != k1


# --------------------------------------------------------------------------- modules


@needs_build_tools
def test_missing_required_module_names_it_and_the_fix(env, fake_kernel, monkeypatch):
    mods = env / "modules" / "6.0.0-fake"
    (mods / "kernel" / "drivers" / "virtio").mkdir(parents=True)
    for name in ("virtio_pci", "virtio", "virtio_blk"):
        (mods / "kernel" / "drivers" / "virtio" / f"{name}.ko").write_bytes(b"")
    (mods / "modules.dep").write_text(
        "kernel/drivers/virtio/virtio.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio_blk.ko: kernel/drivers/virtio/virtio.ko\n")
    monkeypatch.setenv("VMLAB_KERNEL_MODULES", str(mods))
    g = make_guest_dir(env / "guest")
    with pytest.raises(ImageError) as ei:
        vi.ensure_image(guest_dir=g)
    assert "virtio_console" in str(ei.value)
    assert "virtio_pci" not in ei.value.message.split("lacks")[1]
    assert ei.value.fix and "VMLAB_KERNEL" in ei.value.fix
    # nothing half-built is left behind
    images = cache_dir() / "images"
    assert [p.name for p in images.iterdir() if p.name != ".lock"] == []


def test_module_closure_resolves_dependencies(tmp_path):
    mods = tmp_path / "6.0.0-fake"
    mods.mkdir()
    (mods / "modules.dep").write_text(
        "kernel/a/virtio.ko:\n"
        "kernel/a/virtio_pci.ko: kernel/a/virtio.ko\n"
        "kernel/b/crc-t10dif.ko:\n"
        "kernel/b/sd_mod.ko: kernel/b/crc-t10dif.ko\n")
    (mods / "modules.builtin").write_text("kernel/net/packet/af_packet.ko\n")
    c = module_closure(mods, [("virtio-pci", True), ("sd_mod", False),
                                  ("af_packet", False), ("e1000", False)])
    assert c["paths"] == ["kernel/a/virtio.ko", "kernel/a/virtio_pci.ko",
                          "kernel/b/crc-t10dif.ko", "kernel/b/sd_mod.ko"]
    assert c["missing"] == ["e1000"]
    assert c["builtin"] == ["af_packet"]


# --------------------------------------------------------------------------- cache reuse


@needs_build_tools
def test_build_reuse_and_damaged_image_rebuilt(env, fake_kernel, monkeypatch):
    g = make_guest_dir(env / "guest")
    msgs: list[str] = []
    img = vi.ensure_image(guest_dir=g, progress=msgs.append)
    assert img.kernel.read_bytes() == fake_kernel.read_bytes()
    assert img.kernel_version == "6.0.0-fake"
    assert img.root == cache_dir() / "images" / img.key
    m = json.loads((img.root / "manifest.json").read_text())
    assert m["outputs"]["initrd.cpio"]["size"] == img.cpio.stat().st_size
    assert m["outputs"]["initrd.lz4"]["size"] == img.initrd.stat().st_size < img.cpio.stat().st_size
    assert img.initrd.name == "initrd.lz4" and img.initrd.read_bytes()[:4] == LZ4_LEGACY_MAGIC
    assert img.initrd_all is not None and img.initrd_all.read_bytes()[:4] == LZ4_LEGACY_MAGIC
    assert m["outputs"]["initrd-all.lz4"]["size"] == img.initrd_all.stat().st_size
    lz4 = subprocess.run(["lz4", "-dc", str(img.initrd)], capture_output=True, check=True).stdout
    assert lz4 == img.cpio.read_bytes(), "no modules: initrd.lz4 holds exactly the cpio"
    assert m["modules"] == [] and "virtio_pci" in m["modules_missing"]
    assert m["modules_base"] == [] and m["initrd_optional_modules"] == 0
    assert img.initrd_for(["e1000"]) == img.initrd_all and img.initrd_for([]) == img.initrd
    assert stat.S_IMODE(img.root.stat().st_mode) == 0o700
    assert stat.S_IMODE(img.initrd.stat().st_mode) == 0o600

    names = {e["name"]: e for e in vi.read_cpio(img.cpio)}
    for must in ("init", "bin/busybox", "bin/sh", "bin/modprobe", "bin/vmagent", "bin/vmbench",
                 "dev/console", "dev/null", "etc/passwd", "etc/hostname",
                 "etc/vmlab/manifest.json", "proc", "sys", "tmp", "sbin", "usr/bin"):
        assert must in names, must
    assert stat.S_IMODE(names["init"]["mode"]) == 0o755
    assert names["dev/null"]["rdev"] == (1, 3)
    assert json.loads(names["etc/vmlab/manifest.json"]["data"])["key"] == img.key

    files = _identity(img)
    again = vi.ensure_image(guest_dir=g)
    assert _identity(again) == files, "a cache hit rewrites nothing (same inodes, same mtimes)"
    assert again.key == img.key and again.kernel == img.kernel

    # truncated: the cheap size check finds it and rebuilds
    with open(img.kernel, "r+b") as f:
        f.truncate(100)
    msgs.clear()
    fixed = vi.ensure_image(guest_dir=g, progress=msgs.append)
    assert any("damaged" in s for s in msgs), msgs
    assert fixed.kernel.read_bytes() == fake_kernel.read_bytes()

    # same size but corrupt: found with VMLAB_VERIFY_IMAGE=1
    data = bytearray(fixed.initrd.read_bytes())
    data[-600] ^= 0xFF
    fixed.initrd.write_bytes(bytes(data))
    monkeypatch.setenv("VMLAB_VERIFY_IMAGE", "1")
    msgs.clear()
    again = vi.ensure_image(guest_dir=g, progress=msgs.append)
    assert any("damaged" in s for s in msgs), msgs
    assert sha256_file(again.initrd) == again.manifest["outputs"]["initrd.lz4"]["sha256"]

    st = vi.image_status(guest_dir=g)
    assert st["built"] and st["key"] == img.key and st["problems"] == []
    leftovers = [p.name for p in (cache_dir() / "images").iterdir()
                 if p.name.startswith(".") and p.name != ".lock"]
    assert leftovers == []


@needs_build_tools
def test_cli_status_and_build_json(env, fake_kernel, capsys, monkeypatch):
    monkeypatch.setattr(image_util, "DEFAULT_GUEST_DIR", make_guest_dir(env / "guest"))
    assert vi.build_image_cli(["image", "status", "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["built"] is False and st["problems"] == []
    assert vi.build_image_cli(["build", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["ok"] and res["kernel_version"] == "6.0.0-fake"
    assert vi.build_image_cli(["status"]) == 0
    assert "built" in capsys.readouterr().out


def _identity(img: vi.GuestImage) -> dict:
    """(inode, mtime) of every file of an image: a rebuild replaces them (atomic writes make new inodes)."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(img.root.iterdir()) if p.is_file()}


# --------------------------------------------------------------------------- integration


def _boot(img: vi.GuestImage, append: str = "", initrd: Path | None = None) -> tuple[str, float, int]:
    cmd = ["qemu-system-x86_64", "-nodefaults", "-no-user-config", "-display", "none",
           "-M", "pc", "-m", "128", "-accel", "tcg",
           "-kernel", str(img.kernel), "-initrd", str(initrd or img.initrd),
           "-append", f"console=ttyS0 quiet panic=-1 {append}".strip(),
           "-serial", "stdio", "-no-reboot"]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return out.decode(errors="replace"), time.monotonic() - t0, proc.returncode


@pytest.fixture(scope="module")
def real_image(tmp_path_factory):
    if not shutil.which("qemu-system-x86_64"):
        pytest.skip("qemu-system-x86_64 is not installed")
    g = make_guest_dir(tmp_path_factory.mktemp("guest"), agent=STUB_AGENT)
    saved = {v: os.environ.pop(v, None) for v in ("VMLAB_KERNEL", "VMLAB_KERNEL_MODULES")}
    try:
        t0 = time.monotonic()
        img = vi.ensure_image(guest_dir=g, progress=print)
        print(f"ensure_image: {time.monotonic() - t0:.2f} s")
        files = _identity(img)
        assert vi.ensure_image(guest_dir=g).key == img.key
        assert _identity(img) == files, "the second ensure_image is a cache hit: nothing rebuilt"
    finally:
        for k, v in saved.items():
            if v is not None:
                os.environ[k] = v
    return img


@pytest.mark.integration
def test_real_image_boots_and_loads_modules(real_image):
    img = real_image
    assert img.kernel.read_bytes()[:4] == b"\x7fELF"
    assert elf_info(img.kernel)["pvh"]
    source = img.manifest["kernel"]["source"]
    assert img.kernel_version.endswith({"lesson": "-vmlab", "debian": "-amd64"}.get(source, "")), (source, img.kernel_version)
    assert "cloud" not in img.kernel_version
    assert img.manifest["modules_missing"] == []
    for m in ("virtio_pci", "virtio_console", "e1000", "8139cp", "ata_piix", "libata"):
        assert m in img.manifest["modules"]
    out, seconds, rc = _boot(img)
    print(f"boot: {seconds:.2f} s")
    assert f"vmlab-init: starting agent on {img.kernel_version}" in out, out[-3000:]
    assert "AGENT-STUB-END" in out, out[-3000:]
    modules = out.split("== /proc/modules", 1)[1].split("==", 1)[0]
    loaded = {line.split()[0] for line in modules.strip().splitlines() if line.strip()}
    # modprobe resolved virtio_pci's dependencies from the image's modules.dep
    assert {"virtio_pci", "virtio", "virtio_ring", "virtio_console"} <= loaded, modules
    assert rc == 0


@pytest.mark.integration
def test_real_image_initrd_split(real_image, tmp_path):
    """initrd.lz4 carries the base modules only; initrd-all.lz4 is it plus every other file of initrd.cpio."""
    img = real_image
    assert img.initrd_all is not None
    base = subprocess.run(["lz4", "-dc", str(img.initrd)], capture_output=True, check=True).stdout
    whole = subprocess.run(["lz4", "-dc", str(img.initrd_all)], capture_output=True, check=True).stdout
    assert whole.startswith(base) and len(whole) > len(base)
    assert img.initrd_all.read_bytes().startswith(img.initrd.read_bytes())
    (tmp_path / "base.cpio").write_bytes(base)
    (tmp_path / "rest.cpio").write_bytes(whole[len(base):])
    in_base = {e["name"] for e in vi.read_cpio(tmp_path / "base.cpio")}
    in_rest = {e["name"] for e in vi.read_cpio(tmp_path / "rest.cpio")}
    every = {e["name"] for e in vi.read_cpio(img.cpio)}
    assert in_base | in_rest == every
    kos = {n for n in every if n.endswith(".ko")}
    base_kos = {n for n in in_base if n.endswith(".ko")}
    from vmlab.image.modules import modname
    assert {modname(n) for n in base_kos} == img.base_modules == set(img.manifest["modules_base"])
    assert {n for n in in_rest if n.endswith(".ko")} == kos - base_kos
    assert len(kos - base_kos) == img.manifest["initrd_optional_modules"] > 30
    assert {"virtio_pci", "virtio_console", "button", "evdev"} <= img.base_modules
    assert "e1000" not in img.base_modules and "kvm" not in img.base_modules


def test_init_loads_exactly_the_base_modules_of_modules_txt():
    """/init's first module list and the "base" lines of modules.txt name the same modules (initrd.lz4 holds those)."""
    from vmlab.image.modules import base_modules_txt
    init = (REPO_GUEST / "init").read_text()
    line = next(ln for ln in init.splitlines() if ln.startswith("modules="))
    assert sorted(line.split("=", 1)[1].strip('"').split()) == sorted(n for n, _ in base_modules_txt(
        REPO_GUEST / "modules.txt"))


@pytest.mark.integration
def test_real_image_module_options_from_cmdline(real_image):
    initrd = real_image.initrd_for(["ata_piix"])
    assert initrd == real_image.initrd_all
    out, _seconds, _rc = _boot(real_image, "libata.dma=0 vmlab.modules=ata_piix", initrd)
    assert "AGENT-STUB-END" in out, out[-3000:]
    modules = out.split("== /proc/modules", 1)[1].split("==", 1)[0]
    assert "ata_piix" in modules and "libata" in modules
    dma = out.split("== /sys/module/libata/parameters/dma", 1)[1].strip().splitlines()[0]
    assert dma == "0"          # busybox modprobe applied libata.dma=0 from /proc/cmdline


def test_prune_keeps_the_newest_and_the_recently_used(tmp_path):
    """A build prunes old images, but never one another process was handed recently (it may boot it next)."""
    import os
    import time

    from vmlab.image.cache import mark_used, prune_images
    now = time.time()
    dirs = {}
    for i, age_h in enumerate([0, 1, 2, 30, 40, 50]):
        d = tmp_path / f"img{i}"
        d.mkdir()
        os.utime(d, (now - age_h * 3600, now - age_h * 3600))
        dirs[age_h] = d
    mark_used(dirs[50])                      # an old image a running session just asked for
    prune_images(tmp_path, keep=dirs[0], most=2, recent_s=6 * 3600)
    left = sorted(p.name for p in tmp_path.iterdir())
    # kept: the new build, the newest other, the two used within 6 h, the one just marked; 30 h and 40 h go
    assert left == sorted([dirs[0].name, dirs[1].name, dirs[2].name, dirs[50].name])
