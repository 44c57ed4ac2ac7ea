#!/bin/bash
# Bulk load (default 200 MiB in 1 MiB transactions) while walship replicates to a file:// or
# sftp:// replica: catch-up time after the load's end, WAL peak (vs plain sqlite3 alone), walship
# CPU per GiB, state-dir peak, replica bytes; then restore vs `cp` + `PRAGMA integrity_check`, in
# one run.
# usage: bench/bulk.sh [MIB] [file|sftp]   (sftp needs root and openssh-server: throwaway loopback sshd)
# env: JOURNALED=1 keeps the databases, the state directory and a file replica on a loop-mounted
# ext4 with a journal (see use_fs in common.sh); an sftp replica stays in the chroot.
# NOISE=1 runs another writer on that file system through both loads (256 MiB files written and
# fsynced, one after the other): a disk busy with other writes.
# TWO_HOST=1 (sftp): the replica directory on a tmpfs of its own and sshd under SCHED_IDLE, as if
# ALPHA were another machine (see sftp_dir_new in common.sh).
# STATE_TMPFS=1 keeps walship's state directory, its spool with it, on /dev/shm: not a safe
# set-up, a diagnosis of what the spool's writes to the disk cost the load.
source "$(dirname "$0")/common.sh"
MIB="${1:-200}"
MODE="${2:-file}"
use_fs
NOISE_PID=""
if [ -n "${NOISE:-}" ]; then
    # A process group of its own: the loop and its dd stop together.
    setsid bash -c 'while :; do dd if=/dev/zero of="$1/noise" bs=1M count=256 conv=fsync status=none; done' _ "$FS" &
    NOISE_PID=$!
fi
stop_noise() {
    [ -n "$NOISE_PID" ] || return 0
    kill -- "-$NOISE_PID" 2>/dev/null || true; wait "$NOISE_PID" 2>/dev/null || true
    rm -f "$FS/noise"; NOISE_PID=""
}
trap 'stop_noise; cleanup' EXIT
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
kv() { awk -v k="$1" '$1==k {print $2}' "$2"; }

# Baseline: plain sqlite3 alone.
make_db "$FS/base.db"
start_sampler "$FS/base.peak" "$FS/base.db-wal" -
python3 "$BENCH/loader.py" "$FS/base.db" "$MIB" >"$FS/base.load"
stop_sampler
BASE_LOAD=$(( ($(kv end "$FS/base.load") - $(kv start "$FS/base.load")) / 1000000 ))
rm -f "$FS/base.db"*

# walship
STATE="$FS/state"
if [ -n "${STATE_TMPFS:-}" ]; then
    STATE="$(mktemp -d /dev/shm/walship-bench.XXXXXX)"
    CLEAN_DIRS="$CLEAN_DIRS $STATE"
fi
make_db "$FS/w.db"
replica_target "$MODE"
start_walship "$FS/w.db" "$URL" "$STATE" "$FS/walship.log" $EXTRA
start_watch "$ROOT" "$FS/watch.out"
start_sampler "$FS/w.peak" "$FS/w.db-wal" "$STATE" "$WPID"
CPU0=$(py "print(proc_cpu_seconds($WPID))")
python3 "$BENCH/loader.py" "$FS/w.db" "$MIB" >"$FS/w.load"
LAST=$(( $(kv commits "$FS/w.load") + 1 ))
# wait (up to 120 s) until a segment holding txid LAST is on the replica
REPL_NS=$(python3 - "$FS/watch.out" "$LAST" <<'PY'
import sys, time
f, want = sys.argv[1], int(sys.argv[2])
dl = time.monotonic() + 120
while time.monotonic() < dl:
    for l in open(f):
        p = l.split()
        if p and p[0] == 'seg' and int(p[2]) >= want:
            print(p[3]); sys.exit(0)
    time.sleep(0.002)
print(-1)
PY
)
CPU1=$(py "print(proc_cpu_seconds($WPID))")
sleep 0.3
stop_sampler
STATUS=$(cat "$STATE/status")
stop_walship
stop_noise
LOAD_MS=$(( ($(kv end "$FS/w.load") - $(kv start "$FS/w.load")) / 1000000 ))
if [ "$REPL_NS" = -1 ]; then CATCH="never (120 s)"; CATCH_MS=999999; else
    CATCH_MS=$(( (REPL_NS - $(kv end "$FS/w.load")) / 1000000 )); CATCH="$CATCH_MS ms"; fi
