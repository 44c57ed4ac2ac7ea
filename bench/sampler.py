#!/usr/bin/env python3
"""sampler.py OUT WAL [STATE_DIR] [PID] : every 10 ms samples the -wal file's size, the state
directory's bytes and the process's VmRSS; on SIGTERM writes the peaks (and samples count)."""
import os, signal, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import dir_bytes, proc_status, kib
out, wal = sys.argv[1], sys.argv[2]
state = sys.argv[3] if len(sys.argv) > 3 and sys.argv[3] != '-' else None
pid = int(sys.argv[4]) if len(sys.argv) > 4 else None
peak = {'wal': 0, 'state': 0, 'rss_kib': 0, 'samples': 0}
stop = []
timeline = []
signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
open(out + '.ready', 'w').close()
while not stop:
    try:
        peak['wal'] = max(peak['wal'], os.stat(wal).st_size)
    except FileNotFoundError:
        pass
    if state:
        peak['state'] = max(peak['state'], dir_bytes(state))
    if pid:
        try:
            peak['rss_kib'] = max(peak['rss_kib'], kib(proc_status(pid)['VmRSS']))
        except (FileNotFoundError, ProcessLookupError, KeyError):
            pass
    peak['samples'] += 1
    if peak['samples'] % 10 == 1:
        try:
            timeline.append('%.0f' % (os.stat(wal).st_size / 2**20))
        except FileNotFoundError:
            timeline.append('-')
    time.sleep(0.01)
with open(out, 'w') as f:
    for k, v in peak.items():
        f.write('%s %d\n' % (k, v))
    f.write('timeline ' + ','.join(timeline) + '\n')
