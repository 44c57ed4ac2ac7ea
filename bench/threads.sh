#!/bin/bash
# threads.sh [file|sftp] [ROUNDS] : the CPU each of walship's threads (and, over sftp, the
# loopback sshd's processes) spends on a 200 MiB bulk load (`loader.py`, 1 MiB transactions),
# from /proc/*/schedstat (ns) until the replica holds the last commit, ROUNDS (default 3)
# loads; `WALSHIP=` picks the build. The
# baseline is the load's own time, printed beside. Threads that ended before the count (the
# copy under the write lock, one per hold) are not in it.
source "$(dirname "$0")/common.sh"
MODE=${1:-file}; ROUNDS=${2:-3}
use_fs
cpu_ms() { # PID... -> ms summed over their threads
    local t=0 p f
    for p in "$@"; do for f in /proc/$p/task/*/schedstat; do
        [ -r "$f" ] && t=$((t + $(cut -d' ' -f1 "$f" 2>/dev/null || echo 0))); done; done
    echo $((t / 1000000))
}
sshd_pids() { pgrep -x sshd || true; }
echo "# threads.sh $MODE  $(date -u +%FT%TZ)  $(nproc) cores  $(basename "$WALSHIP")"
replica_target "$MODE"   # over sftp: one sshd for every round, a fresh replica directory each
for r in $(seq 1 "$ROUNDS"); do
    rm -rf "$FS/w.db"* "$FS/state" "$FS/replica"; make_db "$FS/w.db"
    [ "$MODE" = sftp ] && [ "$r" -gt 1 ] && { sftp_dir_new; URL="$SFTP_URL"; }
    start_walship "$FS/w.db" "$URL" "$FS/state" "$FS/walship.log" $EXTRA
    sleep 0.5
    declare -A before; for f in /proc/$WPID/task/*; do before[$(cat "$f/comm")]=$(cut -d' ' -f1 "$f/schedstat"); done
    s0=$(cpu_ms $(sshd_pids))
    python3 "$BENCH/loader.py" "$FS/w.db" 200 >"$FS/load"
    # Counted until the replica holds the load's last commit (txid 1 is the empty database's),
    # not after: compaction, which waits for 1 s without commits, would add its own work (the
    # shipper's CPU was 145 or 550 ms, sshd's 330 or 650, as it ran within a fixed wait or not).
    want=$(( $(awk '$1=="commits"{print $2}' "$FS/load") + 1 )); i=0
    until grep -q "replicated to 1/1 replicas.*/$want\$" "$FS/state/status" 2>/dev/null; do
        i=$((i + 1)); [ $i -lt 3000 ] || { echo "threads.sh: the replica never caught up" >&2; exit 1; }
        sleep 0.01
    done
    s1=$(cpu_ms $(sshd_pids))
    line="load $(( ($(awk '$1=="end"{print $2}' "$FS/load") - $(awk '$1=="start"{print $2}' "$FS/load")) / 1000000 )) ms; CPU ms:"
    for f in /proc/$WPID/task/*; do
        c=$(cat "$f/comm"); ns=$(( $(cut -d' ' -f1 "$f/schedstat") - ${before[$c]:-0} ))
        [ $ns -ge 1000000 ] && line="$line $c=$((ns / 1000000))"
    done
    [ "$MODE" = sftp ] && line="$line sshd=$((s1 - s0))"
    echo "$line"
    stop_walship; unset before
done
