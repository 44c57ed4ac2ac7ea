#!/bin/bash
# walship's CPU (and the sftp server's) while replicating RATE commits/s (default 200) for SECS
# (default 30) seconds to a file:// and to an sftp:// replica: percent of one core, user+system,
# from /proc (the server's: every sshd process of the replicator account).
# This machine's root file system is ext4 *without a journal*, where creating a file scans for
# inodes not recently deleted (`recently_deleted` in the kernel): with a file created per step
# that was ~70% of walship's CPU. JOURNALED=1 puts the database, the state directory and the
# file replica on a loop-mounted ext4 with a journal, as on an ordinary installation (the sftp
# replica stays in the chroot on the root file system).
# usage: bench/cpu.sh [RATE] [SECS]   env: JOURNALED=1
source "$(dirname "$0")/common.sh"
RATE="${1:-200}"; SECS="${2:-30}"
use_fs; BASE="$FS"
# the sftp server's processes: every descendant of this run's sshd listener
server_pids() { local p q; for p in $(pgrep -f "sshd -D -e -f $T/sshd/sshd_config"); do
    for q in $(pgrep -P "$p"); do echo "$q"; pgrep -P "$q"; done; done; }
ticks() { local t=0 p; for p in "$@"; do t=$(( t + $(awk '{print $14+$15}' /proc/$p/stat 2>/dev/null || echo 0) )); done; echo $t; }
start_sshd
echo "# cpu.sh  $(date -u +%FT%TZ)  $(nproc) cores  $RATE commits/s for $SECS s  files on $FS_NAME  walship $($WALSHIP --version)  loadavg $(cut -d' ' -f1-3 /proc/loadavg)"
for kind in file sftp; do
    D="$BASE/$kind"; mkdir -p "$D"
    make_db "$D/db"
    if [ $kind = file ]; then
        start_walship "$D/db" "file://$D/replica" "$D/state" "$D/walship.log"
    else
        start_walship "$D/db" "$SFTP_URL" "$D/state" "$D/walship.log" --key-path "$SFTP_KEY" --known-hosts "$SFTP_KNOWN"
    fi
    sleep 1
    S0=$(ticks $(server_pids)); W0=$(ticks $WPID); t0=$(mono_ns)
    python3 "$BENCH/writer.py" "$D/db" "$D/w.out" "$RATE:$SECS"
    S1=$(ticks $(server_pids)); W1=$(ticks $WPID); t1=$(mono_ns)
    stop_walship
    W=$(python3 -c "print('%.1f' % (($W1-$W0)*1e9/($t1-$t0)))"); S=$(python3 -c "print('%.1f' % (($S1-$S0)*1e9/($t1-$t0)))")
    printf '%-5s walship %5s %% of a core (%s ms per commit)   server (sshd) %5s %%\n' $kind "$W" \
        "$(python3 -c "print('%.2f' % (($W1-$W0)*10/($RATE*$SECS)))")" "$([ $kind = sftp ] && echo $S || echo -)"
done
