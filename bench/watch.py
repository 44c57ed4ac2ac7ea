#!/usr/bin/env python3
"""Records when each final file appears on a replica (file:// root, or an sftp replica's local dir).

usage: watch.py REPLICA_ROOT OUT
Writes lines "seg FIRST LAST T_NS NAME" / "snap TXID T_NS NAME" (T_NS = CLOCK_MONOTONIC when the
inotify event was read; files already present when the watch starts are written with their scan
time and flagged "pre"), and "create T_NS NAME" for every file created (a temporary file that
becomes a final name, or a claim). Runs until SIGTERM. Final names appear only by rename (temp +
fsync + rename, or a tail segment appended to, fsynced, then renamed to its new range), so the
appearance of a final name is the moment the data is durable on the replica; a rename creates
no file.
"""
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import Inotify, SEG_RE, SNAP_RE

root, out_path = sys.argv[1], sys.argv[2]
out = open(out_path, 'w', buffering=1)
signal.signal(signal.SIGTERM, lambda *a: (out.flush(), os._exit(0)))
ino = Inotify()
MASK = Inotify.IN_CREATE | Inotify.IN_MOVED_TO
seen = set()


def record(name, t, tag=''):
    if name in seen:
        return
    m = SEG_RE.match(name)
    if m:
        seen.add(name)
        out.write('seg %d %d %d %s %s\n' % (int(m.group(2), 16), int(m.group(3), 16), t, name, tag))
        return
    m = SNAP_RE.match(name)
    if m:
        seen.add(name)
        out.write('snap %d %d %s %s\n' % (int(m.group(1), 16), t, name, tag))


def add_gen(path):
    ino.watch(path, MASK)
    t = time.monotonic_ns()
    for e in os.scandir(path):
        record(e.name, t, 'pre')


gens = os.path.join(root, 'generations')
while not os.path.isdir(gens):
    time.sleep(0.001)
ino.watch(gens, MASK)
for e in os.scandir(gens):
    if e.is_dir():
        add_gen(e.path)
out.write('ready\n')
while True:
    evs, t = ino.read()
    for d, mask, name in evs:
        if d == gens and mask & Inotify.IN_ISDIR:
            add_gen(os.path.join(gens, name))
        elif d != gens:
            if mask & Inotify.IN_CREATE:
                out.write('create %d %s\n' % (t, name))
            record(name, t)
