"""Real-browser tests: JupyterLab and a Voila dashboard driven by headless Chromium (Debian's, via playwright).

JupyterLab: a temp root with a copy of the notebooks plus a notebook made of the lesson's control-panel cell and a
plot cell; Chromium runs the cells, clicks Start and the power button, checks the run state and the event log change
and that the plot image renders. Voila: the instructor ControlPanel dashboard, no code visible, the same clicks.
Screenshots go to build/screenshots/. Skipped (with the reason) only when chromium or playwright is missing.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NB_DIR = ROOT / "notebooks"
SHOTS = ROOT / "build" / "screenshots"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BIN = Path(sys.executable).parent

pytestmark = [pytest.mark.browser, pytest.mark.integration]

if not os.path.exists(CHROMIUM):
    pytest.skip("Debian's chromium is not installed (apt-get install --no-install-recommends chromium; "
                "`make test` installs it when root)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")

DEFAULT_PANEL_CELL = ('from vmlab import MachineSpec\nfrom vmlab.widgets.control_panel import ControlPanel\n'
                      'panel = ControlPanel(MachineSpec(name="browser-test", accel="tcg"))\npanel')
PLOT_CELL = ('import matplotlib.pyplot as plt\nev = panel.vm.events\n'
             'fig, ax = plt.subplots(figsize=(5, 2))\n'
             'ax.plot([e["t"] for e in ev], range(len(ev)), "o-", color="#0072B2")\n'
             'ax.set_xlabel("time since QEMU started (s)"); ax.set_ylabel("events so far")\n'
             'ax.set_title(f"{len(ev)} events: " + ", ".join(e["event"] for e in ev[-4:]))\nplt.show()')


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def panel_cell_from_lessons() -> str:
    """The control-panel cell of the lesson that has one (01.02), else a stand-in with the same call."""
    for p in sorted(NB_DIR.glob("*.ipynb")):
        nb = nbformat.read(str(p), as_version=4)
        for c in nb.cells:
            if c.cell_type == "code" and re.search(r"\bControlPanel\(", c.source) and "import" in c.source:
                src = c.source
                if re.search(r"^panel\s*=", src, re.M):
                    return src
    return DEFAULT_PANEL_CELL


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 40) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            urllib.request.urlopen(url, timeout=2).read(1)
            return
        except Exception:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout} s")


class Server:
    def __init__(self, argv, url_check: str, cwd: Path, log: Path) -> None:
        self.log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        env = dict(os.environ, JUPYTER_PLATFORM_DIRS="1", VMLAB_QUICK="1")
        self.proc = subprocess.Popen(argv, cwd=str(cwd), stdout=self.log, stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        try:
            wait_http(url_check, self.proc)
        except Exception as exc:
            self.stop()
            tail = Path(log).read_text(errors="replace")[-1500:]
            raise RuntimeError(f"{argv[0]} did not come up: {exc}\n{tail}") from exc

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)     # jupyter asks twice; the kernels get shut down
            time.sleep(0.3)
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.log.close()


@pytest.fixture(scope="module")
def browser():
    SHOTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        try:
            b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        except Exception as exc:  # pragma: no cover - depends on the host
            pytest.skip(f"chromium did not start under playwright: {exc}")
        yield b
        b.close()


def panel_cycle(page, name: str, timeout_ms: int = 40_000) -> None:
    """Click Start, see it run; click the power button, see it go off; the event log follows."""
    start = page.locator("button.vmlab-start").first
    start.wait_for(timeout=timeout_ms)
    state = page.locator(".vmlab-state").first
    events = page.locator(".vmlab-events").first
    before_state, before_events = state.inner_text(), events.inner_text()
    start.click()
    page.wait_for_function("() => /running/i.test(document.querySelector('.vmlab-state').innerText)",
                           timeout=timeout_ms)
    page.wait_for_function("() => /READY/.test(document.querySelector('.vmlab-events').innerText)",
                           timeout=timeout_ms)
    assert state.inner_text() != before_state
    page.screenshot(path=str(SHOTS / f"{name}-running.png"), full_page=True)
    power = page.locator("button.vmlab-power").first
    page.wait_for_function("() => !document.querySelector('button.vmlab-power').disabled", timeout=timeout_ms)
    power.click()
    page.wait_for_function("() => /\\boff\\b/i.test(document.querySelector('.vmlab-state').innerText)",
                           timeout=timeout_ms)
    page.wait_for_function("() => /SHUTDOWN|EXIT/.test(document.querySelector('.vmlab-events').innerText)",
                           timeout=timeout_ms)
    after_events = events.inner_text()
    assert after_events != before_events, "the event log changed"
    assert "POWERDOWN" in after_events, "the power button reached QEMU (POWERDOWN event)"
    assert page.locator(".vmlab-timeline svg circle").count() >= 3, "the timeline plots the events"


def test_lesson_control_panel_in_jupyterlab(browser, tmp_path, monkeypatch):
    t0 = time.monotonic()
    root = tmp_path / "lab"
    shutil.copytree(NB_DIR, root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    params = nbformat.v4.new_code_cell('import os\nQUICK = os.environ.get("VMLAB_QUICK", "0") == "1"')
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_markdown_cell("# Control panel (browser test)"), params,
                                         nbformat.v4.new_code_cell(panel_cell_from_lessons()),
                                         nbformat.v4.new_code_cell(PLOT_CELL)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, str(root / "browser-check.ipynb"))
    port, token = free_port(), secrets.token_hex(16)
    settings = tmp_path / "lab-settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
    monkeypatch.setenv("JUPYTERLAB_SETTINGS_DIR", str(tmp_path / "lab-settings"))
    server = Server([str(BIN / "jupyter"), "lab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
                     f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
                     "--LabApp.expose_app_in_browser=True", "--ServerApp.port_retries=0",
                     *(["--allow-root"] if os.geteuid() == 0 else []),
                     "--LabApp.news_url=", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
                    f"http://127.0.0.1:{port}/api/status?token={token}", root, tmp_path / "lab.log")
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    try:
        page.goto(f"http://127.0.0.1:{port}/lab/tree/browser-check.ipynb?token={token}", timeout=60_000)
        page.wait_for_function("() => window.jupyterapp && window.jupyterapp.shell.currentWidget"
                               " && window.jupyterapp.shell.currentWidget.sessionContext"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel"
                               " && window.jupyterapp.shell.currentWidget.sessionContext.session.kernel.status == 'idle'",
                               timeout=60_000)
        run = ("async (i) => { const nb = window.jupyterapp.shell.currentWidget; nb.content.activeCellIndex = i;"
               " await window.jupyterapp.commands.execute('notebook:run-cell'); }")
        page.evaluate(run, 1)    # parameters
        page.evaluate(run, 2)    # the control-panel cell
        panel_cycle(page, "lab-control-panel")
        page.evaluate(run, 3)    # the plot cell
        img = page.locator(".jp-OutputArea-output img").first
        img.wait_for(timeout=30_000)
        page.wait_for_function("() => { const i = document.querySelector('.jp-OutputArea-output img');"
                               " return i && i.complete && i.naturalWidth > 100; }", timeout=30_000)
        img.scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "lab-control-panel-off.png"), full_page=True)
        assert "events" in page.locator(".jp-OutputArea-output").last.inner_text() or img.is_visible()
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        assert errors.count() == 0, errors.first.inner_text()
    finally:
        page.close()
        server.stop()
    assert time.monotonic() - t0 < 75


def test_instructor_dashboard_in_voila(browser, tmp_path):
    dashboard = NB_DIR / "demo" / "ControlPanel.ipynb"
    if not dashboard.exists():
        pytest.fail("notebooks/demo/ControlPanel.ipynb is missing")
    t0 = time.monotonic()
    root = tmp_path / "demo"
    shutil.copytree(NB_DIR / "demo", root)
    port = free_port()
    server = Server([str(BIN / "voila"), "--no-browser", "--strip_sources=True", "--Voila.ip=127.0.0.1",
                     f"--port={port}", "ControlPanel.ipynb"],
                    f"http://127.0.0.1:{port}/", root, tmp_path / "voila.log")
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    try:
        page.goto(f"http://127.0.0.1:{port}/", timeout=60_000)
        page.locator("button.vmlab-start").first.wait_for(timeout=60_000)
        text = page.inner_text("body")
        assert "ControlPanel(" not in text and "import " not in text, "Voila shows no code"
        assert page.locator(".jp-CodeCell .jp-InputArea, .jp-CodeMirrorEditor, .cm-editor").count() == 0
        panel_cycle(page, "voila-control-panel")
        page.screenshot(path=str(SHOTS / "voila-control-panel-off.png"), full_page=True)
    finally:
        page.close()
        server.stop()
    assert time.monotonic() - t0 < 60
