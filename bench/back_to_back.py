#!/usr/bin/env python3
"""Back-to-back live migrations of one small Multiboot kernel, QEMU beside dirtylog, alternating.

  bench/back_to_back.py --kernel K [--append ARGS] [--mem 128M] [--migrations 20]
                        [--every-ms 100] [--rounds 3] [--dirtylog PATH] [--limit-s 120]

Each round runs both systems once, in alternating order (QEMU first in odd rounds):

(a) QEMU 7.2: boots K with -kernel, waits for its first serial byte, then N times: start a fresh
    destination QEMU with -incoming on loopback (started during the gap, so its start-up is not
    counted in the migration), let the guest run --every-ms, QMP `migrate`, poll
    `query-migrate` until completed, record QEMU's own total-time / downtime / ram.transferred,
    end the old source by PID. The last QEMU must be 'running' at the end.
(b) dirtylog: `dirtylog run --kernel K --migrate every=MS --migrations N --json
    --time-limit-s S`, its per-migration JSON lines parsed from stderr; ended by PID as soon
    as N lines have arrived (or by the time limit).

Per system: migrations per second of wall time (first migration start → last end, the gaps
of --every-ms included), medians and maxima of total-time and downtime, median bytes. Every
process is started here and ended by its PID; every wait is bounded.
"""
import argparse, json, os, shutil, signal, socket, statistics, subprocess, sys, tempfile, time

HERE = os.path.dirname(os.path.abspath(__file__))


class Qmp:
    def __init__(self, path, limit_s=20):
        self.s = socket.socket(socket.AF_UNIX)
        t0 = time.time()
        while True:
            try:
                self.s.connect(path)
                break
            except OSError:
                if time.time() - t0 > limit_s:
                    raise RuntimeError(f'QMP socket {path} did not come up')
                time.sleep(0.02)
        self.s.settimeout(limit_s)
        self.f = self.s.makefile('rw')
        json.loads(self.f.readline())
        self.cmd('qmp_capabilities')

    def cmd(self, name, **args):
        msg = {'execute': name, 'arguments': args} if args else {'execute': name}
        self.f.write(json.dumps(msg) + '\n')
        self.f.flush()
        while True:
            line = self.f.readline()
            if not line:
                raise RuntimeError(f'QMP closed during {name}')
            r = json.loads(line)
            if 'return' in r:
                return r['return']
            if 'error' in r:
                raise RuntimeError(f'QMP {name}: {r["error"]}')

    def close(self):
        try:
            self.s.close()
        except OSError:
            pass


def end(p):
    if p is None or p.poll() is not None:
        return
    p.terminate()
    try:
        p.wait(5)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)


def free_port():
    s = socket.socket()
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
    s.close()
    return port


def run_qemu(a, d, rnd):
    base = ['qemu-system-x86_64', '-accel', 'kvm', '-m', a.mem, '-smp', '1', '-kernel', a.kernel,
            '-display', 'none', '-nodefaults', '-no-user-config', '-device',
            'isa-debug-exit,iobase=0xf4,iosize=0x4']
    if a.append:
        base += ['-append', a.append]
    procs = []

    def start(i, incoming=None):
        extra = ['-incoming', f'tcp:127.0.0.1:{incoming}'] if incoming else []
        p = subprocess.Popen(base + ['-serial', f'file:{d}/q{rnd}-{i}.log',
                                     '-qmp', f'unix:{d}/q{rnd}-{i}.qmp,server=on,wait=off'] + extra,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                             stderr=open(f'{d}/q{rnd}-{i}.err', 'w'))
        procs.append(p)
        return p

    recs = []
    t_deadline = time.time() + a.limit_s
    src = start(0)
    try:
        sq = Qmp(f'{d}/q{rnd}-0.qmp')
        log0 = f'{d}/q{rnd}-0.log'
        while not (os.path.exists(log0) and os.path.getsize(log0) >= 1):
            if time.time() > t_deadline:
                raise RuntimeError('QEMU guest printed nothing')
            time.sleep(0.02)
        first = last = None
        for i in range(1, a.migrations + 1):
            port = free_port()
            t_gap = time.time()
            dst = start(i, port)
            dq = Qmp(f'{d}/q{rnd}-{i}.qmp')
            left = a.every_ms / 1000 - (time.time() - t_gap)
            if left > 0:
                time.sleep(left)
            sq.cmd('migrate-set-parameters', **{'max-bandwidth': 10 << 30,
                                                 'downtime-limit': a.downtime_ms})
            t0 = time.time()
            first = first or t0
            sq.cmd('migrate', uri=f'tcp:127.0.0.1:{port}')
            while True:
                info = sq.cmd('query-migrate')
                if info.get('status') in ('completed', 'failed', 'cancelled'):
                    break
                if time.time() > t_deadline:
                    raise RuntimeError(f'QEMU migration {i} did not finish in the limit')
                time.sleep(0.002)
            last = time.time()
            if info['status'] != 'completed':
                raise RuntimeError(f'QEMU migration {i}: {info}')
            recs.append({'total_time_ms': info['total-time'], 'downtime_ms': info['downtime'],
                         'bytes': info['ram']['transferred'], 'wall_ms': (last - t0) * 1000})
            sq.close()
            end(src)
            src, sq = dst, dq
        status = sq.cmd('query-status')['status']
        if status != 'running':
            raise RuntimeError(f'last QEMU is {status}, not running')
        return recs, last - first
    finally:
        for p in procs:
            end(p)


