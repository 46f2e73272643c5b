/* cpuid: N `cpuid` instructions. The CPU always intercepts cpuid in a guest;
 * KVM answers it in the kernel, so it never reaches user space. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %esi          /* cpuid overwrites ecx: count in esi */
    mov  %ecx, %edi
    test %esi, %esi
    jz   2f
1:  xor  %eax, %eax          /* leaf 0: vendor string */
    cpuid
    dec  %esi
    jnz  1b
2:  DONE
