"""The VM control panel: the buttons of a hypervisor's management window.

    from vmlab.widgets.control_panel import ControlPanel
    panel = ControlPanel(MachineSpec(name="demo"))     # or ControlPanel(vm)
    panel                                              # show it in JupyterLab / Voila
    panel.vm                                           # the VM it drives (a new one after each Start)

Buttons: Start, Pause, Resume, Power button (ACPI), Reset, Pull the plug (QMP
``quit``) and Kill (SIGKILL); each is enabled only when the VM's run state
allows it. Below them: the state, a live event log, a small event timeline
(SVG) and the tail of the console. A background thread polls the VM every
``interval`` seconds and updates the widgets; it stops by itself when the VM
is off and for good when the panel is closed (``panel.close()``).

Every button handler catches its exception and shows it in the panel's error
area (an ``Output`` widget) instead of raising. The handlers are plain methods
(``on_start``, ``on_pause``, ...), so lessons and tests can drive the panel
without a browser. Widgets carry stable CSS classes for browser tests:
``vmlab-start``, ``vmlab-pause``, ``vmlab-resume``, ``vmlab-power``,
``vmlab-reset``, ``vmlab-quit``, ``vmlab-kill``, ``vmlab-state``,
``vmlab-events``, ``vmlab-timeline``, ``vmlab-console``, ``vmlab-error`` and
``vmlab-panel`` on the whole panel.
"""

from __future__ import annotations

import html
import threading
import time
import traceback
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional

import ipywidgets as W

from ..errors import SpecError, StateError, VMTimeout
from ..i18n import tr
from ..spec import MachineSpec
from ..vm import VM, RunState
from .errors import failed

if TYPE_CHECKING:
    from ..image import GuestImage

BUTTONS = [  # key, label, icon, tooltip, style
    ("start", "Start", "play", "launch QEMU and boot the guest", "success"),
    ("pause", "Pause", "pause", "stop the vCPUs (QMP stop)", ""),
    ("resume", "Resume", "step-forward", "run the vCPUs again (QMP cont)", ""),
    ("power", "Power button", "power-off", "press the ACPI power button: the guest shuts itself down", "warning"),
    ("reset", "Reset", "refresh", "hard reset: the guest reboots at once, without shutting down", ""),
    ("quit", "Pull the plug", "plug", "QEMU exits at once (QMP quit): unsynced guest data is lost", "danger"),
    ("kill", "Kill QEMU", "times", "SIGKILL the QEMU process from the host OS", "danger"),
]

# which buttons each run state allows (start after off makes a new VM from the same spec)
ALLOWED: Dict[RunState, set] = {
    RunState.CREATED: {"start"},
    RunState.STARTING: {"kill"},
    RunState.RUNNING: {"pause", "power", "reset", "quit", "kill"},
    # not the power button: a paused guest cannot answer it (QEMU would only queue the ACPI event)
    RunState.PAUSED: {"resume", "reset", "quit", "kill"},
    RunState.SHUTTING_DOWN: {"quit", "kill"},
    RunState.OFF: {"start"},
    RunState.FAILED: {"start"},
}
STATE_COLORS = {"created": "#555555", "starting": "#E69F00", "running": "#009E73", "paused": "#0072B2",
                "shutting-down": "#D55E00", "off": "#000000", "failed": "#D55E00"}
EVENT_COLORS = {"ACTION": "#000000", "LAUNCH": "#999999", "RESUME": "#009E73", "STOP": "#E69F00",
                "READY": "#0072B2", "RESET": "#CC79A7", "POWERDOWN": "#E69F00", "GUEST_BYE": "#56B4E9",
                "SHUTDOWN": "#D55E00", "EXIT": "#000000"}


