"""The lessons' worked solutions and end-of-lesson checks, kept out of the notebooks' cell source.

A lesson shows them with ``Solution.lesson("01.00", "rss")`` and ``Check.lesson("01.00")``
(vmlab.widgets.predict): the cell says only which one, the text stays here until the learner presses the
button (it is not even in the page before that). Keys are the lesson's number and a short name.

Writing one: add the text under the lesson's number below; ``tests/test_widgets.py`` checks that every
``Solution.lesson``/``Check.lesson`` in the notebooks has its entry and that no notebook carries a solution's
text or a check's answers in its source.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

from ..errors import SpecError

QuestionT = Tuple[str, Sequence[str], int, str]   # question, choices, index of the right choice, explanation

SOLUTIONS: Dict[str, Dict[str, str]] = {
    "00.00": {
        "rtt": """The round trip is dominated by the guest waking up its agent and the virtio-serial port, not by the host.
Under TCG every guest instruction is translated, so it is slower than under KVM; compare the table's accelerator row.""",
    },
    "01.00": {
        "rss": """QEMU allocates guest RAM lazily: a page costs host memory only once the guest touches it. A freshly booted
busybox guest touches little, so RSS follows what the guest *uses* plus QEMU's own memory, not `-m`. Under TCG, QEMU's
own memory includes the cache of translated guest code, which grows with the code the guest has run: a cold boot runs
more code than a restore from the warm snapshot (compare with the lesson VM's RSS above). So memory can be
*overcommitted*: idle VMs fit in less physical memory than the sum of their `-m`.""",
    },
    "01.01": {
        "overlay": """About 8 MiB (plus a little metadata): qcow2 allocates a 64 KiB cluster the first time a guest block in it is
written; writing the same blocks again reuses the same clusters, so the second pass adds nothing. The base is never
written, so its hash stays the same.""",
    },
    "01.02": {
        "sync": """Kept: `sync` writes the page cache and the journal to the (virtual) disk, and with `cache="none"` QEMU has
handed every completed write to the host before the guest's sync returns. What pulling the plug loses is exactly what
had not been synced.""",
    },
    "02.00": {
        "pio-4k": """4096 bytes = 8 sectors of 512 bytes; each sector is 128 reads of the 32-bit data port, so
1024 data-port traps, plus about 8-10 task-file accesses (sector count, LBA, command, status)
per command: ~1,035 in all. DMA mode replaces the 1024 data-port traps with one DMA transfer.""",
    },
    "02.01": {
        "uart-bs": """Hardly: the UART's cost is per byte (one transmit-register write, plus status reads),
whatever size the guest's write() calls have. For virtio-console, smaller writes mean more
kicks: try the same with `devices=['virtio-console']`.""",
    },
    "03.02": {
        "predictions": r"""**The predictions.** `out` exits to user space once per instruction, because only the VMM knows the port: *N* exits (plus the one to the done port).
`rep insb` is one instruction, but KVM's emulator reads ahead up to 1,024 bytes per exit: 10,000 bytes take 10 exits (9 full kilobytes and the rest), not 10,000 and not 1.
`cpuid` always exits, and KVM answers it in the kernel from the CPUID table the VMM set: about *N* exits handled in the kernel, none to user space.
Look at `exits.table(df)` for your own numbers; the `fixed` column is the empty program's count, the overhead every run has.""",
        "exercises": r"""1. 1,024 bytes: one exit (the read-ahead holds exactly 1,024 bytes); 1,025: two. The rule is `n = min(rest of page, 1024 / size, count)` in `pio_in_emulated`.
2. `pf_taken`: nested page faults. hv gave KVM the memory slot, but KVM fills the nested page table lazily: the first time the guest touches a page (its code, its stack, the page tables the CPU walks), the hardware exits and KVM maps the page in the kernel. After that, the page costs nothing.
3. `outw` moves 2 bytes per instruction and per exit: exits per instruction stay at one, bytes per exit double.
4. Only the store: a write can be queued and replayed later because the guest does not wait for a result; a load needs the device's answer before the instruction can finish.
5. It blocks the vCPU thread in the kernel (after optionally polling for a short time, `halt_poll_ns`) until an interrupt is pending, then re-enters the guest.""",
    },
    "01.03": {
        "sent": """Not 256 MiB: pages that are all zeros are sent as a short marker, so what counts is the memory the guest has
written since it booted: the guest kernel's code and data, the initramfs (loaded, unpacked, its pages freed but not
cleared), the page cache. Then a few dirty pages are sent again in the later rounds and while the guest is stopped
(`downtime_mb`). Compare `precopy_mb` with the size of the kernel and initramfs files in the guest image.""",
    },
    "04.00": {
        "eight-vms": """With more CPU-bound VMs than cores, the host's scheduler time-slices the vCPU threads: the total stays near
what the cores can do (a little less: more switching, more QEMU threads, and every VM's timer interrupts), and each VM
gets its share. The guests are not told: under TCG their steal counters stay 0. Memory is different: each extra VM adds
its QEMU's own memory and the guest RAM it touched; shared pages (QEMU's code, the kernel file) count once in PSS.""",
    },
    "04.01": {
        "oom": """The kernel refuses it: when the container's memory cgroup reaches its limit and nothing can be reclaimed (no
swap here), the kernel's OOM killer kills a process in that cgroup, so `vmbench` dies of SIGKILL (unshare reports
the signal) and nothing outside the container is touched. Without a memory controller (see `cgroup_setup()`), the
same command would simply succeed: the limit is the cgroup's, not the namespace's.""",
    },
}

