#!/usr/bin/env python3
"""QEMU 7.2 and dirtylog migrating the same guest, side by side (issue 9, "Performance").

  bench/side_by_side.py [--peer DIR] [--pairs 3] [--mem 1G,4G] [--ws 64,256] [--verify MODE]
  bench/side_by_side.py --quick                    # 1 pair, 1 GiB, ws 64 MiB (< 2 minutes)
  bench/side_by_side.py --max-rate [--mem 1G] [--rate-ws 64,128,...] [--limit-s 30]
  bench/side_by_side.py --bulk [--bulk-runs 5] [--bulk-mib 1024] [--connections 1,2]

The guest: the peer dirtier (../shared/peer/guest.S, a Multiboot v1 kernel that increments one
dword in every 4 KiB page of [4 MiB, 4 MiB + WS) as fast as it can and writes '.' to COM1 after
every pass), the same ELF on both sides. --peer DIR is a copy of ../shared/peer made here if
missing (default /tmp/peer; never the shared directory, never inside this repo), built with
its build.sh (ws 64 and 256); other working sets (--max-rate) are built in the copy with
build.sh's own gcc/ld lines and another -DWS_SIZE.

Matrix (default): for each guest memory in --mem and working set in --ws, --pairs alternated
pairs (QEMU first in even pairs, dirtylog first in odd ones) of
  QEMU:     python3 PEER/qemu_migrate.py --ws WS --mem MEM --downtime-ms 300 --limit-s L
            (two qemu-system-x86_64 -accel kvm, loopback TCP, max-bandwidth 10 GiB/s, i.e. no
            limit; it waits for the guest's first bytes, 2 s, counts the dots for 1 s, then
            migrates and reports QEMU's own query-migrate numbers)
  dirtylog: dirtylog demo --kernel PEER/guest-wsWSm.elf --mem MEM --vcpus 1 --json
            --warmup-ms 3000 --downtime-ms 300 --timeout-s L [--verify MODE]
            (no bandwidth limit; the destination is its `migrate receive` child process),
            preceded by the guest's pass rate under `dirtylog run` measured the way
            qemu_migrate.py does it: dots in the 1 s window starting 2 s after the first two.
Per run: status, total-time, downtime, transferred bytes, sync rounds, guest passes/s before
migration (x WS = MiB/s dirtied), and the peak RSS of every process of the run (QEMU: source
and destination qemu-system-x86_64; ours: the demo (source) and its receiver child). Peak RSS
is read by polling (every --poll-ms, default 100): /proc/PID/status VmHWM (the kernel's exact
peak) and /proc/PID/smaps, where the guest RAM is the anonymous mappings of at least 256 MiB
(and at most the guest size); "beyond guest" is the larger of (VmHWM - the largest guest RAM
Rss seen) and the largest sampled (all Rss - guest RAM Rss): a sampled lower bound of what the
process holds besides the guest memory it touched. Medians per system; ratios dirtylog / QEMU.
QEMU 7.2 marks a migration "completed" a moment before it fills in total-time and downtime, so
qemu_migrate.py's poll sometimes reads 0 for both; qemu_migrate.py is therefore run unchanged
as a module through a shim that repeats such a query-migrate until they are set
(--no-qemu-requery: bare; runs still reporting total-time 0 are left out of the time medians).

--max-rate: the peer guest has no rate knob (it dirties as fast as it runs), so the knob is
the working set: a bigger one means more distinct pages dirtied per round at the same write
speed. For each system, without and with auto-converge, the working sets of --rate-ws are
tried in ascending order (one run each, alternating systems) until one does not complete
within --limit-s (default 30 s; QEMU's own cancel, ours --timeout-s with --on-timeout cancel
and --max-rounds 1000, since QEMU has no round cap); the table gives the largest that did,
with its dirty rate. Guest memory: the first of --mem.

--bulk: our engine's bulk pass against a raw loopback TCP stream of the same bytes, measured
in the same process (crates/dirtylog-testvm/examples/kvm_loopback_throughput.rs, built here
with cargo), --bulk-runs runs per connection count, alternating connection counts; medians.

Every process is started here in its own session and ended by its PID/PGID after a bounded
wait (--limit-s + 60 s); a migration's bytes are bounded by that time (no byte cap exists in
either system); captured output is capped (--max-output-mib, the run is ended past it). JSON lines of every run go to --out
(default /tmp/side_by_side.jsonl). Env: DIRTYLOG (binary, default target/release/dirtylog),
VERIFY (strict|background|off; passed as --verify if `dirtylog demo --help` has it).
"""
import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
SHARED_PEER = '/work/shared/peer'
MIB = 1 << 20
GUEST_MAP_MIN = 256 * MIB


