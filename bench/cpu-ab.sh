#!/bin/bash
# walship's CPU per commit, two builds compared in interleaved runs (A, B, A, B, ...), so that
# the machine's drift hits both alike: a fresh database and replica per run, RATE one-row
# commits/s for SECS s, CPU from /proc/PID/task/*/schedstat (nanoseconds, every thread; finer
# than the clock ticks `cpu.sh` reads). Prints ms per commit for each run, then each build's
# median and B/A.
# usage: bench/cpu-ab.sh BIN_A BIN_B [PAIRS] [SECS] [file|sftp] [RATE]   (defaults 6 8 sftp 100)
source "$(dirname "$0")/common.sh"
A=$1; B=$2; PAIRS=${3:-6}; SECS=${4:-8}; KIND=${5:-sftp}; RATE=${6:-100}
[ -x "$A" ] && [ -x "$B" ] || { echo "usage: $0 BIN_A BIN_B [PAIRS] [SECS] [file|sftp] [RATE]" >&2; exit 2; }
[ "$KIND" = sftp ] && start_sshd
cpu_ns() { local t=0 f; for f in /proc/$1/task/*/schedstat; do t=$((t + $(cut -d' ' -f1 "$f"))); done; echo $t; }
echo "# cpu-ab.sh  $(date -u +%FT%TZ)  $(nproc) cores  $KIND  $RATE commits/s  $PAIRS pairs of $SECS s  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
n=0; RES="$T/results"
for p in $(seq 1 "$PAIRS"); do for side in A B; do
    n=$((n + 1)); D="$T/r$n"; mkdir -p "$D"; make_db "$D/db"
    if [ $side = A ]; then WALSHIP=$A; else WALSHIP=$B; fi
    if [ "$KIND" = file ]; then
        start_walship "$D/db" "file://$D/replica" "$D/state" "$D/walship.log"
    else
        start_walship "$D/db" "$SFTP_URL/r$n" "$D/state" "$D/walship.log" --key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN"
    fi
    sleep 1
    c0=$(cpu_ns "$WPID")
    python3 "$BENCH/writer.py" "$D/db" "$D/w.out" "$RATE:$SECS"
    c1=$(cpu_ns "$WPID")
    stop_walship
    ms=$(python3 -c "print('%.4f' % (($c1 - $c0) / 1e6 / ($RATE * $SECS)))")
    echo "$side $ms" | tee -a "$RES"
    rm -rf "$D"
done; done
python3 - "$RES" <<'PY'
import statistics, sys
v = {"A": [], "B": []}
for line in open(sys.argv[1]):
    side, ms = line.split()
    v[side].append(float(ms))
a, b = statistics.median(v["A"]), statistics.median(v["B"])
print(f"median ms per commit: A {a:.4f}  B {b:.4f}  B/A {b / a:.3f}")
PY
