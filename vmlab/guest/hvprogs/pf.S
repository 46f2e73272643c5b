/* pf: N page faults, each taken and handled by the guest itself.
 * Each round marks one page not-present in the guest's page table, flushes it
 * from the TLB and touches it: the CPU raises #PF (vector 14) inside the guest,
 * our handler marks the page present again and returns. With nested paging the
 * guest's own page tables are its business: no exit. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    /* IDT gate 14 -> pf_handler (32-bit interrupt gate, ring 0) */
    mov  $pf_handler, %eax
    mov  %ax, HV_IDT + 14*8
    movw $HV_CODE_SEL, HV_IDT + 14*8 + 2
    movw $0x8e00, HV_IDT + 14*8 + 4
    shr  $16, %eax
    mov  %ax, HV_IDT + 14*8 + 6
    xor  %edi, %edi          /* result: faults handled */
    jecxz 2f
1:  andl $~1, HV_PTE(HV_PFPAGE)    /* page not present */
    invlpg HV_PFPAGE                /* forget the old translation */
    movl %ecx, HV_PFPAGE            /* touch it: #PF */
    loop 1b
2:  DONE

pf_handler:
    orl  $1, HV_PTE(HV_PFPAGE)     /* present again */
    inc  %edi
    add  $4, %esp                   /* drop the error code */
    iret                            /* retry the faulting store */