def parse_size(s):
    m = re.fullmatch(r'(\d+)([KMGT]?)i?B?', s.strip(), re.I)
    if not m:
        raise argparse.ArgumentTypeError(f'bad size {s!r}')
    return int(m.group(1)) << {'': 0, 'K': 10, 'M': 20, 'G': 30, 'T': 40}[m.group(2).upper()]


def size_arg(n):
    return f'{n >> 30}G' if n % (1 << 30) == 0 else f'{n >> 20}M'


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Process tree and memory polling


def children_of(pid):
    """Direct and indirect children of pid, from /proc/*/stat."""
    ppid = {}
    for d in os.listdir('/proc'):
        if not d.isdigit():
            continue
        try:
            with open(f'/proc/{d}/stat') as f:
                s = f.read()
            ppid[int(d)] = int(s[s.rindex(')') + 2:].split()[1])
        except (OSError, ValueError, IndexError):
            pass
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        for c, pp in ppid.items():
            if pp == p:
                out.append(c)
                todo.append(c)
    return out


def read_cmdline(pid):
    try:
        with open(f'/proc/{pid}/cmdline', 'rb') as f:
            return f.read().replace(b'\0', b' ').decode(errors='replace').strip()
    except OSError:
        return ''


def read_hwm_kib(pid):
    try:
        with open(f'/proc/{pid}/status') as f:
            for line in f:
                if line.startswith('VmHWM:'):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


HEADER = re.compile(r'^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$')


def read_smaps(pid, guest_bytes):
    """(all Rss KiB, guest RAM Rss KiB, sizes of the mappings counted as guest RAM)."""
    total = guest = 0
    sizes = []
    cur_guest = False
    try:
        with open(f'/proc/{pid}/smaps') as f:
            for line in f:
                m = HEADER.match(line)
                if m:
                    size = int(m.group(2), 16) - int(m.group(1), 16)
                    name = m.group(4)
                    anon = name == '' or name.startswith('[anon') or name.startswith('/memfd:') \
                        or name.startswith('memfd:')
                    cur_guest = anon and GUEST_MAP_MIN <= size <= guest_bytes + 64 * MIB
                    if cur_guest:
                        sizes.append(size)
                elif line.startswith('Rss:'):
                    kib = int(line.split()[1])
                    total += kib
                    if cur_guest:
                        guest += kib
    except (OSError, ValueError):
        return None
    return total, guest, sizes


class MemPoller(threading.Thread):
    """Polls every process under `root` (root included): VmHWM and smaps."""

    def __init__(self, root, guest_bytes, poll_s, classify, out_files=(), max_output=0):
        super().__init__(daemon=True)
        self.root, self.guest_bytes, self.poll_s = root, guest_bytes, poll_s
        self.classify, self.out_files, self.max_output = classify, out_files, max_output
        self.procs = {}  # pid -> dict
        self.stop = threading.Event()
        self.output_overflow = False

    def run(self):
        while not self.stop.is_set():
            for pid in [self.root] + children_of(self.root):
                # Classified on every poll, and counted afresh when the command line changes: a
                # child seen between fork and exec still shows its parent's command line (and,
                # after fork, its parent's RSS).
                cl = read_cmdline(pid)
                if not cl:  # gone, or a zombie: keep what was measured
                    continue
                role = self.classify(pid, cl)
                p = self.procs.get(pid)
                if p is not None and p['cmdline'] != cl:
                    del self.procs[pid]
                    p = None
                if role is None:
                    continue
                if p is None:
                    p = self.procs.setdefault(pid, {'role': role, 'cmdline': cl, 'hwm_kib': 0, 'guest_kib': 0,
                                                    'beyond_sampled_kib': 0, 'guest_maps': []})
                hwm = read_hwm_kib(pid)
                sm = read_smaps(pid, self.guest_bytes)
                if hwm:
                    p['hwm_kib'] = max(p['hwm_kib'], hwm)
                if sm:
                    total, guest, sizes = sm
                    p['guest_kib'] = max(p['guest_kib'], guest)
                    p['beyond_sampled_kib'] = max(p['beyond_sampled_kib'], total - guest)
                    if sizes:
                        p['guest_maps'] = [s // MIB for s in sizes]
            if self.max_output:
                for fn in self.out_files:
                    try:
                        if os.path.getsize(fn) > self.max_output:
                            self.output_overflow = True
                    except OSError:
                        pass
            self.stop.wait(self.poll_s)

    def result(self):
        out = {}
        for p in self.procs.values():
            beyond = max(p['hwm_kib'] - p['guest_kib'], p['beyond_sampled_kib'])
            r = {'hwm_mib': round(p['hwm_kib'] / 1024, 1), 'guest_rss_mib': round(p['guest_kib'] / 1024, 1),
                 'beyond_guest_mib': round(beyond / 1024, 1), 'guest_maps_mib': p['guest_maps']}
            role = p['role']
            if role in out:  # keep the larger if a role matched twice
                if out[role]['hwm_mib'] >= r['hwm_mib']:
                    continue
            out[role] = r
        return out


def run_bounded(cmd, limit_s, guest_bytes, classify, poll_s, max_output, env=None):
    """Run cmd in its own session with stdout/stderr to temp files, polling memory; end it by
    its process group after limit_s (or when its output passes max_output bytes)."""
    d = tempfile.mkdtemp(prefix='sbs-')
    out_fn, err_fn = os.path.join(d, 'out'), os.path.join(d, 'err')
    e = dict(os.environ, TMPDIR=d)
    if env:
        e.update(env)
    t0 = time.time()
    with open(out_fn, 'wb') as fo, open(err_fn, 'wb') as fe:
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=e,
                             start_new_session=True)
    poller = MemPoller(p.pid, guest_bytes, poll_s, classify, (out_fn, err_fn), max_output)
    poller.start()
    killed = None
    while True:
        try:
            rc = p.wait(0.2)
            break
        except subprocess.TimeoutExpired:
            pass
        if time.time() - t0 > limit_s:
            killed = 'time limit'
        elif poller.output_overflow:
            killed = 'output limit'
        if killed:
            end_group(p)
            rc = p.returncode
            break
    poller.stop.set()
    poller.join(5)
    end_group(p)  # anything left in the group (children) after a normal exit
    wall = time.time() - t0
    with open(out_fn, 'rb') as f:
        out = f.read(max_output or None).decode(errors='replace')
    with open(err_fn, 'rb') as f:
        err = f.read(max_output or None).decode(errors='replace')
    shutil.rmtree(d, ignore_errors=True)
    return {'rc': rc, 'killed': killed, 'wall_s': round(wall, 2), 'out': out, 'err': err,
            'rss': poller.result()}


