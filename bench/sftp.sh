#!/bin/bash
# walship over sftp vs OpenSSH's sftp client, in one run against the same throwaway loopback sshd
# (ALPHA layout: chrooted `replicator`, as tests/sshd.rs). Needs root and openssh-server/-client.
#  1. initial snapshot of an existing MIB database: walship start -> ready, vs `sftp put` of the
#     same bytes (the .wsnap file walship uploaded)
#  2. bulk load of MIB2 MiB in 1 MiB transactions while walship runs: load start -> last txid on
#     the replica, vs `sftp put` of the same segment files (one batch)
#  2b. the same load written while walship is down (autocheckpoint off): restart -> caught up,
#     vs `sftp put` of the same segment files
#  3. restore from sftp vs `sftp get -r` of the replica + PRAGMA integrity_check on a copy
# usage: bench/sftp.sh [MIB] [MIB2]   (defaults 200 100)
source "$(dirname "$0")/common.sh"
MIB="${1:-200}"; MIB2="${2:-100}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
kv() { awk -v k="$1" '$1==k {print $2}' "$2"; }
ms() { echo $(( ($2 - $1) / 1000000 )); }

start_sshd
AUTH="--key-path $SFTP_KEY --known-hosts $SFTP_KNOWN"
# walship runs from a config file with compaction-fanout = 1024 (the maximum): compaction would
# otherwise merge the level-0 segments into level 1 and delete them during the run, so the
# OpenSSH baseline could not put the very files walship uploaded (and compaction's own uploads
# are not part of what is measured here)
cat >"$T/walship.toml" <<CFG
db = "$T/w.db"
state-dir = "$T/state"
compaction-fanout = 1024

