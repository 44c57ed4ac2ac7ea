#!/usr/bin/env python3
"""An application doing what applications do around walship, for tests/e2e_apps.rs.

  app.py write DB --rate R --secs S [--busy-ms B] [--row-bytes N]
               [--checkpoint-every N --checkpoint-mode M]
      One-row autocommit INSERTs (of N bytes more) into t(v) at R commits/s for S seconds, with a busy timeout
      of B ms (0: none, the sqlite3 CLI's default). Every Nth commit it runs
      `pragma wal_checkpoint(M)` itself, as many frameworks do. A commit or checkpoint that
      fails with SQLITE_BUSY is counted, not retried.
  app.py read DB --secs S
      Holds one read transaction open for S seconds (prints "reading" once it holds it).

`write` prints one JSON object: commits, busy, commit latency max/p99 (ms), checkpoints run,
checkpoints that returned busy, checkpoint duration max (ms).
"""
import argparse, json, sqlite3, sys, time


def pct(xs, p):
    if not xs:
        return 0.0
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * p))]


def write(a):
    c = sqlite3.connect(a.db, isolation_level=None, timeout=a.busy_ms / 1000.0)
    c.execute('pragma busy_timeout=%d' % a.busy_ms)
    lat, ck = [], []
    commits = busy = ck_busy = 0
    t0 = time.monotonic()
    i = 0
    while True:
        due = t0 + i / a.rate
        if due - t0 >= a.secs or time.monotonic() - t0 >= a.secs:
            break
        now = time.monotonic()
        if due > now:
            time.sleep(due - now)
        i += 1
        s = time.monotonic()
        try:
            c.execute("insert into t(v) values (?)", ('row %d ' % i + 'x' * a.row_bytes,))
            commits += 1
        except sqlite3.OperationalError as e:
            busy += 1
            print('app: commit %d: %s' % (i, e), file=sys.stderr)
        lat.append((time.monotonic() - s) * 1000)
        if a.checkpoint_every and i % a.checkpoint_every == 0:
            s = time.monotonic()
            try:
                r = c.execute('pragma wal_checkpoint(%s)' % a.checkpoint_mode).fetchone()
                if r[0] != 0:
                    ck_busy += 1
            except sqlite3.OperationalError as e:
                ck_busy += 1
                print('app: checkpoint: %s' % e, file=sys.stderr)
            ck.append((time.monotonic() - s) * 1000)
    c.close()
    print(json.dumps({
        'commits': commits, 'busy': busy,
        'max_ms': max(lat) if lat else 0.0, 'p99_ms': pct(lat, 0.99),
        'checkpoints': len(ck), 'checkpoints_busy': ck_busy,
        'checkpoint_max_ms': max(ck) if ck else 0.0,
    }))


def read(a):
    c = sqlite3.connect(a.db, isolation_level=None)
    c.execute('begin')
    c.execute('select count(*) from t').fetchall()
    print('reading', flush=True)
    time.sleep(a.secs)
    c.execute('commit')
    c.close()


ap = argparse.ArgumentParser()
ap.add_argument('mode', choices=['write', 'read'])
ap.add_argument('db')
ap.add_argument('--rate', type=float, default=100)
ap.add_argument('--secs', type=float, default=3)
ap.add_argument('--busy-ms', type=int, default=5000)
ap.add_argument('--row-bytes', type=int, default=0, help='padding per row (big rows: more WAL)')
ap.add_argument('--checkpoint-every', type=int, default=0)
ap.add_argument('--checkpoint-mode', default='TRUNCATE')
a = ap.parse_args()
write(a) if a.mode == 'write' else read(a)
