#!/bin/bash
# walship over S3 (a throwaway 3-node Garage cluster on 127.0.0.1, replication factor 3) vs
# s3cmd moving the very same objects, and the commit -> listable-on-S3 lag, in one run.
#  1. initial snapshot of an existing MIB database: walship start -> ready, vs `s3cmd put` of the
#     snapshot object walship wrote (downloaded first, so the bytes are the same)
#  2. bulk load of MIB2 MiB in 1 MiB transactions while walship runs: load start -> the last txid
#     listable, vs `s3cmd put` of the same level-0 segment objects (one s3cmd process)
#  3. restore from S3 vs `s3cmd get --recursive` of the generation + PRAGMA integrity_check on a copy
#  4. lag at the rates of PHASES (default 10:3,100:5 as RATE:SECONDS) of bench/writer.py's paced
#     commits: commit returned -> the first ListObjectsV2 of the generation prefix showing a segment
#     holding that txid (s3sign.py poll, every INTERVAL_MS=5 ms at most; the achieved interval is
#     printed: it bounds the resolution); app commit latency vs the same writer on plain sqlite3
# Ratios are s3cmd time / walship time (= walship MB/s / s3cmd MB/s): > 1 means walship is faster.
# Every s3cmd run is a fresh process (its start included, as OpenSSH's sftp start is in sftp.sh).
# usage: bench/s3.sh [MIB] [MIB2]   (defaults 200 and MIB)
# env: PHASES, INTERVAL_MS (poller), GARAGE_NODELAY=1 (Garage with TCP_NODELAY forced: garage.sh)
# needs: garage (script/install-garage builds it once), s3cmd (apt-get install -y s3cmd), openssl
source "$(dirname "$0")/common.sh"
source "$BENCH/garage.sh"
MIB="${1:-200}"; MIB2="${2:-$MIB}"
PHASES="${PHASES:-10:3,100:5}"
py() { python3 -c "import sys; sys.path.insert(0,'$BENCH'); from benchlib import *; $1"; }
kv() { awk -v k="$1" '$1==k {print $2}' "$2"; }
ms() { echo $(( ($2 - $1) / 1000000 )); }
mbs() { py "print('%.0f' % ($1/2**20/max($2,1)*1000))"; }
ratio() { py "print('%.2f' % ($1/max($2,1)))"; }
command -v s3cmd >/dev/null || { echo "bench: s3cmd missing: apt-get install -y s3cmd" >&2; exit 1; }

start_garage
s3cmd_conf "$T/s3cfg"
S3C="s3cmd -c $T/s3cfg"
# start_poll PREFIX OUT: lists PREFIX back to back (s3sign.py poll); sets POLLPID, waits until armed
start_poll() {
    python3 "$BENCH/s3sign.py" poll "$S3_BUCKET" "$1" "$2" &
    POLLPID=$!; PIDS="$PIDS $POLLPID"
    until grep -q '^ready' "$2" 2>/dev/null; do
        kill -0 "$POLLPID" 2>/dev/null || { echo "bench: the S3 poller died" >&2; exit 1; }
        sleep 0.005
    done
}
stop_poll() { kill -TERM "$POLLPID"; wait "$POLLPID" 2>/dev/null || true; }
# gen_of PREFIX: the (newest) generation walship created under s3://BUCKET/PREFIX
gen_of() { python3 "$BENCH/s3sign.py" gen "$S3_BUCKET" "$1"; }

# walship runs from a config file with compaction-fanout = 1024 (the maximum), as in sftp.sh: the
# level-0 segments it uploaded must still be there for the baseline to put the same bytes
cat >"$T/walship.toml" <<CFG
db = "$T/w.db"
state-dir = "$T/state"
compaction-fanout = 1024

[[replica]]
url = "s3://$S3_BUCKET/w"
endpoint = "$S3_ENDPOINT"
region = "$S3_REGION"
credentials-file = "$S3_CREDS"
CFG
make_db "$T/w.db"
python3 "$BENCH/loader.py" "$T/w.db" "$MIB" >/dev/null
python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"

# 1. initial snapshot
t0=$(mono_ns)
"$WALSHIP" replicate --config "$T/walship.toml" >"$T/walship.log" 2>&1 &
WPID=$!; PIDS="$PIDS $WPID"
wait_ready "$T/state" "$T/walship.log"
t1=$(mono_ns)
SNAP_MS=$(ms $t0 $t1)
# of which uploading: walship's log, "snapshot written" (compressed into the local spool) -> "ready"
SNAP_UP_MS=$(python3 - "$T/walship.log" <<'PY'
import datetime, sys
ts = {}
for l in open(sys.argv[1]):
    for k in ('snapshot written', 'ready:'):
        if k in l and k not in ts:
            ts[k] = datetime.datetime.fromisoformat(l.split()[0].replace('Z', '+00:00'))
print(int((ts['ready:'] - ts['snapshot written']).total_seconds() * 1000) if len(ts) == 2 else -1)
PY
)
GEN=$(gen_of w)
GP="w/generations/$GEN/"
python3 "$BENCH/s3sign.py" list "$S3_BUCKET" "$GP" >"$T/list0"
set -- $(grep '/snap-.*\.wsnap ' "$T/list0" | head -1)
SNAP_KEY=$1; SNAP_BYTES=$2

