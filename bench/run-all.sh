#!/bin/bash
# Runs every benchmark once (about 3-4 minutes on 2 cores); sftp parts need root + openssh-server.
set -u
cd "$(dirname "$0")"
./lag.sh file; echo
./maxrate.sh file 3; echo
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/sshd ]; then ./lag.sh sftp; echo; fi
./bulk.sh; echo
./rss.sh; echo
if [ "$(id -u)" = 0 ] && [ -x /usr/sbin/sshd ]; then ./sftp.sh; fi
