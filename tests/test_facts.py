"""vmlab.facts: lesson prose filled from doctor's facts (fed in here: no fact about this machine is assumed)."""

from __future__ import annotations

import pytest

from vmlab.facts import FACT_KEYS, facts_from_report, facts_md, machine_facts, render


def facts(**over):
    base = {"cores": 3, "mem_gib": 7.25, "accel": "tcg", "accel_name": "TCG", "kvm": "absent",
            "kvm_reason": "there is no /dev/kvm", "host_is_vm": False, "host_hypervisor": "", "host_hypervisor_name": "an unnamed hypervisor",
            "nested_kvm": None, "nested_reason": "", "qemu_version": "9.9.9", "cpu": "X", "host_kernel": "k"}
    return {**base, **over}


def test_choice_and_fields_follow_the_facts_given():
    assert render("{cores} CPUs, {mem_gib:.1f} GiB", facts()) == "3 CPUs, 7.2 GiB"
    assert (render("{kvm?works:yes {kvm_reason}|pvm:pvm|*:other}", facts(kvm="works", kvm_reason="booted"))
            == "yes booted")
    assert render("{kvm?works:yes|pvm:pvm|*:other}", facts(kvm="pvm")) == "pvm"
    assert render("{kvm?works:yes|pvm:pvm|*:other}", facts(kvm="absent")) == "other"
    assert render("{host_is_vm?true:VM on {host_hypervisor}|false:bare metal}",
                  facts(host_is_vm=True, host_hypervisor="Xen")) == "VM on Xen"
    assert render("{host_is_vm?true:VM|false:bare metal}", facts()) == "bare metal"
    assert render("{nested_kvm?true:a|false:b|none:not proven}", facts()) == "not proven"


def test_facts_md_renders_markdown_with_extra_fields():
    md = facts_md("{cores} cores, {n} VMs, {kvm?works:fast|*:slow}", facts=facts(cores=16, kvm="works"), n=4)
    assert md.data == "16 cores, 4 VMs, fast"


@pytest.mark.parametrize("template, words", [
    ("{nope}", "unknown fact 'nope'"),
    ("{nope?a:b}", "unknown fact 'nope'"),
    ("{kvm?works:fast}", "no text for kvm='absent'"),
    ("{kvm?works}", "without 'value:'"),
])
def test_bad_template_names_the_problem(template, words):
    with pytest.raises(ValueError, match=words.replace("(", r"\(").replace("?", r"\?")):
        render(template, facts())


@pytest.mark.parametrize("verdict, pvm, state", [
    ({"usable": True, "reason": "a guest booted under KVM in 0.4 s"}, False, "works"),
    ({"usable": False, "reason": "it hung in early boot"}, True, "pvm"),
    ({"usable": False, "reason": "QEMU failed under KVM"}, False, "unusable"),
])
def test_facts_from_a_doctor_report(verdict, pvm, state, monkeypatch):
    monkeypatch.delenv("VMLAB_ACCEL", raising=False)
    monkeypatch.setattr("vmlab.vm.accel.kvm_device_problem", lambda: None)
    report = {"accelerators": {"kvm": verdict}, "default_accel": "kvm" if verdict["usable"] else "tcg",
              "host": {"cpu": "C", "cpus": 8, "memory_mb": 3072, "kernel": "k",
                       "virtualization": {"is_vm": pvm, "detected": "kvm" if pvm else None, "pvm_host": pvm}},
              "qemu": {"version": "8.0.0"}, "nested_kvm": {"works": False, "reason": "no svm"}}
    f = facts_from_report(report, cores=5)
    assert f["kvm"] == state and f["kvm_reason"] == verdict["reason"]
    assert f["accel"] == ("kvm" if state == "works" else "tcg")
    assert (f["cores"], f["mem_gib"], f["qemu_version"]) == (5, 3.0, "8.0.0")
    assert f["host_is_vm"] is pvm and f["host_hypervisor"] == ("KVM" if pvm else "")
    assert f["host_hypervisor_name"] == ("KVM" if pvm else "an unnamed hypervisor")
    assert f["nested_kvm"] is False and f["nested_reason"] == "no svm"


def test_absent_kvm(monkeypatch):
    monkeypatch.setattr("vmlab.vm.accel.kvm_device_problem",
                        lambda: "there is no /dev/kvm (no hardware virtualization exposed)")
    f = facts_from_report({"accelerators": {"kvm": {"usable": False, "reason": "there is no /dev/kvm"}},
                           "host": {"virtualization": {}}}, cores=1)
    assert f["kvm"] == "absent" and f["nested_kvm"] is None and f["accel"] == "tcg"


def test_machine_facts_has_every_key_and_agrees_with_doctor():
    from vmlab.cli import doctor_report
    f = machine_facts()
    assert set(FACT_KEYS) <= set(f)
    report = doctor_report(nested=False)
    assert f["kvm_reason"] == report["accelerators"]["kvm"]["reason"]
    assert f["kvm"] in ("works", "pvm", "absent", "unusable")
    assert (f["kvm"] == "works") == bool(report["accelerators"]["kvm"].get("usable"))
    assert isinstance(f["cores"], int) and f["cores"] >= 1


def _templates():
    """(notebook, cell index, template, extra keyword names) of every facts_md(...) call in the notebooks."""
    import ast
    from pathlib import Path

    import nbformat
    root = Path(__file__).resolve().parent.parent / "notebooks"
    for path in sorted(root.rglob("*.ipynb")):
        if ".ipynb_checkpoints" in path.parts:
            continue
        for i, cell in enumerate(nbformat.read(str(path), as_version=4).cells):
            if cell.cell_type != "code" or "facts_md(" not in cell.source:
                continue
            for node in ast.walk(ast.parse(cell.source)):
                if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "facts_md":
                    yield path.name, i, ast.literal_eval(node.args[0]), [k.arg for k in node.keywords]


TEMPLATES = list(_templates())


@pytest.mark.parametrize("kvm", ["works", "pvm", "absent", "unusable"])
@pytest.mark.parametrize("host_is_vm", [True, False])
def test_every_lesson_template_renders_on_every_kind_of_machine(kvm, host_is_vm):
    assert TEMPLATES, "the lessons use facts_md"
    f = facts(kvm=kvm, accel="kvm" if kvm == "works" else "tcg", accel_name="KVM" if kvm == "works" else "TCG",
              host_is_vm=host_is_vm, host_hypervisor="KVM" if host_is_vm else "", nested_kvm=None)
    for name, i, template, keywords in TEMPLATES:
        text = render(template, {**f, **{k: f"<{k}>" for k in keywords}})
        assert "{" not in text and "}" not in text, f"{name} cell {i}: unfilled field in {text!r}"
        if kvm == "works":
            assert "does not boot" not in text and "not usable" not in text, f"{name} cell {i}: {text!r}"
