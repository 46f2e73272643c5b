/* out: N single-byte `out` instructions to the serial port.
 * Each one exits to the hypervisor in user space (KVM_EXIT_IO, count 1). */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  $HV_SERIAL, %dx
    mov  $'x', %al
    mov  %ecx, %edi          /* result: how many we wrote */
    jecxz 2f
1:  out  %al, %dx            /* one byte to COM1 */
    loop 1b                  /* ecx -= 1; again while ecx != 0 */
2:  DONE
