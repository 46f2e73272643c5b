/* hv: a hypervisor in about 200 lines, on Linux's KVM API.
 *
 *   hv PROGRAM [N]
 *
 * runs the flat guest program PROGRAM (a file, or the name of one of the programs
 * built from hvprogs/NAME.S into HV_PROGDIR/NAME.bin) in a new VM with one
 * vCPU, with N in the vCPU's %ecx, until the program writes to the "done" port.
 * It emulates two devices in user space, a serial port and one MMIO register,
 * counts every exit that reaches it by reason, reads the vCPU's in-kernel
 * counters (which also see the exits KVM handles without us), and prints one
 * JSON line. The guest runs in 32-bit protected mode with paging, set up by us
 * directly in the vCPU's registers: no BIOS, no boot loader.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include "hvprogs/hvdefs.h"
#ifndef HV_PROGDIR
#define HV_PROGDIR "/lib/hv"               /* where the image puts the programs */
#endif

static void die(const char *what) { fprintf(stderr, "hv: %s: %s\n", what, strerror(errno)); exit(1); }

static int xioctl(int fd, unsigned long req, void *arg, const char *what) {
    int r = ioctl(fd, req, arg);
    if (r < 0) die(what);
    return r;
}

/* Exits that reach user space, counted by KVM's exit_reason number. */
static const char *reason_name(unsigned r) {
    switch (r) {
    case KVM_EXIT_IO: return "IO";                 /* in/out (and ins/outs) to a port */
    case KVM_EXIT_MMIO: return "MMIO";             /* a load/store to an address with no RAM */
    case KVM_EXIT_HLT: return "HLT";               /* hlt, with no in-kernel interrupt controller */
    case KVM_EXIT_SHUTDOWN: return "SHUTDOWN";     /* triple fault */
    case KVM_EXIT_FAIL_ENTRY: return "FAIL_ENTRY";
    case KVM_EXIT_INTERNAL_ERROR: return "INTERNAL_ERROR";
    case KVM_EXIT_INTR: return "INTR";             /* a signal (our timeout) */
    default: return "OTHER";
    }
}

/* Build the guest's tables in its RAM: a flat GDT and identity-mapped paging. */
static void setup_memory(uint8_t *mem) {
    uint64_t *gdt = (uint64_t *)(mem + HV_GDT);
    gdt[0] = 0;
    gdt[1] = 0x00cf9a000000ffffULL;   /* code: base 0, limit 4 GiB, 32-bit, ring 0 */
    gdt[2] = 0x00cf92000000ffffULL;   /* data: base 0, limit 4 GiB, writable */
    uint32_t *pd = (uint32_t *)(mem + HV_PD), *pt = (uint32_t *)(mem + HV_PT);
    pd[0] = HV_PT | 0x3;                                  /* present, writable */
    for (uint32_t i = 1; i < 1024; i++) pd[i] = (i << 22) | 0x83;   /* 4 MiB pages */
    for (uint32_t i = 0; i < 1024; i++) pt[i] = (i << 12) | 0x3;    /* 4 KiB pages */
}

/* The vCPU starts in protected mode with paging on: we write the registers that a
 * boot loader would have set, including the hidden parts of the segment registers. */
static void setup_vcpu(int vcpu, uint32_t n) {
    struct kvm_sregs s;
    xioctl(vcpu, KVM_GET_SREGS, &s, "KVM_GET_SREGS");
    struct kvm_segment code = { .base = 0, .limit = 0xffffffff, .selector = HV_CODE_SEL,
        .type = 11, .present = 1, .dpl = 0, .db = 1, .s = 1, .g = 1 };
    struct kvm_segment data = code;
    data.type = 3; data.selector = 0x10;
    s.cs = code; s.ds = s.es = s.fs = s.gs = s.ss = data;
    s.gdt.base = HV_GDT; s.gdt.limit = 3 * 8 - 1;
    s.idt.base = HV_IDT; s.idt.limit = 256 * 8 - 1;
    s.cr3 = HV_PD;
    s.cr4 = 0x10;                          /* PSE: 4 MiB pages allowed */
    s.cr0 = 0x80000011;                    /* PG | ET | PE */
    xioctl(vcpu, KVM_SET_SREGS, &s, "KVM_SET_SREGS");
    struct kvm_regs r = { .rip = HV_LOAD, .rsp = HV_LOAD, .rflags = 0x2, .rcx = n };
    xioctl(vcpu, KVM_SET_REGS, &r, "KVM_SET_REGS");
}

