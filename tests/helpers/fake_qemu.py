#!/usr/bin/env python3
"""A stand-in for qemu-system-x86_64, for error-path tests only (tests/test_fake_qmp.py).

Behaviour from $FAKE_QEMU_MODE:
  exit-nofile   print QEMU's "Could not open" message and exit 1
  abort-msr     print the PVM host's MSR assertion and die with SIGABRT
  silent        never speak QMP (the monitor connection times out)
  qmp-then-die  greet and answer QMP, then exit 3 after 0.5 s (no guest ever comes up)
  qmp-forever   greet and answer QMP (errors for unknown commands), never boot a guest
"""

import json
import os
import signal
import socket
import sys
import time

mode = os.environ.get("FAKE_QEMU_MODE", "qmp-forever")
if "--version" in sys.argv:
    print("QEMU emulator version 7.2.99 (fake)")
    sys.exit(0)
if mode == "exit-nofile":
    sys.stderr.write("qemu-system-x86_64: -drive file=/x: Could not open '/x': No such file or directory\n")
    sys.exit(1)
if mode == "abort-msr":
    sys.stderr.write("qemu-system-x86_64: error: failed to set MSR 0x10a to 0x0\n"
                     "../target/i386/kvm/kvm.c:3060: kvm_buf_set_msrs: Assertion failed.\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGABRT)
if mode == "silent":
    time.sleep(3600)

fd = next(int(a.split("fd=")[1]) for a in sys.argv if a.startswith("socket,id=qmp,fd="))
sock = socket.socket(fileno=fd)
f = sock.makefile("rwb", buffering=0)


def send(obj):
    f.write(json.dumps(obj).encode() + b"\r\n")


send({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 99}, "package": "fake"},
              "capabilities": []}})
deadline = time.monotonic() + 0.5 if mode == "qmp-then-die" else None
sock.settimeout(0.1)
buf = b""
while True:
    if deadline and time.monotonic() > deadline:
        sys.stderr.write("fake qemu: dying on purpose\n")
        sys.exit(3)
    try:
        chunk = sock.recv(65536)
    except TimeoutError:
        continue
    if not chunk:
        sys.exit(0)
    buf += chunk
    while b"\n" in buf or buf.strip().endswith(b"}"):
        try:
            msg, idx = json.JSONDecoder().raw_decode(buf.decode().lstrip())
        except ValueError:
            break
        buf = buf.decode().lstrip()[idx:].encode()
        cmd, mid = msg.get("execute"), msg.get("id")
        if cmd in ("qmp_capabilities", "cont", "stop"):
            send({"return": {}, "id": mid})
        elif cmd == "query-status":
            send({"return": {"status": "running", "running": True}, "id": mid})
        elif cmd == "quit":
            send({"return": {}, "id": mid})
            sys.exit(0)
        else:
            send({"error": {"class": "CommandNotFound", "desc": f"The command {cmd} has not been found"},
                  "id": mid})
