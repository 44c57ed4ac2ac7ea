#!/usr/bin/env python3
"""loader.py DB MIB [TXN_KIB] : bulk load MIB MiB in TXN_KIB (default 1024) transactions of 64 KiB
blobs, half of them random and half low-entropy (so zstd gets about 2:1, not a trivial 100:1).
Prints "start NS" and "end NS" (CLOCK_MONOTONIC) around the load, "commits N", and "busy N": the
transactions that failed with SQLITE_BUSY despite the 5 s busy timeout (rolled back, not retried).
With STAMPS=FILE, also writes the CLOCK_MONOTONIC ns at the start and after each transaction to FILE,
one per line (`stalls.sh`). Also prints, for the load alone, the loader's own CPU time "cpu_ms", its
time runnable but waiting for a CPU "runq_ms" (both from /proc/thread-self/schedstat) and how
often it was preempted "preempted" (involuntary context switches) (`loader-cpu.sh`)."""
import os, sqlite3, sys, time
db, mib = sys.argv[1], int(sys.argv[2])
txn_kib = int(sys.argv[3]) if len(sys.argv) > 3 else 1024
per_txn = max(1, txn_kib // 64)
c = sqlite3.connect(db, isolation_level=None)
c.execute('pragma busy_timeout=5000')
c.execute('pragma synchronous=NORMAL')
if os.environ.get('WAL_AUTOCHECKPOINT'):
    c.execute('pragma wal_autocheckpoint=%d' % int(os.environ['WAL_AUTOCHECKPOINT']))
text = (b'walship bulk benchmark row %d ' * 4000)[:32768]
blobs, n = [], mib * 16
for i in range(n):   # pre-generate: the load itself measures sqlite, not the generator
    if i % 2:
        blobs.append(os.urandom(65536))
    else:
        blobs.append(os.urandom(32768) + text)
def sched():   # (CPU ns, run-queue wait ns, involuntary context switches) of this thread
    cpu, wait = open('/proc/thread-self/schedstat').read().split()[:2]
    inv = [l.split()[1] for l in open('/proc/thread-self/status') if l.startswith('nonvoluntary_ctxt_switches')]
    return int(cpu), int(wait), int(inv[0])
s0 = sched()
t0 = time.monotonic_ns()
stamps = [t0] if os.environ.get('STAMPS') else None
commits = 0
busy = 0
for i in range(0, n, per_txn):
    try:
        c.execute('begin')
        c.executemany('insert into t(v) values (?)', [(b,) for b in blobs[i:i + per_txn]])
        c.execute('commit')
    except sqlite3.OperationalError as e:   # SQLITE_BUSY after the 5 s busy timeout
        busy += 1
        print('loader: %s' % e, file=sys.stderr)
        if c.in_transaction:
            c.execute('rollback')
        continue
    commits += 1
    if stamps is not None:
        stamps.append(time.monotonic_ns())
t1 = time.monotonic_ns()
s1 = sched()
print('cpu_ms %.0f\nrunq_ms %.0f\npreempted %d' % ((s1[0] - s0[0]) / 1e6, (s1[1] - s0[1]) / 1e6, s1[2] - s0[2]))
if stamps is not None:
    with open(os.environ['STAMPS'], 'w') as f:
        f.write('\n'.join(map(str, stamps)) + '\n')
if os.environ.get('KEEP_WAL'):   # leave the WAL in place: skip the checkpoint on close
    print('start %d\nend %d\ncommits %d\nbusy %d' % (t0, t1, commits, busy), flush=True)
    os._exit(0)
print('start %d\nend %d\ncommits %d\nbusy %d' % (t0, t1, commits, busy), flush=True)
