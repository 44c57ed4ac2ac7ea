#!/bin/bash
# The cost of client-side encryption (encrypt-to): the same bulk load (default 100 MiB in 1 MiB
# transactions) replicated to a file:// replica twice in one run, plaintext and encrypted (age,
# one X25519 recipient): walship CPU seconds per MiB loaded, replication throughput (MiB loaded
# / time from load start to last txid on the replica) and its ratio, replica bytes; then restore
# time of each (the encrypted one with --identity), checked byte-identical with the source.
# usage: bench/encrypt.sh [MIB]
source "$(dirname "$0")/common.sh"
MIB="${1:-100}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
kv() { awk -v k="$1" '$1==k {print $2}' "$2"; }
RECIPIENT=$(python3 "$BENCH/agekey.py" "$T/identity.txt")

# run KIND: load MIB into a fresh database replicated to $T/KIND/replica; sets CPU_KIND, TP_KIND...
run() {
    local kind="$1" D="$T/$1"; mkdir -p "$D"
    make_db "$D/db"
    { echo "db = \"$D/db\""; echo "state-dir = \"$D/state\""; echo "[[replica]]"
      echo "url = \"file://$D/replica\""
      [ "$kind" = encrypted ] && echo "encrypt-to = [\"$RECIPIENT\"]"; } >"$D/walship.toml"
    "$WALSHIP" replicate --config "$D/walship.toml" >"$D/walship.log" 2>&1 &
    WPID=$!; PIDS="$PIDS $WPID"
    wait_ready "$D/state" "$D/walship.log"
    start_watch "$D/replica" "$D/watch.out"
    local cpu0; cpu0=$(py "print(proc_cpu_seconds($WPID))")
    python3 "$BENCH/loader.py" "$D/db" "$MIB" >"$D/load"
    local last=$(( $(kv commits "$D/load") + 1 ))
    local repl_ns; repl_ns=$(python3 - "$D/watch.out" "$last" <<'PY'
import sys, time
f, want = sys.argv[1], int(sys.argv[2])
dl = time.monotonic() + 300
while time.monotonic() < dl:
    for l in open(f):
        p = l.split()
        if p and p[0] == 'seg' and int(p[2]) >= want:
            print(p[3]); sys.exit(0)
    time.sleep(0.002)
print(-1)
PY
)
    [ "$repl_ns" = -1 ] && { echo "bench: $kind never caught up" >&2; cat "$D/walship.log" >&2; exit 1; }
    local cpu1; cpu1=$(py "print(proc_cpu_seconds($WPID))")
    stop_walship; kill "$WATCHPID" 2>/dev/null || true
    local secs; secs=$(py "print(($repl_ns - $(kv start "$D/load")) / 1e9)")
    eval "CPU_$kind=$(py "print('%.4f' % (($cpu1 - $cpu0) / $MIB))")"
    eval "TP_$kind=$(py "print('%.1f' % ($MIB / $secs))")"
    eval "BYTES_$kind=$(py "print('%.1f' % (dir_bytes('$D/replica') / 2**20))")"
    python3 -c "import sqlite3; c=sqlite3.connect('$D/db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
    local extra=""; [ "$kind" = encrypted ] && extra="--identity $T/identity.txt"
    sync; local r="" i t0 t1
    for i in 1 2 3; do
        rm -f "$D/restored.db"
        t0=$(mono_ns); "$WALSHIP" restore -q $extra -o "$D/restored.db" "file://$D/replica" >/dev/null; t1=$(mono_ns)
        r="$r $(( (t1 - t0) / 1000000 ))"
    done
    eval "RESTORE_$kind=$(echo $r | tr ' ' '\n' | sort -n | sed -n 2p)"
    if cmp -s "$D/restored.db" "$D/db"; then eval "SAME_$kind=byte-identical"; else eval "SAME_$kind=DIFFERENT"; fi
    if [ "$kind" = encrypted ] && grep -rlq 'WALSHIP' "$D/replica/generations"; then
        echo "bench: a plaintext walship file on the encrypted replica" >&2; exit 1; fi
}
run plain
run encrypted

cat <<OUT
# encrypt.sh  $(date -u +%FT%TZ)  $(nproc) cores  ${MIB} MiB in 1 MiB transactions, file:// replica  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)
metric                               plain          encrypted      ratio
walship CPU s per MiB loaded         $(printf '%-14s %-14s %.2fx' "$CPU_plain" "$CPU_encrypted" "$(py "print($CPU_encrypted/$CPU_plain)")")   (encryption: $(py "print('%.1f' % (($CPU_encrypted-$CPU_plain)*1000))") ms CPU per MiB)
replication throughput (MiB/s)       $(printf '%-14s %-14s %.2fx' "$TP_plain" "$TP_encrypted" "$(py "print($TP_encrypted/$TP_plain)")")   (load start -> last txid on the replica)
replica bytes (MiB)                  $(printf '%-14s %-14s %.3fx' "$BYTES_plain" "$BYTES_encrypted" "$(py "print($BYTES_encrypted/$BYTES_plain)")")
restore (ms, median of 3)            $(printf '%-14s %-14s %.2fx' "$RESTORE_plain" "$RESTORE_encrypted" "$(py "print($RESTORE_encrypted/$RESTORE_plain)")")   ($SAME_plain / $SAME_encrypted)
RESULT encrypt cpu_ratio=$(py "print('%.2f' % ($CPU_encrypted/$CPU_plain))") throughput_ratio=$(py "print('%.2f' % ($TP_encrypted/$TP_plain))") cpu_ms_per_mib=$(py "print('%.1f' % (($CPU_encrypted-$CPU_plain)*1000))")
OUT