# 2. bulk load while replicating; the poller says when the last txid is listable
start_poll "$GP" "$T/poll-bulk.out"
CPU0=$(py "print(proc_cpu_seconds($WPID))")
python3 "$BENCH/loader.py" "$T/w.db" "$MIB2" >"$T/load"
LAST=$(( $(kv commits "$T/load") + 1 ))
REPL_NS=$(python3 - "$T/poll-bulk.out" "$LAST" <<'PY'
import os, sys, time
f, want = sys.argv[1], int(sys.argv[2])
dl = time.monotonic() + float(os.environ.get("WAIT_S", "120"))
while time.monotonic() < dl:
    for l in open(f):
        p = l.split()
        if p and p[0] == 'seg' and int(p[2]) >= want:
            print(p[3]); sys.exit(0)
    time.sleep(0.002)
print(-1)
PY
)
[ "$REPL_NS" != -1 ] || { echo "bench: txid $LAST never became listable on S3" >&2; tail "$T/walship.log" >&2; exit 1; }
CPU1=$(py "print(proc_cpu_seconds($WPID))")
stop_poll
BULK_MS=$(ms "$(kv start "$T/load")" "$REPL_NS")
CATCH_MS=$(ms "$(kv end "$T/load")" "$REPL_NS")
LOAD_MS=$(ms "$(kv start "$T/load")" "$(kv end "$T/load")")
stop_walship
# the level-0 segments that carried the load (in the order they appeared), with their sizes
python3 "$BENCH/s3sign.py" list "$S3_BUCKET" "$GP" >"$T/list1"
awk '$1=="seg" && $6!="pre" {print $5}' "$T/poll-bulk.out" | grep '^seg-0-' >"$T/bulk-segs" || true
SEG_N=$(wc -l <"$T/bulk-segs")
[ "$SEG_N" -gt 0 ] || { echo "bench: no level-0 segment seen during the load" >&2; exit 1; }
SEG_BYTES=$(awk -v gp="$GP" 'NR==FNR {want[gp $1]=1; next} ($1 in want) {n++; b+=$2} END {print n+0, b+0}' "$T/bulk-segs" "$T/list1")
set -- $SEG_BYTES; [ "$1" = "$SEG_N" ] || { echo "bench: $((SEG_N - $1)) of the load's segments are no longer on S3 (compacted?): the baseline would not be the same bytes" >&2; exit 1; }
SEG_BYTES=$2
REPLICA_BYTES=$(python3 "$BENCH/s3sign.py" list "$S3_BUCKET" "w/" | awk '{b+=$2} END {print b+0}')

# 3. restore, then its baseline: s3cmd get --recursive of the generation + integrity_check
python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
t0=$(mono_ns)
"$WALSHIP" restore -q -o "$T/restored.db" $(walship_s3_flags) "s3://$S3_BUCKET/w" >/dev/null
t1=$(mono_ns); RESTORE_MS=$(ms $t0 $t1)
if cmp -s "$T/restored.db" "$T/w.db"; then SAME=byte-identical; else SAME=DIFFERENT; fi
cp "$T/w.db" "$T/copy.db"
mkdir -p "$T/got"
t0=$(mono_ns); $S3C get -q --recursive "s3://$S3_BUCKET/$GP" "$T/got/" >/dev/null; t1=$(mono_ns)
IC=$(sqlite3 "$T/copy.db" 'pragma integrity_check'); t2=$(mono_ns)
GET_MS=$(ms $t0 $t1); IC_MS=$(ms $t1 $t2)
GOT=$(py "print(dir_bytes('$T/got'))")
[ "$IC" = ok ] || echo "bench: integrity_check of the copy: $IC" >&2

