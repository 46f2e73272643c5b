/* sgdt: N `sgdt` (store the GDT register), sensitive but NOT privileged: it
 * works in user mode without trapping, so a trap-and-emulate VMM that runs the
 * guest kernel deprivileged cannot hide the real GDT from it -- one of the x86
 * instructions that break Popek and Goldberg's condition. In guest mode the CPU
 * has the guest's own GDTR, so it needs no exit at all. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %edi
    jecxz 2f
1:  sgdt HV_BUF              /* 6 bytes: limit, base */
    loop 1b
2:  DONE
