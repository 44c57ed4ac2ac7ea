#!/usr/bin/env python3
"""A real application writing to a SQLite database, for walship's end-to-end tests.

Uses python3's own sqlite3 module (a different SQLite build than walship's) with its own
connection, a 5 s busy timeout and SQLite's default autocheckpoint. Inserts rows into
t(id INTEGER PRIMARY KEY, writer, seq, payload); some payloads are larger than a page (overflow
pages), some commits are big transactions. Each (writer, seq) is appended to --out only AFTER
its commit returned. Any sqlite3 error (SQLITE_BUSY included) exits with status 3.

Stops after --commits commits (0: until SIGTERM/SIGINT, finishing the current commit).
"""

import argparse
import os
import random
import signal
import sqlite3
import sys
import time

stop = False


def on_signal(_signum, _frame):
    global stop
    stop = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--db", required=True)
    ap.add_argument("--writer", required=True)
    ap.add_argument("--commits", type=int, default=0)
    ap.add_argument("--rate", type=float, default=0.0, help="commits per second, 0 = flat out")
    ap.add_argument("--big-every", type=int, default=0, help="every Nth commit inserts 20-200 rows")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    ap.add_argument("--synchronous", help="PRAGMA synchronous for this connection (default: SQLite's)")
    a = ap.parse_args()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    rng = random.Random(a.seed)
    out = open(a.out, "a", buffering=1)
    n = 0
    try:
        con = sqlite3.connect(a.db, timeout=5, isolation_level=None)
        if a.synchronous:
            con.execute(f"PRAGMA synchronous={a.synchronous}")
        seq = 0
        start = time.monotonic()
        while not stop and (a.commits == 0 or n < a.commits):
            rows = 1
            if a.big_every and n % a.big_every == a.big_every - 1:
                rows = rng.randint(20, 200)
            batch = []
            for _ in range(rows):
                r = rng.random()
                if r < 0.1:
                    size = rng.randint(4097, 20000)  # overflow pages
                elif r < 0.3:
                    size = rng.randint(500, 4000)
                else:
                    size = rng.randint(1, 300)
                batch.append((a.writer, seq, rng.randbytes(size)))
                seq += 1
            con.execute("BEGIN IMMEDIATE")
            con.executemany("INSERT INTO t(writer, seq, payload) VALUES (?, ?, ?)", batch)
            con.execute("COMMIT")
            out.write("".join(f"{w} {s}\n" for (w, s, _) in batch))
            n += 1
            if a.rate > 0:
                due = start + n / a.rate
                delay = due - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
        con.close()
    except sqlite3.Error as e:
        print(f"writer {a.writer}: sqlite3 error after {n} commits: {type(e).__name__}: {e}",
              file=sys.stderr)
        sys.exit(3)
    out.close()
    print(f"writer {a.writer}: {n} commits, {seq} rows", file=sys.stderr)


if __name__ == "__main__":
    main()
