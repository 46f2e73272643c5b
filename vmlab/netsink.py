"""A host-side network peer for a guest NIC with ``backend="socket"``.

``vm.nic_sockets[i]`` is the host end of a stream socketpair that carries QEMU's
socket-netdev framing: a 4-byte big-endian length, then one Ethernet frame.
:class:`NetSink` plays a made-up host (``52:54:00:00:00:01``, ``10.0.0.1``) on
that wire, in a thread:

* counts the UDP datagrams the guest sends to ``sink_port`` (bytes, first and
  last arrival: guest -> host throughput measured where the data lands);
* answers ``rr_port`` datagrams at once (MACs, IPs and ports swapped, IPv4
  header checksum recomputed, UDP checksum 0 = "none"): request/response latency;
* answers ARP requests for its IP (the guest also gets a static neighbour entry);
* :meth:`inject` sends UDP datagrams to the guest (host -> guest).

The frame helpers (``ipv4_checksum``, ``udp_frame``, ``parse_udp``,
``reply_frame``, :class:`FrameReader`) are pure functions, unit-tested.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass
from typing import List, Optional

HOST_MAC = "52:54:00:00:00:01"
HOST_IP = "10.0.0.1"
GUEST_IP = "10.0.0.2"
ETH_IPV4, ETH_ARP = 0x0800, 0x0806


def mac_bytes(mac: str) -> bytes:
    return bytes(int(x, 16) for x in mac.split(":"))


def ip_bytes(ip: str) -> bytes:
    return socket.inet_aton(ip)


def ipv4_checksum(header: bytes) -> int:
    """The Internet checksum (RFC 1071) of an IPv4 header whose checksum field is zero."""
    if len(header) % 2:
        header += b"\0"
    s = sum(struct.unpack(f"!{len(header) // 2}H", header))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def udp_frame(src_mac: str, dst_mac: str, src_ip: str, dst_ip: str, sport: int, dport: int,
              payload: bytes, ident: int = 0) -> bytes:
    """An Ethernet + IPv4 + UDP frame (UDP checksum 0: none, allowed for IPv4)."""
    udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0) + payload
    hdr = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), ident & 0xFFFF, 0x4000, 64, 17, 0,
                      ip_bytes(src_ip), ip_bytes(dst_ip))
    hdr = hdr[:10] + struct.pack("!H", ipv4_checksum(hdr)) + hdr[12:]
    return mac_bytes(dst_mac) + mac_bytes(src_mac) + struct.pack("!H", ETH_IPV4) + hdr + udp


@dataclass
class UDP:
    src_mac: bytes
    dst_mac: bytes
    src_ip: bytes
    dst_ip: bytes
    sport: int
    dport: int
    payload: bytes
    ip_header: bytes


def parse_udp(frame: bytes) -> Optional[UDP]:
    """The UDP datagram in an Ethernet frame, or None (not IPv4/UDP, fragment, truncated)."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x00":
        return None
    ihl = (frame[14] & 0x0F) * 4
    if frame[14] >> 4 != 4 or ihl < 20 or frame[23] != 17 or len(frame) < 14 + ihl + 8:
        return None
    if struct.unpack("!H", frame[20:22])[0] & 0x3FFF:      # a fragment
        return None
    total = struct.unpack("!H", frame[16:18])[0]
    sport, dport, ulen = struct.unpack("!HHH", frame[14 + ihl:14 + ihl + 6])
    end = min(len(frame), 14 + total, 14 + ihl + ulen)
    return UDP(frame[6:12], frame[0:6], frame[26:30], frame[30:34], sport, dport,
               frame[14 + ihl + 8:end], frame[14:14 + ihl])


def reply_frame(frame: bytes) -> Optional[bytes]:
    """The answer to a UDP request: MACs, IPs and ports swapped, same payload."""
    u = parse_udp(frame)
    if u is None:
        return None
    return udp_frame(":".join(f"{b:02x}" for b in u.dst_mac), ":".join(f"{b:02x}" for b in u.src_mac),
                     socket.inet_ntoa(u.dst_ip), socket.inet_ntoa(u.src_ip), u.dport, u.sport, u.payload)


def arp_reply(frame: bytes, my_mac: str, my_ip: str) -> Optional[bytes]:
    """The reply to an ARP request for ``my_ip``, or None."""
    if len(frame) < 42 or frame[12:14] != b"\x08\x06":
        return None
    op = struct.unpack("!H", frame[20:22])[0]
    if op != 1 or frame[38:42] != ip_bytes(my_ip):
        return None
    sha, spa = frame[22:28], frame[28:32]
    me = mac_bytes(my_mac)
    body = struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, 2) + me + ip_bytes(my_ip) + sha + spa
    return sha + me + struct.pack("!H", ETH_ARP) + body


def frame_record(frame: bytes) -> bytes:
    """QEMU's socket-netdev framing: 4-byte big-endian length, then the frame."""
    return struct.pack("!I", len(frame)) + frame


