#!/bin/bash
# Commit -> durable-on-replica lag at 10, 100, 1000 commits/s and full speed, and the app-side
# commit latency with and without walship, measured in one run.
# usage: bench/lag.sh [file|sftp]   (sftp needs root and openssh-server: throwaway loopback sshd)
# env: PHASES (default 10:3,100:4,1000:3,0:2 as RATE:SECONDS), SYNC (NORMAL|FULL, default NORMAL)
source "$(dirname "$0")/common.sh"
MODE="${1:-file}"
PHASES="${PHASES:-10:3,100:4,1000:3,0:2}"
SYNC="${SYNC:-NORMAL}"

wal_mib() { awk '$1=="wal" {printf "%.1f", $2 / 1048576}' "$1"; }

# Baseline: plain sqlite3, no walship.
make_db "$T/base.db"
start_sampler "$T/base.peak" "$T/base.db-wal"
python3 "$BENCH/writer.py" "$T/base.db" "$T/base.out" "$PHASES" --sync "$SYNC"
stop_sampler

make_db "$T/w.db"
replica_target "$MODE"
start_walship "$T/w.db" "$URL" "$T/state" "$T/walship.log" $EXTRA
start_watch "$ROOT" "$T/watch.out"
CPU0=$(python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; print(proc_cpu_seconds($WPID))")
start_sampler "$T/w.peak" "$T/w.db-wal"
python3 "$BENCH/writer.py" "$T/w.db" "$T/w.out" "$PHASES" --sync "$SYNC"
stop_sampler
sleep 0.5
CPU1=$(python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; print(proc_cpu_seconds($WPID))")
echo "# lag.sh $MODE  $(date -u +%FT%TZ)  $(nproc) cores  synchronous=$SYNC  walship $($WALSHIP --version)"
echo "# status after run: $(cat "$T/state/status")"
python3 "$BENCH/lagstats.py" "$T/w.out" "$T/watch.out" "$T/base.out" "$MODE"
echo "walship CPU during the writer run: $(python3 -c "print('%.2f' % ($CPU1 - $CPU0))") s"
echo "WAL file peak: $(wal_mib "$T/w.peak") MiB with walship, $(wal_mib "$T/base.peak") MiB plain"
stop_walship
echo "walship log: $(grep -c ERROR "$T/walship.log" || true) ERROR lines, $(grep -c WARN "$T/walship.log" || true) WARN lines; distinct:"
grep -E 'WARN|ERROR' "$T/walship.log" | sed -E 's/^[^ ]+ +//; s/[0-9a-f]{16}/X/g; s/[0-9a-f]{12}/X/g; s#/tmp/[^ ]*##g' | sort | uniq -c | head -8 || true
