/* outs: one `rep outsb` writing N bytes from memory to the serial port. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  %ecx, %edi
    mov  $HV_SERIAL, %dx
    mov  $HV_BUF, %esi
    cld
    rep outsb                /* ecx bytes from [esi] to port dx */
    DONE