# 1-2 baselines: s3cmd put of the very objects walship wrote (the files s3cmd just got)
SNAP_FILE="$T/got/$(basename "$SNAP_KEY")"
[ "$(stat -c %s "$SNAP_FILE" 2>/dev/null)" = "$SNAP_BYTES" ] || { echo "bench: s3cmd got no $SNAP_KEY of $SNAP_BYTES bytes" >&2; ls -l "$T/got" >&2; exit 1; }
# s3cmd's fixed cost (process start, config, one request): a put of a 1-byte object
head -c 1 /dev/zero >"$T/one"
t0=$(mono_ns); $S3C put -q "$T/one" "s3://$S3_BUCKET/base/one" >/dev/null; t1=$(mono_ns)
S3CMD_FIXED_MS=$(ms $t0 $t1)
t0=$(mono_ns); $S3C put -q "$SNAP_FILE" "s3://$S3_BUCKET/base/snap/" >/dev/null; t1=$(mono_ns)
PUT_SNAP_MS=$(ms $t0 $t1)
SEG_FILES=$(sed "s#^#$T/got/#" "$T/bulk-segs")
t0=$(mono_ns); $S3C put -q $SEG_FILES "s3://$S3_BUCKET/base/segs/" >/dev/null; t1=$(mono_ns)
PUT_SEG_MS=$(ms $t0 $t1)
PUT_SEG_BYTES=$(python3 "$BENCH/s3sign.py" list "$S3_BUCKET" "base/segs/" | awk '{n++; b+=$2} END {print n+0, b+0}')
[ "$PUT_SEG_BYTES" = "$SEG_N $SEG_BYTES" ] || { echo "bench: s3cmd put $PUT_SEG_BYTES (objects bytes), walship $SEG_N $SEG_BYTES" >&2; exit 1; }

# 4. lag: the same paced writer on plain sqlite3, then on a database walship replicates to S3
# (an ad-hoc URL with the CLI flags, default compaction)
make_db "$T/base.db"
python3 "$BENCH/writer.py" "$T/base.db" "$T/base.out" "$PHASES"
make_db "$T/l.db"
start_walship "$T/l.db" "s3://$S3_BUCKET/lag" "$T/lstate" "$T/walship-lag.log" $(walship_s3_flags)
LGEN=$(gen_of lag)
start_poll "lag/generations/$LGEN/" "$T/poll-lag.out"
CPU2=$(py "print(proc_cpu_seconds($WPID))")
python3 "$BENCH/writer.py" "$T/l.db" "$T/l.out" "$PHASES"
sleep 1
CPU3=$(py "print(proc_cpu_seconds($WPID))")
stop_poll
LAGSTATUS=$(cat "$T/lstate/status")
stop_walship
python3 "$BENCH/lagstats.py" "$T/l.out" "$T/poll-lag.out" "$T/base.out" S3 >"$T/lagstats"
# the same with the time each first-showing listing was sent (see s3sign.py: the truth is between
# the previous listing's start and that listing's answer)
awk '$1=="listed" {t0[$2]=$3} $1=="seg" && ($5 in t0) {$4=t0[$5]} {print}' "$T/poll-lag.out" >"$T/poll-lag-sent.out"
python3 "$BENCH/lagstats.py" "$T/l.out" "$T/poll-lag-sent.out" "$T/base.out" S3 >"$T/lagstats-sent"
set -- $(grep '^# poll ' "$T/poll-lag.out")
POLLS=$3; POLL_MEAN=$4; POLL_P50=$5; POLL_P99=$6; POLL_MAX=$7; LIST_P50=$8; LIST_P99=$9

echo "# s3.sh  $(date -u +%FT%TZ)  $(nproc) cores  $("$GARAGE" --version | cut -d' ' -f1-2), 3 nodes on 127.0.0.1, replication_factor 3, sqlite metadata, $([ "${GARAGE_NODELAY:-0}" = 1 ] && echo "TCP_NODELAY forced (GARAGE_NODELAY=1)" || echo "stock (no TCP_NODELAY between nodes)")  s3cmd $(s3cmd --version | awk '{print $3}')  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
printf '%-44s %-22s %-22s %-8s %s\n' metric walship s3cmd "ratio" note
printf '%-44s %-22s %-22s %-8s %s\n' "1. snapshot $MIB MiB db ($(py "print('%.1f' % ($SNAP_BYTES/2**20))") MiB object)" \
    "$SNAP_MS ms $(mbs $SNAP_BYTES $SNAP_MS) MiB/s" "$PUT_SNAP_MS ms $(mbs $SNAP_BYTES $PUT_SNAP_MS) MiB/s" \
    "$(ratio $PUT_SNAP_MS $SNAP_MS)" "walship start -> ready, incl. snapshot compression; uploading alone (log: snapshot written -> ready) $SNAP_UP_MS ms $(mbs $SNAP_BYTES $SNAP_UP_MS) MiB/s"
printf '%-44s %-22s %-22s %-8s %s\n' "2. bulk $MIB2 MiB load ($SEG_N segs, $(py "print('%.1f' % ($SEG_BYTES/2**20))") MiB)" \
    "$BULK_MS ms $(mbs $SEG_BYTES $BULK_MS) MiB/s" "$PUT_SEG_MS ms $(mbs $SEG_BYTES $PUT_SEG_MS) MiB/s" \
    "$(ratio $PUT_SEG_MS $BULK_MS)" "load start -> last txid listable; the load alone took $LOAD_MS ms, catch-up after its end $CATCH_MS ms"
