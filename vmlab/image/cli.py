"""``python -m vmlab image build [--force] [--json]`` and ``image status [--json]``."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, Sequence

from ..errors import SetupError
from .build import ensure_image
from .status import image_status


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m vmlab image",
                                     description="build or inspect the vmlab guest image")
    sub = parser.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("build", help="build the guest image (or reuse the cached one)")
    b.add_argument("--force", action="store_true", help="rebuild even if cached")
    b.add_argument("--json", action="store_true", help="print the result as JSON")
    s = sub.add_parser("status", help="show whether the image is built and what is missing")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    return parser


def build_image_cli(argv: Sequence[str] | None = None) -> int:
    """``python -m vmlab image build [--force] [--json]`` / ``image status [--json]``."""
    args_in = list(sys.argv[1:] if argv is None else argv)
    if args_in and args_in[0] == "image":
        args_in = args_in[1:]
    try:
        args = _parser().parse_args(args_in)
    except SystemExit as exc:
        return int(exc.code or 0)
    if args.cmd == "status":
        return _status(args.json)
    return _build(args.force, args.json)


def _status(as_json: bool) -> int:
    st = image_status()
    if as_json:
        print(json.dumps(st, indent=2, sort_keys=True))
    else:
        if st["built"]:
            print(f"guest image: built, kernel {st['kernel_version']}, key {st['key']}")
            print(f"  {st['path']}")
            bb = st.get("busybox")
            if bb:
                print(f"  busybox: {bb['libc']} ({bb['source']})" + (f"; {st['note']}" if st.get("note") else ""))
        else:
            print("guest image: not built" + (f" ({st['note']})" if st.get("note") else ""))
        for p in st["problems"]:
            print(f"problem: {p['problem']}\n  fix: {p['fix']}")
    return 0 if not st["problems"] else 1


def _build(force: bool, as_json: bool) -> int:
    stream = sys.stderr if as_json else sys.stdout

    def progress(msg: str) -> None:
        print(f"vmlab: {msg}", file=stream, flush=True)

    t0 = time.monotonic()
    try:
        img = ensure_image(force=force, progress=progress, retry_busybox=True)
    except SetupError as exc:
        if as_json:
            print(json.dumps({"ok": False, "error": exc.message, "fix": exc.fix}, indent=2))
        print(f"vmlab: error: {exc}", file=sys.stderr)
        return 1
    result: dict[str, Any] = {
        "ok": True, "kernel": str(img.kernel), "initrd": str(img.initrd),
        "kernel_version": img.kernel_version, "key": img.key, "root": str(img.root),
        "sizes": img.sizes, "modules_missing": img.manifest.get("modules_missing", []),
        "seconds": round(time.monotonic() - t0, 2)}
    if as_json:
        print(json.dumps(result, indent=2, sort_keys=True))
    else:
        print(f"kernel  {img.kernel}  ({result['sizes']['vmlinux']} bytes)")
        print(f"initrd  {img.initrd}  ({result['sizes']['initrd.lz4']} bytes: the base modules only)")
        if img.initrd_all is not None:
            print(f"        {img.initrd_all}  ({result['sizes']['initrd-all.lz4']} bytes: all "
                  f"{len(img.manifest.get('modules', []))} modules)")
        print(f"rootfs  {img.cpio}  ({result['sizes']['initrd.cpio']} bytes, uncompressed)")
        print(f"version {img.kernel_version}  key {img.key}")
        if result["modules_missing"]:
            print(f"modules missing from this kernel: {', '.join(result['modules_missing'])}")
    return 0
