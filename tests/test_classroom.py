"""The classroom: the prediction store, the instructor's reading of it, the hub config, deploy/, and one real hub.

The real-hub test (1 student: login, spawn, a cell that boots a VM, stop, 0 QEMU left) needs the classroom
extra and configurable-http-proxy (`make classroom-deps`, which `make test` runs). The 1/2/4/8-student load
run is `make classroom-load` (classroom/load.py), not part of the test suite.
"""

from __future__ import annotations

import json
import os
import runpy
import shutil
import stat
import sys
from pathlib import Path

import pytest

from vmlab import classroom, predictions_store
from vmlab.widgets.predict import Prediction

ROOT = Path(__file__).resolve().parents[1]
CHP = ROOT / "build" / "classroom" / "node" / "node_modules" / ".bin" / "configurable-http-proxy"
yaml = pytest.importorskip("yaml")


@pytest.fixture
def on_hub(monkeypatch, tmp_path):
    """A student's kernel on a hub with a directory store."""
    store = tmp_path / "store"
    store.mkdir()
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("VMLAB_CLASS_STORE", str(store))
    return store


# ------------------------------------------------------------------------------ the store (student side)
def test_store_does_nothing_off_a_hub(monkeypatch, tmp_path):
    monkeypatch.delenv("JUPYTERHUB_USER", raising=False)
    monkeypatch.setenv("VMLAB_CLASS_STORE", str(tmp_path))
    assert predictions_store.save("q?", "s", 1.0) is False
    Prediction("q?", unit="s").record(2).measured(1)
    assert list(tmp_path.iterdir()) == []


