# JupyterHub for a vmlab class on ONE machine (make classroom; docs/classroom.md, part A).
#
#   jupyterhub -f classroom/jupyterhub_config.py
#
# Loopback only. Students log in with the class password (SharedPasswordAuthenticator: no system accounts);
# each runs under their own uid with their own home, cgroup limits and a copy of the lessons; the guest image
# comes from one shared, read-only cache; idle servers are culled; predictions go to the class service.
#
# Settings, all optional (make classroom sets them):
#   CLASSROOM_STATE        state directory (database, homes, passwords, predictions)   build/classroom/state
#   CLASSROOM_IMAGE_CACHE  the shared guest image cache (a VMLAB_CACHE, built once)     build/classroom/image-cache
#   CLASSROOM_PORT         the hub's public port on 127.0.0.1                          8017
#   CLASSROOM_PASSWORD     the students' password (else STATE/class-password, made once, 0600)
#   CLASSROOM_INSTRUCTORS  hub admins who read the class's predictions                  instructor
#   CLASSROOM_MEM_LIMIT    per student (cgroup)                                         1536M
#   CLASSROOM_CPU_LIMIT    per student, cores (cgroup)                                  2
#   CLASSROOM_IDLE_TIMEOUT seconds before an idle server is culled                      3600
#   CLASSROOM_STUDENT_VENV the students' venv (jupyterlab, jupyterhub, vmlab)           build/classroom/venv
#   CLASSROOM_CHP          the configurable-http-proxy command          build/classroom/node/.../configurable-http-proxy
import os
import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

c = get_config()  # type: ignore[name-defined]  # noqa: F821  (provided by JupyterHub)

STATE = Path(os.environ.get("CLASSROOM_STATE", ROOT / "build" / "classroom" / "state")).resolve()
STATE.mkdir(parents=True, exist_ok=True, mode=0o700)
os.chmod(STATE, 0o711)          # students' homes are inside; they may traverse, not list
PORT = int(os.environ.get("CLASSROOM_PORT", "8017"))
IMAGE_CACHE = Path(os.environ.get("CLASSROOM_IMAGE_CACHE", ROOT / "build" / "classroom" / "image-cache")).resolve()
INSTRUCTORS = {s.strip() for s in os.environ.get("CLASSROOM_INSTRUCTORS", "instructor").split(",") if s.strip()}
# The students' Python: a venv every student uid can run (make classroom builds it from Debian's python3;
# a venv made from a Python under /root, as pyenv's, cannot be run by another uid). Else the hub's own.
STUDENT_VENV = Path(os.environ.get("CLASSROOM_STUDENT_VENV", ROOT / "build" / "classroom" / "venv"))
if not (STUDENT_VENV / "bin" / "jupyterhub-singleuser").exists():
    STUDENT_VENV = Path(sys.executable).parent.parent
BIN = STUDENT_VENV / "bin"


def _secret(name: str, env: str, nbytes: int) -> str:
    if os.environ.get(env):
        return os.environ[env]
    f = STATE / name
    if not f.exists():
        f.touch(mode=0o600)
        f.write_text(secrets.token_urlsafe(nbytes))
    return f.read_text().strip()


# ---------------------------------------------------------------- hub and proxy: loopback only
c.JupyterHub.ip = "127.0.0.1"
c.JupyterHub.port = PORT
c.JupyterHub.hub_ip = "127.0.0.1"
c.JupyterHub.hub_port = PORT + 1
c.JupyterHub.db_url = f"sqlite:///{STATE / 'jupyterhub.sqlite'}"
c.JupyterHub.cookie_secret_file = str(STATE / "jupyterhub_cookie_secret")
c.JupyterHub.pid_file = str(STATE / "jupyterhub.pid")
c.JupyterHub.cleanup_servers = True
c.JupyterHub.cleanup_proxy = True
c.ConfigurableHTTPProxy.api_url = f"http://127.0.0.1:{PORT + 2}"
c.ConfigurableHTTPProxy.command = [os.environ.get(
    "CLASSROOM_CHP", str(ROOT / "build" / "classroom" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"))]
c.ConfigurableHTTPProxy.should_start = True
c.ConfigurableHTTPProxy.pid_file = str(STATE / "jupyterhub-proxy.pid")

# ---------------------------------------------------------------- who may log in: the class password
c.JupyterHub.authenticator_class = "shared-password"
c.SharedPasswordAuthenticator.user_password = _secret("class-password", "CLASSROOM_PASSWORD", 12)
c.SharedPasswordAuthenticator.admin_password = _secret("instructor-password", "CLASSROOM_INSTRUCTOR_PASSWORD", 32)
c.Authenticator.admin_users = INSTRUCTORS
c.Authenticator.allow_all = True

# ---------------------------------------------------------------- the students' servers
SERVICE_PORT = PORT + 3
SERVICE_PREFIX = "/services/vmlab-predictions"
c.JupyterHub.spawner_class = "classroom_spawner.ClassroomSpawner"
c.ClassroomSpawner.state_dir = str(STATE)
c.ClassroomSpawner.home_dir_template = str(STATE / "homes" / "{username}")
c.ClassroomSpawner.image_cache = str(IMAGE_CACHE)
c.ClassroomSpawner.class_store = f"http://127.0.0.1:{SERVICE_PORT}{SERVICE_PREFIX}"
c.Spawner.cmd = [str(BIN / "jupyterhub-singleuser")]
c.Spawner.args = ["--ServerApp.ip=127.0.0.1"] + (["--allow-root"] if os.getuid() == 0 else [])
c.Spawner.notebook_dir = "~/lessons"
c.Spawner.default_url = "/lab/tree/00.00-Index.ipynb"
c.Spawner.environment = {
    # the project's Jupyter settings (no update check, no CDN, widget views not saved)
    "JUPYTER_CONFIG_PATH": str(ROOT / "etc" / "jupyter"),
    "JUPYTER_PATH": str(ROOT / "etc" / "jupyter" / "data"),
    "PATH": f"{BIN}:/usr/local/bin:/usr/bin:/bin",
}
c.Spawner.mem_limit = os.environ.get("CLASSROOM_MEM_LIMIT", "1536M")
c.Spawner.cpu_limit = float(os.environ.get("CLASSROOM_CPU_LIMIT", "2"))
c.Spawner.start_timeout = 300       # a loaded 2-core machine starts 8 servers slowly
c.Spawner.http_timeout = 300
c.JupyterHub.concurrent_spawn_limit = 20
c.JupyterHub.active_server_limit = 40

# ---------------------------------------------------------------- services: culler, predictions
c.JupyterHub.load_roles = [
    {"name": "idle-culler", "services": ["idle-culler"],
     "scopes": ["list:users", "read:users:activity", "read:servers", "delete:servers"]},
]
c.JupyterHub.services = [
    {"name": "idle-culler",
     "command": [sys.executable, "-m", "jupyterhub_idle_culler",
                 f"--timeout={int(os.environ.get('CLASSROOM_IDLE_TIMEOUT', '3600'))}", "--cull-every=60"]},
    {"name": "vmlab-predictions",
     "url": f"http://127.0.0.1:{SERVICE_PORT}",
     "command": [sys.executable, str(HERE / "predictions_service.py")],
     "environment": {"CLASSROOM_PREDICTIONS_DIR": str(STATE / "predictions"),
                     "CLASSROOM_INSTRUCTORS": ",".join(sorted(INSTRUCTORS)),
                     "PYTHONPATH": str(ROOT)},
     "display": False},
]
