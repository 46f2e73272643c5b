"""The guest's busybox: Debian's source linked with musl (vmlab.image.busybox).

The proof that it works is a real guest: its busybox is the musl build, a shell it starts touches fewer pages than
Debian's glibc busybox does (the reason for the change, counted), and the two answer the same to what the lessons
run. The download's error paths use a local HTTP server."""

import hashlib
import http.server
import shutil
import statistics
import threading
from pathlib import Path

import pytest

from vmlab import SetupError
from vmlab.image import busybox as bbmod
from vmlab.image.lessonkernel import missing_options, parse_config

needs_musl = pytest.mark.skipif(shutil.which("musl-gcc") is None, reason="needs musl-tools (make setup installs it)")


# --------------------------------------------------------------------------- configuration
DEBIAN_LIKE = """CONFIG_DESKTOP=y
CONFIG_EXTRA_COMPAT=y
# CONFIG_FEDORA_COMPAT is not set
CONFIG_FEATURE_VI_REGEX_SEARCH=y
CONFIG_ASH=y
"""


def test_the_musl_configuration_turns_off_only_what_musl_cannot_build():
    got = parse_config(bbmod.musl_config(DEBIAN_LIKE))
    assert got == {"CONFIG_DESKTOP": "y", "CONFIG_EXTRA_COMPAT": "n", "CONFIG_FEDORA_COMPAT": "n",
                   "CONFIG_FEATURE_VI_REGEX_SEARCH": "n", "CONFIG_ASH": "y"}
    assert missing_options(parse_config(bbmod.musl_config(DEBIAN_LIKE)), parse_config(DEBIAN_LIKE)) == [
        "CONFIG_EXTRA_COMPAT=n (got y)", "CONFIG_FEATURE_VI_REGEX_SEARCH=n (got y)"]


def test_a_configuration_without_a_musl_option_names_it_and_the_fix():
    with pytest.raises(bbmod.ImageError) as ei:
        bbmod.musl_config("CONFIG_ASH=y\nCONFIG_EXTRA_COMPAT=y\n")
    assert "CONFIG_FEATURE_VI_REGEX_SEARCH" in ei.value.message and "MUSL_OFF" in ei.value.fix


