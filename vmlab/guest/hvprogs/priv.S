/* priv: N `wbinvd` (write back and invalidate caches), a privileged instruction:
 * outside ring 0 it faults (#GP). A guest kernel runs in ring 0, so under
 * hardware-assisted virtualization it is the hypervisor's intercept settings,
 * not the ring, that decide: KVM intercepts wbinvd and handles it in the kernel. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %edi
    jecxz 2f
1:  wbinvd
    loop 1b
2:  DONE