def end_group(p):
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(p.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            p.wait(wait)
        except subprocess.TimeoutExpired:
            continue
        # the leader is gone; members of the group may remain: one more round with SIGKILL
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        return


def last_json(text):
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith('{'):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                pass
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return None


# ---------------------------------------------------------------------------------------------
# The two systems


# qemu_migrate.py run unchanged as a module, with one fix to what it reads: QEMU 7.2 sets the
# status to "completed" a moment before it fills in total-time and downtime, so a query-migrate
# in between reads 0 for both. The shim repeats such a query-migrate (every 5 ms, up to 1 s)
# until total-time is set; nothing else changes.
QEMU_SHIM = r'''
import importlib.util, sys, time
path = sys.argv[1]
sys.argv = [path] + sys.argv[2:]
spec = importlib.util.spec_from_file_location('qemu_migrate', path)
m = importlib.util.module_from_spec(spec)
spec.loader.exec_module(m)
orig = m.qmp
def qmp(p):
    cmd = orig(p)
    def wrapped(name, **args):
        r = cmd(name, **args)
        if name == 'query-migrate':
            for _ in range(200):
                ret = r.get('return', {})
                if ret.get('status') != 'completed' or ret.get('total-time'):
                    break
                print('side_by_side: re-query (completed, total-time 0)', file=sys.stderr, flush=True)
                time.sleep(0.005)
                r = cmd(name, **args)
        return r
    return wrapped
m.qmp = qmp
sys.exit(m.main())
'''


class Bench:
    def __init__(self, a):
        self.a = a
        self.peer = a.peer
        self.dl = a.dirtylog
        helptext = subprocess.run([self.dl, 'demo', '--help'], capture_output=True, text=True,
                                  timeout=30).stdout
        self.has_verify = '--verify' in helptext
        self.verify = a.verify
        if self.verify and not self.has_verify:
            log(f'note: {self.dl} demo has no --verify; VERIFY={self.verify} ignored')
        self.poll_s = a.poll_ms / 1000
        self.max_output = a.max_output_mib * MIB
        self.jsonl = open(a.out, 'a')

    def record(self, r):
        self.jsonl.write(json.dumps(r) + '\n')
        self.jsonl.flush()
        short = {k: r.get(k) for k in ('system', 'mem', 'ws', 'auto_converge', 'status', 'total_ms',
                                       'down_ms', 'bytes', 'rounds', 'passes_per_s_before')}
        short['rss'] = {k: (v['hwm_mib'], v['beyond_guest_mib']) for k, v in r.get('rss', {}).items()}
        log(json.dumps(short))

    def elf(self, ws):
        return os.path.join(self.peer, f'guest-ws{ws}m.elf')

    def qemu(self, mem, ws, auto_converge=False, limit_s=None):
        limit_s = limit_s or self.a.limit_s
        args = ['--ws', str(ws), '--mem', size_arg(mem), '--downtime-ms', str(self.a.downtime_ms),
                '--limit-s', str(limit_s)]
        if auto_converge:
            args.append('--auto-converge')
        script = os.path.join(self.peer, 'qemu_migrate.py')
        cmd = ['python3', script] + args
        if self.a.qemu_requery:
            cmd = ['python3', '-c', QEMU_SHIM, script] + args

        def classify(pid, cl):
            if 'qemu-system' not in cl:
                return None
            return 'dst' if '-incoming' in cl else 'src'
        r = run_bounded(cmd, limit_s + 60, mem, classify, self.poll_s, self.max_output)
        j = last_json(r['out']) or {}
        res = {'system': 'qemu', 'mem': size_arg(mem), 'ws': ws, 'auto_converge': auto_converge,
               'status': j.get('status') or f"no report (rc {r['rc']}, {r['killed'] or 'exited'})",
               'total_ms': j.get('total-time'), 'down_ms': j.get('downtime'),
               'bytes': j.get('transferred'), 'rounds': j.get('dirty-sync-count'),
               'passes_per_s_before': j.get('guest_passes_per_s_before'),
               'passes_per_s_after': j.get('dest_guest_passes_per_s_after'),
               'engine_dirty_pages_rate': j.get('dirty-pages-rate'),
               'throttle': (j.get('last') or {}).get('cpu-throttle-percentage'),
               'verify': 'none (QEMU does not check memory)',
               'rss': r['rss'], 'wall_s': r['wall_s'],
               'cmd': ' '.join(['python3', script] + args) + (' (through the re-query shim)' if self.a.qemu_requery else ''),
               'requeried': r['err'].count('side_by_side: re-query')}
        if not j:
            res['stderr_tail'] = r['err'][-2000:]
        return res

    def dirtylog_rate(self, mem, ws):
        """The guest's passes/s under `dirtylog run`, measured as qemu_migrate.py does: wait for
        two bytes on COM1, then 2 s, then count the dots of 1 s."""
        cmd = [self.dl, 'run', '--kernel', self.elf(ws), '--mem', size_arg(mem), '--time-limit-s', '30']
        p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, start_new_session=True)
        stamps = []  # (time, cumulative bytes)
        n = [0]

        def reader():
            while True:
                b = p.stdout.read1(4096) if hasattr(p.stdout, 'read1') else p.stdout.read(1)
                if not b:
                    return
                n[0] += len(b)
                stamps.append((time.time(), n[0]))
        th = threading.Thread(target=reader, daemon=True)
        th.start()
        t0 = time.time()
        rate = None
        try:
            while time.time() - t0 < 30 and n[0] < 2 and p.poll() is None:
                time.sleep(0.05)
            if n[0] >= 2:
                time.sleep(2.0)
                n0 = n[0]
                time.sleep(1.0)
                rate = n[0] - n0
        finally:
            end_group(p)
            th.join(5)
        return rate

    def ours(self, mem, ws, auto_converge=False, limit_s=None, max_rounds=None):
        limit_s = limit_s or self.a.limit_s
        rate = self.dirtylog_rate(mem, ws)
        cmd = [self.dl, 'demo', '--kernel', self.elf(ws), '--mem', size_arg(mem), '--vcpus', '1',
               '--json', '--warmup-ms', '3000', '--downtime-ms', str(self.a.downtime_ms),
               '--timeout-s', str(int(limit_s)), '--on-timeout', 'cancel']
        if auto_converge:
            cmd.append('--auto-converge')
        if max_rounds:
            cmd += ['--max-rounds', str(max_rounds)]
        if self.verify and self.has_verify:
            cmd += ['--verify', self.verify]
        def classify(pid, cl):
            if 'dirtylog' not in cl:
                return None
            if ' receive' in cl:
                return 'dst'
            if ' demo' in cl:
                return 'src'
            return None
        r = run_bounded(cmd, limit_s + 60, mem, classify, self.poll_s, self.max_output)
        j = last_json(r['out'])
        res = {'system': 'dirtylog', 'mem': size_arg(mem), 'ws': ws, 'auto_converge': auto_converge,
               'passes_per_s_before': rate, 'rss': r['rss'], 'wall_s': r['wall_s'], 'cmd': ' '.join(cmd)}
        if not j or 'source' not in j:
            res['status'] = f"no report (rc {r['rc']}, {r['killed'] or 'exited'})"
            res['stderr_tail'] = r['err'][-2000:]
            return res
        src = j['source']
        err = src.get('error') or j.get('error')
        if err:
            res['error'] = err
        m = src.get('migration') or {}
        samples = [e for e in j.get('destination', []) if e.get('event') == 'sample']
        after = None
        if len(samples) >= 2:
            s0, s1 = samples[0], samples[-1]
            after = round((s1['guest-writes'] - s0['guest-writes']) * 1000 / max(1, s1['ms'] - s0['ms']), 1)
        status = m.get('status', src.get('status'))
        if status == 'failed' and err and 'did not converge' in err:
            status = 'not converged in limit (cancelled)'
        if status == 'completed' and m.get('switchover') not in (None, 'converged'):
            status = f"completed ({m.get('switchover')})"
        res.update({'status': status, 'total_ms': m.get('total-time'), 'down_ms': m.get('downtime'),
                    'bytes': m.get('transferred'), 'rounds': m.get('dirty-sync-count'),
                    'passes_per_s_after': after, 'engine_dirty_pages_rate': m.get('dirty-pages-rate'),
                    'throttle': m.get('cpu-throttle-percentage'), 'verify': m.get('verify', 'n/a'),
                    'verify_time_ms': m.get('verify-time'),
                    'downtime_breakdown_us': m.get('downtime-breakdown-us'),
                    'downtime_limit_exceeded': m.get('downtime-limit-exceeded'),
                    'source_serial_bytes': src.get('source-serial-bytes'),
                    'wall_ms_reported': j.get('wall-time-ms')})
        return res


