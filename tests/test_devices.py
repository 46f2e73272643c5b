"""Device profiles and the full-vs-para-virtual experiments (disk, console, net).

Unit tests: profiles produce valid specs, the /proc/interrupts and trace-log
counters, the lspci parser, the netsink framing and checksums.
Integration tests (real TCG guests, quick mode) check direction and sanity only,
never exact figures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vmlab import devices as dv
from vmlab.errors import SpecError

REPO = Path(__file__).resolve().parent.parent
REQUIRED = ["device", "kind", "throughput_mb_s", "interventions", "interventions_per_mb", "accel",
            "repeat", "lat_us_median", "guest_cpu_s", "host_cpu_s", "traps", "irqs", "qemu", "guest_kernel"]


# --------------------------------------------------------------------- units
@pytest.mark.parametrize("name", sorted(dv.PROFILES))
def test_every_profile_spec_validates(name):
    p = dv.PROFILES[name]
    assert p.kind in dv.KINDS and p.contrast in dv.CONTRASTS
    assert p.description and p.guest_path and (p.regions or p.virtio)
    spec = p.spec(accel="tcg")
    assert spec.trace, "a profile must enable the trace events it counts"
    if p.contrast == "disk":
        assert spec.disks[0].bus == p.disk_bus and spec.disks[0].null
    # a disk's QEMU runs on one host CPU; a console's or NIC's streams to this process and is left free
    assert spec.host_cpu == ("auto" if p.contrast == "disk" else None)
    if p.contrast == "net":
        assert spec.nics[0].model == p.nic_model and spec.nics[0].backend == "socket"


def test_each_contrast_has_both_kinds_and_quick_sets_exist():
    for c in dv.CONTRASTS:
        kinds = {p.kind for p in dv.profiles(c)}
        assert kinds == {"emulated", "paravirtual"}
        assert all(dv.get(n, c) for n in dv.QUICK_DEVICES[c])


def test_unknown_device_is_a_spec_error():
    with pytest.raises(SpecError) as e:
        dv.resolve(["floppy"], "disk", quick=True)
    assert "ide-pio" in str(e.value)
    with pytest.raises(SpecError):
        dv.resolve(["virtio-net"], "disk", quick=True)   # right name, wrong contrast


def test_ide_pio_profile_turns_dma_off():
    p = dv.get("ide-pio")
    assert "libata.dma=0" in p.kernel_args and p.check_expect == "0"


PROC_INTERRUPTS = """           CPU0
  0:         88   IO-APIC   2-edge      timer
  1:          9   IO-APIC   1-edge      i8042
 14:         19   IO-APIC  14-edge      ata_piix
 25:          9   PCI-MSI 32769-edge      virtio0-virtqueues
 27:          3   PCI-MSI 65537-edge      virtio1-req.0
