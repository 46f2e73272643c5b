/* The guest's world, shared by hv.c and the guest programs (hvprogs/NAME.S).
 * Only #defines, so both C and assembly can include it.
 *
 * Guest-physical memory: one 4 MiB slot of ordinary RAM at address 0.
 *   0x00500  GDT (hv.c): null, flat 32-bit code (selector 0x08), flat data (0x10)
 *   0x01000  page directory: entry 0 -> the page table below, the rest 4 MiB pages
 *   0x02000  page table for 0-4 MiB: 4 KiB pages, identity-mapped, all present
 *   0x03000  IDT, all 256 gates empty (a program may fill one in)
 *   0x10000  the guest program (its entry point); the stack grows down from here
 *   0x100000 a 2 MiB buffer for string I/O
 * Outside the slot: the MMIO device (no RAM there, so every access exits). */
#define HV_MEM_SIZE  0x400000
#define HV_GDT       0x500
#define HV_PD        0x1000
#define HV_PT        0x2000
#define HV_IDT       0x3000
#define HV_LOAD      0x10000
#define HV_BUF       0x100000
#define HV_BUF_SIZE  0x200000
#define HV_PFPAGE    0x3ff000              /* the page the page-fault program unmaps */
#define HV_PTE(addr) (HV_PT + ((addr) >> 12) * 4)
#define HV_CODE_SEL  0x08
#define HV_MMIO      0x10000000            /* the MMIO device's one 32-bit register */
#define HV_SERIAL    0x3f8                 /* COM1: data register */
#define HV_SERIAL_LSR 0x3fd                /* COM1: line status register */
#define HV_DONE      0xf4                  /* writing here ends the program */

/* Every program ends the same way: one `out` to the done port (the fixed overhead
 * of one I/O exit), with its result in %edi. */
#define DONE  out %al, $HV_DONE; 9: hlt; jmp 9b