class FrameReader:
    """Splits QEMU's length-prefixed stream into frames (feed it any chunking)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> List[bytes]:
        self._buf += data
        out = []
        pos, buf = 0, self._buf
        while len(buf) - pos >= 4:
            n = int.from_bytes(buf[pos:pos + 4], "big")
            if len(buf) - pos - 4 < n:
                break
            out.append(bytes(buf[pos + 4:pos + 4 + n]))
            pos += 4 + n
        del buf[:pos]
        return out


@dataclass
class SinkCounts:
    frames: int = 0                  # every frame from the guest
    udp_frames: int = 0              # datagrams to the sink port
    udp_bytes: int = 0               # their UDP payload bytes
    first: Optional[float] = None    # monotonic arrival of the first / last one
    last: Optional[float] = None
    replies: int = 0                 # rr answers sent
    arp_replies: int = 0

    @property
    def seconds(self) -> float:
        return (self.last - self.first) if self.first is not None and self.last is not None else 0.0


class NetSink:
    """The host end of a socket NIC, run in a thread: ``with NetSink(vm.nic_sockets[0]) as sink:``."""

    def __init__(self, sock: socket.socket, *, guest_mac: str = "52:54:00:12:34:56", guest_ip: str = GUEST_IP,
                 host_mac: str = HOST_MAC, host_ip: str = HOST_IP, sink_port: int = 9000,
                 rr_port: int = 9002) -> None:
        if sock is None:
            raise ValueError("no socket: the NIC needs backend='socket'")
        self.sock = sock
        self.guest_mac, self.guest_ip = guest_mac, guest_ip
        self.host_mac, self.host_ip = host_mac, host_ip
        self.sink_port, self.rr_port = sink_port, rr_port
        self.counts = SinkCounts()
        self._lock = threading.Lock()      # one writer at a time on the socket
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.error: Optional[BaseException] = None

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> NetSink:
        self.sock.settimeout(0.2)
        self._thread = threading.Thread(target=self._loop, name="vmlab-netsink", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(5)

    def __enter__(self) -> NetSink:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def reset(self) -> SinkCounts:
        """Return the counts so far and start new ones."""
        with self._lock:
            old, self.counts = self.counts, SinkCounts()
        return old

    # -- the wire -----------------------------------------------------------
    def _send(self, data: bytes, timeout: float = 30.0) -> None:
        """Write all of ``data``; QEMU stops reading while the guest NIC cannot take frames, so wait."""
        view = memoryview(data)
        deadline = time.monotonic() + timeout
        with self._lock:
            while view:
                try:
                    n = self.sock.send(view)
                except TimeoutError:
                    if time.monotonic() > deadline:
                        raise TimeoutError(f"QEMU took no frames for {timeout:.0f} s") from None
                    continue
                view = view[n:]

    def _loop(self) -> None:
        reader = FrameReader()
        sink = struct.pack("!H", self.sink_port)
        rr = struct.pack("!H", self.rr_port)
        try:
            while not self._stop.is_set():
                try:
                    data = self.sock.recv(1 << 20)
                except TimeoutError:
                    continue
                except OSError:
                    break
                if not data:
                    break
                now = time.monotonic()
                for fr in reader.feed(data):
                    c = self.counts
                    c.frames += 1
                    if len(fr) >= 42 and fr[12:14] == b"\x08\x00" and fr[23] == 17:
                        ihl = (fr[14] & 0x0F) * 4
                        dport = fr[14 + ihl + 2:14 + ihl + 4]
                        if dport == sink:
                            c.udp_frames += 1
                            c.udp_bytes += int.from_bytes(fr[14 + ihl + 4:14 + ihl + 6], "big") - 8
                            if c.first is None:
                                c.first = now
                            c.last = now
                        elif dport == rr:
                            rep = reply_frame(fr)
                            if rep:
                                self._send(frame_record(rep))
                                c.replies += 1
                    elif fr[12:14] == b"\x08\x06":
                        rep = arp_reply(fr, self.host_mac, self.host_ip)
                        if rep:
                            self._send(frame_record(rep))
                            c.arp_replies += 1
        except BaseException as exc:  # surfaced by the experiment
            self.error = exc

    def inject(self, count: int, size: int, port: int, *, batch: int = 64) -> float:
        """Send ``count`` UDP datagrams of ``size`` payload bytes to the guest; returns seconds taken."""
        payload = bytearray(size)
        for i in range(8, size):
            payload[i] = 65 + i % 26
        t0 = time.monotonic()
        i = 0
        while i < count:
            recs = []
            for j in range(i, min(count, i + batch)):
                if size >= 8:
                    payload[:8] = j.to_bytes(8, "big")
                recs.append(frame_record(udp_frame(self.host_mac, self.guest_mac, self.host_ip, self.guest_ip,
                                                   40000, port, bytes(payload), ident=j)))
            self._send(b"".join(recs))
            i += batch
        return time.monotonic() - t0


def guest_setup(dev: str = "eth0", guest_ip: str = GUEST_IP, host_ip: str = HOST_IP,
                host_mac: str = HOST_MAC) -> str:
    """The guest shell commands that put ``dev`` on the made-up wire (busybox ``ip``)."""
    return (f"ip link set {dev} up && ip addr add {guest_ip}/24 dev {dev} && "
            f"(ip neigh replace {host_ip} lladdr {host_mac} dev {dev} nud permanent 2>/dev/null || "
            f"arp -s {host_ip} {host_mac} 2>/dev/null || true) && "
            "echo 8388608 > /proc/sys/net/core/rmem_max && echo 8388608 > /proc/sys/net/core/wmem_max && "
            # emulated NICs negotiate the link after 'up' (e1000: a few hundred ms): wait for carrier
            f"i=0; while [ \"$(cat /sys/class/net/{dev}/carrier 2>/dev/null)\" != 1 ] && [ $i -lt 200 ]; do "
            "sleep 0.05; i=$((i+1)); done; "
            f"[ \"$(cat /sys/class/net/{dev}/carrier 2>/dev/null)\" = 1 ] || "
            f"{{ echo 'no carrier on {dev}' >&2; exit 1; }}")
