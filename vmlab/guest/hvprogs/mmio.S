/* mmio: N rounds of one 32-bit store and one load at the MMIO device.
 * No RAM is there, so each access is a nested page fault that KVM cannot
 * resolve: it decodes the instruction and exits (KVM_EXIT_MMIO). 2N ops. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  $HV_MMIO, %ebx
    xor  %edi, %edi
    jecxz 2f
1:  mov  %ecx, (%ebx)        /* store: the device keeps the value */
    mov  (%ebx), %eax        /* load: the device answers value + 1 */
    add  %eax, %edi
    loop 1b
2:  DONE
