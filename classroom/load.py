"""A class, simulated for real: N students on a real JupyterHub on this machine (make classroom-load).

For each class size (default 1, 2, 4, 8) every student, at the same moment: logs in through the hub's login
form with the class password, asks the hub's REST API for a token, starts their server, opens a kernel and
runs the first measured cells of lesson 02.00 (boot a VM with an IDE and a virtio disk, read what the guest
sees, read 4 MiB from each: a small device contrast), records a prediction (the class store), then stops their
server with the VM still running. Measured per class size: time to first VM (median, slowest), failures,
memory and CPU per student (each student's cgroup: peak memory, CPU-seconds; and the peak sum of PSS of their
processes), the host's memory and CPU, and the QEMU processes left after the servers stop (must be 0).

Bounded: at most 16 students, each class has a deadline (--class-timeout), every request has a timeout.
Loopback only: the hub listens on 127.0.0.1 and the driver talks to nothing else.

    python classroom/load.py --students 1,2,4,8        # prints the table; JSON in build/classroom/
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import requests
import websocket

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT))

from classroom_spawner import cgroup_pids, cgroup_usage  # noqa: E402

from vmlab import procfs  # noqa: E402

MAX_STUDENTS = 16
PASSWORD = "class-" + uuid.uuid4().hex[:12]

# The first measured cells of lesson 02.00 (set-up, experiment 1) and a small device contrast.
CELLS: list[tuple[str, str]] = [
    ("import", "import json, os, time\nfrom vmlab import VM, Disk\nfrom vmlab import devices as dv\n"
               "print('IMPORTED', time.time())"),
    ("boot", "vm = VM(accel='auto', name='lspci', disks=(Disk(bus='EMULATED', size='16M'), Disk(bus='virtio', size='16M')))\n"
             "vm.start()\nprint('VM_READY', time.time(), vm.accel, round(vm.boot_seconds, 2))"),
    ("contrast", "pci = dv.lspci(vm)\nres = {}\n"
                 "for dev in ('/dev/sda', '/dev/vda'):\n"
                 "    r = vm.run(f'vmbench disk --dev {dev} --mode read --pattern seq --bs 65536 --total 4194304')\n"
                 "    res[dev] = json.loads(r.stdout)['throughput_mb_s']\n"
                 "print('CONTRAST', json.dumps(res), len(pci))"),
    ("predict", "from vmlab.widgets.predict import Prediction\n"
                "p = Prediction('Class load run: emulated disk (sda), sequential read, MB/s?', unit='MB/s')\n"
                "p.record(10.0 + len(os.environ['JUPYTERHUB_USER']))\np.measured(res['/dev/sda'])\n"
                "print('PREDICTED')"),
]


# ------------------------------------------------------------------------------------------ the hub
@dataclass
class Hub:
    url: str
    state: Path
    proc: subprocess.Popen
    log: Path
    password: str


def _free_port_block(n: int = 4) -> int:
    import socket
    for base in range(18017, 19000, 10):
        ok = True
        for p in range(base, base + n):
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", p))
                except OSError:
                    ok = False
                    break
        if ok:
            return base
    raise RuntimeError("no 4 free ports on 127.0.0.1 between 18017 and 19000")


@contextlib.contextmanager
def running_hub(image_cache: Path, state: Optional[Path] = None, port: Optional[int] = None,
                idle_timeout: int = 3600, start_timeout: float = 120) -> Iterator[Hub]:
    """Start JupyterHub with classroom/jupyterhub_config.py (a fresh state dir); stop it and its proxy after."""
    state = Path(state or tempfile.mkdtemp(prefix="vmlab-class-", dir=ROOT / "build" / "classroom"))
    port = port or _free_port_block()
    env = dict(os.environ, CLASSROOM_STATE=str(state), CLASSROOM_PORT=str(port), CLASSROOM_PASSWORD=PASSWORD,
               CLASSROOM_IMAGE_CACHE=str(image_cache), CLASSROOM_IDLE_TIMEOUT=str(idle_timeout))
    log = state.parent / f"{state.name}.hub.log"
    bin_dir = Path(sys.executable).parent
    with open(log, "wb") as logf:
        proc = subprocess.Popen([str(bin_dir / "jupyterhub"), "-f", str(HERE / "jupyterhub_config.py")],
                                cwd=state.parent, env=env, stdout=logf, stderr=subprocess.STDOUT,
                                start_new_session=True)
    hub = Hub(f"http://127.0.0.1:{port}", state, proc, log, PASSWORD)
    try:
        deadline = time.monotonic() + start_timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the hub exited ({proc.returncode}); its log: {log}\n"
                                   + log.read_text()[-3000:])
            with contextlib.suppress(requests.RequestException):
                if requests.get(f"{hub.url}/hub/api/", timeout=5).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the hub did not answer in {start_timeout:.0f} s; its log: {log}")
            time.sleep(0.5)
        yield hub
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)      # the hub stops its servers (cleanup_servers) and its proxy
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)   # anything of its session left (the proxy)


# ------------------------------------------------------------------------------------------ a student
@dataclass
class StudentResult:
    name: str
    ok: bool = False
    error: str = ""
    t_login: Optional[float] = None       # seconds from the class's start
    t_server: Optional[float] = None
    t_kernel: Optional[float] = None
    t_first_vm: Optional[float] = None
    t_contrast: Optional[float] = None
    accel: str = ""
    boot_s: Optional[float] = None
    contrast_mb_s: dict[str, float] = field(default_factory=dict)
    mem_peak_mb: Optional[float] = None    # the cgroup's peak (RSS + page cache of the student's processes)
    pss_peak_mb: Optional[float] = None    # peak of the summed PSS of the student's processes
    cpu_s: Optional[float] = None          # CPU-seconds of the student's processes (cgroup)
    swept: int = 0                         # processes the spawner had to kill after the server stopped


class Student:
    def __init__(self, hub: Hub, name: str, t0: float, timeout: float) -> None:
        self.hub, self.name, self.t0, self.timeout = hub, name, t0, timeout
        self.s = requests.Session()
        self.token = ""
        self.r = StudentResult(name)
        self.cells = [(label, code.replace("EMULATED", "ide")) for label, code in CELLS]

    def _since(self) -> float:
        return round(time.time() - self.t0, 2)

    def api(self, method: str, path: str, **kw: Any) -> requests.Response:
        headers = kw.pop("headers", {})
        if self.token:
            headers["Authorization"] = f"token {self.token}"
        r = self.s.request(method, self.hub.url + path, headers=headers, timeout=60, **kw)
        if r.status_code >= 400:
            raise RuntimeError(f"{method} {path}: HTTP {r.status_code} {r.text[:300]}")
        return r

    def login(self) -> None:
        self.api("GET", "/hub/login")
        xsrf = self.s.cookies.get("_xsrf", "")
        self.api("POST", "/hub/login?next=", data={"username": self.name, "password": self.hub.password,
                                                   "_xsrf": xsrf}, allow_redirects=False)
        if not any(c.name.startswith("jupyterhub-session") or c.name == "jupyterhub-hub-login"
                   for c in self.s.cookies):
            raise RuntimeError("login failed: no hub cookie")
        self.api("GET", "/hub/home")           # the session changed at login: its xsrf cookie too
        xsrf = [c.value for c in self.s.cookies if c.name == "_xsrf"][-1]
        r = self.api("POST", f"/hub/api/users/{self.name}/tokens", headers={"X-XSRFToken": xsrf},
                     json={"note": "vmlab load run", "expires_in": 3600})
        self.token = r.json()["token"]
        self.r.t_login = self._since()

    def start_server(self) -> None:
        self.api("POST", f"/hub/api/users/{self.name}/server")
        deadline = time.monotonic() + self.timeout
        while time.monotonic() < deadline:
            model = self.api("GET", f"/hub/api/users/{self.name}").json()
            srv = (model.get("servers") or {}).get("")
            if srv and srv.get("ready"):
                self.r.t_server = self._since()
                return
            if not srv and not model.get("pending"):
                raise RuntimeError("the server stopped while starting (see the hub log)")
            time.sleep(0.5)
        raise TimeoutError("the server did not become ready in time")

    def run_cells(self) -> None:
        kid = self.api("POST", f"/user/{self.name}/api/kernels", json={"name": "python3"}).json()["id"]
        ws = websocket.create_connection(
            f"{self.hub.url.replace('http', 'ws')}/user/{self.name}/api/kernels/{kid}/channels",
            header=[f"Authorization: token {self.token}"], timeout=self.timeout)
        self.r.t_kernel = self._since()
        try:
            for label, code in self.cells:
                out = self._execute(ws, code)
                for line in out.splitlines():
                    parts = line.split()
                    if parts and parts[0] == "VM_READY":
                        self.r.t_first_vm = round(float(parts[1]) - self.t0, 2)
                        self.r.accel, self.r.boot_s = parts[2], float(parts[3])
                    elif parts and parts[0] == "CONTRAST":
                        self.r.contrast_mb_s = json.loads(line.split(None, 1)[1].rsplit(" ", 1)[0])
                        self.r.t_contrast = self._since()
                if label == "boot" and self.r.t_first_vm is None:
                    raise RuntimeError(f"the boot cell printed no VM_READY: {out[-500:]}")
        finally:
            ws.close()

    def _execute(self, ws: websocket.WebSocket, code: str) -> str:
        msg_id = uuid.uuid4().hex
        ws.send(json.dumps({"header": {"msg_id": msg_id, "username": self.name, "session": uuid.uuid4().hex,
                                       "msg_type": "execute_request", "version": "5.3"},
                            "parent_header": {}, "metadata": {}, "channel": "shell",
                            "content": {"code": code, "silent": False, "store_history": False,
                                        "user_expressions": {}, "allow_stdin": False, "stop_on_error": True}}))
        out: list[str] = []
        deadline = time.monotonic() + self.timeout
        status = None
        idle = False
        while not (idle and status):
            if time.monotonic() > deadline:
                raise TimeoutError(f"a cell did not finish in time: {code.splitlines()[0]}")
            msg = json.loads(ws.recv())
            if msg.get("parent_header", {}).get("msg_id") != msg_id:
                continue
            mt = msg["msg_type"]
            if mt == "stream":
                out.append(msg["content"]["text"])
            elif mt == "error":
                raise RuntimeError(f"cell failed: {msg['content']['ename']}: {msg['content']['evalue']}")
            elif mt == "execute_reply":
                status = msg["content"]["status"]
            elif mt == "status" and msg["content"]["execution_state"] == "idle":
                idle = True
        if status != "ok":
            raise RuntimeError(f"cell ended with status {status}")
        return "".join(out)

    def stop_server(self) -> None:
        self.api("DELETE", f"/hub/api/users/{self.name}/server")
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            model = self.api("GET", f"/hub/api/users/{self.name}").json()
            if not (model.get("servers") or {}) and not model.get("pending"):
                return
            time.sleep(0.5)
        raise TimeoutError("the server did not stop in 120 s")


# ------------------------------------------------------------------------------------------ measuring
def _cgroups_of(state: Path, name: str) -> dict[str, Path]:
    try:
        return {k: Path(v) for k, v in json.loads((state / "cgroups" / f"{name}.json").read_text()).items()}
    except (OSError, ValueError):
        return {}


def _cpu_busy() -> tuple[float, float]:
    fields = [float(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def _mem_available_mb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def qemu_processes(users: Optional[set[str]] = None) -> list[tuple[int, str]]:
    """QEMU processes on the host; with ``users``, only those started from those students' kernels."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            if not (d / "comm").read_text().startswith("qemu-system"):
                continue
            environ = (d / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        user = next((e.split(b"=", 1)[1].decode() for e in environ if e.startswith(b"JUPYTERHUB_USER=")), "")
        if users is None or user in users:
            found.append((int(d.name), user))
    return found


class Sampler(threading.Thread):
    """Every second: each student's memory (cgroup now, summed PSS) and the host's available memory."""

    def __init__(self, state: Path, names: list[str]) -> None:
        super().__init__(daemon=True)
        self.state, self.names = state, names
        self.pss_peak: dict[str, float] = dict.fromkeys(names, 0.0)
        self.mem_avail_min = _mem_available_mb()
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(1.0):
            self.mem_avail_min = min(self.mem_avail_min, _mem_available_mb())
            for n in self.names:
                dirs = _cgroups_of(self.state, n)
                total = 0
                for pid in cgroup_pids(dirs):
                    with contextlib.suppress(OSError, ValueError):
                        total += procfs.pss_bytes(pid)
                self.pss_peak[n] = max(self.pss_peak[n], total / 2**20)


def run_class(hub: Hub, n: int, timeout: float = 600, prefix: str = "student",
              emulated: str = "ide") -> dict[str, Any]:
    """n students at once; returns the measurements of this class size. ``emulated``: the bus of the
    emulated disk of the contrast ("ide" as in lesson 02.00, or "ahci")."""
    if not 1 <= n <= MAX_STUDENTS:
        raise ValueError(f"a class here is 1 to {MAX_STUDENTS} students, not {n}")
    names = [f"{prefix}{n}x{i + 1}" for i in range(n)]
    load_before = os.getloadavg()
    other_qemus = len(qemu_processes()) - len(qemu_processes(set(names)))
    sampler = Sampler(hub.state, names)
    busy0, total0 = _cpu_busy()
    mem0 = _mem_available_mb()
    t0 = time.time() + 0.5
    students = [Student(hub, name, t0, timeout) for name in names]
    for st in students:
        st.cells = [(label, code.replace("EMULATED", emulated)) for label, code in CELLS]

    def work(st: Student) -> None:
        try:
            time.sleep(max(0.0, t0 - time.time()))     # everyone starts at the same moment
            st.login()
            st.start_server()
            st.run_cells()
            st.r.ok = True
        except Exception as exc:
            st.r.error = f"{type(exc).__name__}: {exc}"[:500]

    sampler.start()
    threads = [threading.Thread(target=work, args=(st,), daemon=True) for st in students]
    for t in threads:
        t.start()
    deadline = time.monotonic() + timeout + 30
    for t in threads:
        t.join(max(0.0, deadline - time.monotonic()))
    busy1, total1 = _cpu_busy()
    wall = time.time() - t0
    for st in students:                      # usage before the stop removes the cgroups
        u = cgroup_usage(_cgroups_of(hub.state, st.name))
        st.r.mem_peak_mb = None if u["mem_peak_bytes"] is None else round(u["mem_peak_bytes"] / 2**20, 1)
        st.r.cpu_s = None if u["cpu_seconds"] is None else round(u["cpu_seconds"], 1)
    sampler.stop_event.set()
    sampler.join()
    for st in students:
        st.r.pss_peak_mb = round(sampler.pss_peak[st.name], 1)
        if not st.token:
            continue
        try:
            st.stop_server()
        except Exception as exc:
            st.r.ok = False
            st.r.error = (st.r.error + f"; stop: {type(exc).__name__}: {exc}")[:500]
    time.sleep(1.0)
    left = qemu_processes(set(names))
    for st in students:
        with contextlib.suppress(OSError, ValueError):
            st.r.swept = len(json.loads((hub.state / "sweeps" / f"{st.name}.json").read_text())["killed"])
    cores = os.cpu_count() or 1
    first = sorted(s.r.t_first_vm for s in students if s.r.t_first_vm is not None)
    return {
        "students": n,
        "failures": sum(not s.r.ok for s in students),
        "server_ready_median_s": _median([s.r.t_server for s in students]),
        "kernel_ready_median_s": _median([s.r.t_kernel for s in students]),
        "first_vm_median_s": round(statistics.median(first), 1) if first else None,
        "first_vm_slowest_s": round(first[-1], 1) if first else None,
        "mem_peak_mb_per_student": _median([s.r.mem_peak_mb for s in students]),
        "pss_peak_mb_per_student": _median([s.r.pss_peak_mb for s in students]),
        "cpu_s_per_student": _median([s.r.cpu_s for s in students]),
        "host_mem_used_peak_mb": round(mem0 - sampler.mem_avail_min, 0),
        "host_cpu_cores_busy": round((busy1 - busy0) / max(total1 - total0, 1) * cores, 2),
        "class_cores_used": round(sum(s.r.cpu_s or 0.0 for s in students) / max(wall, 1e-3), 2),
        "wall_s": round(wall, 1),
        "qemu_left": len(left),
        "swept_by_spawner": sum(s.r.swept for s in students),
        "load_before": [round(x, 2) for x in load_before],
        "load_after": [round(x, 2) for x in os.getloadavg()],
        "other_qemus_on_host_at_start": other_qemus,
        "per_student": [asdict(s.r) for s in students],
    }


def _median(xs: list[Optional[float]]) -> Optional[float]:
    vals = [x for x in xs if x is not None]
    return round(statistics.median(vals), 1) if vals else None


COLUMNS = [("students", "students"), ("failures", "failures"), ("server_ready_median_s", "server ready median s"),
           ("first_vm_median_s", "1st VM median s"),
           ("first_vm_slowest_s", "1st VM slowest s"), ("mem_peak_mb_per_student", "cgroup peak MiB/student"),
           ("pss_peak_mb_per_student", "PSS peak MiB/student"), ("cpu_s_per_student", "CPU s/student"),
           ("class_cores_used", "class cores used"), ("host_cpu_cores_busy", "host cores busy (all work)"),
           ("qemu_left", "QEMU left"), ("swept_by_spawner", "swept"), ("load_before", "load avg before")]


def table(rows: list[dict[str, Any]]) -> str:
    head = "| " + " | ".join(h for _k, h in COLUMNS) + " |"
    sep = "|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [head, sep]
    for r in rows:
        cells = []
        for k, _h in COLUMNS:
            v = r.get(k)
            cells.append(" / ".join(str(x) for x in v) if isinstance(v, list) else ("—" if v is None else str(v)))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def prepare_image_cache(cache: Path) -> str:
    """Build (or find) the guest image for the current inputs in the shared cache, then make the cache
    read-only for everyone but its owner. Returns the image key. Cheap when the image is there already."""
    env = dict(os.environ, VMLAB_CACHE=str(cache))
    out = subprocess.run([sys.executable, "-m", "vmlab", "image", "build"], env=env, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode != 0:
        raise RuntimeError(f"building the shared guest image in {cache} failed:\n{out.stdout[-2000:]}{out.stderr[-2000:]}")
    for dirpath, _dirs, files in os.walk(cache):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    key = next((ln.split("key", 1)[1].strip() for ln in out.stdout.splitlines() if " key " in ln), "?")
    return key


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--students", default="1,2,4,8", help="class sizes, comma-separated (each 1..16)")
    ap.add_argument("--image-cache", default=str(ROOT / "build" / "classroom" / "image-cache"))
    ap.add_argument("--class-timeout", type=float, default=900, help="seconds per class size at most")
    ap.add_argument("--out", default=str(ROOT / "build" / "classroom"))
    ap.add_argument("--emulated", default="ide", choices=("ide", "ahci"),
                    help="the emulated disk of the contrast (lesson 02.00 uses ide)")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.students.split(",") if x.strip()]
    for n in sizes:
        if not 1 <= n <= MAX_STUDENTS:
            ap.error(f"class size {n}: give 1 to {MAX_STUDENTS}")
    rows = []
    with running_hub(Path(a.image_cache)) as hub:
        print(f"hub at {hub.url} (log {hub.log}); state {hub.state}", flush=True)
        for n in sizes:
            # other work may change the guest sources between class sizes: the image must match them
            key = prepare_image_cache(Path(a.image_cache))
            row = run_class(hub, n, timeout=a.class_timeout, emulated=a.emulated)
            row["image_key"] = key
            row["emulated_disk"] = a.emulated
            rows.append(row)
            print(table([row]).splitlines()[-1], flush=True)
            for s in row["per_student"]:
                if not s["ok"]:
                    print(f"   {s['name']}: {s['error']}", flush=True)
    from vmlab import hostinfo
    result = {"when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "cores": os.cpu_count(),
              "host": _host_context(hostinfo), "rows": rows}
    out = Path(a.out) / f"load-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    print()
    print(table(rows))
    print(f"\n{result['when']}, {result['cores']} cores; JSON: {out}")
    left = sum(r["qemu_left"] for r in rows)
    failed = sum(r["failures"] for r in rows)
    return 0 if left == 0 and failed == 0 else 1


def _host_context(hostinfo: Any) -> dict[str, Any]:
    return {"cpu": hostinfo.host_cpu(), "virtualization": hostinfo.host_virtualization(),
            "loadavg": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
