"""Facts about the learner's machine, for lesson prose that is true wherever it runs.

A lesson never types a fact about the machine into markdown ("two cores", "KVM works here"): it asks
:func:`machine_facts` (what ``python -m vmlab doctor`` measures) and writes the sentence with
:func:`facts_md`::

    from vmlab.facts import facts_md
    facts_md("This machine has {cores} usable CPUs; lessons run under {accel_name}. "
             "{kvm?works:KVM works here.|pvm:The host's KVM is PVM, so KVM guests hang: {kvm_reason}.|"
             "*:KVM is not usable here: {kvm_reason}.}")

The template has two kinds of fields:

``{name}`` or ``{name:.1f}``
    a fact, formatted as ``str.format`` does (keys below, plus any ``**extra`` keyword).
``{name?value:text|value:text|*:text}``
    a choice: the text after the value the fact has (compared as lower-case text; ``True``/``False`` are
    ``true``/``false``, ``None`` is ``none``), or after ``*`` when no value matches. A choice text may hold
    ``{name}`` fields, but no ``|`` and no other choice. A fact value with no matching text and no ``*``
    is an error (so a new value cannot silently print nothing).

Keys of :func:`machine_facts`:

=================  ===================================================================================
``cores``          usable CPUs of this process (``os.sched_getaffinity``), int
``mem_gib``        host memory in GiB, float
``accel``          ``"kvm"`` or ``"tcg"``: what ``accel="auto"`` uses here (``VMLAB_ACCEL`` respected);
                   ``accel_name`` is the same in capitals
``kvm``            ``"works"`` (a guest booted under KVM), ``"pvm"`` (the host's KVM is PVM and lesson guests
                   do not boot), ``"absent"`` (no /dev/kvm), ``"unusable"`` (any other failure)
``kvm_reason``     the probe's words, e.g. ``"a guest booted under KVM in 0.41 s"``
``host_is_vm``     bool: the host is itself a virtual machine (CPUID hypervisor bit or systemd-detect-virt)
``host_hypervisor``  the hypervisor under the host, e.g. ``"KVM"`` (from systemd-detect-virt, which reads the
                   CPUID hypervisor signature), ``""`` if none or unknown; ``host_hypervisor_name`` is the same
                   for prose: ``"an unnamed hypervisor"`` instead of ``""``
``nested_kvm``     bool: a nested guest gets a working /dev/kvm, as doctor proved earlier; ``None`` if doctor
                   has not proven it yet (this module never boots a guest for it: run
                   ``python -m vmlab doctor``); ``nested_reason`` its words
``qemu_version``   e.g. ``"7.2.22"``; also ``cpu`` (host CPU model) and ``host_kernel``
=================  ===================================================================================

:func:`machine_facts` is computed once per process (``reprobe=True`` asks doctor to probe KVM again).
"""

from __future__ import annotations

import os
import platform
import re
import string
from typing import Any, Dict, Mapping, Optional

__all__ = ["FACT_KEYS", "facts_md", "machine_facts", "render"]

FACT_KEYS = ("cores", "mem_gib", "accel", "accel_name", "kvm", "kvm_reason", "host_is_vm", "host_hypervisor",
             "host_hypervisor_name", "nested_kvm", "nested_reason", "qemu_version", "cpu", "host_kernel")

# systemd-detect-virt's names (it reads the CPUID hypervisor signature, then DMI) -> the product's name
_HYPERVISORS = {"kvm": "KVM", "qemu": "QEMU (TCG)", "xen": "Xen", "microsoft": "Hyper-V", "vmware": "VMware",
                "oracle": "VirtualBox", "amazon": "KVM (AWS Nitro)", "google": "KVM (Google Compute Engine)",
                "bhyve": "bhyve", "parallels": "Parallels", "acrn": "ACRN", "powervm": "PowerVM"}

_cache: Dict[str, Any] = {}


def _kvm_state(verdict: Mapping[str, Any], device_problem: Optional[str], pvm_host: bool) -> str:
    if verdict.get("usable"):
        return "works"
    if device_problem and "no /dev/kvm" in device_problem:
        return "absent"
    if pvm_host:
        return "pvm"
    return "unusable"


def _nested_cached(image_key: Optional[str]) -> Dict[str, Any]:
    """doctor's remembered nested-KVM verdict for this host, QEMU and image, or {} (never boots)."""
    if not image_key:
        return {}
    from .errors import VMLabError
    from .vm import nested
    from .vm.accel import host_key
    try:
        return dict(nested._load().get(host_key(image_key)) or {})
    except (VMLabError, OSError, ValueError):      # no QEMU, unreadable cache: simply not proven
        return {}


