#!/bin/bash
# loader-cpu.sh ROUNDS BIN... : what a bulk writer's time is made of, plain and beside walship
# builds: ROUNDS rounds of 200 MiB loads (`loader.py`, 1 MiB transactions, file:// replica),
# plain first, then beside each build BIN. For each load: its time, the loader's own CPU time,
# its time runnable but waiting for a CPU (run queue), and how often it was preempted. The rest
# of a load's time is the loader asleep: its checkpoints' fsyncs and walship's holds.
# JOURNALED=1 as for bulk.sh.
source "$(dirname "$0")/common.sh"
ROUNDS=$1; shift
[ $# -ge 1 ] || { echo "usage: $0 ROUNDS BIN..." >&2; exit 2; }
use_fs
kv() { awk -v k="$1" '$1==k {print $2}' "$FS/out"; }
echo "# loader-cpu.sh  $(date -u +%FT%TZ)  $(nproc) cores  loadavg $(cut -d' ' -f1-3 /proc/loadavg)  $FS_NAME"
replica_target file
for r in $(seq 1 "$ROUNDS"); do
    for b in base "$@"; do
        fresh_load_db "$b" "$FS/walship.log"
        python3 "$BENCH/loader.py" "$FS/w.db" 200 >"$FS/out"
        [ "$b" != base ] && stop_walship
        printf 'round %d %-12s load %4d ms  cpu %4d ms  run queue %3d ms  preempted %d\n' "$r" \
            "$(basename "$b")" $(( ($(kv end) - $(kv start)) / 1000000 )) "$(kv cpu_ms)" "$(kv runq_ms)" "$(kv preempted)"
    done
done
