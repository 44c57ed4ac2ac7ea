#!/bin/bash
# Restore time of two builds from one sftp replica of a ~200 MiB database (200 transactions of
# 1000 rows of 1000 random bytes), in interleaved runs (A, B, A, B...), page cache warm.
# usage: bench/restore-ab.sh BIN_A BIN_B [PAIRS]   (default 4; the replica is written by BIN_A)
source "$(dirname "$0")/common.sh"
A=$1; B=$2; PAIRS=${3:-4}
[ -x "$A" ] && [ -x "$B" ] || { echo "usage: $0 BIN_A BIN_B [PAIRS]" >&2; exit 2; }
replica_target sftp
make_db "$T/w.db"
python3 - "$T/w.db" <<'PY'
import os, sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute("create table big(id integer primary key, b blob)")
for _ in range(200):
    c.execute("begin")
    c.executemany("insert into big(b) values (?)", [(os.urandom(1000),) for _ in range(1000)])
    c.execute("commit")
c.close()
PY
WALSHIP=$A start_walship "$T/w.db" "$URL" "$T/state" "$T/walship.log" $EXTRA
stop_walship
echo "# restore-ab.sh  $(date -u +%FT%TZ)  $(nproc) cores  $PAIRS pairs  A=$A B=$B"
for p in $(seq 1 "$PAIRS"); do for side in A B; do
    if [ $side = A ]; then W=$A; else W=$B; fi
    rm -f "$T/r.db"
    t0=$(mono_ns); "$W" restore -q -o "$T/r.db" "$URL" $EXTRA >/dev/null; t1=$(mono_ns)
    echo "$side $(( (t1 - t0) / 1000000 )) ms"
done; done