def facts_from_report(report: Mapping[str, Any], cores: Optional[int] = None) -> Dict[str, Any]:
    """The facts in a ``doctor_report()`` (``nested_kvm`` only from the report itself)."""
    from .config import accel_override
    from .vm.accel import kvm_device_problem
    acc = report.get("accelerators", {})
    kvm = acc.get("kvm", {}) or {}
    host = report.get("host", {}) or {}
    hv = host.get("virtualization", {}) or {}
    accel = str(report.get("default_accel", "tcg"))
    if accel_override() == "tcg":
        accel = "tcg"
    detected = str(hv.get("detected") or "")
    nested = report.get("nested_kvm") or {}
    q = report.get("qemu") or {}
    return {
        "cores": cores if cores is not None else len(os.sched_getaffinity(0)),
        "mem_gib": round(float(host.get("memory_mb", 0)) / 1024, 1),
        "accel": accel, "accel_name": accel.upper(),
        "kvm": _kvm_state(kvm, kvm_device_problem(), bool(hv.get("pvm_host"))),
        "kvm_reason": str(kvm.get("reason", "")),
        "host_is_vm": bool(hv.get("is_vm")),
        "host_hypervisor": _HYPERVISORS.get(detected, detected),
        "host_hypervisor_name": _HYPERVISORS.get(detected, detected) or "an unnamed hypervisor",
        "nested_kvm": bool(nested["works"]) if "works" in nested else None,
        "nested_reason": str(nested.get("reason", "")),
        "qemu_version": str(q.get("version", "")),
        "cpu": str(host.get("cpu", "")),
        "host_kernel": str(host.get("kernel", platform.release())),
    }


def machine_facts(reprobe: bool = False) -> Dict[str, Any]:
    """What doctor measures on this machine, as the flat dict documented in the module docstring."""
    if _cache and not reprobe:
        return dict(_cache)
    from .cli import doctor_report
    report = doctor_report(reprobe=reprobe, nested=False)
    facts = facts_from_report(report)
    if facts["nested_kvm"] is None:
        cached = _nested_cached((report.get("image") or {}).get("key"))
        if "works" in cached:
            facts["nested_kvm"] = bool(cached["works"])
            facts["nested_reason"] = str(cached.get("reason", ""))
    _cache.clear()
    _cache.update(facts)
    return dict(facts)


_CHOICE = re.compile(r"\{(\w+)\?((?:[^{}]|\{[^{}?|]*\})*)\}")


def _as_key(value: Any) -> str:
    return str(value).lower()


def render(template: str, facts: Mapping[str, Any]) -> str:
    """The template with its choices made and its fields filled from *facts* (see the module docstring)."""
    def choose(m: re.Match[str]) -> str:
        name, body = m.group(1), m.group(2)
        if name not in facts:
            raise ValueError(f"facts template: unknown fact {name!r} in a choice; known: {', '.join(sorted(facts))}")
        options: Dict[str, str] = {}
        for part in body.split("|"):
            key, sep, text = part.partition(":")
            if not sep:
                raise ValueError(f"facts template: choice {{{name}?...}} has an option without 'value:' ({part!r})")
            options[key.strip().lower()] = text
        value = _as_key(facts[name])
        if value in options:
            return options[value]
        if "*" in options:
            return options["*"]
        raise ValueError(f"facts template: {{{name}?...}} has no text for {name}={value!r}; "
                         f"add '{value}:...' or a default '*:...'")
    text = _CHOICE.sub(choose, template)
    try:
        return string.Formatter().vformat(text, (), dict(facts))
    except KeyError as exc:
        raise ValueError(f"facts template: unknown fact {exc.args[0]!r}; known: {', '.join(sorted(facts))}; "
                         "or pass it as a keyword to facts_md") from None


def facts_md(template: str, *, facts: Optional[Mapping[str, Any]] = None, **extra: Any) -> Any:
    """The template rendered with this machine's facts (or *facts*), plus ``**extra``, as IPython Markdown.

    The template goes through :func:`vmlab.i18n.tr` first: the Korean edition translates it (fields and choice
    values unchanged) in ``vmlab/locale/ko/strings.toml``, as it does prediction questions."""
    from IPython.display import Markdown

    from .i18n import tr
    return Markdown(render(tr(template), {**(machine_facts() if facts is None else facts), **extra}))
