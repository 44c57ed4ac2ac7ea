# Sourced after common.sh: a throwaway 3-node Garage cluster on 127.0.0.1 (replication factor 3,
# sqlite metadata, data under $T/garage), one key and one bucket. Its processes go into $PIDS, so
# common.sh's cleanup trap kills them (by pid) and removes their directories with $T.
# GARAGE=... overrides the binary (default: script/install-garage, which builds only if missing).
# Garage's own defaults are kept: metadata_fsync and data_fsync are false (a write is acknowledged
# once a quorum of 2 nodes has it, not once it is on disk), and objects under 3 KiB are stored in
# the metadata table, bigger ones as data blocks sent between the nodes by RPC.
# Garage 2.5.0 does not set TCP_NODELAY on its RPC connections between nodes: a small message
# written right after another one waits for the peer's delayed ACK (~40 ms), which shows as
# 4 KiB PUTs taking ~50 ms and listings sometimes ~45-85 ms here. GARAGE_NODELAY=1 starts the
# servers with a tiny LD_PRELOAD shim (built with cc into $T) that sets TCP_NODELAY on every
# socket they connect or accept, to see what Garage costs without that stall (default: stock).

# free_port: a free loopback TCP port
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

# wait_port PORT LOG: waits (up to 30 s) until 127.0.0.1:PORT accepts connections
wait_port() {
    local i=0
    until python3 -c "import socket; socket.create_connection(('127.0.0.1',$1),1)" 2>/dev/null; do
        i=$((i + 1))
        [ $i -lt 3000 ] || { echo "bench: garage did not listen on $1:" >&2; cat "$2" >&2; exit 1; }
        sleep 0.01
    done
}

# start_garage [BUCKET]: starts the cluster, creates a key and BUCKET (default walship-bench).
# Sets GARAGE, GARAGE_CONF (node 1's config, for the CLI), S3_PORT (node 1's S3 API),
# S3_ENDPOINT, S3_REGION, S3_BUCKET, S3_KEY_ID, S3_SECRET, S3_CREDS (walship's credentials file).
start_garage() {
    GARAGE="${GARAGE:-$("$REPO/script/install-garage")}"
    S3_BUCKET="${1:-walship-bench}"; S3_REGION=garage
    local secret n d rpc s3 id ids="" out
    secret=$(openssl rand -hex 32)
    for n in 1 2 3; do
        d="$T/garage/node$n"; mkdir -p "$d/meta" "$d/data"
        rpc=$(free_port); s3=$(free_port)
        cat >"$d/garage.toml" <<CFG
metadata_dir = "$d/meta"
data_dir = "$d/data"
db_engine = "sqlite"
replication_factor = 3
rpc_bind_addr = "127.0.0.1:$rpc"
rpc_public_addr = "127.0.0.1:$rpc"
rpc_secret = "$secret"

[s3_api]
s3_region = "$S3_REGION"
api_bind_addr = "127.0.0.1:$s3"
CFG
        chmod 600 "$d/garage.toml"
        if [ "${GARAGE_NODELAY:-0}" = 1 ]; then
            LD_PRELOAD="$(nodelay_shim)" RUST_LOG=warn "$GARAGE" -c "$d/garage.toml" server >"$d/log" 2>&1 &
        else
            RUST_LOG=warn "$GARAGE" -c "$d/garage.toml" server >"$d/log" 2>&1 &
        fi
        PIDS="$PIDS $!"
        eval "GARAGE_RPC$n=$rpc GARAGE_S3_$n=$s3"
    done
    GARAGE_CONF="$T/garage/node1/garage.toml"
    S3_PORT=$GARAGE_S3_1
    S3_ENDPOINT="http://127.0.0.1:$S3_PORT"
    for n in 1 2 3; do
        d="$T/garage/node$n"
        eval "wait_port \$GARAGE_RPC$n $d/log"
        id=$(gcli -c "$d/garage.toml" node id -q)
        ids="$ids ${id%%@*}"
        [ $n = 1 ] || gcli node connect "$id" >/dev/null
    done
    for id in $ids; do gcli layout assign -z dc1 -c 1G "$id" >/dev/null; done
    gcli layout apply --version 1 >/dev/null
    wait_port "$S3_PORT" "$T/garage/node1/log"
    out=$(gcli key create walship-bench)
    S3_KEY_ID=$(awk -F': *' '/Key ID:/ {print $2; exit}' <<<"$out" | tr -d ' ')
    S3_SECRET=$(awk -F': *' '/Secret key:/ {print $2; exit}' <<<"$out" | tr -d ' ')
    [ -n "$S3_KEY_ID" ] && [ -n "$S3_SECRET" ] || { echo "bench: cannot parse garage key create:" >&2; echo "$out" >&2; exit 1; }
    gcli bucket create "$S3_BUCKET" >/dev/null
    gcli bucket allow --read --write --owner "$S3_BUCKET" --key "$S3_KEY_ID" >/dev/null
    S3_CREDS="$T/garage/credentials.toml"
    printf 'access-key-id = "%s"\nsecret-access-key = "%s"\n' "$S3_KEY_ID" "$S3_SECRET" >"$S3_CREDS"
    chmod 600 "$S3_CREDS"
    export S3_ENDPOINT S3_REGION S3_KEY_ID S3_SECRET   # for s3sign.py
    wait_s3
}

