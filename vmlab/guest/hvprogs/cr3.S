/* cr3: N writes of the page-table base register (mov to %cr3), privileged.
 * With shadow paging every one would exit; with nested paging (AMD NPT,
 * Intel EPT) the guest owns its page tables and KVM does not intercept it. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %edi
    mov  %cr3, %eax
    jecxz 2f
1:  mov  %eax, %cr3          /* reload: flushes the guest's TLB */
    loop 1b
2:  DONE