REPLICA_BYTES=$(py "print(dir_bytes('$ROOT'))")
# the source at rest: fold the WAL in so it can be compared byte for byte with the restore
python3 -c "import sqlite3; c=sqlite3.connect('$FS/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
DB_BYTES=$(stat -c %s "$FS/w.db")

# Restore vs cp + integrity_check: warm page cache for both, alternated 3 times, medians.
sync
R=""; C=""
for i in 1 2 3; do
    rm -f "$FS/restored.db" "$FS/copy.db"
    t0=$(mono_ns); "$WALSHIP" restore -q -o "$FS/restored.db" "$URL" $EXTRA >/dev/null; t1=$(mono_ns)
    t2=$(mono_ns); cp "$FS/w.db" "$FS/copy.db"; IC=$(sqlite3 "$FS/copy.db" 'pragma integrity_check'); t3=$(mono_ns)
    R="$R $(( (t1 - t0) / 1000000 ))"; C="$C $(( (t3 - t2) / 1000000 ))"
done
med() { echo $* | tr ' ' '\n' | sort -n | sed -n 2p; }
RESTORE_MS=$(med $R); CP_MS=$(med $C)
if cmp -s "$FS/restored.db" "$FS/w.db"; then SAME="byte-identical"; else SAME="DIFFERENT"; fi

GIB=$(py "print($MIB/1024)")
cat <<OUT
# bulk.sh $MODE  $(date -u +%FT%TZ)  $(nproc) cores  ${MIB} MiB in $(kv commits "$FS/w.load") transactions  files on $FS_NAME${NOISE:+ (with another writer)}${TWO_HOST:+ (TWO_HOST: replica on a tmpfs, sshd idle)}${STATE_TMPFS:+ (STATE_TMPFS: spool on /dev/shm)}  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)
# status at catch-up: $STATUS
metric                              walship        baseline       ratio    target
load time (ms)                      $(printf '%-14s %-14s %.2fx' "$LOAD_MS" "$BASE_LOAD" "$(py "print($LOAD_MS/$BASE_LOAD)")")    (baseline: plain sqlite3)
SQLITE_BUSY (busy timeout 5 s)      $(printf '%-14s %-14s' "$(kv busy "$FS/w.load")" "$(kv busy "$FS/base.load")")
load end -> last txid on replica    $(printf '%-14s %-14s %-8s' "$CATCH" - -) <= 3000 ms
WAL peak (MiB)                      $(printf '%-14.1f %-14.1f %.1fx' "$(py "print($(kv wal "$FS/w.peak")/2**20)")" "$(py "print($(kv wal "$FS/base.peak")/2**20)")" "$(py "print($(kv wal "$FS/w.peak")/max(1,$(kv wal "$FS/base.peak")))")")     <= 64 MiB
walship CPU s per GiB loaded        $(py "print('%.2f' % (($CPU1-$CPU0)/$GIB))")  ($(py "print('%.2f' % ($CPU1-$CPU0))") s for $MIB MiB)
state-dir peak (MiB)                $(py "print('%.1f' % ($(kv state "$FS/w.peak")/2**20))")
walship VmRSS peak (MiB)            $(py "print('%.1f' % ($(kv rss_kib "$FS/w.peak")/1024))")
replica bytes (MiB)                 $(py "print('%.1f' % ($REPLICA_BYTES/2**20))")  (database $(py "print('%.1f' % ($DB_BYTES/2**20))") MiB)
restore vs cp+integrity_check (ms)  $(printf '%-14s %-14s %.2fx' "$RESTORE_MS" "$CP_MS" "$(py "print($RESTORE_MS/$CP_MS)")")     <= 3x   (restore $SAME; integrity $IC; runs: restore$R / cp+check$C)
WAL size every 100 ms (MiB), walship run: $(awk '$1=="timeline"{print $2}' "$FS/w.peak")
WAL size every 100 ms (MiB), baseline:    $(awk '$1=="timeline"{print $2}' "$FS/base.peak")
RESULT bulk catch_ms=$CATCH_MS wal_peak_mib=$(py "print('%.1f' % ($(kv wal "$FS/w.peak")/2**20))") restore_ratio=$(py "print('%.2f' % ($RESTORE_MS/$CP_MS))")
OUT
echo "walship log: $(grep -c ERROR "$FS/walship.log" || true) ERROR lines; distinct WARN/ERROR:"
grep -E 'WARN|ERROR' "$FS/walship.log" | sed -E 's/^[^ ]+ +//; s/[0-9a-f]{12,16}/X/g; s#/tmp/[^ ]*##g' | sort | uniq -c | head -8 || true
