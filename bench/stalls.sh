#!/bin/bash
# stalls.sh ROUNDS BIN... : where a bulk writer's time goes beside walship. ROUNDS rounds of
# 200 MiB loads (`loader.py`, 1 MiB transactions): one with plain sqlite3, then one beside each
# walship build BIN (file:// replica), in an order rotated each round. For each load: its time,
# and its stalls (the gaps between two commits): 5-15 ms (a writer's own checkpoint: it copies
# ~4 MiB and syncs the WAL and the database) and >= 15 ms by 5 ms bucket (walship's holds of the
# write lock, which SQLite's busy handler rounds up to 18, 33 or 53 ms, and checkpoints of the
# writer's own that waited for other syncs). walship runs with WALSHIP_LOG=walship=debug: for
# each hold its debug line gives the frames captured under the lock (tail), the ms until they
# were captured (stepped_ms) and published (captured_ms), and the hold (locked_ms).
# Then per build: mean load, mean stalls, the load's time split into its ordinary commits
# (gaps < 5 ms), its 5-15 ms stalls and its longer ones (sums, ms), and the holds' medians.
# JOURNALED=1 as for bulk.sh; MODE=sftp replicates over the loopback sshd instead (one sshd,
# a fresh replica directory per load; TWO_HOST=1 as for bulk.sh).
# Builds are told apart by their file names, which must differ.
source "$(dirname "$0")/common.sh"
ROUNDS=$1; shift
[ $# -ge 1 ] || { echo "usage: $0 ROUNDS BIN..." >&2; exit 2; }
use_fs
OUT="$T/stalls"; mkdir -p "$OUT"
MODE=${MODE:-file}
replica_target "$MODE"
one() { # base|BIN -> load ms
    local name log=/dev/null
    name=$(basename "$1")
    [ "$1" != base ] && log="$OUT/$name.$RANDOM.log"
    [ "$MODE" = sftp ] && URL="$SFTP_URL"
    WALSHIP_LOG=walship=debug fresh_load_db "$1" "$log"
    local stamps="$OUT/$name.$RANDOM.stamps"
    STAMPS=$stamps python3 "$BENCH/loader.py" "$FS/w.db" 200 >/dev/null
    [ "$1" != base ] && { sleep 0.3; stop_walship; }
    python3 -c "ts=[int(l) for l in open('$stamps')]; print('%.0f' % ((ts[-1]-ts[0])/1e6))"
}
echo "# stalls.sh $MODE  $(date -u +%FT%TZ)  $(nproc) cores  loadavg $(cut -d' ' -f1-3 /proc/loadavg)  ${JOURNALED:+journaled ext4}${TWO_HOST:+  TWO_HOST}"
for r in $(seq 1 "$ROUNDS"); do
    set -- base "$@"; n=$#; k=$(( r % n )); arr=("$@"); declare -A res
    for i in $(seq 0 $((n - 1))); do b=${arr[$(( (i + k) % n ))]}; [ "$MODE" = sftp ] && [ "$b" != base ] && sftp_dir_new; res[$b]=$(one "$b"); done
    line="round $r:"; for b in "${arr[@]}"; do line="$line $(basename "$b")=${res[$b]}"; done
    echo "$line"
    shift
done
python3 - "$OUT" base "$@" <<'PY'
import collections, glob, os, re, statistics as st, sys
out = sys.argv[1]
for name in [os.path.basename(b) for b in sys.argv[2:]]:
    loads, short, long_, split = [], [], collections.Counter(), []
    for f in glob.glob(f'{out}/{name}.*.stamps'):
        ts = [int(l) for l in open(f)]
        gaps = [(b - a) / 1e6 for a, b in zip(ts, ts[1:])]
        loads.append(sum(gaps))
        short.append(sum(5 <= g < 15 for g in gaps))
        split.append((sum(g for g in gaps if g < 5), sum(g for g in gaps if 5 <= g < 15),
                      sum(g for g in gaps if g >= 15)))
        for g in gaps:
            if g >= 15:
                long_[min(int(g // 5) * 5, 100)] += 1
    n = len(loads)
    line = f'{name:>8}: {n} loads, mean {st.mean(loads):.0f} ms; stalls per load: 5-15 ms {st.mean(short):.1f}, >= 15 ms ' + \
        ' '.join(f'{k}-:{long_[k] / n:.1f}' for k in sorted(long_)) + \
        '\n{:>10}time in commits < 5 ms {:.0f}, in 5-15 ms stalls {:.0f}, in longer ones {:.0f} (means)'.format(
            '', *(st.mean(x) for x in zip(*split)))
    holds = [tuple(map(int, m.groups())) for f in glob.glob(f'{out}/{name}.*.log') for l in open(f)
             for m in [re.search(r'tail=(\d+) stepped_ms=(\d+) captured_ms=(\d+) locked_ms=(\d+)', l)] if m]
    if holds:
        t, s, c, L = zip(*holds)
        line += (f'\n{"":>10}{len(holds) / n:.1f} holds per load: tail median {st.median(t):.0f} frames,'
                 f' captured in {st.median(s):.0f} ms, published {st.median([b - a for a, b in zip(s, c)]):.0f} ms later,'
                 f' hold median {st.median(L):.0f} ms, {sum(x <= 17 for x in L)} of {len(L)} <= 17 ms')
    print(line)
PY
