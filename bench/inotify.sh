#!/bin/bash
# What an inotify watch on the database's directory costs a bulk writer, without walship: plain
# sqlite3 loads MIB (default 200) MiB in 1 MiB transactions (bench/loader.py), alone and beside a
# process that only watches the directory and reads its events every 50 ms, in PAIRS (default 6)
# interleaved pairs (the order alternates). MASK is the watch's inotify mask: by default the
# `notify` crate's (modify, open, close-write, attributes, names), which walship's daemon used
# before its own watcher; `MASK=0x3c0` is names only (create, delete, moves). Prints each pair's
# load times and ratio, then the median ratio.
# usage: bench/inotify.sh [PAIRS] [MIB]   env: MASK, JOURNALED=1 (see use_fs in common.sh)
source "$(dirname "$0")/common.sh"
PAIRS="${1:-6}"; MIB="${2:-200}"; MASK="${MASK:-0x3ee}"
use_fs
D="$FS/d"; mkdir -p "$D"
cat >"$T/watch.py" <<'PY'
import ctypes, os, select, sys, time
libc = ctypes.CDLL(None, use_errno=True)
fd = libc.inotify_init1(0)
if fd < 0 or libc.inotify_add_watch(fd, sys.argv[1].encode(), int(sys.argv[2], 0)) < 0:
    sys.exit('inotify: errno %d' % ctypes.get_errno())
open(sys.argv[3], 'w').close()
while True:
    time.sleep(0.05)
    if select.select([fd], [], [], 0)[0]:
        os.read(fd, 65536)
PY
# load WATCHED -> prints the load's ms
load() {
    rm -f "$D"/t.db*; make_db "$D/t.db"
    local wp=""
    if [ "$1" = 1 ]; then
        rm -f "$T/ready"; python3 "$T/watch.py" "$D" "$MASK" "$T/ready" & wp=$!
        until [ -e "$T/ready" ]; do sleep 0.01; done
    fi
    python3 "$BENCH/loader.py" "$D/t.db" "$MIB" >"$T/load"
    [ -z "$wp" ] || { kill "$wp"; wait "$wp" 2>/dev/null || true; }
    awk '$1=="start"{s=$2} $1=="end"{e=$2} END{printf "%d", (e-s)/1e6}' "$T/load"
}
echo "# inotify.sh  $(date -u +%FT%TZ)  $(nproc) cores  ${MIB} MiB  mask $MASK  files on $FS_NAME"
R=""
for p in $(seq 1 "$PAIRS"); do
    if [ $((p % 2)) = 1 ]; then a=$(load 0); b=$(load 1); else b=$(load 1); a=$(load 0); fi
    r=$(python3 -c "print('%.3f' % ($b / $a))"); R="$R $r"
    echo "alone $a ms  watched $b ms  ratio $r"
done
echo "RESULT inotify mask=$MASK median $(echo $R | tr ' ' '\n' | sort -n | awk '{v[NR]=$1} END{print (NR%2 ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2)}')x over $PAIRS pairs"
