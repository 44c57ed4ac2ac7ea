#!/bin/bash
# Soak: MINUTES (default 60) of RATE commits/s (default 200) replicated over sftp to a throwaway
# loopback sshd, with sshd killed for OUTAGE_S seconds (default 60) every EVERY_S seconds
# (default 600). Every second it samples walship's lag (its status file), RSS, open files, the
# state directory's size and the WAL's size into soak.csv; at the end it prints, per outage,
# how long after sshd's return the lag was back under 50 ms, and per period the peaks of RSS,
# open files and local disk (flat = no leak), then restores and compares with the source.
# Plots (PNG) of lag and local disk over time go to OUT (default bench/out/).
# usage: bench/soak.sh [MINUTES]   env: RATE EVERY_S OUTAGE_S OUT
source "$(dirname "$0")/common.sh"
MIN="${1:-60}"; RATE="${RATE:-200}"; EVERY_S="${EVERY_S:-600}"; OUTAGE_S="${OUTAGE_S:-60}"
OUT="${OUT:-$REPO/bench/out}"; mkdir -p "$OUT"
DUR=$((MIN * 60))

start_sshd
SSHD_CFG="$T/sshd/sshd_config"
kill_tree() { local c; for c in $(pgrep -P "$1"); do kill_tree "$c"; done; kill -KILL "$1" 2>/dev/null || true; }
sshd_kill() { local p; for p in $(pgrep -f "sshd -D -e -f $SSHD_CFG"); do kill_tree "$p"; done; }
sshd_start() { (/usr/sbin/sshd -D -e -f "$SSHD_CFG" 2>>"$T/sshd/sshd.log" &); }
trap 'sshd_kill; cleanup' EXIT

make_db "$T/w.db"
start_walship "$T/w.db" "$SFTP_URL" "$T/state" "$T/walship.log" --key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN"
python3 "$BENCH/writer.py" "$T/w.db" "$T/w.out" "$RATE:$DUR" & WRITER=$!; PIDS="$PIDS $WRITER"

echo "t,lag_ms,rss_kib,fds,state_bytes,wal_bytes,outage" >"$T/soak.csv"
t0=$(date +%s)
outage=0
while kill -0 "$WRITER" 2>/dev/null; do
    now=$(( $(date +%s) - t0 ))
    phase=$(( now % EVERY_S ))
    if [ $now -ge $EVERY_S ] && [ $phase -lt $OUTAGE_S ] && [ $outage = 0 ]; then
        sshd_kill; outage=1; echo "$now sshd down" >>"$T/events"
    elif [ $outage = 1 ] && [ $phase -ge $OUTAGE_S ]; then
        sshd_start; outage=0; echo "$now sshd up" >>"$T/events"
    fi
    lag=$(sed -n 's/.*lag \([0-9]*\) ms.*/\1/p' "$T/state/status" 2>/dev/null); lag=${lag:-0}
    rss=$(awk '/^VmRSS/ {print $2}' /proc/$WPID/status)
    fds=$(ls /proc/$WPID/fd | wc -l)
    st=$(du -sb "$T/state" 2>/dev/null | cut -f1)
    wal=$(stat -c %s "$T/w.db-wal" 2>/dev/null || echo 0)
    echo "$now,$lag,$rss,$fds,$st,$wal,$outage" >>"$T/soak.csv"
    sleep 1
done
[ $outage = 1 ] && sshd_start
wait "$WRITER" || true
sleep 3
stop_walship
cp "$T/soak.csv" "$OUT/soak.csv"

python3 "$BENCH/plot.py" "$OUT/soak-lag.png" "walship lag (ms) over sftp, $RATE commits/s, sshd killed ${OUTAGE_S}s every ${EVERY_S}s (grey)" "$OUT/soak.csv" t lag_ms outage
python3 "$BENCH/plot.py" "$OUT/soak-state.png" "walship state directory (bytes) during the soak, outages grey" "$OUT/soak.csv" t state_bytes outage
python3 "$BENCH/plot.py" "$OUT/soak-rss.png" "walship RSS (KiB) during the soak, outages grey" "$OUT/soak.csv" t rss_kib outage

python3 -c "import sqlite3; c=sqlite3.connect('$T/w.db'); c.execute('pragma wal_checkpoint(TRUNCATE)'); c.close()"
RESTORED=$("$WALSHIP" restore -o "$T/restored.db" --key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN" "$SFTP_URL" 2>&1 | tail -1)
if cmp -s "$T/restored.db" "$T/w.db"; then SAME=byte-identical; else SAME=DIFFERENT; fi
IC=$(sqlite3 "$T/restored.db" 'pragma integrity_check')
echo "# soak.sh  $(date -u +%FT%TZ)  $(nproc) cores  ${MIN} min at $RATE commits/s, sshd killed ${OUTAGE_S}s every ${EVERY_S}s  walship $($WALSHIP --version)"
python3 - "$T/soak.csv" "$EVERY_S" "$OUTAGE_S" <<'PY'
import csv, sys
rows = [{k: int(v) for k, v in r.items()} for r in csv.DictReader(open(sys.argv[1]))]
every, out = int(sys.argv[2]), int(sys.argv[3])
print('period        RSS p50 KiB  RSS max KiB  fds max  state max MiB  WAL max MiB  lag max ms (outside outages)')
for p in range(0, rows[-1]['t'] + 1, every):
    w = [r for r in rows if p <= r['t'] < p + every]
    if not w: continue
    calm = [r['lag_ms'] for r in w if not r['outage'] and r['t'] - p > out + 30] or [0]
    rss = sorted(r['rss_kib'] for r in w)
    print('%5d-%-6d  %11d  %11d  %7d  %13.1f  %11.1f  %d' % (p, p + every, rss[len(rss) // 2], rss[-1],
          max(r['fds'] for r in w), max(r['state_bytes'] for r in w) / 2**20, max(r['wal_bytes'] for r in w) / 2**20, max(calm)))
print('recovery: seconds from sshd restart until lag < 50 ms')
for i, r in enumerate(rows):
    if i and rows[i - 1]['outage'] and not r['outage']:
        back = next((s['t'] - r['t'] for s in rows[i:] if s['lag_ms'] < 50), None)
        print('  outage ending at t=%d s: %s' % (r['t'], 'never' if back is None else '%d s' % back))
PY
echo "$RESTORED"
echo "restore: $SAME, integrity $IC; rows $(sqlite3 "$T/restored.db" 'select count(*) from t') of $(sqlite3 "$T/w.db" 'select count(*) from t')"
echo "walship log: $(grep -c ERROR "$T/walship.log" || true) ERROR lines; distinct WARN/ERROR:"
grep -E 'WARN|ERROR' "$T/walship.log" | sed -E 's/^[^ ]+ +//; s/[0-9a-f]{12,20}/X/g; s#/tmp/[^ ]*##g; s/[0-9]+ ms/N ms/g' | sort | uniq -c | sort -rn | head -8 || true
echo "plots: $OUT/soak-lag.png $OUT/soak-state.png $OUT/soak-rss.png"
