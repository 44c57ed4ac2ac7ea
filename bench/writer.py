#!/usr/bin/env python3
"""Paced single-row commits: writer.py DB OUT PHASES [--sync NORMAL|FULL]

PHASES: comma-separated RATE:SECONDS (RATE 0 = as fast as possible), e.g. 10:3,100:4,1000:3,0:2;
one idle second between phases. Writes "PHASE SEQ T_START_NS T_END_NS" per commit (SEQ counts
this writer's commits from 1; with walship started after the database was created, the commit
SEQ gets txid SEQ+1). Commits are autocommit INSERTs of a 100-byte row, busy timeout 5 s; a
commit that still fails (SQLITE_BUSY) is counted, not retried: the last line is "# busy N".
"""
import os, sqlite3, sys, time

db, out_path, phases = sys.argv[1], sys.argv[2], sys.argv[3]
sync = sys.argv[5] if len(sys.argv) > 5 and sys.argv[4] == '--sync' else 'NORMAL'
c = sqlite3.connect(db, isolation_level=None)
c.execute('pragma busy_timeout=5000')
c.execute('pragma synchronous=%s' % sync)
row = os.urandom(50).hex()
seq = 0
busy = 0
rows = []
for ph in phases.split(','):
    rate, secs = ph.split(':')
    rate, secs = int(rate), float(secs)
    t0 = time.monotonic_ns()
    end = t0 + int(secs * 1e9)
    i = 0
    while True:
        if rate:
            due = t0 + int(i * 1e9 / rate)
            if due >= end:
                break
            now = time.monotonic_ns()
            if due > now:
                time.sleep((due - now) / 1e9)
        elif time.monotonic_ns() >= end:
            break
        seq += 1
        i += 1
        a = time.monotonic_ns()
        try:
            c.execute('insert into t(v) values (?)', (row,))
        except sqlite3.OperationalError as e:   # SQLITE_BUSY after the 5 s busy timeout
            busy += 1
            print('writer: %s' % e, file=sys.stderr)
            seq -= 1
            continue
        b = time.monotonic_ns()
        rows.append('%s %d %d %d' % (ph, seq, a, b))
    time.sleep(1.0)
with open(out_path, 'w') as f:
    f.write('\n'.join(rows) + '\n# busy %d\n' % busy)
c.close()
