/*
 * halt: prints "halt", then "cli; hlt" forever (never exits). No command-line options.
 */
#include "lib.inc"

main:
    PUTS("halt\n")
1:  cli
    hlt
    jmp 1b