class ControlPanel:
    """A live control panel for one lesson VM (see the module docstring)."""

    def __init__(self, vm_or_spec: Any = None, *, interval: float = 0.3, console_lines: int = 12,
                 poll: bool = True, image: Optional[GuestImage] = None, on_new_vm: Optional[Callable[[VM], None]] = None,
                 **vm_fields: Any) -> None:
        if isinstance(vm_or_spec, VM):
            self.vm = vm_or_spec
        elif vm_or_spec is None or isinstance(vm_or_spec, MachineSpec):
            kw = dict(vm_fields)
            if image is not None:
                kw["image"] = image
            self.vm = VM(vm_or_spec, **kw)
        else:
            raise SpecError("vm_or_spec", f"expected a VM or a MachineSpec, got {vm_or_spec!r}",
                            fix="ControlPanel(MachineSpec(...)) or ControlPanel(vm)")
        self.interval = float(interval)
        self.console_lines = int(console_lines)
        self.on_new_vm = on_new_vm
        self.error_text = ""
        self.history: List[Dict[str, Any]] = []     # (state, enabled buttons) seen by refresh
        self._busy: Optional[str] = None
        self._lock = threading.RLock()
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self._poll_enabled = poll
        self._last_events = -1
        self._last_console = ""
        self._build()
        self.refresh()
        if poll and self.state not in (RunState.CREATED, RunState.OFF, RunState.FAILED):
            self._start_poller()

    # ------------------------------------------------------------ widgets
    def _build(self) -> None:
        self.buttons: Dict[str, W.Button] = {}
        for key, label, icon, tip, style in BUTTONS:
            b = W.Button(description=tr(label), icon=icon, tooltip=tr(tip), button_style=style,
                         layout=W.Layout(width="auto"))
            b.add_class(f"vmlab-{key}")
            b.add_class("vmlab-button")
            b.on_click(self._clicker(key))
            self.buttons[key] = b
        self.state_label = W.HTML()
        self.state_label.add_class("vmlab-state")
        self.event_log = W.HTML(layout=W.Layout(width="46%"))
        self.event_log.add_class("vmlab-events")
        self.timeline = W.HTML(layout=W.Layout(width="54%"))
        self.timeline.add_class("vmlab-timeline")
        self.console = W.HTML()
        self.console.add_class("vmlab-console")
        self.errors = W.Output(layout=W.Layout(max_height="12em", overflow="auto"))
        self.errors.add_class("vmlab-error")
        self.widget = W.VBox([
            W.HBox(list(self.buttons.values()), layout=W.Layout(flex_flow="row wrap")),
            self.state_label,
            W.HBox([self.event_log, self.timeline]),
            W.HTML(tr("<b>Console</b> (tail of the guest kernel log)")),
            self.console,
            self.errors,
        ])
        self.widget.add_class("vmlab-panel")

    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        return self.widget._repr_mimebundle_(**kwargs)

    def _ipython_display_(self) -> None:
        from IPython.display import display
        display(self.widget)

    # -------------------------------------------------------------- state
    @property
    def state(self) -> RunState:
        """The VM's run state, corrected for a SHUTDOWN event read after QEMU's exit
        (which would otherwise leave the VM "shutting-down" for ever)."""
        st = self.vm.state
        code = self.vm.exit_code
        if st is RunState.SHUTTING_DOWN and code is not None:
            return RunState.OFF if code == 0 or self.vm._avm._closing else RunState.FAILED
        return st

    @property
    def state_name(self) -> str:
        return self.state.value

    def wait_state(self, *names: str, timeout: float = 90.0, ready: bool = False) -> str:
        """Block until the state is one of ``names`` (and, with ``ready``, the guest
        agent answers); returns the state. For scripts and headless lessons."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state_name
            if st in names and not self._busy and (not ready or self.vm.agent_ready):
                self._safe_refresh()
                return st
            time.sleep(0.05)
        raise VMTimeout(f"the panel's VM to be {' or '.join(names)} (it is {self.state_name}; "
                        f"last error: {self.error_text or 'none'})", timeout)

    @property
    def polling(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def enabled(self) -> set:
        """The buttons the current state allows."""
        if self._closed:
            return set()
        allowed = set(ALLOWED.get(self.state, set()))
        if self._busy:
            allowed &= {"kill"}
        return allowed

    def refresh(self) -> None:
        """Update every widget from the VM (the poller calls this)."""
        if self._closed:
            return
        with self._lock:
            vm = self.vm
            allowed = self.enabled()
            for k, b in self.buttons.items():
                b.disabled = k not in allowed
            st = self.state.value
            en = sorted(allowed)
            if not self.history or self.history[-1]["state"] != st or self.history[-1]["enabled"] != en:
                self.history.append({"state": st, "enabled": en, "t": time.time()})
            bits = [f"<b style='color:{STATE_COLORS.get(st, '#000')}'>{html.escape(tr(st))}</b>"]
            if self._busy:
                bits.append(f"<i>{html.escape(tr(self._busy))}...</i>")
            if vm.accel:
                bits.append(f"accel {html.escape(vm.accel)}")
            if vm.pid:
                bits.append(f"QEMU pid {vm.pid}")
            if vm.boot_seconds:
                bits.append(tr("booted in {seconds} s").format(seconds=f"{vm.boot_seconds:.2f}"))
            if vm.exit_code is not None:
                bits.append(tr("QEMU exit status {code}").format(code=vm.exit_code))
            if self.state is RunState.PAUSED and not self._busy:
                bits.append("<span class='vmlab-hint'>" + tr("the vCPUs are stopped: press <b>Resume</b> before the "
                            "power button (a paused guest cannot answer it)") + "</span>")
            self.state_label.value = (f"<span class='vmlab-state-text' data-state='{html.escape(st)}'>"
                                      f"VM <code>{html.escape(vm.spec.name)}</code>: " + " &middot; ".join(bits)
                                      + "</span>")
            events = list(vm.events)
            if len(events) != self._last_events:
                self._last_events = len(events)
                self.event_log.value = self._events_html(events)
                self.timeline.value = self._timeline_svg(events)
            con = vm.console_text(tail=self.console_lines)
            if con != self._last_console:
                self._last_console = con
                self.console.value = ("<pre style='font-size:11px;max-height:14em;overflow:auto;margin:0;"
                                      "background:#f7f7f7;padding:4px'>" + html.escape(con or tr("(no output yet)"))
                                      + "</pre>")

    @staticmethod
    def _events_html(events: List[Dict[str, Any]]) -> str:
        rows = []
        for e in events[-14:]:
            d = e.get("data") or {}
            detail = d.get("reason") or d.get("action") or d.get("kernel") or \
                ("" if d.get("exit_code") is None else f"exit status {d['exit_code']}")
            rows.append(f"<tr><td style='text-align:right'>{e['t']:.3f}</td>"
                        f"<td style='color:{EVENT_COLORS.get(e['event'], '#333')}'><b>{html.escape(e['event'])}</b></td>"
                        f"<td>{html.escape(str(e['source']))}</td><td>{html.escape(str(detail))}</td></tr>")
        head = "<tr><th>t (s)</th><th>event</th><th>from</th><th>detail</th></tr>"
        return ("<b>Events</b> (t = seconds since QEMU started)<table style='font-size:11px'>"
                + head + "".join(rows) + "</table>" + ("" if events else "<i>none yet</i>"))

    @staticmethod
    def _timeline_svg(events: List[Dict[str, Any]], width: int = 380, height: int = 110) -> str:
        """Events since the last host action, one lane per source (vmlab, qemu, agent),
        on a square-root time axis so the quick reactions right after an action stay apart."""
        if not events:
            return "<b>Timeline</b><br><i>starts when QEMU does</i>"
        last = max((i for i, e in enumerate(events) if e["event"] in ("ACTION", "LAUNCH")), default=0)
        win = events[min(last, max(0, len(events) - 3)):][-40:]
        t0 = win[0]["t"]
        span = max(max(e["t"] for e in win) - t0, 1e-3)
        lanes = {"vmlab": 30, "qemu": 60, "agent": 90}
        x = lambda t: 60 + (width - 80) * ((max(t - t0, 0.0) / span) ** 0.5)  # noqa: E731
        # scales with its box instead of being cut by it; labels anchored so they stay inside
        parts = [f"<svg viewBox='0 0 {width} {height}' width='100%' style='max-width:{width}px' "
                 f"role='img' aria-label='event timeline'>"]
        for src, y in lanes.items():
            parts.append(f"<text x='2' y='{y + 3}' font-size='9' fill='#555'>{src}</text>"
                         f"<line x1='55' y1='{y}' x2='{width - 10}' y2='{y}' stroke='#ddd'/>")
        for i, e in enumerate(win):
            c = EVENT_COLORS.get(e["event"], "#333")
            xx, y = x(e["t"]), lanes.get(str(e["source"]), 60)
            dy = (-7, 13)[i % 2]
            label = e["event"]
            half = 3.0 * len(label)                       # about half the label's width at font-size 8
            anchor = "end" if xx + half > width - 2 else ("start" if xx - half < 55 else "middle")
            parts.append(f"<circle cx='{xx:.1f}' cy='{y}' r='4' fill='{c}'><title>{html.escape(label)} "
                         f"at +{e['t'] - t0:.3f} s</title></circle>"
                         f"<text x='{xx:.1f}' y='{y + dy}' font-size='8' text-anchor='{anchor}' fill='{c}'>"
                         f"{html.escape(label)}</text>")
        parts.append(f"<text x='{width - 10}' y='{height - 2}' font-size='8' text-anchor='end'>"
                     f"{span:.3f} s after {html.escape(win[0]['event'])} (square-root scale)</text></svg>")
        return tr("<b>Timeline</b> (since the last action)") + "<br>" + "".join(parts)

    # ------------------------------------------------------------- errors
    def _show_error(self, doing: str, exc: BaseException) -> None:
        msg = getattr(exc, "message", None) or str(exc) or type(exc).__name__
        fix = getattr(exc, "fix", None)
        self.error_text = f"{tr(doing)}: {msg}" + (tr(" (fix: {fix})").format(fix=tr(fix)) if fix else "")
        self.errors.append_stderr(f"[{time.strftime('%H:%M:%S')}] {self.error_text}\n")
        if not hasattr(exc, "message"):      # not a vmlab error: a bug worth the traceback
            self.errors.append_stderr("".join(traceback.format_exception(exc))[-2000:])
        failed(doing, exc)                   # logged; raised when VMLAB_STRICT=1 (vmlab.widgets.errors)

    def clear_errors(self) -> None:
        self.error_text = ""
        self.errors.clear_output()

    def _guard(self, doing: str, fn: Callable[[], Any]) -> None:
        try:
            fn()
        except Exception as exc:  # every handler shows its failure in the panel, never raises
            self._show_error(doing, exc)
        finally:
            try:
                self.refresh()
            except Exception as exc:
                self._show_error("refresh", exc)

    def _clicker(self, key: str) -> Callable[[Any], None]:
        return lambda _button: getattr(self, f"on_{key}")()

    # ----------------------------------------------------------- handlers
    def on_start(self) -> None:
        """Start the VM (a fresh one from the same spec if this one is off); boots in the background."""
        def go() -> None:
            if self._busy:
                raise RuntimeError(f"busy: {self._busy}")
            if self.state in (RunState.OFF, RunState.FAILED):
                self.vm = VM(self.vm.spec, image=getattr(self.vm, "_image", None))
                self._last_events = -1
                if self.on_new_vm:
                    self.on_new_vm(self.vm)
            elif self.vm.state is not RunState.CREATED:
                raise StateError(f"cannot start: the VM is {self.vm.state.value}", fix="it is already started")
            self._busy = "starting"
            self._start_poller()

            def boot() -> None:
                try:
                    self.vm.start()
                except Exception as exc:
                    self._show_error("start", exc)
                finally:
                    self._busy = None
                    self._safe_refresh()
            threading.Thread(target=boot, name="vmlab-panel-start", daemon=True).start()
        self._guard("start", go)

    def on_pause(self) -> None:
        self._guard("pause", self.vm.pause)

    def on_resume(self) -> None:
        self._guard("resume", lambda: self.vm.resume(wait=False))

    def on_power(self) -> None:
        def press() -> None:
            if self.state is RunState.PAUSED:
                raise StateError("the guest is paused, so it cannot answer the power button",
                                 fix="press Resume first, then the power button")
            self.vm.powerdown()
        self._guard("power button", press)

    def on_reset(self) -> None:
        self._guard("reset", self.vm.reset)

    def on_quit(self) -> None:
        self._guard("pull the plug", self.vm.quit)

    def on_kill(self) -> None:
        self._guard("kill", self.vm.kill)

    # ------------------------------------------------------------- poller
    def _safe_refresh(self) -> None:
        try:
            self.refresh()
        except Exception as exc:
            self._show_error("refresh", exc)

    def _start_poller(self) -> None:
        if not self._poll_enabled or self._closed or self.polling:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._poll_loop, name="vmlab-panel-poll", daemon=True)
        self._thread.start()

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._safe_refresh()
            if not self._busy and self.state in (RunState.OFF, RunState.FAILED, RunState.CREATED):
                self._safe_refresh()       # the last word: EXIT and the final state
                return

    def close(self, shutdown_vm: bool = False) -> None:
        """Stop the poller and close the widgets (and, if asked, shut the VM down)."""
        self._closed = True
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        if shutdown_vm:
            try:
                self.vm.shutdown()
            except Exception as exc:
                self._show_error("shutdown", exc)
        self.widget.close()
        for w in [*self.buttons.values(), self.state_label, self.event_log, self.timeline, self.console,
                  self.errors]:
            w.close()

    def __enter__(self) -> ControlPanel:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close(shutdown_vm=True)