printf '%-44s %-22s %-22s %-8s %s\n' "3. restore (generation $(py "print('%.1f' % ($GOT/2**20))") MiB)" \
    "$RESTORE_MS ms $(mbs $GOT $RESTORE_MS) MiB/s" "$((GET_MS + IC_MS)) ms (get $GET_MS + check $IC_MS)" \
    "$(ratio $((GET_MS + IC_MS)) $RESTORE_MS)" "$SAME; s3cmd get alone $(mbs $GOT $GET_MS) MiB/s"
echo "s3cmd's fixed cost (start-up + one request: put of a 1-byte object): $S3CMD_FIXED_MS ms, included in its times above"
echo "2. walship CPU during the bulk load: $(py "print('%.2f' % ($CPU1-$CPU0))") s = $(py "print('%.2f' % (($CPU1-$CPU0)*1024/$MIB2))") s per GiB loaded; replica (s3://$S3_BUCKET/w) $(py "print('%.1f' % ($REPLICA_BYTES/2**20))") MiB for a $(py "print('%.1f' % ($(stat -c %s "$T/w.db")/2**20))") MiB database"
echo "4. lag, commit returned -> answer of the first listing showing it (ListObjectsV2 of the generation prefix, $POLLS listings: interval mean $POLL_MEAN ms, p50 $POLL_P50, p99 $POLL_P99, max $POLL_MAX; one listing p50 $LIST_P50 ms, p99 $LIST_P99 ms):"
grep -v '^RESULT' "$T/lagstats"
echo "   the same up to the moment that listing was sent (lag p50/p99/max ms):"
awk '/^[0-9a-z]+\/s / {printf "   %-9s %9s %9s %9s\n", $1, $5, $6, $7}' "$T/lagstats-sent"
# Garage stores an object under 3 KiB (its INLINE_THRESHOLD) in the metadata table, a bigger one
# as a data block sent to the nodes by RPC: the two paths differ much in latency here
python3 - "$T/l.out" "$T/poll-lag.out" <<'PY'
import sys
rng, sizes = {}, {}
for l in open(sys.argv[1]):
    if l[0] != '#' and l.strip():
        ph, seq = l.split()[:2]
        lo, hi = rng.get(ph, (10**18, 0))
        rng[ph] = (min(lo, int(seq) + 1), max(hi, int(seq) + 1))
for l in open(sys.argv[2]):
    p = l.split()
    if p and p[0] == 'size' and p[1].startswith('seg-0-'):
        sizes[int(p[1].split('-')[2], 16)] = int(p[2])
for ph, (lo, hi) in rng.items():
    s = sorted(v for k, v in sizes.items() if lo <= k <= hi)
    if s:
        print('   %-7s level-0 segment objects: %d, size p50 %d B, max %d B, %d of them >= 3 KiB (stored as Garage data blocks)' % (
            ('max' if ph.startswith('0:') else ph.split(':')[0]) + '/s', len(s), s[len(s) // 2], s[-1], sum(1 for v in s if v >= 3072)))
PY
echo "   walship CPU during the writer run: $(py "print('%.2f' % ($CPU3-$CPU2))") s; status: $LAGSTATUS"
LAG=$(grep '^RESULT lag100' "$T/lagstats" | sed 's/^RESULT lag100 //; s/p50_ms/lag100_p50_ms/; s/p99_ms/lag100_p99_ms/')
LAGSENT=$(grep '^RESULT lag100' "$T/lagstats-sent" | sed 's/^RESULT lag100 //; s/p50_ms/lag100_sent_p50_ms/; s/p99_ms/lag100_sent_p99_ms/')
echo "RESULT s3 snap_ratio=$(ratio $PUT_SNAP_MS $SNAP_MS) bulk_ratio=$(ratio $PUT_SEG_MS $BULK_MS) restore_ratio=$(ratio $((GET_MS + IC_MS)) $RESTORE_MS) ${LAG:-lag100=NA} ${LAGSENT:-} poll_p50_ms=$POLL_P50"
for l in "$T/walship.log" "$T/walship-lag.log"; do
    echo "walship log $(basename "$l"): $(grep -c ERROR "$l" || true) ERROR lines; distinct WARN/ERROR:"
    grep -E 'WARN|ERROR' "$l" | sed -E 's/^[^ ]+ +//; s/[0-9a-f]{12,20}/X/g; s#/tmp/[^ ]*##g' | sort | uniq -c | head -8 || true
done
