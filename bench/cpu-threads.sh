#!/bin/bash
# walship's CPU and context switches per commit, thread by thread, while a writer makes RATE
# one-row commits/s for SECS s (from /proc/PID/task/*/schedstat: CPU ns and switches per
# thread). PERF=1 also records a profile of the run (`perf record --call-graph dwarf`) in
# /tmp/perf.data, for `perf report --comm THREAD`.
# usage: bench/cpu-threads.sh [file|sftp] [RATE] [SECS]   (defaults sftp 100 8)
source "$(dirname "$0")/common.sh"
KIND=${1:-sftp}; RATE=${2:-100}; SECS=${3:-8}
[ "$KIND" = sftp ] && start_sshd
D="$T/r"; mkdir -p "$D"; make_db "$D/db"
if [ "$KIND" = file ]; then
    start_walship "$D/db" "file://$D/replica" "$D/state" "$D/walship.log"
else
    start_walship "$D/db" "$SFTP_URL/r" "$D/state" "$D/walship.log" --key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN"
fi
sleep 1
snap() { for f in /proc/$WPID/task/*; do echo "$(cat "$f/comm") $(cut -d' ' -f1,3 "$f/schedstat")"; done; }
snap >"$T/s0"
if [ -n "${PERF:-}" ]; then
    perf record -F 2999 --call-graph dwarf,16384 -p "$WPID" -o /tmp/perf.data -- sleep $((SECS - 1)) 2>/dev/null & PP=$!
fi
python3 "$BENCH/writer.py" "$D/db" "$D/w.out" "$RATE:$SECS"
snap >"$T/s1"
[ -n "${PERF:-}" ] && wait "$PP"
echo "# cpu-threads.sh $KIND  $(date -u +%FT%TZ)  $(nproc) cores  $RATE commits/s for $SECS s  $(basename "$WALSHIP")"
paste "$T/s0" "$T/s1" | awk -v n=$((RATE * SECS)) '{printf "%-16s cpu/commit %.4f ms  switches/commit %.2f\n", $1, ($5-$2)/1e6/n, ($6-$3)/n}'
stop_walship