/* The serial port, as little of a 16550 as the programs need. */
static uint64_t serial_out_bytes, serial_in_bytes;
static char serial_text[65];
static void serial_io(struct kvm_run *run) {
    uint8_t *data = (uint8_t *)run + run->io.data_offset;   /* count elements, each size bytes */
    for (uint32_t i = 0; i < run->io.count; i++, data += run->io.size) {
        if (run->io.direction == KVM_EXIT_IO_OUT && run->io.port == HV_SERIAL) {
            if (serial_out_bytes < 64) serial_text[serial_out_bytes] = (char)*data;
            serial_out_bytes++;
        } else if (run->io.port == HV_SERIAL) {
            *data = "hello from the serial port\n"[serial_in_bytes++ % 27];
        } else if (run->io.port == HV_SERIAL_LSR) {
            *data = 0x60;                   /* transmitter empty: always ready */
        }
    }
}

/* The MMIO device: one register; writes store, reads return the last value + 1. */
static uint32_t mmio_reg;
static void mmio_access(struct kvm_run *run) {
    if (run->mmio.phys_addr != HV_MMIO || run->mmio.len != 4) return;
    if (run->mmio.is_write) memcpy(&mmio_reg, run->mmio.data, 4);
    else { uint32_t v = mmio_reg + 1; memcpy(run->mmio.data, &v, 4); }
}

/* KVM's binary statistics (KVM_GET_STATS_FD, Linux >= 5.14): a header, then one
 * descriptor per counter (its name and where its value is), then the values.
 * These counters live in the kernel and count every exit, even those KVM handles
 * itself and never shows us (cpuid, msr accesses, nested page faults...). */
static void print_stats(int vcpu) {
    int fd = ioctl(vcpu, KVM_GET_STATS_FD, NULL);
    if (fd < 0) { printf("\"kvm_stats\":null"); return; }
    struct kvm_stats_header h;
    if (pread(fd, &h, sizeof h, 0) != sizeof h) die("reading the stats header");
    size_t dsize = sizeof(struct kvm_stats_desc) + h.name_size;
    char *descs = malloc(dsize * h.num_desc);
    if (!descs || pread(fd, descs, dsize * h.num_desc, h.desc_offset) < 0) die("reading stats");
    printf("\"kvm_stats\":{");
    for (uint32_t i = 0, first = 1; i < h.num_desc; i++) {
        struct kvm_stats_desc *d = (struct kvm_stats_desc *)(descs + i * dsize);
        uint64_t v;
        if (d->size != 1 || (d->flags & KVM_STATS_TYPE_MASK) > KVM_STATS_TYPE_PEAK) continue;
        if (pread(fd, &v, 8, h.data_offset + d->offset) != 8) die("reading a stat");
        printf("%s\"%s\":%llu", first ? "" : ",", d->name, (unsigned long long)v);
        first = 0;
    }
    printf("}");
    free(descs);
    close(fd);
}

static void on_alarm(int sig) { (void)sig; }   /* only there to interrupt KVM_RUN */