LOC:        491   Local timer interrupts
"""


def test_interrupt_delta_skips_timer_and_agent():
    before = dv.parse_interrupts(PROC_INTERRUPTS)
    assert before["14"] == (19, "IO-APIC 14-edge ata_piix") and "LOC" not in before
    after_text = (PROC_INTERRUPTS.replace("88", "99").replace(" 19 ", " 30 ")
                  .replace("  9   PCI", " 15   PCI").replace("  3   PCI", " 10   PCI"))
    d = dv.irq_delta(before, dv.parse_interrupts(after_text), ["virtio0"])
    assert d == {"14 ata_piix": 11, "27 virtio1-req.0": 7}
    # a driver that freed its IRQ (the UART on close) keeps its number; the name comes from either side
    d2 = dv.irq_delta({"3": (5, "IO-APIC 3-edge ttyS1")}, {"3": (9, "IO-APIC 3-edge")})
    assert d2 == {"3 ttyS1": 4}


def test_count_traps_by_region_and_virtio_device():
    log = (b"memory_region_ops_read cpu 0 mr 0x1 addr 0x1f0 value 0x0 size 4 name 'ide'\n" * 5 +
           b"memory_region_ops_write cpu 0 mr 0x2 addr 0xc000 value 0x1 size 1 name 'piix-bmdma'\n" +
           b"memory_region_ops_write cpu -1 mr 0x3 addr 0xfee01004 value 0x27 size 4 name 'apic-msi'\n" +
           b"memory_region_ops_read cpu 0 mr 0x9 addr 0x0 value 0x0 size 4 name 'ide-extra'\n")
    assert dv.count_traps(log, dv.get("ide-pio")) == {"ide": 5, "piix-bmdma": 1}
    vlog = b"virtio_queue_notify vdev 0xaa n 0 vq 0x1\n" * 3 + b"virtio_queue_notify vdev 0xbb n 1 vq 0x2\n"
    assert dv.count_traps(vlog, dv.get("virtio-blk"), ["0xaa"])["virtio_queue_notify"] == 3
    assert dv.count_traps(vlog, dv.get("virtio-blk"), [])["virtio_queue_notify"] == 0


def test_parse_lspci():
    rows = dv.parse_lspci("0000:00:01.1 0x8086 0x7010 0x010180 0x1100 ata_piix\n"
                          "0000:00:04.0 0x1af4 0x1001 0x010000 0x0002 virtio-pci\n"
                          "0000:00:05.0 0x1234 0x5678 0x00ff00 -\n")
    assert rows[0]["name"].startswith("Intel PIIX3 IDE") and rows[0]["driver"] == "ata_piix"
    assert rows[1]["paravirtual"] and not rows[0]["paravirtual"]
    assert rows[2]["driver"] == "(none)" and rows[2]["name"] == "?"


def test_kvm_stats_are_skipped_with_a_reason_under_tcg():
    class Fake:
        accel = "tcg"
    stats, why = dv.kvm_exit_stats(Fake())
    assert stats is None and "only under KVM" in why


def test_disk_arguments_are_checked_before_any_vm():
    from vmlab.experiments import disk
    with pytest.raises(SpecError):
        disk.run(quick=True, devices=["ide-pio"], bs=[1000])
    with pytest.raises(SpecError):
        disk.run(quick=True, devices=["ide-pio"], modes=["append"])


# --------------------------------------------------------------- integration
def _check_frame(df):
    for c in REQUIRED:
        assert c in df.columns, c
    assert set(df["kind"]) <= {"emulated", "paravirtual"}
    assert (df["interventions"] > 0).all()
    assert (df["throughput_mb_s"] > 0).all()
    assert set(df["accel"]) == {"tcg"}


def _median(df, device, col, **where):
    sub = df[df.device == device]
    for k, v in where.items():
        sub = sub[sub[k] == v]
    assert len(sub), (device, where)
    return float(sub[col].median())


@pytest.fixture(scope="module")
def disk_df(image):
    from vmlab.experiments import disk
    return disk.run(quick=True, accel="tcg", image=image, devices=["ide-pio", "ide-dma", "virtio-blk"])


@pytest.mark.integration
def test_disk_quick_direction(disk_df, tmp_path):
    df = disk_df
    _check_frame(df)
    for c in ("mode", "pattern", "bs", "size_bytes"):
        assert c in df.columns
    for mode in ("read", "write"):
        pio = _median(df, "ide-pio", "interventions_per_mb", mode=mode)
        virt = _median(df, "virtio-blk", "interventions_per_mb", mode=mode)
        assert pio >= 100 * virt, (mode, pio, virt)
        assert _median(df, "ide-dma", "interventions_per_mb", mode=mode) < pio
        assert (_median(df, "virtio-blk", "throughput_mb_s", mode=mode)
                > _median(df, "ide-pio", "throughput_mb_s", mode=mode))
    # the frame survives a CSV round trip
    from vmlab.measure import load, save
    back = load(save(df, "disk-test", directory=tmp_path))
    assert list(back.columns) == list(df.columns) and len(back) == len(df)


@pytest.mark.integration
def test_interventions_scale_with_bytes(image):
    prof = dv.get("ide-dma")
    with dv.boot(prof, accel="tcg", image=image) as vm:
        probe = dv.Probe(vm, prof)
        from vmlab.experiments.disk import command
        one = probe.measure(command(prof, "read", "seq", 65536, 1 << 20), count=True).interventions
        two = probe.measure(command(prof, "read", "seq", 65536, 2 << 20), count=True).interventions
        untraced = probe.measure(command(prof, "read", "seq", 65536, 1 << 20), count=False)
    assert one > 0 and 1.6 * one <= two <= 2.5 * one, (one, two)
    assert untraced.interventions == 0 and not untraced.counted


@pytest.mark.integration
def test_a_disk_profile_disk_stores_nothing(image):
    """The device experiments' disk is QEMU's null driver: a write is accepted and dropped, a read returns zeros,
    and there is no file on the host; its QEMU runs on one host CPU."""
    prof = dv.get("virtio-blk")
    with dv.boot(prof, accel="tcg", image=image) as vm:
        drive = next(a for a in vm.launch.argv if "id=disk0" in a and a.startswith("driver="))
        assert drive.startswith("driver=null-co,size=67108864,read-zeroes=on")
        assert not list(vm.private_dir.glob("scratch*"))
        vm.run("printf 'vmlab%.0s' $(seq 100) > /tmp/b && dd if=/tmp/b of=/dev/vda bs=512 count=1 oflag=direct",
               timeout=30)
        nonzero = vm.run("dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | tr -d '\\000' | wc -c").stdout
        size = vm.run("dd if=/dev/vda bs=512 count=1 iflag=direct 2>/dev/null | wc -c").stdout
        assert (int(size), int(nonzero)) == (512, 0)
        assert vm.host_cpu in os.sched_getaffinity(0)


# ------------------------------------------------------------------ netsink
def test_ipv4_checksum_known_header():
    # the classic example header (RFC 1071 style): checksum 0xb861
    hdr = bytes.fromhex("450000730000400040110000c0a80001c0a800c7")
    from vmlab.netsink import ipv4_checksum
    assert ipv4_checksum(hdr) == 0xB861
    full = hdr[:10] + (0xB861).to_bytes(2, "big") + hdr[12:]
    assert ipv4_checksum(full) == 0      # a correct header sums to zero


def test_udp_frame_round_trip_and_reply():
    from vmlab.netsink import ipv4_checksum, parse_udp, reply_frame, udp_frame
    fr = udp_frame("52:54:00:12:34:56", "52:54:00:00:00:01", "10.0.0.2", "10.0.0.1", 40000, 9002, b"x" * 64)
    u = parse_udp(fr)
    assert (u.sport, u.dport, u.payload) == (40000, 9002, b"x" * 64)
    assert ipv4_checksum(u.ip_header) == 0
    rep = parse_udp(reply_frame(fr))
    assert (rep.sport, rep.dport) == (9002, 40000)
    assert rep.src_ip == u.dst_ip and rep.dst_ip == u.src_ip
    assert rep.src_mac == u.dst_mac and rep.dst_mac == u.src_mac
    assert ipv4_checksum(rep.ip_header) == 0 and rep.payload == u.payload
    assert parse_udp(b"\0" * 60) is None


def test_frame_reader_handles_any_chunking():
    from vmlab.netsink import FrameReader, frame_record
    frames = [bytes([i]) * (60 + i) for i in range(5)]
    stream = b"".join(frame_record(f) for f in frames)
    for step in (1, 3, 7, 64, len(stream)):
        r, got = FrameReader(), []
        for i in range(0, len(stream), step):
            got += r.feed(stream[i:i + step])
        assert got == frames


def test_arp_reply():
    from vmlab.netsink import arp_reply, mac_bytes
    guest = mac_bytes("52:54:00:12:34:56")
    req = (b"\xff" * 6 + guest + b"\x08\x06" + bytes.fromhex("0001080006040001") + guest +
           bytes([10, 0, 0, 2]) + b"\0" * 6 + bytes([10, 0, 0, 1]))
    rep = arp_reply(req, "52:54:00:00:00:01", "10.0.0.1")
    assert rep[:6] == guest and rep[20:22] == b"\x00\x02" and rep[28:32] == bytes([10, 0, 0, 1])
    assert arp_reply(req, "52:54:00:00:00:01", "10.0.0.9") is None


# ----------------------------------------------------- console / net / CLI
@pytest.mark.integration
def test_console_quick_direction(image):
    from vmlab.experiments import console
    df = console.run(quick=True, accel="tcg", image=image)
    _check_frame(df)
    assert "interventions_per_byte" in df.columns
    assert _median(df, "virtio-console", "throughput_mb_s") > _median(df, "uart", "throughput_mb_s")
    assert (_median(df, "uart", "interventions_per_byte")
            > 100 * _median(df, "virtio-console", "interventions_per_byte"))
    # a UART needs at least one register write per byte
    assert _median(df, "uart", "traps") >= _median(df, "uart", "size_bytes")


@pytest.mark.integration
def test_net_quick_sanity(image):
    from vmlab.experiments import net
    df = net.run(quick=True, accel="tcg", image=image, count=1000, rr_count=100)
    _check_frame(df)
    assert set(df.direction) == {"guest->host", "host->guest", "rr"}
    # counts, not rates: how many datagrams a loaded host drops is a speed figure (benchmarks/devices.py)
    tx = df[df.direction == "guest->host"]
    assert ((tx["packets"] > 0) & (tx["packets"] <= tx["count"])).all()     # the host peer saw datagrams
    assert (tx["lost"] == tx["count"] - tx["packets"]).all()                 # and lost is what it did not see
    rx = df[df.direction == "host->guest"]
    assert ((rx["packets"] > 0) & (rx["packets"] <= rx["count"])).all()
    rr = df[df.direction == "rr"]
    assert (rr["lat_us_median"] > 0).all() and ((rr["lost"] >= 0) & (rr["lost"] < rr["count"])).all()
    assert (rr["packets"] == 2 * (rr["count"] - rr["lost"])).all()           # a request and its reply
    # e1000 traps on register writes to send and to take an interrupt; virtio-net kicks a shared ring. Compared in
    # request-response, one datagram in flight, where neither can batch: there the count is each device's own
    # protocol (~4.4 vs 1.5 per packet). A stream batches as the load allows: under the parallel test run on the AMD
    # machine e1000 took 0.26 and virtio-net 0.33 per packet, where quiet runs gave 0.8-1.5 vs 0.02-0.19; that
    # comparison is benchmarks/devices.py's, judged on a quiet machine
    assert (_median(df, "e1000", "interventions_per_packet", direction="rr")
            > _median(df, "virtio-net", "interventions_per_packet", direction="rr"))


@pytest.mark.integration
def test_cli_json(image):
    out = subprocess.run([sys.executable, "-m", "vmlab", "experiment", "console", "--quick", "--json"],
                         cwd=REPO, capture_output=True, text=True, timeout=240)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out.stdout)
    assert rows and {r["device"] for r in rows} == {"uart", "virtio-console"}
    for r in rows:
        for k in ("device", "kind", "throughput_mb_s", "interventions", "accel"):
            assert r[k] is not None, k
        assert r["kind"] in ("emulated", "paravirtual")
