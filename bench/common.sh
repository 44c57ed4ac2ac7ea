# Sourced by the bench scripts: temp dir, cleanup trap, walship and sshd helpers.
# Every process started here is recorded in $PIDS and killed (by pid) on exit; only loopback is used.
set -eu
BENCH="$(cd "$(dirname "$0")" && pwd)"
REPO="$(dirname "$BENCH")"
WALSHIP="${WALSHIP:-$REPO/target/release/walship}"
[ -x "$WALSHIP" ] || { echo "bench: $WALSHIP missing: run cargo build --release" >&2; exit 1; }
T="$(mktemp -d /tmp/walship-bench.XXXXXX)"
PIDS=""
CLEAN_DIRS=""
MOUNTS=""
cleanup() {
    for p in $PIDS; do kill -TERM "$p" 2>/dev/null || true; done
    for p in $PIDS; do wait "$p" 2>/dev/null || true; done
    for m in $MOUNTS; do umount "$m" 2>/dev/null || true; done
    if mountpoint -q "$T/fs" 2>/dev/null; then umount "$T/fs" || true; fi
    if [ -n "${KEEP:-}" ]; then echo "bench: kept $T $CLEAN_DIRS" >&2; else rm -rf "$T" $CLEAN_DIRS; fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# use_fs: sets FS, where a run keeps its files: $T, or with JOURNALED=1 a loop-mounted ext4 with a
# journal, as on an ordinary installation (this machine's root is ext4 without one); FS_NAME says which.
use_fs() {
    if [ -n "${JOURNALED:-}" ]; then
        truncate -s 2G "$T/fs.img"; mkfs.ext4 -q -F "$T/fs.img"; mkdir -p "$T/fs"
        mount -o loop "$T/fs.img" "$T/fs"; FS="$T/fs"; FS_NAME="ext4 with a journal (loop)"
    else
        FS="$T"; FS_NAME="the root fs (ext4, no journal)"
    fi
}

# now_ms: CLOCK_MONOTONIC in ns (same clock as the python helpers)
mono_ns() { python3 -c 'import time; print(time.monotonic_ns())'; }

# start_walship DB URL STATE LOG [extra args...]: starts the daemon, waits until ready; sets WPID
start_walship() {
    local db="$1" url="$2" st="$3" log="$4"; shift 4
    "$WALSHIP" replicate "$db" "$url" --state-dir "$st" "$@" >"$log" 2>&1 &
    WPID=$!
    PIDS="$PIDS $WPID"
    wait_ready "$st" "$log"
}

# wait_ready STATE LOG: waits (up to 60 s) until walship $WPID reports its replica caught up
wait_ready() {
    local i=0
    until [ -s "$1/status" ] && grep -q 'replicated to 1/1' "$1/status" 2>/dev/null; do
        i=$((i + 1))
        if [ $i -gt 6000 ] || ! kill -0 "$WPID" 2>/dev/null; then
            echo "bench: walship did not become ready:" >&2; cat "$2" >&2; exit 1
        fi
        sleep 0.01
    done
}

# stop_walship: SIGTERM (ship what is pending), wait
stop_walship() {
    kill -TERM "$WPID" 2>/dev/null || true
    wait "$WPID" 2>/dev/null || true
}

# start_sampler OUT WAL [STATE|-] [PID]: sampler.py (peaks of the -wal file, the state
# directory, the RSS, every 10 ms) until stop_sampler writes them to OUT; waits until it runs
start_sampler() {
    python3 "$BENCH/sampler.py" "$@" & SPID=$!; PIDS="$PIDS $SPID"
    until [ -e "$1.ready" ]; do sleep 0.005; done
}
stop_sampler() { kill -TERM "$SPID"; wait "$SPID" || true; }

# start_watch ROOT OUT: inotify watcher on a replica's directory; sets WATCHPID, waits until armed
start_watch() {
    python3 "$BENCH/watch.py" "$1" "$2" &
    WATCHPID=$!
    PIDS="$PIDS $WATCHPID"
    until grep -q '^ready' "$2" 2>/dev/null; do sleep 0.005; done
}

# make_db DB: a WAL-mode database with one table, created before walship starts
make_db() {
    python3 - "$1" <<'PY'
import sqlite3, sys
c = sqlite3.connect(sys.argv[1])
c.execute('pragma journal_mode=wal')
c.execute('create table t(id integer primary key, v)')
c.commit(); c.close()
PY
}

# start_sshd: a throwaway sshd on a free loopback port with the ALPHA layout (as tests/sshd.rs:
# the package's sysusers/tmpfiles files and sshd drop-in, root-owned authorized keys under /run).
# Sets SSHD_PORT, SFTP_KEY, SFTP_KNOWN, SFTP_URL (a fresh replica dir), SFTP_DIR (its local path).
start_sshd() {
    [ "$(id -u)" = 0 ] || { echo "bench: sftp needs root" >&2; exit 1; }
    systemd-sysusers "$REPO/sysusers.d/walship-replicator.conf" >/dev/null
    systemd-tmpfiles --create "$REPO/tmpfiles.d/walship-replicator.conf" >/dev/null
    mkdir -p /run/sshd
    local d="$T/sshd" auth="/run/walship-bench-sshd/$$"
    mkdir -p "$d" "$auth"; chmod 755 /run/walship-bench-sshd "$auth"
    CLEAN_DIRS="$CLEAN_DIRS $auth"
    ssh-keygen -q -t ed25519 -N '' -C walship-bench -f "$d/host_ed25519"
    ssh-keygen -q -t ed25519 -N '' -C walship-bench -f "$d/client_ed25519"
    cp "$d/client_ed25519.pub" "$auth/authorized_keys_replicator"; chmod 644 "$auth/authorized_keys_replicator"
    SSHD_PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
    cat >"$d/sshd_config" <<CFG
Port $SSHD_PORT
ListenAddress 127.0.0.1
HostKey $d/host_ed25519
PidFile none
UsePAM yes
LogLevel ERROR
Subsystem sftp internal-sftp
MaxStartups 100
Match User replicator
	AuthorizedKeysFile $auth/authorized_keys_%u
Include $REPO/packaging/sshd_config.d/walship-replicator.conf
CFG
    set -- $(cat "$d/host_ed25519.pub")
    echo "[127.0.0.1]:$SSHD_PORT $1 $2" >"$d/known_hosts"
    # TWO_HOST=1: sshd and its sessions run under SCHED_IDLE (see sftp_dir_new).
    ${TWO_HOST:+chrt --idle 0} /usr/sbin/sshd -D -e -f "$d/sshd_config" 2>"$d/sshd.log" &
    PIDS="$PIDS $!"
    SFTP_KEY="$d/client_ed25519"; SFTP_KNOWN="$d/known_hosts"
    local i=0
    until python3 -c "import socket; socket.create_connection(('127.0.0.1',$SSHD_PORT),1)" 2>/dev/null; do
        i=$((i+1)); [ $i -lt 500 ] || { cat "$d/sshd.log" >&2; exit 1; }; sleep 0.01
    done
    sftp_dir_new
}

# replica_target file|sftp: sets URL, ROOT (the replica's directory on this machine) and EXTRA
# (walship's options for it): a file:// replica under $T, or sftp:// on a throwaway loopback sshd
replica_target() {
    if [ "$1" = sftp ]; then
        start_sshd
        URL="$SFTP_URL"; ROOT="$SFTP_DIR"
        EXTRA="--key-path $SFTP_KEY --known-hosts $SFTP_KNOWN"
    else
        URL="file://${FS:-$T}/replica"; ROOT="${FS:-$T}/replica"; EXTRA=""
    fi
}

# fresh_load_db BIN LOG: a new database $FS/w.db (the last one, its state directory and a file://
# replica gone) and, unless BIN is "base", walship BIN replicating it to $URL (replica_target
# first), logging to LOG
fresh_load_db() {
    rm -rf "$FS/w.db"* "$FS/state" "$FS/replica"; make_db "$FS/w.db"
    [ "$1" = base ] && return 0
    WALSHIP=$1 start_walship "$FS/w.db" "$URL" "$FS/state" "$2" $EXTRA
}

# sftp_dir_new: a fresh replica directory inside the chroot's writable db/ (removed on exit)
sftp_dir_new() {
    local name="bench-$$-$(date +%s%N)"
    SFTP_URL="sftp://replicator@127.0.0.1:$SSHD_PORT/db/$name"
    SFTP_DIR="/var/data/replicator/db/$name"
    CLEAN_DIRS="$CLEAN_DIRS $SFTP_DIR"
    # TWO_HOST=1 stands in for ALPHA being another machine: the replica directory is a tmpfs of
    # its own (the server's writes and fsyncs do not reach this disk), and sshd runs only on CPU
    # time nothing else here wants (start_sshd). What is left is walship's own work, and the
    # loopback TCP between the two.
    if [ -n "${TWO_HOST:-}" ]; then
        mkdir -p "$SFTP_DIR"
        mount -t tmpfs -o "size=8g,mode=0700,uid=$(id -u replicator),gid=$(id -g replicator)" tmpfs "$SFTP_DIR"
        MOUNTS="$MOUNTS $SFTP_DIR"
    fi
}

# ossh_sftp BATCHFILE: OpenSSH's sftp client against the bench sshd
ossh_sftp() {
    sftp -q -b "$1" -i "$SFTP_KEY" -P "$SSHD_PORT" -o UserKnownHostsFile="$SFTP_KNOWN" \
        -o StrictHostKeyChecking=yes -o BatchMode=yes replicator@127.0.0.1
}