def run_dirtylog(a, d, rnd):
    cmd = [a.dirtylog, 'run', '--kernel', a.kernel, '--mem', a.mem, '--migrate',
           f'every={a.every_ms}', '--migrations', str(a.migrations), '--json',
           '--time-limit-s', str(int(a.limit_s)), '--downtime-ms', str(a.downtime_ms)]
    if a.append:
        cmd += ['--append', a.append]
    out = open(f'{d}/d{rnd}.out', 'wb')
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.PIPE,
                         text=True)
    recs, errs = [], []
    t_start = time.time()
    try:
        for line in p.stderr:  # bounded by --time-limit-s
            line = line.strip()
            try:
                j = json.loads(line)
            except ValueError:
                errs.append(line)
                continue
            if j.get('event') == 'migration':
                j = {k.replace('-', '_'): v for k, v in j.items()}  # older builds used _
                recs.append({'total_time_ms': j['total_time_ms'], 'downtime_ms': j['downtime_ms'],
                             'bytes': j['bytes'], 't': time.time()})
                if len(recs) == a.migrations:
                    break
            if j.get('event') == 'done':
                break
    finally:
        end(p)
    if len(recs) < a.migrations:
        raise RuntimeError(f'dirtylog: {len(recs)} of {a.migrations} migrations; {errs[-3:]}')
    # Wall span: first migration's start (its end minus its total-time) to the last end.
    span = recs[-1]['t'] - (recs[0]['t'] - recs[0]['total_time_ms'] / 1000)
    return recs, span


def summary(recs, span):
    tt = [r['total_time_ms'] for r in recs]
    dt = [r['downtime_ms'] for r in recs]
    by = [r['bytes'] for r in recs]
    return {'migrations': len(recs), 'per_s': len(recs) / span,
            'total_med': statistics.median(tt), 'total_max': max(tt),
            'down_med': statistics.median(dt), 'down_max': max(dt),
            'bytes_med': statistics.median(by)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--kernel', required=True)
    ap.add_argument('--append', default='')
    ap.add_argument('--mem', default='128M')
    ap.add_argument('--migrations', type=int, default=20)
    ap.add_argument('--every-ms', type=int, default=100)
    ap.add_argument('--downtime-ms', type=int, default=300)
    ap.add_argument('--rounds', type=int, default=3)
    ap.add_argument('--limit-s', type=float, default=120)
    ap.add_argument('--dirtylog', default=os.path.join(HERE, '..', 'target', 'release', 'dirtylog'))
    a = ap.parse_args()
    a.kernel = os.path.abspath(a.kernel)
    d = tempfile.mkdtemp(prefix='b2b')
    res = {'qemu': [], 'dirtylog': []}
    try:
        for rnd in range(a.rounds):
            order = ['qemu', 'dirtylog'] if rnd % 2 == 0 else ['dirtylog', 'qemu']
            for sysname in order:
                f = run_qemu if sysname == 'qemu' else run_dirtylog
                recs, span = f(a, d, rnd)
                s = summary(recs, span)
                res[sysname].append(s)
                print(json.dumps({'round': rnd, 'system': sysname, **s}), flush=True)
    finally:
        shutil.rmtree(d, ignore_errors=True)
    print(f'\nkernel {os.path.basename(a.kernel)} {a.append}, mem {a.mem}, {a.migrations} '
          f'migrations every {a.every_ms} ms, {a.rounds} rounds alternating; medians over rounds')
    print('| system | migrations/s | total-time median / max, ms | downtime median / max, ms '
          '| bytes per migration (median) |')
    print('|---|---|---|---|---|')
    med = {}
    for sysname in ('qemu', 'dirtylog'):
        rs = res[sysname]
        m = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        med[sysname] = m
        print(f'| {sysname} | {m["per_s"]:.2f} | {m["total_med"]:.0f} / {m["total_max"]:.0f} | '
              f'{m["down_med"]:.0f} / {m["down_max"]:.0f} | {m["bytes_med"] / 2**20:.1f} MiB |')
    q, o = med['qemu'], med['dirtylog']
    ratio = lambda x, y: f'{x / y:.2f}' if y else 'n/a'
    print(f'| dirtylog / qemu | {ratio(o["per_s"], q["per_s"])} | '
          f'{ratio(o["total_med"], q["total_med"])} / {ratio(o["total_max"], q["total_max"])} | '
          f'{ratio(o["down_med"], q["down_med"])} / {ratio(o["down_max"], q["down_max"])} | '
          f'{ratio(o["bytes_med"], q["bytes_med"])} |')
    return 0


if __name__ == '__main__':
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(main())
