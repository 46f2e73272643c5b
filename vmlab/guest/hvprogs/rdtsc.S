/* rdtsc: N `rdtsc` instructions. Sensitive (it reads the host's clock), but the
 * hardware applies the guest's TSC offset itself: no exit at all. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %esi
    mov  %ecx, %edi
    test %esi, %esi
    jz   2f
1:  rdtsc                    /* edx:eax = time-stamp counter + the guest's offset */
    dec  %esi
    jnz  1b
2:  DONE
