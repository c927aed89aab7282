/*
 * echo: prints "echo ready", then writes back every byte read from COM1 (polling), and exits
 * with code 0 after echoing a 'q'. No command-line options.
 */
#include "lib.inc"

main:
    PUTS("echo ready\n")
1:  call getc
    call putc
    cmp $'q', %al
    jne 1b
    xor %eax, %eax
    jmp exit