# --------------------------------------------------------------------------- choosing the busybox
@pytest.fixture
def fresh(tmp_path, monkeypatch):
    """A private, empty cache; no busybox override."""
    monkeypatch.setenv("VMLAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("VMLAB_BUSYBOX", raising=False)
    monkeypatch.delenv("VMLAB_DEBIAN_MIRROR", raising=False)
    return tmp_path


def test_vmlab_busybox_chooses_a_file_or_debians_and_names_a_missing_file(fresh, monkeypatch):
    monkeypatch.setenv("VMLAB_BUSYBOX", "debian")
    choice = bbmod.guest_busybox(build=False)
    assert (choice.libc, choice.source, choice.fallback) == ("glibc", "debian package", None)
    monkeypatch.setenv("VMLAB_BUSYBOX", str(fresh / "nosuch"))
    with pytest.raises(SetupError) as ei:
        bbmod.guest_busybox(build=False)
    assert "nosuch" in ei.value.message and "VMLAB_BUSYBOX" in ei.value.fix and "debian" in ei.value.fix


class _Archive(http.server.BaseHTTPRequestHandler):
    """Serves ``files`` (path -> bytes), 404 otherwise, and counts the requests."""

    files: dict = {}
    requests: list = []

    def do_GET(self):
        type(self).requests.append(self.path)
        body = type(self).files.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def archive(monkeypatch):
    """A local HTTP server standing in for the Debian archive and snapshot.debian.org."""
    handler = type("Archive", (_Archive,), {"files": {}, "requests": []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setenv("VMLAB_DEBIAN_MIRROR", base + "/debian")
    monkeypatch.setattr(bbmod, "SNAPSHOT", base + "/snapshot/{sha1}")
    yield handler
    server.shutdown()
    server.server_close()


def test_a_download_is_checked_against_its_pinned_size_and_hash(fresh, archive, tmp_path):
    good = b"the source" * 100
    f = bbmod.SourceFile("x_1.0.orig.tar.bz2", len(good), hashlib.sha256(good).hexdigest(),
                         hashlib.sha1(good).hexdigest())
    archive.files[f"/debian/{bbmod.POOL}/{f.name}"] = good[:-1] + b"!"       # damaged on the mirror
    archive.files[f"/snapshot/{f.sha1}"] = good                             # intact on the snapshot
    downloads = tmp_path / "dl"
    downloads.mkdir()
    got = bbmod.fetch_source(f, downloads, None)
    assert got.read_bytes() == good and oct(got.stat().st_mode & 0o777) == "0o600"
    assert archive.requests == [f"/debian/{bbmod.POOL}/{f.name}", f"/snapshot/{f.sha1}"]
    assert sorted(p.name for p in downloads.iterdir()) == [f.name]          # no partial download left
    assert bbmod.fetch_source(f, downloads, None) == got and len(archive.requests) == 2   # once


@needs_musl
def test_a_failed_download_falls_back_to_debians_busybox_says_why_and_is_not_retried_at_every_start(fresh, archive):
    orig = bbmod.SOURCE_FILES[0]
    archive.files[f"/debian/{bbmod.POOL}/{orig.name}"] = b"not the tarball"
    choice = bbmod.guest_busybox()
    assert (choice.libc, choice.source) == ("glibc", "debian package")
    assert f"expected {orig.size} bytes" in choice.fallback and "404" in choice.fallback
    assert "VMLAB_DEBIAN_MIRROR" in choice.fallback
    assert len(archive.requests) == 2                    # the mirror, then the snapshot
    again = bbmod.guest_busybox()                        # a VM start within the hour: no new download
    assert len(archive.requests) == 2 and "vmlab image build" in again.fallback and again.libc == "glibc"
    bbmod.guest_busybox(retry=True)                      # `python -m vmlab image build`: tries again
    assert len(archive.requests) == 4


# --------------------------------------------------------------------------- in a real guest
#: commands the lessons' kind of work runs, answered the same by both builds (stdout, stderr, status)
SAME_ANSWERS = (
    "sh -c nosuch", "sh -c 'exit 3'", "cat /nonexistent", "ls /nonexistent",
    "printf '%5.2f|%e|%g\\n' 3.14159 12345.678 0.0001", "date -u -d @86399", "seq -s, 1 3 10",
    "expr 7 \\* 6", "stat -c '%a %U' /init", "awk 'BEGIN{print 1/3, 7%3}'", "sha256sum /init",
    "dd if=/dev/zero of=/dev/null bs=4096 count=3", "ps -o pid,comm | head -n 2", "grep -c root /etc/passwd",
)


@pytest.mark.integration
def test_the_guest_has_the_musl_busybox_it_starts_shells_with_fewer_page_faults_and_answers_like_debians(vm, image):
    assert image.manifest["busybox_build"]["libc"] == "musl", image.manifest["busybox_build"]
    banner = vm.run("busybox | head -n 1").stdout
    assert f"Debian {bbmod.SOURCE_VERSION} source, musl" in banner, banner
    vm.run("mkdir -p /root/debian")
    vm.copy_in(Path(shutil.which("busybox") or "/bin/busybox"), "/root/debian/busybox", mode=0o755)
    assert "Debian" in vm.run("/root/debian/busybox | head -n 1").stdout

    def faults(bb: str) -> int:
        """Page faults of a shell of *bb* by the time it reads its own /proc/self/stat (field 10, minflt)."""
        counts = [int(vm.run(f"{bb} sh -c 'read -r s < /proc/self/stat; echo \"$s\"'").stdout.split()[9])
                  for _ in range(5)]
        return int(statistics.median(counts))
    musl, glibc = faults("/bin/busybox"), faults("/root/debian/busybox")
    assert musl + 10 <= glibc, (musl, glibc)      # measured 46 and 64 (docs/boot.md)

    for cmd in SAME_ANSWERS:
        a = vm.run(f"/bin/busybox {cmd}", check=False)
        b = vm.run(f"/root/debian/busybox {cmd}", check=False)
        assert (a.stdout, a.stderr, a.status) == (b.stdout, b.stderr, b.status), cmd