int main(int argc, char **argv) {
    if (argc < 2) { fprintf(stderr, "usage: hv PROGRAM [N]   (PROGRAM: a file, or out, ins, cpuid...)\n"); return 2; }
    uint32_t n = argc > 2 ? (uint32_t)strtoul(argv[2], NULL, 0) : 10;
    char path[4096];
    snprintf(path, sizeof path, strchr(argv[1], '/') ? "%s" : HV_PROGDIR "/%s.bin", argv[1]);

    /* 1. The VM: open /dev/kvm, check the API version, create a VM. */
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0) die("open /dev/kvm");
    if (ioctl(kvm, KVM_GET_API_VERSION, NULL) != KVM_API_VERSION) die("KVM API version");
    int vm = xioctl(kvm, KVM_CREATE_VM, 0, "KVM_CREATE_VM");

    /* 2. Its RAM: ordinary anonymous memory of this process, given to the VM as
     *    guest-physical 0..4 MiB (one memory slot). The program is copied in. */
    uint8_t *mem = mmap(NULL, HV_MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) die("mmap");
    struct kvm_userspace_memory_region slot = { .slot = 0, .guest_phys_addr = 0,
        .memory_size = HV_MEM_SIZE, .userspace_addr = (uint64_t)mem };
    xioctl(vm, KVM_SET_USER_MEMORY_REGION, &slot, "KVM_SET_USER_MEMORY_REGION");
    FILE *f = fopen(path, "rb");
    if (!f) die(path);
    size_t len = fread(mem + HV_LOAD, 1, HV_BUF - HV_LOAD, f);
    fclose(f);
    if (len == 0) { fprintf(stderr, "hv: %s is empty\n", path); return 1; }
    setup_memory(mem);

    /* 3. One vCPU, and the shared page (struct kvm_run) where KVM tells us why it exited. */
    int vcpu = xioctl(vm, KVM_CREATE_VCPU, 0, "KVM_CREATE_VCPU");
    int run_size = xioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, NULL, "KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) die("mmap kvm_run");
    setup_vcpu(vcpu, n);

    /* 4. The loop: KVM_RUN enters the guest and returns only for what the kernel
     *    cannot handle itself. We emulate it and go round again. */
    struct sigaction sa = { .sa_handler = on_alarm };   /* no SA_RESTART: KVM_RUN returns EINTR */
    sigaction(SIGALRM, &sa, NULL);
    alarm(60);
    uint64_t exits[64] = {0}, done_port = 0, other_io = 0;
    const char *error = NULL;
    struct timespec t0, t1;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, NULL) < 0 && errno != EINTR) die("KVM_RUN");
        unsigned reason = run->exit_reason;
        exits[reason < 64 ? reason : 63]++;
        if (reason == KVM_EXIT_IO) {
            if (run->io.port == HV_DONE) { done_port++; break; }
            if (run->io.port == HV_SERIAL || run->io.port == HV_SERIAL_LSR) serial_io(run);
            else other_io++;
        } else if (reason == KVM_EXIT_MMIO) {
            mmio_access(run);
        } else if (reason == KVM_EXIT_HLT) {
            continue;                       /* nothing will wake it but us: just resume */
        } else {
            error = reason == KVM_EXIT_INTR ? "timeout (60 s)" : reason_name(reason);
            break;
        }
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);

    /* 5. Report: one JSON line. */
    struct kvm_regs regs;
    xioctl(vcpu, KVM_GET_REGS, &regs, "KVM_GET_REGS");
    const char *prog = strrchr(path, '/') ? strrchr(path, '/') + 1 : path;
    printf("{\"program\":\"%.*s\",\"n\":%u,\"ok\":%s,", (int)strcspn(prog, "."), prog, n,
           error ? "false" : "true");
    if (error) printf("\"error\":\"%s\",", error);
    printf("\"seconds\":%.9f,\"result\":%llu,\"exits\":{",
           (t1.tv_sec - t0.tv_sec) + (t1.tv_nsec - t0.tv_nsec) / 1e9, (unsigned long long)regs.rdi);
    for (unsigned r = 0, first = 1; r < 64; r++)
        if (exits[r]) { printf("%s\"%s\":%llu", first ? "" : ",", reason_name(r),
                               (unsigned long long)exits[r]); first = 0; }
    printf("},\"done_exits\":%llu,\"other_io\":%llu,\"serial_out_bytes\":%llu,\"serial_in_bytes\":%llu,",
           (unsigned long long)done_port, (unsigned long long)other_io,
           (unsigned long long)serial_out_bytes, (unsigned long long)serial_in_bytes);
    printf("\"serial_text\":\"");
    for (const unsigned char *c = (const unsigned char *)serial_text; *c; c++)
        printf(*c >= 32 && *c < 127 && *c != '"' && *c != '\\' ? "%c" : "\\u%04x", *c);
    printf("\",");
    print_stats(vcpu);
    printf("}\n");
    return error ? 1 : 0;
}
