#!/bin/bash
# What applications do around walship, with and without it, in one run: a writer with NO busy
# timeout (the sqlite3 CLI's default) at 100 commits/s (SQLITE_BUSY count; goal 0); the same
# writer running `pragma wal_checkpoint(TRUNCATE)` every 10 commits (checkpoint time, busy
# checkpoints); a writer at full speed while another connection holds a read transaction
# (commit latency p99 / max).
# usage: bench/apps.sh [ROW_BYTES]   (default 20000: ~6 WAL frames a commit, walship checkpoints
#        every couple of seconds; 0 for one-frame commits)
source "$(dirname "$0")/common.sh"
ROW="${1:-20000}"
APP="$BENCH/../tests/app.py"
SECS="${SECS:-10}"

run_all() {  # DB LABEL
    local db=$1 label=$2
    echo "$label busy0    $(python3 "$APP" write "$db" --rate 100 --secs "$SECS" --busy-ms 0 --row-bytes "$ROW" 2>/dev/null)"
    echo "$label truncate $(python3 "$APP" write "$db" --rate 50 --secs "$SECS" --checkpoint-every 10 --row-bytes "$ROW" 2>/dev/null)"
    python3 "$APP" read "$db" --secs "$((SECS + 2))" > /dev/null &
    local reader=$!
    PIDS="$PIDS $reader"
    sleep 0.5
    echo "$label reader   $(python3 "$APP" write "$db" --rate 100000 --secs "$SECS" --row-bytes 6000 2>/dev/null)"
    wait "$reader"
}

echo "# apps.sh  $(date -u +%FT%TZ)  $(nproc) cores  rows of $ROW bytes, $SECS s per phase  walship $($WALSHIP --version)"
make_db "$T/base.db"
run_all "$T/base.db" "sqlite3" | tee "$T/base.out"
make_db "$T/w.db"
start_walship "$T/w.db" "file://$T/replica" "$T/state" "$T/walship.log"
run_all "$T/w.db" "walship" | tee "$T/w.out"
stop_walship
echo "# walship log: $(grep -c ERROR "$T/walship.log" || true) ERROR, $(grep -c WARN "$T/walship.log" || true) WARN lines; generations: $(grep -c 'starting a new generation' "$T/walship.log" || true)"
$WALSHIP restore -o "$T/r.db" "file://$T/replica" > /dev/null
SRC=$(sqlite3 "$T/w.db" 'select count(*) from t'); GOT=$(sqlite3 "$T/r.db" 'select count(*) from t')
echo "# restore: $GOT rows, source $SRC rows"
echo "RESULT apps.sh rows=$ROW restore_equal=$([ "$SRC" = "$GOT" ] && echo yes || echo NO)"
