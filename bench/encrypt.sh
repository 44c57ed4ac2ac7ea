#!/bin/bash
# The cost of client-side encryption (encrypt-to), plaintext and encrypted (age, one X25519
# recipient) to a file:// replica in one run, alternated ROUNDS times (default 2; best of the
# rounds, the machine being noisy):
# - initial snapshot of a MIB (default 100) database that exists before walship starts: walship
#   CPU seconds per MiB and throughput (MiB / time from start to "replicated to 1/1");
# - bulk load of MIB more in 1 MiB transactions while it replicates: walship CPU seconds per MiB
#   and throughput (MiB / time from load start to last txid on the replica; bounded by the
#   loader, so a ratio near 1 only says encryption does not slow replication down);
# - replica bytes, and restore time (the encrypted one with --identity), byte-identical checked.
# usage: bench/encrypt.sh [MIB]   env: ROUNDS
source "$(dirname "$0")/common.sh"
MIB="${1:-100}"; ROUNDS="${ROUNDS:-2}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
kv() { awk -v k="$1" '$1==k {print $2}' "$2"; }
RECIPIENT=$(python3 "$BENCH/agekey.py" "$T/identity.txt")

# run KIND: snapshot of a MIB database, then MIB loaded while replicating to $T/KIND/replica;
# appends to the KIND_* result lists.
run() {
    local kind="$1" D="$T/$1"; rm -rf "$D"; mkdir -p "$D"
    make_db "$D/db"
    python3 "$BENCH/loader.py" "$D/db" "$MIB" >"$D/preload"
    python3 -c "import sqlite3; c=sqlite3.connect('$D/db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
    { echo "db = \"$D/db\""; echo "state-dir = \"$D/state\""; echo "[[replica]]"
      echo "url = \"file://$D/replica\""
      [ "$kind" = encrypted ] && echo "encrypt-to = [\"$RECIPIENT\"]"; } >"$D/walship.toml"
    local s0; s0=$(mono_ns)
    "$WALSHIP" replicate --config "$D/walship.toml" >"$D/walship.log" 2>&1 &
    WPID=$!; PIDS="$PIDS $WPID"
    wait_ready "$D/state" "$D/walship.log"
    local s1; s1=$(mono_ns)
    local cpu0; cpu0=$(py "print(proc_cpu_seconds($WPID))")
    eval "SNAPCPU_$kind=\"\${SNAPCPU_$kind:-} $(py "print('%.4f' % ($cpu0 / $MIB))")\""
    eval "SNAPTP_$kind=\"\${SNAPTP_$kind:-} $(py "print('%.1f' % ($MIB * 1e9 / ($s1 - $s0)))")\""
    start_watch "$D/replica" "$D/watch.out"
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
    eval "CPU_$kind=\"\${CPU_$kind:-} $(py "print('%.4f' % (($cpu1 - $cpu0) / $MIB))")\""
    eval "TP_$kind=\"\${TP_$kind:-} $(py "print('%.1f' % ($MIB / $secs))")\""
    eval "BYTES_$kind=$(py "print('%.1f' % (dir_bytes('$D/replica') / 2**20))")"
    python3 -c "import sqlite3; c=sqlite3.connect('$D/db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
    local extra=""; [ "$kind" = encrypted ] && extra="--identity $T/identity.txt"
    sync; local r="" i t0 t1
    for i in 1 2 3; do
        rm -f "$D/restored.db"
        t0=$(mono_ns); "$WALSHIP" restore -q $extra -o "$D/restored.db" "file://$D/replica" >/dev/null; t1=$(mono_ns)
        r="$r $(( (t1 - t0) / 1000000 ))"
    done
    eval "RESTORE_$kind=\"\${RESTORE_$kind:-} $(echo $r | tr ' ' '\n' | sort -n | sed -n 2p)\""
    if cmp -s "$D/restored.db" "$D/db"; then eval "SAME_$kind=byte-identical"; else eval "SAME_$kind=DIFFERENT"; fi
    if [ "$kind" = encrypted ] && grep -rlq 'WALSHIP' "$D/replica/generations"; then
        echo "bench: a plaintext walship file on the encrypted replica" >&2; exit 1; fi
}
for i in $(seq "$ROUNDS"); do run plain; run encrypted; done
lo() { echo $* | tr ' ' '\n' | sort -g | head -1; }
hi() { echo $* | tr ' ' '\n' | sort -g | tail -1; }
for k in plain encrypted; do
    eval "SC_$k=\$(lo \$SNAPCPU_$k) ST_$k=\$(hi \$SNAPTP_$k) C_$k=\$(lo \$CPU_$k) P_$k=\$(hi \$TP_$k) R_$k=\$(lo \$RESTORE_$k)"
done
row() { printf '%-38s %-14s %-14s %.2fx   %s\n' "$1" "$2" "$3" "$(py "print($3/$2)")" "$4"; }
echo "# encrypt.sh  $(date -u +%FT%TZ)  $(nproc) cores  ${MIB} MiB database + ${MIB} MiB in 1 MiB transactions, file:// replica, best of $ROUNDS rounds  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-38s %-14s %-14s %s\n' metric plain encrypted ratio
row "snapshot: walship CPU s per MiB" "$SC_plain" "$SC_encrypted" "(rounds: $SNAPCPU_plain /$SNAPCPU_encrypted)"
row "snapshot: throughput (MiB/s)" "$ST_plain" "$ST_encrypted" "(rounds: $SNAPTP_plain /$SNAPTP_encrypted)"
row "bulk: walship CPU s per MiB" "$C_plain" "$C_encrypted" "(rounds: $CPU_plain /$CPU_encrypted)"
row "bulk: throughput (MiB/s, loader-bound)" "$P_plain" "$P_encrypted" "(rounds: $TP_plain /$TP_encrypted)"
row "replica bytes (MiB)" "$BYTES_plain" "$BYTES_encrypted" ""
row "restore (ms)" "$R_plain" "$R_encrypted" "($SAME_plain / $SAME_encrypted)"
echo "RESULT encrypt snapshot_cpu_ms_per_mib=$(py "print('%.1f' % ($SC_plain*1000))")/$(py "print('%.1f' % ($SC_encrypted*1000))") snapshot_throughput_ratio=$(py "print('%.2f' % ($ST_encrypted/$ST_plain))") bulk_cpu_ms_per_mib=$(py "print('%.1f' % ($C_plain*1000))")/$(py "print('%.1f' % ($C_encrypted*1000))") bulk_throughput_ratio=$(py "print('%.2f' % ($P_encrypted/$P_plain))")"
