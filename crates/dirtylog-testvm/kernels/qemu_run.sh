#!/bin/sh
# Runs one of dirtylog's test kernels under QEMU (benchmark side; not a CI dependency), with the
# command line the kernels are validated against. Serial is on stdin/stdout; the exit status is
# QEMU's: (code << 1) | 1 for a guest exit through isa-debug-exit, 124 when the time limit hits.
#
#   qemu_run.sh KERNEL [ARGS...]
#
# KERNEL is an ELF file, or a kernel name (info, echo, smp, memtest, spin, halt), built from
# this directory with gcc/ld into ${TMPDIR:-/tmp}/dirtylog-kernels/NAME.elf. ARGS become the
# Multiboot command line (-append). Environment: QEMU (default qemu-system-x86_64),
# QEMU_TIMEOUT (seconds, default 60), QEMU_SMP (default 2), QEMU_MEM (default 128M),
# QEMU_INITRD (a module: "FILE [ARGS]"), QEMU_ACCEL (default kvm).
set -eu
if [ $# -lt 1 ]; then
  echo "usage: $0 KERNEL [ARGS...]" >&2
  exit 2
fi
kernel=$1
shift
here=$(cd "$(dirname "$0")" && pwd)
if [ ! -f "$kernel" ]; then
  if [ ! -f "$here/$kernel.S" ]; then
    echo "$0: $kernel is neither a file nor a kernel in $here" >&2
    exit 2
  fi
  out=${TMPDIR:-/tmp}/dirtylog-kernels
  mkdir -p "$out"
  gcc -m32 -c -nostdinc -I "$here" -o "$out/$kernel.o" "$here/$kernel.S"
  ld -m elf_i386 -T "$here/link.ld" -o "$out/$kernel.elf" "$out/$kernel.o"
  kernel=$out/$kernel.elf
fi
set -- -accel "${QEMU_ACCEL:-kvm}" -m "${QEMU_MEM:-128M}" -smp "${QEMU_SMP:-2}" \
  -kernel "$kernel" -append "$*" \
  -display none -nodefaults -no-user-config -serial stdio \
  -device isa-debug-exit,iobase=0xf4,iosize=4 -no-reboot
if [ -n "${QEMU_INITRD:-}" ]; then
  set -- "$@" -initrd "$QEMU_INITRD"
fi
exec timeout --foreground -k 5 "${QEMU_TIMEOUT:-60}" "${QEMU:-qemu-system-x86_64}" "$@"
