#!/usr/bin/env bash
# Runs a selection of kvm-unit-tests' x86 tests (from x86/unittests.cfg) under QEMU and under
# `dirtylog run`, and prints one table row per test: exit status and SUMMARY line of each.
#
#   bench/kvm_unit_tests.sh KUT_DIR [TEST ...]
#
# KUT_DIR is a built kvm-unit-tests tree (./configure && make, x86_64), kept outside this repo.
# Env: DIRTYLOG (default: target/release/dirtylog next to this script), QEMU
# (default qemu-system-x86_64), TIMEOUT_S (default 60, per run), LOGDIR (default a temp dir;
# every run's stdout/stderr is kept there), HOSTCPU=1 adds a column "QEMU -cpu host" (QEMU
# with the cfg's other parameters but the host's CPUID, which is what dirtylog gives guests).
# A test passes when the exit status is 1 (the guest's exit(0) → 0<<1|1); the SUMMARY line is
# shown ("-" when the test prints none, as vmexit does). Every run is bounded by `timeout`; QEMU runs in the foreground and is ended by it.
set -u
here=$(cd "$(dirname "$0")" && pwd)
kut=${1:?usage: $0 KUT_DIR [TEST ...]}; shift
kut=$(cd "$kut" && pwd)
export DIRTYLOG=${DIRTYLOG:-$here/../target/release/dirtylog}
export QEMU=${QEMU:-qemu-system-x86_64}
export TIMEOUT_S=${TIMEOUT_S:-60}
export LOGDIR=${LOGDIR:-$(mktemp -d /tmp/kut-bench.XXXXXX)}
export HOSTCPU=${HOSTCPU:-0}
default_tests="x2apic xapic ioapic smptest smptest3 vmexit_cpuid vmexit_vmcall vmexit_inl_pmtimer
vmexit_ipi vmexit_tscdeadline access smap pku asyncpf emulator eventinj hypercall idt_test
memory msr msr64 pmu realmode s3 setjmp sieve syscall tsc tsc_adjust xsave rmap_chain
kvmclock_test pcid-enabled umip la57 debug hyperv_clock tsx-ctrl"
tests=${*:-$default_tests}
exec python3 - "$kut" $tests <<'PY'
import os, re, shlex, subprocess, sys, time
kut, names = sys.argv[1], sys.argv[2:]
dl, qemu, tmo, logdir = os.environ['DIRTYLOG'], os.environ['QEMU'], int(os.environ['TIMEOUT_S']), os.environ['LOGDIR']
hostcpu = os.environ['HOSTCPU'] == '1'

# x86/unittests.cfg: [name] then key = value lines.
cfg, cur = {}, None
for line in open(os.path.join(kut, 'x86/unittests.cfg')):
    line = line.rstrip('\n')
    m = re.match(r'^\[(.+)\]$', line)
    if m: cur = cfg.setdefault(m.group(1), {}); continue
    m = re.match(r'^(\w+)\s*=\s*(.*)$', line)
    if m and cur is not None: cur[m.group(1)] = m.group(2)

def args_of(s):  # test_args: shell words, with `date +%s` evaluated as the runner would
    s = s.replace('`date +%s`', str(int(time.time())))
    return ' '.join(shlex.split(s))

def run(tag, name, cmd):
    t0 = time.time()
    with open(f'{logdir}/{name}.{tag}.out', 'wb') as o, open(f'{logdir}/{name}.{tag}.err', 'wb') as e:
        p = subprocess.run(['timeout', '-k', '5', str(tmo)] + cmd, stdin=subprocess.DEVNULL, stdout=o, stderr=e)
    dt = time.time() - t0
    out = open(f'{logdir}/{name}.{tag}.out', errors='replace').read()
    summ = [l.strip() for l in out.splitlines() if l.startswith('SUMMARY:')]
    summ = summ[-1][len('SUMMARY: '):] if summ else '-'
    ok = p.returncode == 1  # exit(0); a few tests (vmexit) print no SUMMARY line
    return p.returncode, summ, ok, dt

def drop_cpu(params):
    w = shlex.split(params); r = []; i = 0
    while i < len(w):
        if w[i] in ('-cpu', '-enable-kvm'):
            i += 2 if w[i] == '-cpu' else 1; continue
        r.append(w[i]); i += 1
    return r

cols = ['QEMU (cfg -cpu)'] + (['QEMU -cpu host'] if hostcpu else []) + ['dirtylog run']
print(f'# kvm-unit-tests in {kut}; timeout {tmo} s per run; logs in {logdir}')
print('| test | smp | ' + ' | '.join(cols) + ' |')
print('|---|---|' + '---|' * len(cols))
npass = [0] * len(cols)
for name in names:
    c = cfg.get(name)
    if c is None: print(f'| {name} | | not in unittests.cfg |'); continue
    flat = os.path.join(kut, 'x86', c['file'])
    if not os.path.exists(flat): print(f'| {name} | | {c["file"]} not built |'); continue
    smp = c.get('smp', '1'); targs = args_of(c.get('test_args', '')); qp = c.get('qemu_params', '')
    base = [qemu, '--no-reboot', '-nodefaults', '-global', 'kvm-pit.lost_tick_policy=discard',
            '-device', 'pc-testdev', '-device', 'isa-debug-exit,iobase=0xf4,iosize=0x4',
            '-display', 'none', '-serial', 'stdio', '-device', 'pci-testdev', '-machine', 'accel=kvm',
            '-kernel', flat, '-smp', smp]
    app = ['-append', targs] if targs else []
    runs = [('qemu', base + shlex.split(qp) + app)]
    if hostcpu: runs.append(('qemuhost', base + drop_cpu(qp) + ['-cpu', 'host'] + app))
    # dirtylog: 128 MiB like QEMU's default; a cfg "-m" is passed as --mem.
    mem = '128M'
    w = shlex.split(qp)
    if '-m' in w: mem = w[w.index('-m') + 1].upper().rstrip('B'); mem = mem if mem[-1] in 'MG' else mem + 'M'
    runs.append(('dirtylog', [dl, 'run', '--kernel', flat, '--smp', smp, '--mem', mem] + (['--append', targs] if targs else [])))
    cells = []
    for i, (tag, cmd) in enumerate(runs):
        rc, summ, ok, dt = run(tag, name, cmd)
        npass[i] += ok
        cells.append(f'{"PASS" if ok else "FAIL"} {rc}, {summ} ({dt:.1f} s)')
    print(f'| {name} | {smp} | ' + ' | '.join(cells) + ' |', flush=True)
print('| passed | | ' + ' | '.join(f'{n}/{len(names)}' for n in npass) + ' |')
PY
