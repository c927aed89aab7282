#!/usr/bin/env python3
"""QEMU 7.2 saving a running guest to a file (issue 12, "Performance"): boot the peer dirtier
(../shared/peer/guest.S, copied and built in --peer) under qemu-system-x86_64 -accel kvm, let it
run, then `migrate` to `exec:cat > FILE` over QMP and print QEMU's own query-migrate numbers as
one JSON line. Used by crates/dirtylog-testvm/examples/snapshot_bench.rs (--qemu) beside our
snapshots, in the same run; also runs alone.

  bench/qemu_save.py [--peer /tmp/peer] [--ws 64] [--mem 1G] [--dir /var/tmp]
                     [--downtime-ms 300] [--limit-s 60] [--max-bytes 4G]

Bounded: the migration is cancelled after --limit-s or once the file passes --max-bytes; QEMU
is ended by its PID; the saved file is deleted. Bandwidth is not limited (max-bandwidth
10 GiB/s, as qemu_migrate.py sets it); QEMU's default downtime limit (300 ms). QEMU does not
fsync the file: `fsync_ms` is the time to fsync it afterwards (ours fsync before they finish).
Output keys: save_ms (QEMU total-time), downtime_ms, setup_ms, total_bytes (RAM transferred),
file_bytes, dirty_sync_count, wall_ms (migrate command to completion, as polled), fsync_ms,
guest_dirty_mib_per_s_before, status.
"""
import argparse, json, os, shutil, socket, subprocess, sys, tempfile, time


def qmp(path):
    s = socket.socket(socket.AF_UNIX)
    for _ in range(200):
        try:
            s.connect(path)
            break
        except OSError:
            time.sleep(0.05)
    s.settimeout(30)
    f = s.makefile('rw')
    json.loads(f.readline())

    def cmd(name, **args):
        f.write(json.dumps({"execute": name, "arguments": args} if args else {"execute": name}) + "\n")
        f.flush()
        while True:
            r = json.loads(f.readline())
            if 'return' in r or 'error' in r:
                return r
    cmd('qmp_capabilities')
    return cmd


def size_arg(v):
    m = {'K': 1 << 10, 'M': 1 << 20, 'G': 1 << 30}
    return int(v[:-1]) * m[v[-1]] if v[-1] in m else int(v)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument('--peer', default='/tmp/peer')
    ap.add_argument('--ws', type=int, default=64)
    ap.add_argument('--mem', default='1G')
    ap.add_argument('--dir', default='/var/tmp')
    ap.add_argument('--downtime-ms', type=int, default=300)
    ap.add_argument('--limit-s', type=float, default=60)
    ap.add_argument('--max-bytes', type=size_arg, default=4 << 30)
    ap.add_argument('--warm-s', type=float, default=2.0)
    a = ap.parse_args()
    if not os.path.isdir(a.peer):
        shutil.copytree(os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', '..', 'shared', 'peer'), a.peer)
    elf = os.path.join(a.peer, f'guest-ws{a.ws}m.elf')
    if not os.path.exists(elf):
        subprocess.run([os.path.join(a.peer, 'build.sh')], check=True)
    d = tempfile.mkdtemp(prefix='qsave')
    out_file = os.path.join(a.dir, f'qemu-save-{os.getpid()}.bin')
    cmdline = ['qemu-system-x86_64', '-accel', 'kvm', '-m', a.mem, '-kernel', elf, '-display', 'none',
               '-nodefaults', '-no-user-config', '-serial', f'file:{d}/serial.log',
               '-qmp', f'unix:{d}/qmp,server=on,wait=off']
    q = subprocess.Popen(cmdline, stdout=subprocess.DEVNULL, stderr=open(f'{d}/err', 'w'))
    out = {'peer': 'qemu-save', 'ws_mib': a.ws, 'mem': a.mem, 'uri': 'exec:cat > FILE'}
    try:
        s = qmp(f'{d}/qmp')
        t0 = time.time()
        while time.time() - t0 < 30:  # the guest's first dots (SeaBIOS is slow here)
            if os.path.exists(f'{d}/serial.log') and os.path.getsize(f'{d}/serial.log') >= 2:
                break
            time.sleep(0.1)
        time.sleep(a.warm_s)
        n0 = os.path.getsize(f'{d}/serial.log'); time.sleep(1.0); n1 = os.path.getsize(f'{d}/serial.log')
        out['guest_dirty_mib_per_s_before'] = (n1 - n0) * a.ws
        s('migrate-set-capabilities', capabilities=[{'capability': 'events', 'state': True}])
        s('migrate-set-parameters', **{'max-bandwidth': 10 << 30, 'downtime-limit': a.downtime_ms})
        t_start = time.time()
        r = s('migrate', uri=f'exec:cat > {out_file}')
        if 'error' in r:
            out['status'] = 'error'; out['error'] = r['error']
            return 1
        info = {}
        while time.time() - t_start < a.limit_s:
            info = s('query-migrate')['return']
            if info.get('status') in ('completed', 'failed', 'cancelled'):
                break
            if os.path.exists(out_file) and os.path.getsize(out_file) > a.max_bytes:
                s('migrate_cancel'); out['status'] = 'cancelled-over-max-bytes'
                break
            time.sleep(0.01)
        wall = time.time() - t_start
        # QEMU 7.2 may answer `completed` with total-time 0 at first: ask again.
        for _ in range(20):
            if info.get('status') != 'completed' or info.get('total-time'):
                break
            time.sleep(0.05)
            info = s('query-migrate')['return']
        out.setdefault('status', info.get('status', 'not-completed-in-limit'))
        out['wall_ms'] = round(wall * 1000, 1)
        out['save_ms'] = info.get('total-time')
        out['downtime_ms'] = info.get('downtime')
        out['setup_ms'] = info.get('setup-time')
        ram = info.get('ram', {})
        out['total_bytes'] = ram.get('transferred')
        out['dirty_sync_count'] = ram.get('dirty-sync-count')
        out['normal_pages'] = ram.get('normal')
        out['duplicate_pages'] = ram.get('duplicate')
        # cat may still be writing: wait for its end (QEMU closed the pipe), then fsync.
        time.sleep(0.2)
        if os.path.exists(out_file):
            t = time.time()
            fd = os.open(out_file, os.O_RDONLY); os.fsync(fd); os.close(fd)
            out['fsync_ms'] = round((time.time() - t) * 1000, 1)
            out['file_bytes'] = os.path.getsize(out_file)
    finally:
        q.terminate()
        try:
            q.wait(5)
        except subprocess.TimeoutExpired:
            q.kill(); q.wait()
        if os.path.exists(out_file):
            os.remove(out_file)
        shutil.rmtree(d, ignore_errors=True)
        print(json.dumps(out))
    return 0 if out.get('status') == 'completed' else 1


if __name__ == '__main__':
    sys.exit(main())