# ---------------------------------------------------------------------------------------------
# Tables


def med(rs, k, time_key=False):
    v = [r[k] for r in rs if isinstance(r.get(k), (int, float))
         and not (time_key and not r.get('total_ms'))]
    return statistics.median(v) if v else None


def fmt(x, nd=0):
    if x is None:
        return '–'
    if isinstance(x, float) and nd == 0 and abs(x - round(x)) > 1e-9:
        return f'{x:.1f}'
    return f'{x:.{nd}f}' if nd else f'{x:.0f}'


def ratio(o, q):
    return f'{o / q:.2f}' if o and q else 'n/a'


def rng(rs, k):
    v = [r[k] for r in rs if isinstance(r.get(k), (int, float)) and r.get('total_ms')]
    return f' ({min(v):.0f}–{max(v):.0f})' if len(v) > 1 else ''


def rss_med(rs, role, key):
    v = [r['rss'][role][key] for r in rs if role in r.get('rss', {})]
    return statistics.median(v) if v else None


def matrix_table(res, a, verify_desc):
    print(f'\n## QEMU 7.2 vs dirtylog, the peer dirtier, 1 vCPU, downtime limit {a.downtime_ms} ms, '
          f'no bandwidth limit, loopback; medians of {a.pairs} alternated pair(s); dirtylog verify: {verify_desc}\n')
    print('| guest | system | completed | total-time ms (range) | downtime ms (range) | MiB sent | rounds '
          '| passes/s before (MiB/s dirtied) | src VmHWM MiB (beyond guest) | dst VmHWM MiB (beyond guest) |')
    print('|---|---|---|---|---|---|---|---|---|---|')
    summary = []
    for (mem, ws), by in res.items():
        M = {}
        for name in ('qemu', 'dirtylog'):
            rs = by[name]
            ok = sum(r.get('status') == 'completed' for r in rs)
            m = {'total_ms': med(rs, 'total_ms', True), 'down_ms': med(rs, 'down_ms', True),
                 'bytes': med(rs, 'bytes'), 'rounds': med(rs, 'rounds'),
                 'pb': med(rs, 'passes_per_s_before')}
            for role in ('src', 'dst'):
                m[role] = (rss_med(rs, role, 'hwm_mib'), rss_med(rs, role, 'beyond_guest_mib'))
            M[name] = m
            pb = m['pb']
            print(f"| {mem}, ws {ws} MiB | {name} | {ok}/{len(rs)} | {fmt(m['total_ms'])}{rng(rs, 'total_ms')} "
                  f"| {fmt(m['down_ms'])}{rng(rs, 'down_ms')} "
                  f"| {fmt(m['bytes'] / MIB if m['bytes'] else None, 1)} | {fmt(m['rounds'])} "
                  f"| {fmt(pb)} ({fmt(pb * ws if pb is not None else None)}) "
                  f"| {fmt(m['src'][0])} ({fmt(m['src'][1], 1)}) | {fmt(m['dst'][0])} ({fmt(m['dst'][1], 1)}) |")
        q, o = M['qemu'], M['dirtylog']
        print(f"| {mem}, ws {ws} MiB | **dirtylog / QEMU** | | **{ratio(o['total_ms'], q['total_ms'])}** "
              f"| **{ratio(o['down_ms'], q['down_ms'])}** | {ratio(o['bytes'], q['bytes'])} | "
              f"| {ratio(o['pb'], q['pb'])} | {ratio(o['src'][1], q['src'][1])} | {ratio(o['dst'][1], q['dst'][1])} |")
        summary.append((mem, ws, ratio(o['total_ms'], q['total_ms']), ratio(o['down_ms'], q['down_ms'])))
    budget = {m: 64 + parse_size(m) // 4096 * 2 / 8 / MIB for m in {k[0] for k in res}}
    print('\nRSS: peak VmHWM (exact, kernel) of each process; "beyond guest" = max(VmHWM - largest guest-RAM '
          f'Rss seen, largest sampled all-Rss - guest-RAM Rss), sampled every {a.poll_ms} ms from /proc/PID/smaps '
          '(guest RAM = anonymous mappings of 256 MiB up to the guest size). Issue 9 budget for "beyond guest": '
          + ', '.join(f'{m}: {b:.2f} MiB' for m, b in sorted(budget.items())) + ' (64 MiB + 2 bits/page).')
    print('\n| guest | ws | total-time ours/QEMU (target ≤ 0.5) | downtime ours/QEMU (target ≤ 0.5) |')
    print('|---|---|---|---|')
    for mem, ws, t, d in summary:
        print(f'| {mem} | {ws} MiB | {t} | {d} |')


# ---------------------------------------------------------------------------------------------
# Modes


def build_peer(peer, wss):
    here = os.path.realpath(peer)
    if here.startswith(os.path.realpath(SHARED_PEER)) or here.startswith(os.path.realpath(REPO) + os.sep):
        sys.exit(f'--peer {peer}: use a copy of {SHARED_PEER} outside the repo (e.g. /tmp/peer)')
    if not os.path.isdir(peer):
        shutil.copytree(SHARED_PEER, peer)
        for root, dirs, files in os.walk(peer):
            for n in dirs + files:
                os.chmod(os.path.join(root, n), 0o755 if n in dirs or n.endswith(('.sh', '.py')) else 0o644)
        os.chmod(peer, 0o755)
    if not all(os.path.exists(os.path.join(peer, f'guest-ws{w}m.elf')) for w in (64, 256)):
        subprocess.run([os.path.join(peer, 'build.sh')], check=True, timeout=120)
    for ws in wss:
        elf = os.path.join(peer, f'guest-ws{ws}m.elf')
        if os.path.exists(elf):
            continue
        # build.sh's own two lines, another WS_SIZE
        o = os.path.join(peer, f'g{ws}.o')
        subprocess.run(['gcc', '-m32', '-c', f'-DWS_SIZE={ws << 20}', os.path.join(peer, 'guest.S'), '-o', o],
                       check=True, timeout=60)
        subprocess.run(['ld', '-m', 'elf_i386', '-T', os.path.join(peer, 'link.ld'), '-o', elf, o],
                       check=True, timeout=60)
        os.unlink(o)


def matrix(b, a):
    res = {}
    t_start = time.time()
    for mem in a.mem:
        for ws in a.ws:
            if ws * MIB + 4 * MIB > mem:
                log(f'skip ws {ws} MiB in {size_arg(mem)}: does not fit')
                continue
            by = res.setdefault((size_arg(mem), ws), {'qemu': [], 'dirtylog': []})
            for i in range(a.pairs):
                if a.budget_s and time.time() - t_start > a.budget_s:
                    log(f'time budget of {a.budget_s} s spent; stopping')
                    return res
                for name in (('qemu', 'dirtylog') if i % 2 == 0 else ('dirtylog', 'qemu')):
                    r = b.qemu(mem, ws) if name == 'qemu' else b.ours(mem, ws)
                    r['pair'] = i
                    b.record(r)
                    by[name].append(r)
    return res


def max_rate(b, a):
    mem = a.mem[0]
    wss = [w for w in a.rate_ws if w * MIB + 4 * MIB <= mem]
    configs = [(s, ac) for ac in (False, True) for s in ('qemu', 'dirtylog')]
    alive = set(configs)
    best = {c: None for c in configs}
    first_fail = {c: None for c in configs}
    t_start = time.time()
    for i, ws in enumerate(wss):
        order = configs if i % 2 == 0 else list(reversed(configs))
        for c in order:
            if c not in alive:
                continue
            if a.budget_s and time.time() - t_start > a.budget_s:
                log(f'time budget of {a.budget_s} s spent; stopping')
                alive.clear()
                break
            s, ac = c
            if s == 'qemu':
                r = b.qemu(mem, ws, ac, a.limit_s)
            else:
                r = b.ours(mem, ws, ac, a.limit_s, a.max_rounds)
            r['mode'] = 'max-rate'
            b.record(r)
            if r.get('status') == 'completed':
                best[c] = r
            else:
                first_fail[c] = r
                alive.discard(c)
        if not alive:
            break
    print(f'\n## Highest dirty load that converges within {a.limit_s} s, {size_arg(mem)} guest, downtime limit '
          f'{a.downtime_ms} ms, no bandwidth limit; knob = working set (the peer guest has no rate knob)\n')
    print(f'Working sets tried, ascending: {", ".join(map(str, wss))} MiB (one run each; a system stops at its first failure).\n')
    print('| system | auto-converge | largest ws converged, MiB | its passes/s (MiB/s dirtied) | total-time ms | downtime ms '
          '| rounds | throttle % | first ws not converged |')
    print('|---|---|---|---|---|---|---|---|---|')
    for c in configs:
        r, f = best[c], first_fail[c]
        pb = r.get('passes_per_s_before') if r else None
        print(f"| {c[0]} | {'yes' if c[1] else 'no'} | {r['ws'] if r else 'none'} "
              f"| {fmt(pb)} ({fmt(pb * r['ws'] if pb is not None else None)}) "
              f"| {fmt(r.get('total_ms') if r else None)} | {fmt(r.get('down_ms') if r else None)} "
              f"| {fmt(r.get('rounds') if r else None)} | {fmt(r.get('throttle') if r else None)} "
              f"| {(str(f['ws']) + ' (' + str(f.get('status')) + ')') if f else 'none failed'} |")
    print('\nThe guest writes as fast as it runs under both (passes/s x ws, MiB/s, is about the same at every ws; '
          'passes/s are whole dots counted over 1 s, so coarse at large ws): the load that grows with ws is the '
          'number of distinct pages dirtied per round. Target (issue 9): ours ≥ 2× QEMU\'s.')
    for ac in (False, True):
        q, o = best[('qemu', ac)], best[('dirtylog', ac)]
        print(f"\nauto-converge {'yes' if ac else 'no'}: largest converging ws ours/QEMU = "
              f"{ratio(o['ws'] if o else None, q['ws'] if q else None)}"
              + (' (capped: the largest ws tried converged)' if (o and o['ws'] == wss[-1]) or (q and q['ws'] == wss[-1]) else ''))


def bulk(a):
    exe = os.path.join(REPO, 'target', 'release', 'examples', 'kvm_loopback_throughput')
    log('building the kvm_loopback_throughput example (cargo, release)...')
    p = subprocess.run(['cargo', 'build', '--release', '-p', 'dirtylog-testvm', '--example',
                        'kvm_loopback_throughput'], cwd=REPO, timeout=1800)
    if p.returncode != 0 or not os.path.exists(exe):
        sys.exit('could not build the kvm_loopback_throughput example')
    res = {c: [] for c in a.connections}
    for i in range(a.bulk_runs):
        for c in (a.connections if i % 2 == 0 else list(reversed(a.connections))):
            r = run_bounded([exe, str(a.bulk_mib), str(c)], 300, a.bulk_mib * MIB, lambda pid, cl: None,
                            1.0, a.max_output_mib * MIB)
            eng = re.search(r'engine bulk pass: .*= ([\d.]+) GiB/s', r['out'])
            raw = re.search(r'raw TCP stream: .*= ([\d.]+) GiB/s \(before the migration: ([\d.]+) GiB/s\)', r['out'])
            rat = re.search(r'ratio engine/raw: ([\d.]+)', r['out'])
            row = {'mode': 'bulk', 'connections': c, 'engine_gib_s': float(eng.group(1)) if eng else None,
                   'raw_after_gib_s': float(raw.group(1)) if raw else None,
                   'raw_before_gib_s': float(raw.group(2)) if raw else None,
                   'ratio': float(rat.group(1)) if rat else None, 'rc': r['rc'], 'killed': r['killed']}
            if not rat:
                row['stderr_tail'] = r['err'][-1000:]
            log(json.dumps(row))
            with open(a.out, 'a') as f:
                f.write(json.dumps(row) + '\n')
            res[c].append(row)
    print(f'\n## Bulk pass vs a raw loopback TCP stream, {a.bulk_mib} MiB of non-zero pages, '
          f'{a.bulk_runs} alternated runs per connection count (kvm_loopback_throughput; raw = faster of before/after)\n')
    print('| connections | engine GiB/s (runs) | raw GiB/s (runs, faster of the two) | ratio median (range) | target |')
    print('|---|---|---|---|---|')
    for c, rs in res.items():
        e = [r['engine_gib_s'] for r in rs if r['engine_gib_s'] is not None]
        w = [max(r['raw_after_gib_s'], r['raw_before_gib_s']) for r in rs if r['raw_after_gib_s'] is not None]
        q = [r['ratio'] for r in rs if r['ratio'] is not None]
        print(f"| {c} | {', '.join(f'{x:.2f}' for x in e)} | {', '.join(f'{x:.2f}' for x in w)} "
              f"| {statistics.median(q):.2f} ({min(q):.2f}–{max(q):.2f}) | ≥ 0.8 |" if q else f'| {c} | failed | | | |')


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument('--peer', default='/tmp/peer')
    ap.add_argument('--dirtylog', default=os.environ.get('DIRTYLOG', os.path.join(REPO, 'target', 'release', 'dirtylog')))
    ap.add_argument('--verify', default=os.environ.get('VERIFY') or None,
                    help='strict|background|off, passed to dirtylog demo --verify if it has the flag (env VERIFY)')
    ap.add_argument('--pairs', type=int, default=3)
    ap.add_argument('--mem', default='1G,4G')
    ap.add_argument('--ws', default='64,256', help='working sets, MiB')
    ap.add_argument('--downtime-ms', type=int, default=300)
    ap.add_argument('--limit-s', type=float, default=None,
                    help='per-migration bound (QEMU --limit-s, ours --timeout-s); default 60, 30 with --max-rate')
    ap.add_argument('--budget-s', type=float, default=0, help='stop starting runs after this many seconds (0: none)')
    ap.add_argument('--poll-ms', type=int, default=100)
    ap.add_argument('--max-output-mib', type=int, default=16)
    ap.add_argument('--out', default='/tmp/side_by_side.jsonl')
    ap.add_argument('--no-qemu-requery', dest='qemu_requery', action='store_false',
                    help='run qemu_migrate.py bare (QEMU 7.2 then sometimes reports total-time 0)')
    ap.add_argument('--quick', action='store_true', help='1 pair, 1 GiB, ws 64 MiB')
    ap.add_argument('--max-rate', action='store_true')
    ap.add_argument('--rate-ws', default='64,128,256,384,512,768,960', help='working sets for --max-rate, MiB')
    ap.add_argument('--max-rounds', type=int, default=1000, help='dirtylog --max-rounds in --max-rate (QEMU has no cap)')
    ap.add_argument('--table-from', metavar='JSONL', help="print the matrix table again from a run's --out file")
    ap.add_argument('--bulk', action='store_true')
    ap.add_argument('--bulk-runs', type=int, default=5)
    ap.add_argument('--bulk-mib', type=int, default=1024)
    ap.add_argument('--connections', default='1,2')
    a = ap.parse_args()
    if a.pairs < 1:
        ap.error('--pairs must be at least 1')
    a.connections = [int(x) for x in a.connections.split(',')]
    if a.table_from:
        res = {}
        with open(a.table_from) as f:
            for line in f:
                r = json.loads(line)
                if r.get('mode') or r.get('system') not in ('qemu', 'dirtylog'):
                    continue
                res.setdefault((r['mem'], r['ws']), {'qemu': [], 'dirtylog': []})[r['system']].append(r)
        a.pairs = max((len(v['qemu']) for v in res.values()), default=0)
        verify = sorted({r.get('verify') for v in res.values() for r in v['dirtylog']} - {None})
        matrix_table(res, a, ', '.join(map(str, verify)) or 'unknown')
        return
    if a.bulk:
        bulk(a)
        return
    if a.quick:
        a.pairs, a.mem, a.ws = 1, '1G', '64'
    a.mem = [parse_size(x) for x in a.mem.split(',')]
    a.ws = [int(x) for x in a.ws.split(',')]
    a.rate_ws = sorted(int(x) for x in a.rate_ws.split(','))
    if a.limit_s is None:
        a.limit_s = 30.0 if a.max_rate else 60.0
    if not os.access(a.dirtylog, os.X_OK):
        sys.exit(f'{a.dirtylog}: not found; cargo build --release -p dirtylog-cli')
    if not shutil.which('qemu-system-x86_64'):
        sys.exit('qemu-system-x86_64 not found: apt-get install -y qemu-system-x86')
    build_peer(a.peer, a.rate_ws if a.max_rate else a.ws)
    b = Bench(a)
    verify_desc = (a.verify if (a.verify and b.has_verify) else 'default (background)' if b.has_verify
                   else 'no --verify flag in this build')
    log(f'dirtylog: {a.dirtylog}; peer: {a.peer}; verify: {verify_desc}; runs → {a.out}')
    t0 = time.time()
    if a.max_rate:
        max_rate(b, a)
    else:
        res = matrix(b, a)
        matrix_table(res, a, verify_desc)
    print(f'\n(wall {time.time() - t0:.0f} s; every run as JSON: {a.out})')


if __name__ == '__main__':
    main()
