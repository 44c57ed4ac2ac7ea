#!/bin/bash
# walship's memory (VmRSS/VmHWM) idle and under load at two database sizes, and its wake-ups
# (context switches over all threads) during 10 s of an idle database.
# usage: bench/rss.sh [SMALL_MIB] [LARGE_MIB]   (defaults 20 200)
source "$(dirname "$0")/common.sh"
SIZES="${1:-20} ${2:-200}"
IDLE="${IDLE:-10}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
mib_of() { py "print('%.1f' % (kib(proc_status($WPID)['$1'])/1024))"; }

echo "# rss.sh  $(date -u +%FT%TZ)  $(nproc) cores  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-8s %-10s %-10s %-10s %-12s %-10s %-12s %-12s %-8s %s\n' db_MiB start_s RSS_idle HWM_start RSS_load_pk HWM_end CPU_idle_% CPU_load_% threads "idle ${IDLE}s ctxt switches (vol+nonvol per thread)"
for S in $SIZES; do
    D="$T/s$S"; mkdir -p "$D"
    make_db "$D/db"
    python3 "$BENCH/loader.py" "$D/db" "$S" >/dev/null
    python3 -c "import sqlite3; c=sqlite3.connect('$D/db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
    t0=$(mono_ns)
    start_walship "$D/db" "file://$D/replica" "$D/state" "$D/walship.log"
    t1=$(mono_ns)
    sleep 1
    HWM0=$(mib_of VmHWM)
    C0=$(py "import json; print(json.dumps(ctxt_switches($WPID)))")
    CPU0=$(py "print(proc_cpu_seconds($WPID))")
    sleep "$IDLE"
    CPU1=$(py "print(proc_cpu_seconds($WPID))")
    C1=$(py "import json; print(json.dumps(ctxt_switches($WPID)))")
    RSS_IDLE=$(mib_of VmRSS)
    WAKE=$(python3 - "$C0" "$C1" <<'PY'
import json, sys
a, b = json.loads(sys.argv[1]), json.loads(sys.argv[2])
parts, tot = [], 0
for tid in sorted(b, key=int):
    n, v, nv = b[tid]
    _, v0, nv0 = a.get(tid, (n, 0, 0))
    d = (v - v0) + (nv - nv0)
    tot += d
    parts.append('%s=%d' % (n, d))
print('total %d: %s' % (tot, ' '.join(parts)))
PY
)
    NTHR=$(ls /proc/$WPID/task | wc -l)
    # load: 100 commits/s for 3 s, then a LOAD_MIB (default 50) MiB bulk load, RSS sampled every 10 ms
    python3 "$BENCH/sampler.py" "$D/peak" "$D/db-wal" - "$WPID" & SPID=$!; PIDS="$PIDS $SPID"
    until [ -e "$D/peak.ready" ]; do sleep 0.005; done
    CPU2=$(py "print(proc_cpu_seconds($WPID))"); t2=$(mono_ns)
    python3 "$BENCH/writer.py" "$D/db" "$D/w.out" 100:3
    python3 "$BENCH/loader.py" "$D/db" "${LOAD_MIB:-50}" >/dev/null
    sleep 1
    CPU3=$(py "print(proc_cpu_seconds($WPID))"); t3=$(mono_ns)
    kill -TERM $SPID; wait $SPID || true
    RSS_LOAD=$(awk '$1=="rss_kib"{printf "%.1f", $2/1024}' "$D/peak")
    HWM1=$(mib_of VmHWM)
    stop_walship
    printf '%-8s %-10s %-10s %-10s %-12s %-10s %-12s %-12s %-8s %s\n' "$S" "$(py "print('%.2f' % (($t1-$t0)/1e9))")" "$RSS_IDLE" "$HWM0" "$RSS_LOAD" "$HWM1" \
        "$(py "print('%.2f' % (($CPU1-$CPU0)*100/$IDLE))")" "$(py "print('%.1f' % (($CPU3-$CPU2)*1e11/($t3-$t2)))")" "$NTHR" "$WAKE"
    rm -rf "$D"
done
echo "(MiB; start_s = walship start until ready incl. the first snapshot; HWM_start = VmHWM 1 s after ready; CPU_% = walship's CPU time over wall time of one core, idle and during the load (3 s at 100 commits/s, then the bulk load, then 1 s); target: RSS <= 16 MiB at both sizes, no wake-ups beyond timers)"
