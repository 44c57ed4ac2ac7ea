#!/bin/bash
# Point-in-time restore over a day of compacted history, over sftp. COMMITS (default 8 640 000,
# one day at 100 commits/s) single-row commits of a 100-byte row (lag.sh's writer's shape) are
# written as fast as one writer goes: the history walship keeps is the same commits (one
# record each), only their timestamps are closer together. Half-way the writer notes the time
# and pauses 1.1 s. walship replicates over sftp with the default compaction (fanout 16) and
# snapshot interval (24 h: the day starts from one snapshot); the script waits until
# compaction has settled, then restores (1) the latest state and (2) the state at the noted
# time (`--timestamp`), each vs `sftp get -r` of the generation the restore reads (the bytes
# a full replay reads, fetched by OpenSSH) + `PRAGMA integrity_check` of the source.
# Checks: (1) is byte-identical to the source; (2) holds exactly the first half of the rows.
# usage: bench/pitr.sh [COMMITS]
source "$(dirname "$0")/common.sh"
N="${1:-8640000}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

start_sshd
AUTH=(--key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN")
make_db "$T/w.db"
start_walship "$T/w.db" "$SFTP_URL" "$T/state" "$T/walship.log" "${AUTH[@]}"
CPU0=$(py "print(proc_cpu_seconds($WPID))")
t0=$(mono_ns)
python3 - "$T/w.db" "$N" >"$T/writer.out" <<'PY'
import os, sqlite3, sys, time
db, n = sys.argv[1], int(sys.argv[2])
c = sqlite3.connect(db, isolation_level=None)
c.execute('pragma busy_timeout=5000'); c.execute('pragma synchronous=NORMAL')
row = os.urandom(50).hex()
busy = 0
i = 0
while i < n:
    try:
        c.execute('insert into t(v) values (?)', (row,))
    except sqlite3.OperationalError:
        busy += 1
        continue
    i += 1
    if i == n // 2:
        time.sleep(0.55)
        print('mid_ms', time.time_ns() // 1_000_000)
        time.sleep(0.55)
print('busy', busy)
PY
t1=$(mono_ns)
WRITE_MS=$(ms $t0 $t1)
MID_MS=$(awk '$1=="mid_ms"{print $2}' "$T/writer.out")
# caught up: the status says so; then compaction settles (no file added or removed for 20 s)
wait_ready "$T/state" "$T/walship.log"
CAUGHT_MS=$(ms $t1 $(mono_ns))
prev=""; same=0
while [ $same -lt 20 ]; do
    cur=$(ls "$SFTP_DIR"/generations/*/ | md5sum)
    if [ "$cur" = "$prev" ]; then same=$((same + 1)); else same=0; prev=$cur; fi
    sleep 1
done
SETTLE_MS=$(( $(ms $t1 $(mono_ns)) - 20000 ))
CPU1=$(py "print(proc_cpu_seconds($WPID))")
stop_walship
python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
DB_BYTES=$(stat -c %s "$T/w.db")
GEN=$(ls "$SFTP_DIR/generations")
REPL_BYTES=$(py "print(dir_bytes('$SFTP_DIR'))")
LEVELS=$(ls "$SFTP_DIR/generations/$GEN" | sed -nE 's/^seg-([0-9])-.*/L\1/p; s/^snap-.*/snap/p' | sort | uniq -c | awk '{printf "%s %s, ", $1, $2}')
MID_TS=$(date -u -d "@$(( MID_MS / 1000 )).$(printf '%03d' $(( MID_MS % 1000 )))" +%FT%T.%3NZ)
sync

# restores, alternated with the baseline, each twice; the faster of each is kept
best() { tr ' ' '\n' <<<"$*" | grep . | sort -n | head -1; }
RL=""; RP=""; B=""
for i in 1 2; do
    rm -f "$T/latest.db" "$T/pit.db"; rm -rf "$T/get"
    a=$(mono_ns); "$WALSHIP" restore -q -o "$T/latest.db" "${AUTH[@]}" "$SFTP_URL"; b=$(mono_ns)
    RL="$RL $(ms $a $b)"
    a=$(mono_ns); "$WALSHIP" restore -q -o "$T/pit.db" --timestamp "$MID_TS" "${AUTH[@]}" "$SFTP_URL"; b=$(mono_ns)
    RP="$RP $(ms $a $b)"
    mkdir -p "$T/get"; printf 'get -r db/%s/generations/%s %s/get/\n' "${SFTP_URL##*/}" "$GEN" "$T" >"$T/batch"
    a=$(mono_ns); ossh_sftp "$T/batch" >/dev/null; IC=$(sqlite3 "$T/w.db" 'pragma integrity_check'); b=$(mono_ns)
    B="$B $(ms $a $b)"
done
GET_BYTES=$(py "print(dir_bytes('$T/get'))")
if cmp -s "$T/latest.db" "$T/w.db"; then SAME=byte-identical; else SAME=DIFFERENT; fi
PIT_ROWS=$(sqlite3 "$T/pit.db" 'select count(*), max(id), (select integrity_check from pragma_integrity_check) from t')
RLB=$(best $RL); RPB=$(best $RP); BB=$(best $B)
cat <<OUT
# pitr.sh  $(date -u +%FT%TZ)  $(nproc) cores  $N commits  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)
history: $N single-row commits written in $WRITE_MS ms ($(py "print(round($N*1000/$WRITE_MS))") commits/s; a day at 100/s is 8 640 000); SQLITE_BUSY $(awk '$1=="busy"{print $2}' "$T/writer.out")
replicated: caught up $CAUGHT_MS ms after the last commit; compaction settled $SETTLE_MS ms after it; walship CPU $(py "print('%.1f' % ($CPU1-$CPU0))") s
database $(py "print('%.1f' % ($DB_BYTES/2**20))") MiB; replica $(py "print('%.1f' % ($REPL_BYTES/2**20))") MiB in: $LEVELS
restore latest (ms)                 $RLB   (runs:$RL)   $SAME
restore at $MID_TS (ms)   $RPB   (runs:$RP)   rows, max id, integrity: $PIT_ROWS (want $((N / 2)) $((N / 2)) ok)
sftp get -r of the generation ($(py "print('%.1f' % ($GET_BYTES/2**20))") MiB) + integrity_check (ms): $BB   (runs:$B)
RESULT pitr commits=$N latest_ratio=$(py "print('%.2f' % ($BB/$RLB))") pit_ratio=$(py "print('%.2f' % ($BB/$RPB))") (OpenSSH time / walship time: >= 1 means walship is faster)
OUT
echo "walship log: $(grep -c ERROR "$T/walship.log" || true) ERROR lines"