CHECKS: Dict[str, List[QuestionT]] = {
    "00.00": [
        ("What does the table call the accelerator that translates guest instructions in software?",
         ["KVM", "TCG", "PVM"], 1,
         "TCG, QEMU's Tiny Code Generator: binary translation, no hardware help."),
        ("How does vmlab decide that KVM works here?",
         ["/dev/kvm exists", "it boots a guest under KVM", "the CPU has vmx or svm flags"], 1,
         "A device node or a CPU flag is not proof: only a guest that boots is."),
    ],
    "01.00": [
        ("Which program implements the virtual hardware in these lessons?", ["the guest kernel", "QEMU", "Jupyter"], 1,
         "QEMU: a user process on the host presents the PC, its devices and memory."),
        ("The guest's MemTotal is smaller than -m because...",
         ["QEMU keeps the rest", "the guest kernel reserves some for itself", "of the balloon"], 1,
         "The guest kernel's own code and reserved areas are not counted in MemTotal."),
        ("The host's RSS for QEMU follows...",
         ["the -m size exactly", "what the guest has touched, plus QEMU's own memory", "the host's free memory"], 1,
         "Guest RAM is allocated lazily: untouched pages cost nothing."),
    ],
    "01.01": [
        ("A 256 MiB qcow2 disk the guest has written 32 MiB to occupies on the host about...",
         ["256 MiB", "32 MiB", "0 MiB"], 1,
         "qcow2 allocates clusters when they are first written: thin provisioning."),
        ("A VM writes to an overlay. The golden base image...", ["changes", "stays byte-identical", "is copied first"], 1,
         "Writes land in the overlay; the base is only read."),
        ("Booted with vmlab.root=/dev/vda, a file written in the guest's /etc...",
         ["is lost at reboot", "is kept on the disk"], 1,
         "The root file system is the disk, so changes persist."),
    ],
    "01.02": [
        ("vm.quit() while the guest has dirty data in its page cache...",
         ["keeps it", "loses it", "corrupts the file system"], 1,
         "The guest never writes it out; the file system stays consistent (journal), the data is gone."),
        ("After vm.powerdown(), who shuts the guest down?", ["QEMU", "the guest's own PID 1", "the host kernel"], 1,
         "The power button is a request: the guest decides, syncs and powers off."),
        ("A VM started with paused=True has run how many guest instructions?",
         ["none", "the BIOS", "the kernel's early boot"], 0,
         "QEMU's -S: the vCPUs do not run until cont (resume)."),
    ],
    "03.02": [
        ('Which x86 instruction is sensitive but not privileged (so trap-and-emulate cannot catch it)?', ['wbinvd', 'sgdt', 'hlt', 'out'], 1, 'sgdt reads the GDT register in any ring without trapping. wbinvd and hlt are privileged (they fault outside ring 0); out faults in user mode unless the I/O permission bitmap allows it.'),
        ("With nested paging (NPT/EPT), does a guest's `mov %cr3` cause a VM exit under KVM?", ['yes, it is privileged', 'no, the guest owns its page tables', 'only in user mode'], 1, 'Privilege no longer decides: KVM leaves CR3 writes to the guest when the hardware translates guest-physical addresses itself. Shadow paging had to intercept them.'),
        ('`rep insb` of 4,096 bytes into a page-aligned buffer: how many exits to user space (without the done exit)?', ['1', '4', '4,096'], 1, "KVM's emulator reads ahead at most 1,024 bytes (its read cache) per exit: 4,096 / 1,024 = 4."),
        ("Why are the loop times measured in this lesson's nested guest not KVM's costs?", ['KVM counts wrongly when nested', "the outer CPU is QEMU's TCG, which emulates every exit in software", 'hv does not use KVM'], 1, 'The counts come from the same KVM code as on hardware; the timing includes TCG emulating AMD-V, hundreds of times slower than a real world switch.'),
    ],
    "01.03": [
        ("When does pre-copy stop the guest?",
         ["after a fixed number of rounds", "when what is left fits in the downtime limit at the measured bandwidth",
          "as soon as the first round is done"], 1,
         "QEMU compares the dirty memory left with bandwidth x downtime-limit after each round."),
        ("The guest writes memory faster than the link can send it. Pre-copy...",
         ["finishes anyway, just later", "never converges unless the guest is slowed, the limit raised or post-copy used",
          "loses the pages it could not send"], 1,
         "Each round re-sends what was dirtied in the last; auto-converge throttles the vCPU, post-copy moves first."),
        ("Why is the heartbeat gap longer than QEMU's downtime?",
         ["the heartbeat is wrong", "QEMU's figure ends when the stream ends; the guest still has to be started on the "
          "destination and send its next beat", "the network is slow"], 1,
         "QEMU measures on the source; a user sees the whole pause, start-up on the destination included."),
    ],
    "04.01": [
        ("A container's `uname -r` is...", ["its image's kernel", "the host's kernel", "chosen by the engine"], 1,
         "Namespaces change what names mean, not which kernel runs: there is one kernel, the host's."),
        ("A kernel crash triggered inside a (root, unconfined) container...",
         ["stops only that container", "stops the host and everything on it", "is impossible"], 1,
         "It is the host kernel that crashes; a VM's guest kernel crash stops only that VM."),
        ("Why does a null system call cost the same in the container as on the host?",
         ["containers are compiled specially", "it is the same system call on the same kernel",
          "cgroups cache system calls"], 1,
         "The container's process calls the host kernel directly; only a VM puts another kernel and a hypervisor in the way."),
    ],
    "04.00": [
        ("What is a TCG vCPU to the host?", ["a kernel module", "a thread of the QEMU process", "a separate VM process"], 1,
         "Each vCPU is a QEMU thread named 'CPU n/TCG'; query-cpus-fast reports its thread id."),
        ("Why does QEMU's RSS grow when the guest touches memory?",
         ["QEMU copies the guest's pages", "guest RAM is backed by host pages only on first write", "the balloon inflates"], 1,
         "The guest RAM mapping is reserved at start and backed by the host kernel on first touch (lazy allocation)."),
        ("Why does a TCG guest show no steal time under a noisy neighbour?",
         ["it was not slowed down",
          "nothing tells it: steal time is a paravirtual counter the hypervisor must provide",
          "steal time only counts I/O"], 1,
         "Its clock follows the host's wall clock and no hypervisor updates a steal counter, so lost CPU time looks like its own."),
    ],
}


def solution(lesson: str, key: str) -> str:
    """The worked solution ``key`` of ``lesson`` ("01.00")."""
    try:
        return SOLUTIONS[lesson][key]
    except KeyError:
        known = ", ".join(f"{k!r}" for k in SOLUTIONS.get(lesson, {})) or "none"
        raise SpecError("solution", f"lesson {lesson!r} has no solution {key!r} (it has: {known})",
                        fix="add it to SOLUTIONS in vmlab/widgets/answers.py") from None


def check(lesson: str) -> List[QuestionT]:
    """The end-of-lesson check of ``lesson``: (question, choices, answer index, explanation) tuples."""
    try:
        return CHECKS[lesson]
    except KeyError:
        raise SpecError("check", f"lesson {lesson!r} has no check (lessons with one: {', '.join(CHECKS)})",
                        fix="add it to CHECKS in vmlab/widgets/answers.py") from None
