/* hlt: N `hlt` instructions. Without an in-kernel interrupt controller KVM
 * cannot wait for an interrupt itself, so each one exits (KVM_EXIT_HLT). */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %edi
    jecxz 2f
1:  hlt
    loop 1b
2:  DONE
