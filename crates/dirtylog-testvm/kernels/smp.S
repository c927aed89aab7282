/*
 * smp: brings up every application processor with INIT-SIPI-SIPI through the xAPIC.
 *
 * The CPU count comes from fw_cfg (FW_CFG_NB_CPUS). The BSP copies a real-mode trampoline to
 * 0x7000 (SIPI vector 0x07; the page is overwritten, after the Multiboot info was read), sends
 * INIT then two SIPIs to all-excluding-self, and waits, timed by the PIT, up to 5 s for every
 * AP. Each AP goes real mode -> protected mode (the kernel's GDT) -> its own 4 KiB stack, takes
 * a spinlock, prints its line, atomically increments the counter of CPUs up, and halts.
 * No command-line options.
 *
 * Output:
 *   smp: N cpus expected
 *   cpu <apic id> up             (one line per AP, in the order they came up)
 *   smp: N cpus up               exit code 0
 * Failures:
 *   smp: timeout, K of N cpus up                  exit code 1
 *   smp: bad cpu count N (1..16 supported)        exit code 2
 */
#include "lib.inc"

#define MAX_CPUS      16
#define AP_STACK_SIZE 4096
#define TRAMPOLINE    0x7000
#define ICR_INIT      0x000C4500    /* INIT, level assert, all excluding self */
#define ICR_SIPI      (0x000C4600 | (TRAMPOLINE >> 12))

main:
    mov $FW_CFG_NB_CPUS, %eax
    mov $2, %ecx
    call fw_cfg_read
    mov %eax, ncpus
    cmp $1, %eax
    jb bad_count
    cmp $MAX_CPUS, %eax
    ja bad_count
    PUTS("smp: ")
    call put_dec
    PUTS(" cpus expected\n")
    cmp $1, %eax
    je all_up

    movl $0x1FF, LAPIC_SVR      /* software-enable the BSP's xAPIC, spurious vector 0xff */

    mov $tramp_start, %esi
    mov $TRAMPOLINE, %edi
    mov $(tramp_end - tramp_start), %ecx
    rep movsb

    call pit_start
    movl $0, LAPIC_ICR_HI
    movl $ICR_INIT, LAPIC_ICR_LO
    call icr_wait
    mov $(PIT_HZ / 100), %eax   /* 10 ms */
    call delay
    movl $ICR_SIPI, LAPIC_ICR_LO
    call icr_wait
    mov $(PIT_HZ / 5000), %eax  /* 200 us */
    call delay
    movl $ICR_SIPI, LAPIC_ICR_LO
    call icr_wait

    /* wait up to 5 s (PIT), with a poll-count bound in case the PIT does not count */
    xor %ebx, %ebx
1:  mov cpus_up, %eax
    cmp ncpus, %eax
    jae all_up
    pause
    call pit_ticks
    cmp $(PIT_HZ * 5), %eax
    jae timeout
    inc %ebx
    cmp $2000000, %ebx
    jb 1b

timeout:
    call lock
    PUTS("smp: timeout, ")
    mov cpus_up, %eax
    call put_dec
    PUTS(" of ")
    mov ncpus, %eax
    call put_dec
    PUTS(" cpus up\n")
    mov $1, %eax
    jmp exit

all_up:
    call lock
    PUTS("smp: ")
    mov cpus_up, %eax
    call put_dec
    PUTS(" cpus up\n")
    call unlock
    xor %eax, %eax
    jmp exit

bad_count:
    PUTS("smp: bad cpu count ")
    call put_dec
    PUTS(" (1..16 supported)\n")
    mov $2, %eax
    jmp exit

/* icr_wait: waits until the xAPIC has sent the last IPI (ICR delivery status clear). */
icr_wait:
    testl $0x1000, LAPIC_ICR_LO
    jz 1f
    pause
    jmp icr_wait
1:  ret

/* delay: waits %eax PIT ticks (pit_start must have run); bounded by a poll count. */
delay:
    push %ebx
    push %ecx
    push %edx
    mov %eax, %edx
    call pit_ticks
    add %eax, %edx
    xor %ecx, %ecx
1:  call pit_ticks
    cmp %edx, %eax
    jae 2f
    inc %ecx
    cmp $1000000, %ecx
    jb 1b
2:  pop %edx
    pop %ecx
    pop %ebx
    ret

/* lock / unlock: the spinlock serializing COM1 output between CPUs. */
lock:
    push %eax
1:  mov $1, %eax
    xchg %eax, print_lock
    test %eax, %eax
    jz 3f
2:  pause
    cmpl $0, print_lock
    jne 2b
    jmp 1b
3:  pop %eax
    ret
unlock:
    movl $0, print_lock
    ret

/* The AP trampoline, copied to TRAMPOLINE: starts in real mode at CS = TRAMPOLINE >> 4,
   IP = 0; loads the kernel's GDT and enters protected mode at ap_entry. */
    .code16
tramp_start:
    cli
    lgdtl %cs:tramp_gdtr - tramp_start
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmpl $SEL_CODE, $ap_entry
    .align 4
tramp_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
tramp_end:
    .code32

ap_entry:
    mov $SEL_DATA, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $1, %eax
    lock xadd %eax, ap_ticket   /* this AP's stack index */
    cmp $(MAX_CPUS - 1), %eax
    jae ap_park
    inc %eax
    shl $12, %eax
    add $ap_stacks, %eax
    mov %eax, %esp
    call lapic_id
    call lock
    PUTS("cpu ")
    call put_dec
    PUTS(" up\n")
    lock incl cpus_up
    call unlock
ap_park:
    cli
    hlt
    jmp ap_park

    .data
    .align 4
ncpus:      .long 0
cpus_up:    .long 1             /* the BSP */
ap_ticket:  .long 0
print_lock: .long 0

    .bss
    .align 4096
ap_stacks:
    .space (MAX_CPUS - 1) * AP_STACK_SIZE
