#!/usr/bin/env bash
# The peer workload (a Multiboot dirtier that rewrites one dword per page of a 64 MiB working
# set and prints '.' after each pass) migrated once by QEMU 7.2 and once by dirtylog, alternating,
# RUNS times each; prints every run as a JSON line, then a table of medians.
#
#   bench/peer_side_by_side.sh PEER_DIR [RUNS]
#
# PEER_DIR: a copy of ../shared/peer (built here with its build.sh if guest-ws64m.elf is missing;
# never the shared directory itself). Env: DIRTYLOG (default target/release/dirtylog), WS (64).
# QEMU side: `python3 PEER_DIR/qemu_migrate.py --ws WS` (1 GiB, downtime limit 300 ms; it waits
# 2 s, counts the guest's dots for 1 s, then migrates). dirtylog side:
# `dirtylog demo --kernel PEER_DIR/guest-wsWSm.elf --mem 1G --vcpus 1 --json --warmup-ms 3000`
# (same 300 ms downtime target by default), and, before it, the guest's pass rate under
# `dirtylog run` ((dots after 4 s - dots after 2 s) / 2, from two runs; QEMU's window is 2-3 s).
# A run whose total-time is reported as 0 (QEMU 7.2 sometimes does) is left out of the medians.
# Every process is bounded by `timeout`.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
peer=$(cd "${1:?usage: $0 PEER_DIR [RUNS]}" && pwd)
runs=${2:-3}
export DIRTYLOG=${DIRTYLOG:-$here/../target/release/dirtylog}
export WS=${WS:-64}
case "$peer" in /work/shared/*) echo "$0: use a copy of the peer directory" >&2; exit 2;; esac
[ -f "$peer/guest-ws${WS}m.elf" ] || "$peer/build.sh"
exec python3 - "$peer" "$runs" <<'PY'
import json, os, statistics, subprocess, sys, time
peer, runs = sys.argv[1], int(sys.argv[2])
dl, ws = os.environ['DIRTYLOG'], int(os.environ['WS'])
elf = f'{peer}/guest-ws{ws}m.elf'

def qemu():
    p = subprocess.run(['timeout', '-k', '5', '120', 'python3', f'{peer}/qemu_migrate.py', '--ws', str(ws)],
                       capture_output=True, text=True)
    j = json.loads(p.stdout.strip().splitlines()[-1])
    return {'status': j.get('status'), 'total_ms': j.get('total-time'), 'down_ms': j.get('downtime'),
            'bytes': j.get('transferred'), 'passes_per_s_before': j.get('guest_passes_per_s_before'),
            'passes_per_s_after': j.get('dest_guest_passes_per_s_after'),
            'rounds': j.get('dirty-sync-count')}

def dirtylog_rate():
    # The guest under `dirtylog run`: (dots after 4 s - dots after 2 s) / 2, from two runs ended
    # by --time-limit-s (its console is flushed at newlines and at exit, and the guest prints
    # no newline, so the dots cannot be watched while it runs).
    n = {}
    for s in (2, 4):
        p = subprocess.run(['timeout', '-k', '5', '20', dl, 'run', '--kernel', elf, '--mem', '1G',
                            '--time-limit-s', str(s)], stdin=subprocess.DEVNULL,
                           capture_output=True)
        n[s] = p.stdout.count(b'.')
    return (n[4] - n[2]) / 2

def ours():
    rate = dirtylog_rate()
    p = subprocess.run(['timeout', '-k', '5', '120', dl, 'demo', '--kernel', elf, '--mem', '1G', '--vcpus', '1',
                        '--json', '--warmup-ms', '3000'], capture_output=True, text=True)
    j = json.loads(p.stdout.splitlines()[-1])  # the last JSON line: the outcome
    m = j['source']['migration']
    samples = [e for e in j['destination'] if e.get('event') == 'sample']
    after = None
    if len(samples) >= 2:
        a, b = samples[0], samples[-1]
        after = round((b['guest-writes'] - a['guest-writes']) * 1000 / max(1, b['ms'] - a['ms']), 1)
    return {'status': m.get('status', j['source'].get('status')), 'total_ms': m['total-time'],
            'down_ms': m['downtime'], 'bytes': m['transferred'], 'passes_per_s_before': rate,
            'passes_per_s_after': after, 'rounds': m.get('dirty-sync-count')}

res = {'qemu': [], 'dirtylog': []}
for i in range(runs):
    for name in (['qemu', 'dirtylog'] if i % 2 == 0 else ['dirtylog', 'qemu']):
        r = qemu() if name == 'qemu' else ours()
        res[name].append(r)
        print(json.dumps({'run': i, 'system': name, **r}), flush=True)

def med(rs, k):
    v = [r[k] for r in rs if r.get(k) is not None and not (k in ('total_ms', 'down_ms') and not r['total_ms'])]
    return statistics.median(v) if v else None
print(f'\npeer guest ws {ws} MiB, 1 GiB, 1 vCPU, downtime target 300 ms; {runs} alternated runs each, medians')
print('| system | completed | total-time, ms | downtime, ms | bytes | sync rounds | guest passes/s before (MiB/s dirtied) | passes/s on destination |')
print('|---|---|---|---|---|---|---|---|')
M = {}
for name in ('qemu', 'dirtylog'):
    rs = res[name]; M[name] = {k: med(rs, k) for k in ('total_ms', 'down_ms', 'bytes', 'rounds', 'passes_per_s_before', 'passes_per_s_after')}
    m = M[name]; ok = sum(r['status'] == 'completed' for r in rs)
    pb = m['passes_per_s_before']
    print(f"| {name} | {ok}/{len(rs)} | {m['total_ms']} | {m['down_ms']} | {m['bytes'] / 2**20:.1f} MiB | {m['rounds']} | "
          f"{pb} ({pb * ws if pb is not None else '-'}) | {m['passes_per_s_after']} |")
q, o = M['qemu'], M['dirtylog']
r = lambda k: f"{o[k] / q[k]:.2f}" if o[k] and q[k] else 'n/a'
print(f"| dirtylog / qemu | | {r('total_ms')} | {r('down_ms')} | {r('bytes')} | | {r('passes_per_s_before')} | {r('passes_per_s_after')} |")
PY