def test_store_does_nothing_without_a_store(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.delenv("VMLAB_CLASS_STORE", raising=False)
    assert predictions_store.enabled() is False
    assert predictions_store.save("q?", "s", 1.0) is False


def test_widget_records_into_the_students_own_file(on_hub, monkeypatch):
    p = Prediction("How long does a cold boot take under TCG?", unit="s", low=0.1, high=60, log=True)
    p.record(3)
    p.measured(1.5)
    monkeypatch.setenv("JUPYTERHUB_USER", "bob")
    Prediction("How long does a cold boot take under TCG?", unit="s").record(10)
    files = sorted(f.name for f in on_hub.iterdir() if not f.name.startswith("."))
    assert files == ["alice.json", "bob.json"]
    alice = json.loads((on_hub / "alice.json").read_text())
    assert alice["user"] == "alice"
    (rec,) = alice["predictions"].values()
    assert (rec["predicted"], rec["measured"], rec["unit"]) == (3.0, 1.5, "s")
    assert rec["key"] == predictions_store.question_key("How long does a cold boot  take under TCG?")
    assert stat.S_IMODE((on_hub / "alice.json").stat().st_mode) == 0o600
    bob = json.loads((on_hub / "bob.json").read_text())
    assert [r["predicted"] for r in bob["predictions"].values()] == [10.0]     # only bob's own


def test_latest_record_per_question_wins(on_hub):
    for v in (1, 2, 5):
        predictions_store.save("q?", "x", v)
    data = json.loads((on_hub / "alice.json").read_text())
    assert [r["predicted"] for r in data["predictions"].values()] == [5.0]


def test_a_user_name_that_is_not_a_file_name_is_refused(on_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("JUPYTERHUB_USER", "../escape")
    assert predictions_store.save("q?", "x", 1) is False
    assert not (tmp_path / "escape.json").exists()
    with pytest.raises(ValueError, match="not a hub user name"):
        predictions_store.user_file(on_hub, "a/b")


def test_an_unreachable_service_never_breaks_a_lesson(monkeypatch):
    monkeypatch.setenv("JUPYTERHUB_USER", "alice")
    monkeypatch.setenv("VMLAB_CLASS_STORE", "http://127.0.0.1:9/services/vmlab-predictions")
    p = Prediction("q?", unit="x")
    assert p.record(1) is p                       # no exception
    assert predictions_store.save("q?", "x", 1) is False


def test_non_finite_numbers_are_stored_as_missing():
    rec = predictions_store.make_record("q", "x", float("nan"), "oops")
    assert rec["predicted"] is None and rec["measured"] is None


# ------------------------------------------------------------------------------ the instructor's side
def _class_store(directory: Path) -> None:
    for user, pred, meas in [("ann", 2.0, 1.6), ("ben", 20.0, 1.8), ("cy", 0.5, None), ("dee", 3.0, 1.7)]:
        rec = predictions_store.make_record("Cold boot under TCG?", "s", pred, meas)
        predictions_store.merge_into_file(directory, user, rec)
    predictions_store.merge_into_file(directory, "ann", predictions_store.make_record("RSS of a VM?", "MiB", 128, 264))
    (directory / "not a student.json").write_text("{}")
    (directory / "broken.json").write_text("{")


def test_classroom_reads_summarises_and_plots(tmp_path):
    import matplotlib
    matplotlib.use("Agg")
    _class_store(tmp_path)
    df = classroom.load(tmp_path)
    assert list(df.columns) == classroom.COLUMNS
    assert sorted(set(df["user"])) == ["ann", "ben", "cy", "dee"]
    q = classroom.questions(df).set_index("question")
    boot = q.loc["Cold boot under TCG?"]
    assert (boot["n_predicted"], boot["n_measured"]) == (4, 3)
    assert boot["predicted_median"] == 2.5 and boot["measured_median"] == 1.7
    key = predictions_store.question_key("Cold boot under TCG?")
    d = classroom.distribution(df, key)
    assert sorted(d["predicted"]) == [0.5, 2.0, 3.0, 20.0]
    ax = classroom.plot_question(df, key)
    assert ax.get_xscale() == "log"               # 0.5 .. 20 spans more than 10x
    assert len(ax.lines) == 1 and ax.lines[0].get_xdata()[0] == 1.7


def test_an_empty_or_missing_store_is_an_empty_table(tmp_path, monkeypatch):
    monkeypatch.delenv("VMLAB_CLASS_STORE", raising=False)
    for source in (None, tmp_path, tmp_path / "missing"):
        df = classroom.load(source)
        assert df.empty and list(df.columns) == classroom.COLUMNS
        assert classroom.questions(df).empty
    with pytest.raises(KeyError, match="no predictions"):
        classroom.distribution(classroom.load(tmp_path), "abc")


# ------------------------------------------------------------------------------ the hub's configuration
def _load_hub_config(tmp_path, monkeypatch):
    from traitlets.config import Config
    c = Config()
    monkeypatch.setenv("CLASSROOM_STATE", str(tmp_path / "state"))
    monkeypatch.setenv("CLASSROOM_PASSWORD", "a-class-password")
    runpy.run_path(str(ROOT / "classroom" / "jupyterhub_config.py"), init_globals={"get_config": lambda: c})
    return c


def test_hub_config_is_loopback_only_with_culler_limits_and_store(tmp_path, monkeypatch):
    c = _load_hub_config(tmp_path, monkeypatch)
    assert c.JupyterHub.ip == "127.0.0.1" and c.JupyterHub.hub_ip == "127.0.0.1"
    assert c.ConfigurableHTTPProxy.api_url.startswith("http://127.0.0.1:")
    assert c.JupyterHub.spawner_class == "classroom_spawner.ClassroomSpawner"
    assert c.Spawner.mem_limit and c.Spawner.cpu_limit
    names = {s["name"]: s for s in c.JupyterHub.services}
    assert "jupyterhub_idle_culler" in names["idle-culler"]["command"]
    assert names["vmlab-predictions"]["url"].startswith("http://127.0.0.1:")
    assert c.ClassroomSpawner.class_store.startswith(names["vmlab-predictions"]["url"])
    assert c.SharedPasswordAuthenticator.user_password == "a-class-password"
    admin = (tmp_path / "state" / "instructor-password")
    assert len(admin.read_text()) >= 32 and stat.S_IMODE(admin.stat().st_mode) == 0o600


# ------------------------------------------------------------------------------ deploy/ (Zero to JupyterHub)
def _yaml_docs(name):
    return [d for d in yaml.safe_load_all((ROOT / "deploy" / name).read_text()) if d]


def _bytes(spec: str) -> float:
    units = {"K": 2**10, "M": 2**20, "G": 2**30}
    return float(spec[:-1]) * units[spec[-1]] if spec[-1] in units else float(spec)


def test_z2jh_values_structure():
    (v,) = _yaml_docs("values.yaml")
    assert set(v) <= {"hub", "singleuser", "prePuller", "cull", "scheduling", "proxy", "ingress"}
    su = v["singleuser"]
    assert _bytes(su["memory"]["guarantee"]) <= _bytes(su["memory"]["limit"])
    assert su["cpu"]["guarantee"] <= su["cpu"]["limit"]
    assert su["extraEnv"]["VMLAB_CACHE"].startswith("/home/jovyan/")
    hook = " ".join(su["lifecycleHooks"]["postStart"]["exec"]["command"])
    assert "/srv/vmlab/.cache/vmlab/images" in hook            # the shared image cache, linked, never rebuilt
    assert v["cull"]["enabled"] is True and v["cull"]["timeout"] > 0
    profiles = {p["display_name"].split()[0]: p for p in su["profileList"]}
    kvm = profiles["KVM"]["kubespawner_override"]
    assert kvm["extra_resource_limits"] == {"squat.ai/kvm": "1"}
    assert kvm["node_selector"] == {"vmlab/kvm": "true"}
    assert "privileged" not in json.dumps(v)                    # students' pods are never privileged
    svc_url = v["hub"]["services"]["vmlab-predictions"]["url"]
    assert su["extraEnv"]["VMLAB_CLASS_STORE"].startswith(svc_url)
    egress_port = su["networkPolicy"]["egress"][0]["ports"][0]["port"]
    assert svc_url.endswith(f":{egress_port}")


def test_device_plugin_and_predictions_service_manifests():
    (ds,) = _yaml_docs("kvm-device-plugin.yaml")
    assert (ds["apiVersion"], ds["kind"]) == ("apps/v1", "DaemonSet")
    spec = ds["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"vmlab/kvm": "true"}
    args = spec["containers"][0]["args"]
    device = json.loads(args[args.index("--device") + 1])
    assert device["name"] == "kvm" and device["groups"][0]["paths"] == [{"path": "/dev/kvm"}]
    kinds = {d["kind"]: d for d in _yaml_docs("predictions-service.yaml")}
    assert set(kinds) == {"PersistentVolumeClaim", "Deployment", "Service"}
    pod = kinds["Deployment"]["spec"]["template"]
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    env = {e["name"]: e for e in pod["spec"]["containers"][0]["env"]}
    assert "secretKeyRef" in env["JUPYTERHUB_API_TOKEN"]["valueFrom"]
    assert pod["metadata"]["labels"]["app.kubernetes.io/name"] == "vmlab-predictions"


def test_docs_sizing_matches_the_values_file():
    (v,) = _yaml_docs("values.yaml")
    doc = (ROOT / "docs" / "classroom.md").read_text()
    su = v["singleuser"]
    for figure in (su["memory"]["guarantee"], su["memory"]["limit"]):
        assert figure in doc, f"docs/classroom.md does not give the values file's {figure}"
    assert "estimate" in doc.lower()


# ------------------------------------------------------------------------------ one real hub, one student
def _hub_available() -> str:
    try:
        import jupyterhub  # noqa: F401
        import jupyterhub_idle_culler  # noqa: F401
        import websocket  # noqa: F401
    except ImportError as exc:
        return f"the classroom extra is not installed ({exc.name}): make classroom-deps"
    if not CHP.exists():
        return f"configurable-http-proxy is not installed at {CHP}: make classroom-deps"
    return ""


@pytest.fixture
def shared_image_cache():
    """A shared, read-only image cache made from the current image (copied, not rebuilt), in build/ where
    every student uid can reach it (a pytest tmp_path is under a 0700 directory)."""
    from vmlab import config
    from vmlab.image import ensure_image
    img = ensure_image()
    src = config.cache_dir()
    top = ROOT / "build" / "classroom" / f"test-cache-{os.getpid()}"
    shared = top / "image-cache"
    (shared / "images").mkdir(parents=True)
    shutil.copytree(img.root, shared / "images" / img.root.name)
    shutil.copytree(src / "downloads", shared / "downloads", ignore=shutil.ignore_patterns(".download-*"))
    shutil.copytree(src / "busybox", shared / "busybox", ignore=shutil.ignore_patterns(".*", "failed-*"))
    if (src / "hashes.json").exists():
        shutil.copy2(src / "hashes.json", shared / "hashes.json")
    for dirpath, _dirs, files in os.walk(shared):
        os.chmod(dirpath, 0o755)
        for f in files:
            os.chmod(os.path.join(dirpath, f), 0o644)
    os.chmod(top, 0o755)
    yield shared
    shutil.rmtree(top, ignore_errors=True)


@pytest.mark.integration
def test_one_student_on_a_real_hub(shared_image_cache):
    why = _hub_available()
    if why:
        pytest.skip(why)
    sys.path.insert(0, str(ROOT / "classroom"))
    import load
    state = ROOT / "build" / "classroom" / f"test-{os.getpid()}"
    try:
        with load.running_hub(shared_image_cache, state=state) as hub:
            row = load.run_class(hub, 1, timeout=300, prefix="t")
            preds = classroom.load(state / "predictions")
            # only an instructor reads the class's predictions; another student gets 403
            service = f"{hub.url}/services/vmlab-predictions"
            other = load.Student(hub, "t-other", 0.0, 60)
            other.login()
            with pytest.raises(RuntimeError, match="HTTP 403"):
                other.api("GET", "/services/vmlab-predictions/api/predictions")
            hub.password = (state / "instructor-password").read_text().strip()
            teacher = load.Student(hub, "instructor", 0.0, 60)
            teacher.login()
            via_service = classroom.load(service, token=teacher.token)
        (student,) = row["per_student"]
        assert student["error"] == "" and row["failures"] == 0, student
        assert student["t_first_vm"] is not None and student["accel"] in ("tcg", "kvm")
        assert set(student["contrast_mb_s"]) == {"/dev/sda", "/dev/vda"}
        assert row["qemu_left"] == 0
        assert list(preds["user"]) == [student["name"]]      # the prediction reached the class service
        assert list(via_service["user"]) == [student["name"]]
        assert via_service["measured"].iloc[0] == student["contrast_mb_s"]["/dev/sda"]
        assert load.qemu_processes({student["name"]}) == []
    finally:
        shutil.rmtree(state, ignore_errors=True)
        state.with_name(f"{state.name}.hub.log").unlink(missing_ok=True)