[[replica]]
url = "$SFTP_URL"
key-path = "$SFTP_KEY"
known-hosts = "$SFTP_KNOWN"
CFG
# copy_segs DEST NAME...: copies those replica files (level-0 segments walship uploaded during the
# run) for the baseline; fails loudly if one is gone (e.g. compacted away) rather than measure less
copy_segs() {
    local dest="$1" f src; shift
    mkdir -p "$dest"
    for f in "$@"; do
        src=$(ls "$SFTP_DIR"/generations/*/"$f" 2>/dev/null | head -1)
        [ -n "$src" ] || { echo "bench: $f is no longer on the replica (compacted?): baseline would not be the same bytes" >&2; ls -R "$SFTP_DIR" >&2; exit 1; }
        cp "$src" "$dest/"
    done
}
make_db "$T/w.db"
python3 "$BENCH/loader.py" "$T/w.db" "$MIB" >/dev/null
python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
N0=$(sqlite3 "$T/w.db" 'select count(*) from t')
COMMITS0=$(( N0 / 16 + 1 ))   # not a txid: walship starts at txid 1 = snapshot

# 1. initial snapshot
t0=$(mono_ns)
"$WALSHIP" replicate --config "$T/walship.toml" >"$T/walship.log" 2>&1 &
WPID=$!; PIDS="$PIDS $WPID"
wait_ready "$T/state" "$T/walship.log"
t1=$(mono_ns)
SNAP_MS=$(ms $t0 $t1)
SNAP_FILE=$(ls "$SFTP_DIR"/generations/*/snap-*.wsnap | head -1)
SNAP_BYTES=$(stat -c %s "$SNAP_FILE")

# 2. bulk load while replicating (WAL, state dir and RSS sampled every 10 ms; CPU from /proc)
start_watch "$SFTP_DIR" "$T/watch.out"
python3 "$BENCH/sampler.py" "$T/peak" "$T/w.db-wal" "$T/state" "$WPID" & SPID=$!; PIDS="$PIDS $SPID"
until [ -e "$T/peak.ready" ]; do sleep 0.005; done
CPU0=$(py "print(proc_cpu_seconds($WPID))")
python3 "$BENCH/loader.py" "$T/w.db" "$MIB2" >"$T/load"
LAST=$(( $(kv commits "$T/load") + 1 ))
REPL_NS=$(python3 - "$T/watch.out" "$LAST" <<'PY'
import sys, time
f, want = sys.argv[1], int(sys.argv[2])
dl = time.monotonic() + float(__import__("os").environ.get("WAIT_S", "120"))
while time.monotonic() < dl:
    for l in open(f):
        p = l.split()
        if p and p[0] == 'seg' and int(p[2]) >= want:
            print(p[3]); sys.exit(0)
    time.sleep(0.002)
print(-1)
PY
)
[ "$REPL_NS" != -1 ] || { echo "bench: the replica never got txid $LAST" >&2; exit 1; }
CPU1=$(py "print(proc_cpu_seconds($WPID))")
kill -TERM "$SPID"; wait "$SPID" || true
BULK_MS=$(ms "$(kv start "$T/load")" "$REPL_NS")
CATCH_MS=$(ms "$(kv end "$T/load")" "$REPL_NS")
LOAD_MS=$(ms "$(kv start "$T/load")" "$(kv end "$T/load")")
# an application connection stays open across walship's restart, so that walship's close is not
# the last one (SQLite checkpoints and deletes the WAL when the last connection closes)
python3 -c "import sqlite3,time; c=sqlite3.connect('$T/w.db'); c.execute('select 1 from t limit 1').fetchall(); time.sleep(600)" &
HOLD=$!; PIDS="$PIDS $HOLD"; sleep 0.3
stop_walship
# 2b. a WAL backlog written while walship is down (no checkpoints): restart -> caught up
WAL_AUTOCHECKPOINT=0 KEEP_WAL=1 python3 "$BENCH/loader.py" "$T/w.db" "$MIB2" >"$T/load2"
LAST2=$(( LAST + $(kv commits "$T/load2") ))
MARK=$(wc -l <"$T/watch.out")
t0=$(mono_ns)
"$WALSHIP" replicate --config "$T/walship.toml" >>"$T/walship.log" 2>&1 &
WPID=$!; PIDS="$PIDS $WPID"
# Three ways to resume are fine: the WAL is continuous and its backlog is merged into one commit
# (txid LAST+1, logged "resumed the generation: the WAL is continuous"); replaying the WAL frames
# (the last txid is LAST2); or, when the WAL
# was reset while walship was stopped (walship's own checkpoint at its clean stop empties it, so the
# loader starts a new WAL), "resume by difference": one txid LAST+1 holding every page changed
# while stopped (walship logs "resumed the generation: N page(s) changed while walship was
# stopped"; walship reads the database only after the loader finished, so that txid holds it all).
# A new generation (full snapshot) is reported as a failure to resume.
R2=$(python3 - "$T/watch.out" "$LAST2" "$MARK" "$T/walship.log" "$LAST" <<'PY'
import sys, time
f, want, mark, log, last = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
dl = time.monotonic() + float(__import__("os").environ.get("WAIT_S", "120"))
while time.monotonic() < dl:
    text = open(log, errors='replace').read()
    # resumed by difference, or with the WAL's backlog merged into one commit: one txid LAST+1
    diff = 'changed while walship was stopped' in text or 'resumed the generation: the WAL is continuous' in text
    for l in open(f).readlines()[mark:]:
        p = l.split()
        if p and p[0] == 'seg' and int(p[2]) >= (last + 1 if diff else want):
            print('diff' if diff else 'seg', p[3]); sys.exit(0)
        if p and p[0] == 'snap' and p[4:5] != ['pre']:
            print('snap', p[2]); sys.exit(0)
    time.sleep(0.002)
segs = [l.split() for l in open(f).readlines()[mark:] if l.startswith('seg ')]
print('none -1 %s' % (max(int(p[2]) for p in segs) if segs else 0))
PY
)
set -- $R2; BACKLOG_KIND=$1; BACKLOG_MS=$(( ($2 - t0) / 1000000 ))
stop_walship
copy_segs "$T/put-backlog" $(tail -n +$((MARK + 1)) "$T/watch.out" | awk '$1=="seg" && $6!="pre" {print $5}' | grep '^seg-0-' || true)
kill $HOLD; wait $HOLD 2>/dev/null || true
BL_BYTES=$(py "print(dir_bytes('$T/put-backlog'))"); BL_N=$(ls "$T/put-backlog" | wc -l)
[ "$BL_N" -gt 0 ] || head -c 1 /dev/zero >"$T/put-backlog/empty"
# the level-0 segments that carried the live load (snapshot excluded)
mkdir -p "$T/put-snap"
# (only those of the live load: the lines before MARK; the backlog's come after)
copy_segs "$T/put-seg" $(head -n "$MARK" "$T/watch.out" | awk '$1=="seg" && $6!="pre" {print $5}' | grep '^seg-0-' || true)
SEG_BYTES=$(py "print(dir_bytes('$T/put-seg'))"); SEG_N=$(ls "$T/put-seg" | wc -l)
cp "$SNAP_FILE" "$T/put-snap/"
REPLICA_BYTES=$(py "print(dir_bytes('$SFTP_DIR'))")

# OpenSSH baselines (each a fresh sftp process: includes its start and handshake)
OPUT="bench-put-$$"; CLEAN_DIRS="$CLEAN_DIRS /var/data/replicator/db/$OPUT"
printf 'mkdir db/%s\nput %s db/%s/\n' "$OPUT" "$T/put-snap/$(basename "$SNAP_FILE")" "$OPUT" >"$T/b1"
t0=$(mono_ns); ossh_sftp "$T/b1" >/dev/null; t1=$(mono_ns); PUT_SNAP_MS=$(ms $t0 $t1)
printf 'mkdir db/%s/segs\nput %s/* db/%s/segs/\n' "$OPUT" "$T/put-seg" "$OPUT" >"$T/b2"
t0=$(mono_ns); ossh_sftp "$T/b2" >/dev/null; t1=$(mono_ns); PUT_SEG_MS=$(ms $t0 $t1)
printf 'mkdir db/%s/bl\nput %s/* db/%s/bl/\n' "$OPUT" "$T/put-backlog" "$OPUT" >"$T/b4"
t0=$(mono_ns); ossh_sftp "$T/b4" >/dev/null; t1=$(mono_ns); PUT_BL_MS=$(ms $t0 $t1)

# 3. restore vs get -r + integrity_check
python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
t0=$(mono_ns); "$WALSHIP" restore -q -o "$T/restored.db" $AUTH "$SFTP_URL" >/dev/null; t1=$(mono_ns)
RESTORE_MS=$(ms $t0 $t1)
if cmp -s "$T/restored.db" "$T/w.db"; then SAME=byte-identical; else SAME=DIFFERENT; fi
# the generation restore reads: the newest (names sort by time)
GEN=$(ls "$SFTP_DIR/generations" | sort | tail -1)
mkdir -p "$T/got"
printf 'get -r db/%s/generations/%s %s/got/\n' "$(basename "$SFTP_DIR")" "$GEN" "$T" >"$T/b3"
cp "$T/w.db" "$T/copy.db"
t0=$(mono_ns); ossh_sftp "$T/b3" >/dev/null; t1=$(mono_ns); IC=$(sqlite3 "$T/copy.db" 'pragma integrity_check'); t2=$(mono_ns)
GET_MS=$(ms $t0 $t1); IC_MS=$(ms $t1 $t2); GOT=$(py "print(dir_bytes('$T/got'))")

mbs() { py "print('%.0f' % ($1/2**20/max($2,1)*1000))"; }
echo "# sftp.sh  $(date -u +%FT%TZ)  $(nproc) cores  loopback sshd $(sshd -V 2>&1 | head -1 | cut -d, -f1)  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %-22s %-22s %-8s %s\n' metric walship "OpenSSH sftp" ratio target
printf '%-44s %-22s %-22s %-8s %s\n' "1. snapshot $MIB MiB db ($(py "print('%.1f' % ($SNAP_BYTES/2**20))") MiB on wire)" \
    "$SNAP_MS ms $(mbs $SNAP_BYTES $SNAP_MS) MiB/s" "$PUT_SNAP_MS ms $(mbs $SNAP_BYTES $PUT_SNAP_MS) MiB/s" \
    "$(py "print('%.2f' % ($PUT_SNAP_MS/$SNAP_MS))")" ">= 0.80 (start->ready incl. snapshot compression)"
printf '%-44s %-22s %-22s %-8s %s\n' "2. bulk $MIB2 MiB load ($SEG_N segs, $(py "print('%.1f' % ($SEG_BYTES/2**20))") MiB)" \
    "$BULK_MS ms $(mbs $SEG_BYTES $BULK_MS) MiB/s" "$PUT_SEG_MS ms $(mbs $SEG_BYTES $PUT_SEG_MS) MiB/s" \
    "$(py "print('%.2f' % ($PUT_SEG_MS/$BULK_MS))")" ">= 0.80 (load start -> on replica; load alone took $LOAD_MS ms; catch-up after load end $CATCH_MS ms)"
if [ "$BACKLOG_KIND" = seg ] || [ "$BACKLOG_KIND" = diff ]; then
[ "$BACKLOG_KIND" = seg ] && HOW="replayed the WAL" || HOW="resumed with one txid (the WAL backlog merged, or the pages changed while stopped)"
printf '%-44s %-22s %-22s %-8s %s\n' "2b. $MIB2 MiB WAL backlog ($BL_N segs, $(py "print('%.1f' % ($BL_BYTES/2**20))") MiB)" \
    "$BACKLOG_MS ms $(mbs $BL_BYTES $BACKLOG_MS) MiB/s" "$PUT_BL_MS ms $(mbs $BL_BYTES $PUT_BL_MS) MiB/s" \
    "$(py "print('%.2f' % ($PUT_BL_MS/$BACKLOG_MS))")" ">= 0.80 (walship restart -> last txid on replica, incl. its start-up; $HOW)"
elif [ "$BACKLOG_KIND" = none ]; then
echo "2b. WAL backlog: walship resumed but txid $LAST2 never reached the replica within ${WAIT_S:-120} s (highest seen: $3)"
else
echo "2b. WAL backlog: walship did NOT resume: it started a new generation (full snapshot on the replica after $BACKLOG_MS ms): $(grep -o 'starting a new generation: [^=]*' "$T/walship.log" | tail -1)"
fi
printf '%-44s %-22s %-22s %-8s %s\n' "3. restore (newest generation $(py "print('%.1f' % ($GOT/2**20))") MiB)" \
    "$RESTORE_MS ms" "$((GET_MS + IC_MS)) ms (get $GET_MS + check $IC_MS)" \
    "$(py "print('%.2f' % (($GET_MS+$IC_MS)/$RESTORE_MS))")" ">= 0.80 ($SAME; got $(py "print('%.1f' % ($GOT/2**20))") MiB)"
echo "2. during the bulk load: WAL peak $(py "print('%.1f' % ($(kv wal "$T/peak")/2**20))") MiB, state-dir (local disk) peak $(py "print('%.1f' % ($(kv state "$T/peak")/2**20))") MiB, walship RSS peak $(py "print('%.1f' % ($(kv rss_kib "$T/peak")/1024))") MiB, walship CPU $(py "print('%.2f' % ($CPU1-$CPU0))") s = $(py "print('%.2f' % (($CPU1-$CPU0)*1024/$MIB2))") s per GiB loaded; SQLITE_BUSY $(kv busy "$T/load")"
echo "replica after all steps: $(py "print('%.1f' % ($REPLICA_BYTES/2**20))") MiB for a $(py "print('%.1f' % ($(stat -c %s "$T/w.db")/2**20))") MiB database (history of every step included)"
echo "RESULT sftp snap_ratio=$(py "print('%.2f' % ($PUT_SNAP_MS/$SNAP_MS))") bulk_ratio=$(py "print('%.2f' % ($PUT_SEG_MS/$BULK_MS))") backlog_ratio=$( case $BACKLOG_KIND in seg|diff) py "print('%.2f' % ($PUT_BL_MS/max(1,$BACKLOG_MS)))";; *) echo NA;; esac) restore_ratio=$(py "print('%.2f' % (($GET_MS+$IC_MS)/$RESTORE_MS))")"
echo "walship log: $(grep -c ERROR "$T/walship.log" || true) ERROR lines; distinct WARN/ERROR:"
grep -E 'WARN|ERROR' "$T/walship.log" | sed -E 's/^[^ ]+ +//; s/[0-9a-f]{12,16}/X/g; s#/tmp/[^ ]*##g; s#:[0-9]+/db/[^ ]*##g' | sort | uniq -c | head -8 || true
