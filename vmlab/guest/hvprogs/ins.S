/* ins: one `rep insb` reading N bytes from the serial port into memory.
 * KVM hands user space many elements per exit (run->io.count). */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    mov  $HV_SERIAL, %dx
    mov  $HV_BUF, %edi
    cld
    rep insb                 /* ecx bytes from port dx to [edi] */
    sub  $HV_BUF, %edi       /* result: bytes read */
    DONE