# nodelay_shim: builds (once per run) and prints the path of the TCP_NODELAY LD_PRELOAD shim
nodelay_shim() {
    local so="$T/garage/nodelay.so"
    if [ ! -e "$so" ]; then
        cat >"$T/garage/nodelay.c" <<'C'
#define _GNU_SOURCE
#include <dlfcn.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <sys/socket.h>
static void nodelay(int fd) { int one = 1; setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one); }
int connect(int fd, const struct sockaddr *a, socklen_t l) {
    static int (*real)(int, const struct sockaddr *, socklen_t);
    if (!real) real = dlsym(RTLD_NEXT, "connect");
    int r = real(fd, a, l);
    nodelay(fd);   /* also while a non-blocking connect is in progress; fails harmlessly on non-TCP */
    return r;
}
int accept4(int fd, struct sockaddr *a, socklen_t *l, int f) {
    static int (*real)(int, struct sockaddr *, socklen_t *, int);
    if (!real) real = dlsym(RTLD_NEXT, "accept4");
    int r = real(fd, a, l, f);
    if (r >= 0) nodelay(r);
    return r;
}
C
        cc -shared -fPIC -O2 -o "$so" "$T/garage/nodelay.c" -ldl >&2 || { echo "bench: GARAGE_NODELAY=1 needs cc" >&2; exit 1; }
    fi
    echo "$so"
}

# gcli [-c CONF] ARGS...: the garage CLI (talks RPC to node 1 unless -c says otherwise)
gcli() {
    if [ "$1" = -c ]; then local c="$2"; shift 2; "$GARAGE" -c "$c" "$@"; else "$GARAGE" -c "$GARAGE_CONF" "$@"; fi
}

# wait_s3: waits (up to 30 s) until a signed ListObjectsV2 of the bucket answers 200: the layout
# and the key's permissions propagate to the nodes asynchronously
wait_s3() {
    local i=0
    until python3 "$BENCH/s3sign.py" list "$S3_BUCKET" "" >/dev/null 2>"$T/garage/wait_s3.err"; do
        i=$((i + 1))
        [ $i -lt 300 ] || { echo "bench: garage never answered a listing:" >&2; cat "$T/garage/wait_s3.err" "$T/garage/node1/log" >&2; exit 1; }
        sleep 0.1
    done
}

# s3cmd_conf FILE: a private s3cmd config for the cluster (path-style: host_bucket without %(bucket)s)
s3cmd_conf() {
    cat >"$1" <<CFG
[default]
access_key = $S3_KEY_ID
secret_key = $S3_SECRET
host_base = 127.0.0.1:$S3_PORT
host_bucket = 127.0.0.1:$S3_PORT
use_https = False
signature_v2 = False
bucket_location = $S3_REGION
check_ssl_certificate = False
guess_mime_type = False
progress_meter = False
CFG
    chmod 600 "$1"
}

# walship_s3_flags: the flags walship needs for an ad-hoc s3:// URL on this cluster
walship_s3_flags() { echo "--endpoint $S3_ENDPOINT --region $S3_REGION --credentials-file $S3_CREDS"; }
