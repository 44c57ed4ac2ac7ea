#!/bin/bash
# The rate of a max-rate single-row writer beside walship, against the same writer on plain
# sqlite3, in interleaved pairs (plain, walship, plain, walship...): a fresh database per run,
# `writer.py ... 0:SECS` (one-row autocommit INSERTs as fast as one Python connection goes,
# synchronous=NORMAL, default autocheckpoint), walship started on it before the writer. Unlike
# `PHASES=0:4 lag.sh`, nothing else runs beside the writer (lag.sh's replica watcher costs it
# a few percent; both runs have the same WAL-size sampler). Prints each pair's ratio, walship's CPU and WAL peak, then the median.
# usage: bench/maxrate.sh [file|sftp] [PAIRS] [SECS]   (defaults file 6 4)
source "$(dirname "$0")/common.sh"
KIND=${1:-file}; PAIRS=${2:-6}; SECS=${3:-4}
replica_target "$KIND"
wal_mib() { awk '$1=="wal" {printf "%.1f", $2 / 1048576}' "$1"; }
count() { grep -c '^0:' "$1"; }
echo "# maxrate.sh  $(date -u +%FT%TZ)  $(nproc) cores  $KIND  $PAIRS pairs of $SECS s  walship $($WALSHIP --version)"
printf '%-5s %10s %10s %7s %12s %9s\n' pair plain/s walship/s ratio walship_cpu WAL_MiB
RATIOS=""
for p in $(seq 1 "$PAIRS"); do
    make_db "$T/plain$p.db"
    start_sampler "$T/plain$p.peak" "$T/plain$p.db-wal"
    python3 "$BENCH/writer.py" "$T/plain$p.db" "$T/plain$p.out" "0:$SECS" >/dev/null
    stop_sampler
    make_db "$T/w$p.db"
    [ "$KIND" = sftp ] && sftp_dir_new && URL="$SFTP_URL"
    [ "$KIND" = file ] && URL="file://$T/replica$p"
    start_walship "$T/w$p.db" "$URL" "$T/state$p" "$T/walship$p.log" $EXTRA
    C0=$(python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; print(proc_cpu_seconds($WPID))")
    start_sampler "$T/w$p.peak" "$T/w$p.db-wal"
    python3 "$BENCH/writer.py" "$T/w$p.db" "$T/w$p.out" "0:$SECS" >/dev/null
    stop_sampler
    C1=$(python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; print(proc_cpu_seconds($WPID))")
    stop_walship
    a=$(count "$T/plain$p.out"); b=$(count "$T/w$p.out")
    r=$(python3 -c "print('%.3f' % ($b / $a))"); RATIOS="$RATIOS $r"
    printf '%-5s %10d %10d %6sx %10.2f s %9s\n' "$p" $((a / SECS)) $((b / SECS)) "$r" \
        "$(python3 -c "print($C1 - $C0)")" "$(wal_mib "$T/w$p.peak")"
    rm -rf "$T/plain$p.db"* "$T/w$p.db"* "$T/state$p" "$T/replica$p"
done
MED=$(python3 -c "import statistics, sys; print('%.3f' % statistics.median(map(float, sys.argv[1:])))" $RATIOS)
echo "RESULT maxrate $KIND median ${MED}x over $PAIRS pairs (ratios:$RATIOS)"
