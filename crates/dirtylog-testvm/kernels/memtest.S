/*
 * memtest: a memory pattern writer and checker to run across migrations, in the style of
 * kvm-unit-tests' common/memory-verify.c and the lib/migrate.c serial handshake.
 *
 * Command line (decimal numbers):
 *   mode=request|continuous|passes   (default request)
 *   mb=N        working set [4 MiB, 4 MiB + N MiB), default 16, must fit below mem_upper
 *   rounds=N    request: migrations asked for (default 3); continuous: passes between
 *               "Begin" and "End" (default 100); passes: passes before stopping, 0 = forever
 *               (default 0)
 *   step=N      bytes from one checked dword to the next: 4 (every dword, the default) up to
 *               4096 (one dword per page, like memory-verify.c), a power of two
 *   corrupt=1   self-test of the checker: flips the dword in the middle of the working set
 *               after the first fill, so the first check reports a MISMATCH
 *
 * Every checked dword at address A of generation G holds A ^ ((G + 1) * 0x9E3779B9). A pass
 * checks them against generation G and rewrites them with generation G + 1. During every pass the
 * TSC is read once per page and must never go backwards; the xAPIC timer (one-shot, masked,
 * divide by 128, started from 0xFFFFFFFF) is read after every pass and its current count must
 * never grow, and must have moved by the end.
 *
 * Output:
 *   memtest: mode=M mb=N rounds=R step=S
 *   mode=request, per round:
 *     Now migrate the VM, then press a key to continue...     (then waits for one COM1 byte)
 *     memtest: round K ok                                      (after checking + rewriting)
 *   mode=continuous:
 *     Begin continuous migration                               (then waits for one COM1 byte)
 *     <R passes, no output>
 *     End continuous migration
 *     End continuous migration (quiet)                         (then waits for one COM1 byte)
 *     <one more pass: memory checked after the last migration>
 *   mode=passes: one '.' per pass, then a newline when R passes are done (R > 0)
 *   memtest: PASS                                              exit code 0
 * Failures:
 *   MISMATCH at 0x<addr> expected 0x<value> got 0x<value>      exit code 1
 *   tsc went backwards                                          exit code 3
 *   lapic timer went backwards | lapic timer stuck              exit code 4
 *   bad argument: mode= (or rounds=, mb=, step=)                exit code 2
 *   memtest: mb=N does not fit in memory                        exit code 2
 */
#include "lib.inc"

#define MODE_REQUEST    0
#define MODE_CONTINUOUS 1
#define MODE_PASSES     2
#define GOLDEN          0x9E3779B9

main:
    /* mode= */
    movl $MODE_REQUEST, mode
    mov $key_mode, %esi
    call arg_find
    test %eax, %eax
    jz 1f
    mov $w_request, %edi
    call word_eq
    je 1f
    movl $MODE_CONTINUOUS, mode
    mov $w_continuous, %edi
    call word_eq
    je 1f
    movl $MODE_PASSES, mode
    mov $w_passes, %edi
    call word_eq
    je 1f
    jmp arg_bad
1:
    /* rounds= (default per mode) */
    mov mode, %eax
    mov default_rounds(,%eax,4), %eax
    mov $key_rounds, %esi
    call arg_dec
    mov %eax, rounds

    /* step= */
    mov $key_step, %esi
    mov $4, %eax
    call arg_dec
    cmp $4, %eax
    jb arg_bad
    cmp $4096, %eax
    ja arg_bad
    lea -1(%eax), %edx
    test %eax, %edx
    jnz arg_bad
    mov %eax, step

    /* mb= */
    mov $key_mb, %esi
    mov $16, %eax
    call arg_dec
    mov $name, %esi
    call ws_check
    mov %eax, mb
    shl $20, %eax
    add $WS_BASE, %eax
    mov %eax, ws_end

    PUTS("memtest: mode=")
    mov mode, %eax
    mov mode_names(,%eax,4), %esi
    call puts
    PUTS(" mb=")
    mov mb, %eax
    call put_dec
    PUTS(" rounds=")
    mov rounds, %eax
    call put_dec
    PUTS(" step=")
    mov step, %eax
    call put_dec
    NEWLINE

    call timer_start
    lfence
    rdtsc
    mov %eax, tsc_lo
    mov %edx, tsc_hi

    movl $0, gen
    call fill
    mov $key_corrupt, %esi
    xor %eax, %eax
    call arg_dec
    test %eax, %eax
    jz 1f
    mov ws_end, %eax
    sub $WS_BASE, %eax
    shr $1, %eax
    notl WS_BASE(%eax)
1:

    mov mode, %eax
    cmp $MODE_CONTINUOUS, %eax
    je continuous
    cmp $MODE_PASSES, %eax
    je passes

request:
    xor %ebx, %ebx
1:  cmp rounds, %ebx
    jae pass_ok
    PUTS("Now migrate the VM, then press a key to continue...\n")
    call getc
    call pass
    inc %ebx
    PUTS("memtest: round ")
    mov %ebx, %eax
    call put_dec
    PUTS(" ok\n")
    jmp 1b

