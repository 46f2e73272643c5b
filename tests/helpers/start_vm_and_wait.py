"""Start a VM, print where it lives as one JSON line, then wait to be killed.

Used by tests/test_reliability.py: the test SIGKILLs this process and checks
that the QEMU it started dies with it and that the private dir is swept.

    python tests/helpers/start_vm_and_wait.py NAME [--warm] [--count N]
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))

from vmlab import VM


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("name")
    ap.add_argument("--warm", action="store_true")
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument("--boot-timeout", type=float, default=180)
    args = ap.parse_args()
    vms = []
    for i in range(args.count):
        vm = VM(accel="tcg", name=f"{args.name}{i}" if args.count > 1 else args.name,
                warm=args.warm, boot_timeout=args.boot_timeout)
        vm.start()
        vms.append(vm)
    print(json.dumps({"python_pid": os.getpid(),
                      "vms": [{"qemu_pid": vm.pid, "private_dir": str(vm.private_dir),
                               "name": vm.spec.name} for vm in vms]}), flush=True)
    if os.environ.get("VMLAB_HELPER_EXIT"):     # a clean run: shut down and exit
        for vm in vms:
            vm.run("true")
            vm.shutdown()
        return
    while True:
        time.sleep(60)


if __name__ == "__main__":
    main()
