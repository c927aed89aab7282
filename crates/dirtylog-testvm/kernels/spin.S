/*
 * spin: prints "spin", then, with interrupts off and no further I/O of any kind, increments
 * one dword in every 4 KiB page of [4 MiB, 4 MiB + mb MiB) forever. Never exits; a VMM has to
 * stop it from the host.
 *
 * Command line: mb=N (working set in MiB, default 8; must fit below mem_upper, else
 * "spin: mb=N does not fit in memory" and exit code 2).
 */
#include "lib.inc"

main:
    mov $key_mb, %esi
    mov $8, %eax
    call arg_dec
    mov $name, %esi
    call ws_check
    mov %eax, %edx
    shl $8, %edx                /* pages */
    PUTS("spin\n")
1:  mov $WS_BASE, %edi
    mov %edx, %ecx
2:  incl (%edi)
    add $4096, %edi
    dec %ecx
    jnz 2b
    jmp 1b

    .section .rodata
key_mb: .asciz "mb="
name:   .asciz "spin"