continuous:
    PUTS("Begin continuous migration\n")
    call getc
    xor %ebx, %ebx
1:  cmp rounds, %ebx
    jae 2f
    call pass
    inc %ebx
    jmp 1b
2:  PUTS("End continuous migration\n")
    PUTS("End continuous migration (quiet)\n")
    call getc
    call pass
    jmp pass_ok

passes:
    xor %ebx, %ebx
1:  call pass
    inc %ebx
    mov $'.', %al
    call putc
    mov rounds, %eax
    test %eax, %eax
    jz 1b
    cmp %eax, %ebx
    jb 1b
    NEWLINE

pass_ok:
    mov LAPIC_TMCCT, %eax
    cmp $0xFFFFFFFF, %eax
    jne 1f
    PUTS("lapic timer stuck\n")
    mov $4, %eax
    jmp exit
1:  PUTS("memtest: PASS\n")
    xor %eax, %eax
    jmp exit

/* seed: %eax = generation; returns its pattern seed in %eax. */
seed:
    push %edx
    inc %eax
    mov $GOLDEN, %edx
    mul %edx
    pop %edx
    ret

/* fill: writes generation `gen` to the whole working set. */
fill:
    pusha
    mov gen, %eax
    call seed
    mov %eax, %esi
    mov step, %ecx
    mov $WS_BASE, %edi
    mov ws_end, %ebx
1:  mov %edi, %eax
    xor %esi, %eax
    mov %eax, (%edi)
    add %ecx, %edi
    cmp %ebx, %edi
    jb 1b
    popa
    ret

/* pass: checks every checked dword against generation `gen`, rewrites it with gen + 1,
   increments gen; checks the TSC once per page and the xAPIC timer once per pass. Seven
   instructions per dword: guest instructions are slow on nested hosts. */
pass:
    pusha
    mov gen, %eax
    call seed
    mov %eax, %esi              /* current seed */
    mov gen, %eax
    inc %eax
    call seed
    mov %eax, %ebp
    xor %esi, %ebp              /* current ^ next: turns a checked value into the next one */
    mov step, %ecx
    mov $WS_BASE, %edi
    mov ws_end, %ebx
1:  call tsc_check
    lea 4096(%edi), %edx        /* end of this page */
2:  mov %edi, %eax
    xor %esi, %eax
    cmp %eax, (%edi)
    jne mismatch
    xor %ebp, (%edi)
    add %ecx, %edi
    cmp %edx, %edi
    jb 2b
    cmp %ebx, %edi
    jb 1b
    incl gen
    call timer_check
    popa
    ret

/* mismatch: %edi = address, %eax = expected. */
mismatch:
    mov (%edi), %edx
    PUTS("MISMATCH at ")
    xchg %eax, %edi
    call put_hex
    PUTS(" expected ")
    mov %edi, %eax
    call put_hex
    PUTS(" got ")
    mov %edx, %eax
    call put_hex
    NEWLINE
    mov $1, %eax
    jmp exit

/* tsc_check: fails with exit code 3 if the TSC is below the last value read. */
tsc_check:
    push %eax
    push %edx
    lfence
    rdtsc
    cmp tsc_hi, %edx
    ja 1f
    jb 2f
    cmp tsc_lo, %eax
    jb 2f
1:  mov %eax, tsc_lo
    mov %edx, tsc_hi
    pop %edx
    pop %eax
    ret
2:  PUTS("tsc went backwards\n")
    mov $3, %eax
    jmp exit

/* timer_start: xAPIC software-enabled, timer one-shot, masked, divide by 128, from ~0. */
timer_start:
    movl $0x1FF, LAPIC_SVR
    movl $0x00010020, LAPIC_LVT_TIMER
    movl $0xA, LAPIC_TDCR
    movl $0xFFFFFFFF, LAPIC_TMICT
    movl $0xFFFFFFFF, timer_last
    ret

/* timer_check: fails with exit code 4 if the timer's current count grew. */
timer_check:
    push %eax
    mov LAPIC_TMCCT, %eax
    cmp timer_last, %eax
    ja 1f
    mov %eax, timer_last
    pop %eax
    ret
1:  PUTS("lapic timer went backwards\n")
    mov $4, %eax
    jmp exit

    .section .rodata
key_mode:     .asciz "mode="
key_rounds:   .asciz "rounds="
key_mb:       .asciz "mb="
key_step:     .asciz "step="
key_corrupt:  .asciz "corrupt="
name:         .asciz "memtest"
w_request:    .asciz "request"
w_continuous: .asciz "continuous"
w_passes:     .asciz "passes"
    .align 4
mode_names:     .long w_request, w_continuous, w_passes
default_rounds: .long 3, 100, 0

    .data
    .align 4
mode:       .long 0
rounds:     .long 0
mb:         .long 0
step:       .long 4
ws_end:     .long 0
gen:        .long 0
tsc_lo:     .long 0
tsc_hi:     .long 0
timer_last: .long 0
