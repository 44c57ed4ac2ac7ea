#!/bin/sh
# Upload/download throughput of walship's SftpBackend vs OpenSSH's sftp put/get, in one run against
# the same test sshd (tests/sshd.rs: real /usr/sbin/sshd, chrooted replicator account, loopback).
# Needs root, openssh-server and openssh-client. Usage: bench/sftp-throughput.sh [MiB] (default 256)
# The OpenSSH timings include its process start and handshake (~tens of ms).
set -eu
cd "$(dirname "$0")/.."
WALSHIP_BENCH_MIB="${1:-256}" exec cargo test --release --test tests sftp_throughput_vs_openssh \
    -- --ignored --nocapture --test-threads=1
