#!/usr/bin/env python3
"""lagstats.py WALSHIP_WRITER_OUT WATCH_OUT BASELINE_WRITER_OUT [LABEL]

Joins commit times (txid = SEQ + 1) with the time each txid first appeared on the replica and
prints, per phase: commit -> durable-on-replica lag p50/p99/max, and the application's commit
latency p50/p99 with and without walship (ratio = with / without).
"""
import sys, os
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from benchlib import pct

wfile, watchfile, bfile = sys.argv[1:4]
label = sys.argv[4] if len(sys.argv) > 4 else 'replica'


busy = {}


def load_writer(p):
    phases = {}
    order = []
    for line in open(p):
        if line.startswith('# busy '):
            busy[p] = int(line.split()[2])
            continue
        if not line.strip():
            continue
        ph, seq, a, b = line.split()
        if ph not in phases:
            phases[ph] = []
            order.append(ph)
        phases[ph].append((int(seq), int(a), int(b)))
    return order, phases


order, w = load_writer(wfile)
_, base = load_writer(bfile)
segs = []
creates = []
for line in open(watchfile):
    f = line.split()
    if f and f[0] == 'seg' and (len(f) < 6 or f[5] != 'pre'):
        segs.append((int(f[1]), int(f[2]), int(f[3]), f[4]))
    elif f and f[0] == 'create':
        creates.append(int(f[1]))
level0 = sorted([s for s in segs if s[3].startswith('seg-0-')], key=lambda s: s[2])
other = sorted([s for s in segs if not s[3].startswith('seg-0-')], key=lambda s: s[2])
appear = {}
for first, last, t, _n in level0 + other:
    for x in range(first, last + 1):
        if x not in appear:
            appear[x] = t

ms = lambda ns: ns / 1e6
print('%-9s %7s %8s | %-31s | %-23s %-23s %s' % (
    'phase', 'commits', 'rate/s', 'lag to %s p50/p99/max ms' % label,
    'commit ms p50/p99 plain', 'with walship', 'p50 ratio'))
results = {}
for ph in order:
    rows = w[ph]
    lags = [appear[s + 1] - b for s, a, b in rows if (s + 1) in appear]
    missing = sum(1 for s, a, b in rows if (s + 1) not in appear)
    dur = (rows[-1][2] - rows[0][1]) / 1e9
    lat = [b - a for s, a, b in rows]
    blat = [b - a for s, a, b in base.get(ph, [])]
    nsegs = sum(1 for s in level0 if rows[0][0] + 1 <= s[0] and s[1] <= rows[-1][0] + 1)
    # files created on the replica while the phase ran (a tail segment's renames create none)
    nfiles = sum(1 for t in creates if rows[0][1] <= t <= rows[-1][2])
    p50, p99 = pct(lags, 50), pct(lags, 99)
    results[ph] = (p50, p99)
    rate_name = 'max' if ph.startswith('0:') else ph.split(':')[0]
    print('%-9s %7d %8.0f | %9.2f %9.2f %9.2f%s | %9.3f %9.3f     %9.3f %9.3f     %6.2fx  (%d names, %d files created, %.1f/s)' % (
        rate_name + '/s', len(rows), len(rows) / dur if dur else 0,
        ms(p50), ms(p99), ms(max(lags)) if lags else float('nan'),
        (' MISSING %d' % missing) if missing else '',
        ms(pct(blat, 50)), ms(pct(blat, 99)), ms(pct(lat, 50)), ms(pct(lat, 99)),
        pct(lat, 50) / pct(blat, 50) if blat else float('nan'), nsegs, nfiles,
        nfiles / dur if dur else 0))
for ph in order:
    if ph.startswith('0:') and base.get(ph):
        rows, brows = w[ph], base[ph]
        rate = len(rows) / ((rows[-1][2] - rows[0][1]) / 1e9)
        brate = len(brows) / ((brows[-1][2] - brows[0][1]) / 1e9)
        print('max-rate writer: %.0f commits/s with walship, %.0f plain: %.2fx' % (rate, brate, rate / brate))
print('SQLITE_BUSY errors (busy timeout 5 s): %s with walship, %s plain' % (
    busy.get(wfile, '?'), busy.get(bfile, '?')))
# machine-readable summary for the 100/s phase
for ph in order:
    if ph.startswith('100:'):
        print('RESULT lag100 p50_ms=%.2f p99_ms=%.2f' % (ms(results[ph][0]), ms(results[ph][1])))
