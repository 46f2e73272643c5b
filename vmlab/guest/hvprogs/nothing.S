/* nothing: just the done exit -- the fixed overhead every program has. */
#include "hvdefs.h"
    .code32
    .globl _start
_start:
    xor  %edi, %edi
    DONE
