"""Clean exits: a script that starts a VM and then kills it, quits it, shuts it down or just leaves it running
exits with nothing on stderr -- no asyncio noise ("Task was destroyed but it is pending!", "_GatheringFuture
exception was never retrieved ... EOFError") -- status 0, its QEMU gone and its private directory removed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """
import json, sys
from vmlab import VM
vm = VM(accel="tcg", name="cleanexit", warm={warm})
vm.start()
print(json.dumps({{"pid": vm.pid, "dir": str(vm.private_dir)}}), flush=True)
ending = {ending!r}
if ending == "kill":
    vm.kill()
elif ending == "quit":
    vm.quit()
elif ending == "shutdown":
    vm.shutdown()
# "leave": the interpreter exits with the VM running
"""


def _gone(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat[stat.rindex(")") + 2] in "ZX"


@pytest.mark.integration
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "warm"])
@pytest.mark.parametrize("ending", ["kill", "quit", "shutdown", "leave"])
def test_script_exits_without_asyncio_noise(image, ending, warm):
    env = {k: v for k, v in os.environ.items() if k != "VMLAB_LOG"}   # the logger quiet, as a learner has it
    p = subprocess.run([sys.executable, "-c", SCRIPT.format(ending=ending, warm=warm)], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.stderr == "", p.stderr
    assert p.returncode == 0
    info = json.loads(p.stdout.splitlines()[0])
    assert _gone(info["pid"]), "QEMU outlived the script"
    assert not Path(info["dir"]).exists(), "the private directory outlived the script"
