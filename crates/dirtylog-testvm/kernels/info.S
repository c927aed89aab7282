/*
 * info: reports what the loader and the machine passed, then exits with a chosen status.
 *
 * Command line: exit=N (decimal, default 0).
 * Output (one line each; "none" when the loader did not pass the field):
 *   cmdline: <the whole Multiboot command line>
 *   mem_lower: <KiB>
 *   mem_upper: <KiB>
 *   mmap entries: <count>
 *   cpus: <fw_cfg FW_CFG_NB_CPUS>
 *   ram: <fw_cfg FW_CFG_RAM_SIZE in MiB>
 *   module: <length> bytes <first up to 32 bytes, non-printable ones as '.'>   (first module, if any)
 *   rep outsb: ok        (written with one `rep outsb`)
 *   exit: <N>
 * then exits with code N. A wrong boot magic prints "info: bad magic 0x..." and exits with 2;
 * an exit value that is not a 32-bit decimal prints only "bad argument: exit=" and exits with 2.
 */
#include "lib.inc"

main:
    cmpl $MB_BOOT_MAGIC, mb_magic
    je 1f
    PUTS("info: bad magic ")
    mov mb_magic, %eax
    call put_hex
    NEWLINE
    mov $2, %eax
    jmp exit
1:  mov $key_exit, %esi
    xor %eax, %eax
    call arg_dec
    mov %eax, exit_code
    mov mb_info, %ebx
    mov MBI_FLAGS(%ebx), %edx

    PUTS("cmdline: ")
    test $MBI_F_CMDLINE, %edx
    jz 2f
    mov MBI_CMDLINE(%ebx), %esi
    call puts
    jmp 3f
2:  PUTS("none")
3:  NEWLINE

    PUTS("mem_lower: ")
    test $MBI_F_MEM, %edx
    jz 2f
    mov MBI_MEM_LOWER(%ebx), %eax
    call put_dec
    PUTS("\nmem_upper: ")
    mov MBI_MEM_UPPER(%ebx), %eax
    call put_dec
    jmp 3f
2:  PUTS("none\nmem_upper: none")
3:  NEWLINE

    PUTS("mmap entries: ")
    test $MBI_F_MMAP, %edx
    jz 2f
    mov MBI_MMAP_ADDR(%ebx), %esi
    mov MBI_MMAP_LENGTH(%ebx), %edi
    add %esi, %edi              /* end */
    xor %eax, %eax
4:  cmp %edi, %esi
    jae 5f
    inc %eax
    mov (%esi), %ecx            /* entry size, not counting the size field */
    lea 4(%esi,%ecx), %esi
    jmp 4b
5:  call put_dec
    jmp 3f
2:  PUTS("none")
3:  NEWLINE

    PUTS("cpus: ")
    mov $FW_CFG_NB_CPUS, %eax
    mov $2, %ecx
    call fw_cfg_read
    call put_dec
    PUTS("\nram: ")
    mov $FW_CFG_RAM_SIZE, %eax
    mov $8, %ecx
    call fw_cfg_read
    shrd $20, %edx, %eax
    call put_dec
    NEWLINE

    mov MBI_FLAGS(%ebx), %edx
    test $MBI_F_MODS, %edx
    jz 3f
    cmpl $0, MBI_MODS_COUNT(%ebx)
    je 3f
    mov MBI_MODS_ADDR(%ebx), %edi
    mov (%edi), %esi            /* mod_start */
    mov 4(%edi), %ecx           /* mod_end */
    sub %esi, %ecx
    PUTS("module: ")
    mov %ecx, %eax
    call put_dec
    PUTS(" bytes ")
    cmp $32, %ecx
    jbe 4f
    mov $32, %ecx
4:  test %ecx, %ecx
    jz 6f
5:  lodsb
    cmp $0x20, %al
    jb 7f
    cmp $0x7e, %al
    jbe 8f
7:  mov $'.', %al
8:  call putc
    loop 5b
6:  NEWLINE
3:
    /* One line written by a single string instruction (rep outsb to COM1): a VMM must send
       every byte to the same port. */
    mov $rep_line, %esi
    mov $(rep_line_end - rep_line), %ecx
    mov $0x3f8, %dx
    cld
    rep outsb
    PUTS("exit: ")
    mov exit_code, %eax
    call put_dec
    NEWLINE
    jmp exit

    .section .rodata
key_exit: .asciz "exit="
rep_line: .ascii "rep outsb: ok\n"
rep_line_end:

    .data
    .align 4
exit_code: .long 0
