#!/bin/bash
# The daemon's system calls (strace -c -f) while a writer makes RATE one-row commits/s for SECS
# seconds (default 100 for 5) to a file:// replica, and the files the replica holds after.
# Divide the counts by RATE*SECS for calls per commit.
# usage: bench/syscalls.sh [RATE] [SECS]   env: WALSHIP (the binary), KEEP
source "$(dirname "$0")/common.sh"
RATE="${1:-100}"; SECS="${2:-5}"
D="$T/file"; mkdir -p "$D"
make_db "$D/db"
start_walship "$D/db" "file://$D/replica" "$D/state" "$D/walship.log"
sleep 1
strace -c -f -p "$WPID" -o "$T/strace.out" 2>/dev/null & SP=$!
sleep 0.5
python3 "$BENCH/writer.py" "$D/db" "$D/w.out" "$RATE:$SECS"
sleep 0.3
kill -INT $SP; wait $SP || true
stop_walship
echo "# syscalls.sh  $(date -u +%FT%TZ)  $RATE commits/s for $SECS s  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
echo "files on the replica after the run: $(find "$D/replica" -type f | wc -l)"
head -30 "$T/strace.out"
