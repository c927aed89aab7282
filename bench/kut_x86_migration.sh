#!/usr/bin/env bash
# kvm-unit-tests has no x86 migration tests: its migration tests (common/selftest-migration.c,
# common/memory-verify.c, using lib/migrate.c's serial handshake) are built for arm, powerpc and
# s390x only, because x86's lib has no serial input (__getchar) and no asm/time.h. This script
# adds both to a kvm-unit-tests tree OUTSIDE this repo (a local port, not upstream code), builds
# x86/selftest-migration.flat and x86/memory-verify.flat, then runs them:
#   - under QEMU with kvm-unit-tests' own migration runner (run_migration in
#     scripts/arch-run.bash, which migrates between QEMU processes on each "Now migrate the VM"
#     and back to back while continuous), and
#   - under `dirtylog run --migrate on-request`.
#
#   bench/kut_x86_migration.sh KUT_DIR
#
# get_clock_ms() here is rdtsc / (TSC_KHZ), TSC_KHZ defaulting to this host's 2300000 (the
# tests only use it to bound loops). Env: DIRTYLOG, TIMEOUT_S (default 90), TSC_KHZ.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
kut=$(cd "${1:?usage: $0 KUT_DIR}" && pwd)
case "$kut" in "$(cd "$here/.." && pwd)"*) echo "$0: KUT_DIR must be outside this repo" >&2; exit 2;; esac
DIRTYLOG=${DIRTYLOG:-$here/../target/release/dirtylog}
TIMEOUT_S=${TIMEOUT_S:-90}
TSC_KHZ=${TSC_KHZ:-2300000}
cd "$kut"
if ! grep -q "__getchar" lib/x86/io.c; then
  cat >> lib/x86/io.c <<'C'

/* Local port for migration tests: poll COM1 for one received byte. */
int __getchar(void)
{
	if (!(inb(serial_iobase + 0x05) & 0x01))
		return -1;
	return inb(serial_iobase + 0x00);
}
C
fi
cat > lib/x86/asm/time.h <<C
#ifndef _ASMX86_TIME_H_
#define _ASMX86_TIME_H_
/* Local port: milliseconds from the TSC at an assumed $TSC_KHZ kHz. */
#include "processor.h"
#include "delay.h"
static inline uint64_t get_clock_ms(void) { return rdtsc() / $TSC_KHZ; }
static inline void mdelay(unsigned long ms) { delay((u64)ms * $TSC_KHZ); }
#endif
C
ln -sf ../common/selftest-migration.c x86/selftest-migration.c
ln -sf ../common/memory-verify.c x86/memory-verify.c
if ! grep -q "selftest-migration" x86/Makefile.common; then
  # Before the rules that expand these lists (libcflat's objects, test_cases).
  sed -i -e '/^cflatobjs += lib\/x86\/pmu.o/a cflatobjs += lib/migrate.o lib/getchar.o' \
    -e '/^test_cases:/i tests-common += $(TEST_DIR)/selftest-migration.$(exe) $(TEST_DIR)/memory-verify.$(exe)' \
    x86/Makefile.common
fi
if ! grep -q "^\[selftest-migration\]" x86/unittests.cfg; then
  cat >> x86/unittests.cfg <<'M'

[selftest-migration]
file = selftest-migration.flat
groups = migration

[memory-verify]
file = memory-verify.flat
groups = migration
M
fi
make -j2 >/dev/null
ls -la x86/selftest-migration.flat x86/memory-verify.flat

# x86/run ignores MIGRATION=yes (only arm/powerpc/s390x's run scripts call migration_cmd), so
# call the harness's run_migration directly with x86/run's QEMU command line; a wrapper counts
# the QEMU processes it starts (the first is the source, each further one a migration).
wrap=$(mktemp /tmp/kutmig-qemu.XXXXXX)
cat > "$wrap" <<W
#!/bin/sh
echo start >> $wrap.count
exec qemu-system-x86_64 "\$@"
W
chmod +x "$wrap"
for t in selftest-migration memory-verify; do
  echo "== $t: QEMU 7.2, kvm-unit-tests' run_migration (scripts/arch-run.bash)"
  rm -f "$wrap.count"
  start=$(date +%s.%N)
  set +e
  timeout -k 5 "$TIMEOUT_S" bash -c 'source config.mak; source scripts/arch-run.bash; run_migration "$@"' _ \
    "$wrap" --no-reboot -nodefaults -device pc-testdev -device isa-debug-exit,iobase=0xf4,iosize=0x4 \
    -display none -serial stdio -machine accel=kvm -kernel x86/$t.flat -smp 1 \
    > /tmp/kutmig.$t.qemu.log 2>&1 < /dev/null
  rc=$?
  set -e
  n=$(($(cat "$wrap.count" 2>/dev/null | wc -l) - 1))
  echo "status $rc, $(grep -a SUMMARY /tmp/kutmig.$t.qemu.log | tail -1), $n migrations, $(echo "$(date +%s.%N) - $start" | bc) s"
  echo "== $t: dirtylog run --migrate on-request"
  start=$(date +%s.%N)
  set +e
  timeout -k 5 "$TIMEOUT_S" "$DIRTYLOG" run --kernel x86/$t.flat --migrate on-request --json \
    > /tmp/kutmig.$t.dirtylog.out 2> /tmp/kutmig.$t.dirtylog.err < /dev/null
  rc=$?
  set -e
  echo "status $rc, $(grep -a SUMMARY /tmp/kutmig.$t.dirtylog.out | tail -1), $(echo "$(date +%s.%N) - $start" | bc) s"
  python3 - /tmp/kutmig.$t.dirtylog.err <<'PY'
import json, statistics, sys
recs, other = [], []
for l in open(sys.argv[1], errors='replace'):
    try: j = json.loads(l)
    except ValueError: other.append(l.rstrip()); continue
    if j.get('event') == 'migration':  # keys: downtime-ms / total-time-ms (older builds: _)
        recs.append({k.replace('-', '_'): v for k, v in j.items()})
    elif j.get('event') == 'done': print('  summary:', json.dumps(j))
if recs:
    by = {}
    for r in recs: by.setdefault(r['trigger'], []).append(r)
    for k, rs in by.items():
        dt = [r['downtime_ms'] for r in rs]; tt = [r['total_time_ms'] for r in rs]
        print(f'  {k}: {len(rs)} migrations, total-time median {statistics.median(tt)} ms (max {max(tt)}), '
              f'downtime median {statistics.median(dt)} ms (max {max(dt)})')
for l in other[:10]: print('  stderr:', l)
PY
done
rm -f "$wrap" "$wrap.count"
