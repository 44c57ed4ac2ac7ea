#!/usr/bin/env bash
# The user's story with the packages, end to end, under a real systemd: three systemd-nspawn
# containers booted from a debootstrapped Debian bookworm root, ALPHA (storage host,
# walship-replicator), BRAVO (database host, walship) and CHARLIE (a warm standby following
# ALPHA with walship-follow@), each in a network namespace of its own, BRAVO and CHARLIE each
# joined to ALPHA by a veth pair (10.77.0.1 alpha, 10.77.0.2 bravo; 10.77.1.1 alpha, 10.77.1.3
# charlie). Then the same with the .rpm
# packages installed by `rpm -i --nodeps` in the same (Debian) containers: no RPM-based root can
# be bootstrapped here, so dnf and Fedora's own macros are not exercised.
#
#   packaging/build.sh && tests/e2e-packages.sh        # as root; prints "N passed, N failed"
#
# Environment: WALSHIP_PACKAGES (default target/packages), WALSHIP_E2E_CACHE (where the
# bookworm root is kept between runs, default /var/cache/walship-e2e), WALSHIP_E2E_MIRROR
# (default: the first Debian mirror of /etc/apt/sources.list*, else deb.debian.org).
# Everything it creates (overlay mounts, containers, network namespaces, veth pair, cgroups,
# the scratch directory) is removed on exit, also on failure or Ctrl-C. It never touches the
# host's sshd or port 22: the sshd it talks to runs inside ALPHA's network namespace.
set -uo pipefail
cd "$(dirname "$0")/.."
repo=$PWD
pkgs=$(realpath "${WALSHIP_PACKAGES:-target/packages}")
cache=${WALSHIP_E2E_CACHE:-/var/cache/walship-e2e}
root_base=$cache/bookworm
[ "$(id -u)" -eq 0 ] || { echo "e2e-packages: run as root" >&2; exit 2; }
for f in walship_ walship-replicator_ walship- walship-replicator-; do
  case $f in *_) ext=deb ;; *) ext=rpm ;; esac
  ls "$pkgs"/"$f"[0-9]*."$ext" >/dev/null 2>&1 ||
    { echo "e2e-packages: no $f*.$ext in $pkgs: run packaging/build.sh" >&2; exit 2; }
done

passed=0 failed=0
ok() { passed=$((passed + 1)); echo "PASS $*"; }
ko() { failed=$((failed + 1)); echo "FAIL $*"; }
# check "description" command...: one test, its output shown on failure.
# (not in a subshell: boot sets the container variables)
check() {
  local what=$1
  shift
  if "$@" >"$checklog" 2>&1; then ok "$what"; else ko "$what"; tail -20 "$checklog" | sed 's/^/     | /'; fi
}
step() { echo; echo "== $*"; }

# ---------------------------------------------------------------------------------------------
# The root file system, cached.
if [ ! -e "$root_base/.walship-e2e-ready" ]; then
  mirror=${WALSHIP_E2E_MIRROR:-$(sed -n 's/^URIs: *\([^ ]*debian\/*\)$/\1/p; s/^deb \(http[^ ]*debian\/*\) bookworm .*/\1/p' \
    /etc/apt/sources.list /etc/apt/sources.list.d/*.sources /etc/apt/sources.list.d/*.list 2>/dev/null | head -1)}
  mirror=${mirror:-http://deb.debian.org/debian}
  echo "e2e-packages: debootstrap bookworm from $mirror into $root_base (once, ~2 min)"
  mkdir -p "$cache"
  rm -rf "$root_base.tmp"
  debootstrap --variant=minbase \
    --include=systemd,systemd-sysv,dbus,openssh-server,sqlite3,iproute2,rpm,ca-certificates \
    bookworm "$root_base.tmp" "$mirror" >"$cache/debootstrap.log" 2>&1 ||
    { echo "e2e-packages: debootstrap failed, see $cache/debootstrap.log" >&2; exit 2; }
  rm -rf "$root_base" && mv "$root_base.tmp" "$root_base"
fi
touch "$root_base/.walship-e2e-ready"

# ---------------------------------------------------------------------------------------------
# Containers.
id=$$
work=$(mktemp -d /tmp/walship-e2e.XXXXXX)
checklog=$work/check.log
declare -A npid leader
cleanup() {
  set +e
  for h in alpha bravo charlie; do
    if [ -n "${npid[$h]:-}" ] && kill -0 "${npid[$h]}" 2>/dev/null; then
      kill -TERM "${npid[$h]}"
      for _ in $(seq 1 40); do kill -0 "${npid[$h]}" 2>/dev/null || break; sleep 0.5; done
      kill -KILL "${npid[$h]}" 2>/dev/null
    fi
    # If nspawn had to be killed, its container's init survives it: end the container.
    [ -n "${leader[$h]:-}" ] && kill -KILL "${leader[$h]}" 2>/dev/null
  done
  wait 2>/dev/null
  for h in alpha bravo charlie; do
    mountpoint -q "$work/$h/root" && umount -l "$work/$h/root"
    ip netns del "wse2e-$h-$id" 2>/dev/null
    for c in systemd unified; do
      # The container's last processes may still be leaving its cgroups: retry for 10 s.
      for _ in $(seq 1 20); do
        [ -d "/sys/fs/cgroup/$c/wse2e-$h-$id" ] || break
        find "/sys/fs/cgroup/$c/wse2e-$h-$id" -depth -type d -exec rmdir {} \; 2>/dev/null
        sleep 0.5
      done
    done
  done
  if findmnt -rn -o TARGET | grep -q "^$work/"; then
    echo "e2e-packages: mounts left under $work: not removed" >&2
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ALPHA 10.77.0.1 <-> BRAVO 10.77.0.2 on one veth pair, ALPHA 10.77.1.1 <-> CHARLIE 10.77.1.3
# (the standby) on another: BRAVO and CHARLIE see only ALPHA.
setup_net() {
  local h
  for h in alpha bravo charlie; do ip netns add "wse2e-$h-$id" || return 1; done
  ip link add "wsea$id" type veth peer name "wseb$id" &&
  ip link add "wsec$id" type veth peer name "wsed$id" &&
  ip link set "wsea$id" netns "wse2e-alpha-$id" && ip link set "wseb$id" netns "wse2e-bravo-$id" &&
  ip link set "wsec$id" netns "wse2e-alpha-$id" && ip link set "wsed$id" netns "wse2e-charlie-$id" &&
  ip -n "wse2e-alpha-$id" addr add 10.77.0.1/24 dev "wsea$id" &&
  ip -n "wse2e-bravo-$id" addr add 10.77.0.2/24 dev "wseb$id" &&
  ip -n "wse2e-alpha-$id" addr add 10.77.1.1/24 dev "wsec$id" &&
  ip -n "wse2e-charlie-$id" addr add 10.77.1.3/24 dev "wsed$id" &&
  for h in alpha bravo charlie; do ip -n "wse2e-$h-$id" link set lo up || return 1; done &&
  ip -n "wse2e-alpha-$id" link set "wsea$id" up && ip -n "wse2e-bravo-$id" link set "wseb$id" up &&
  ip -n "wse2e-alpha-$id" link set "wsec$id" up && ip -n "wse2e-charlie-$id" link set "wsed$id" up
}
boot() {
  local h=$1 r=$work/$1
  mkdir -p "$r/upper" "$r/work" "$r/root"
  mount -t overlay overlay -o "lowerdir=$root_base,upperdir=$r/upper,workdir=$r/work" "$r/root" || return 1
  rm -f "$r/root/etc/hostname"
  case $h in
    charlie) printf '127.0.0.1 localhost\n10.77.1.1 alpha\n10.77.1.3 charlie\n' ;;
    *) printf '127.0.0.1 localhost\n10.77.0.1 alpha\n10.77.0.2 bravo\n10.77.1.3 charlie\n' ;;
  esac >"$r/root/etc/hosts"
  mkdir -p "$r/root/root/pkgs" && cp "$pkgs"/walship* "$r/root/root/pkgs/"
  for c in systemd unified; do mkdir -p "/sys/fs/cgroup/$c/wse2e-$h-$id"; done
  (
    for c in systemd unified; do echo "$BASHPID" >"/sys/fs/cgroup/$c/wse2e-$h-$id/cgroup.procs"; done
    exec systemd-nspawn --boot --register=no --keep-unit -q -D "$r/root" -M "$h" \
      --network-namespace-path="/run/netns/wse2e-$h-$id"
  ) >"$work/$h.console" 2>&1 </dev/null &
  npid[$h]=$!
  for _ in $(seq 1 100); do
    leader[$h]=$(pgrep -P "${npid[$h]}" -x systemd | head -1)
    [ -n "${leader[$h]}" ] && break
    sleep 0.2
  done
  [ -n "${leader[$h]}" ] || return 1
  # Until the system manager's bus is up, systemctl fails: poll (90 s).
  local state=
  for _ in $(seq 1 90); do
    state=$(ct "$h" systemctl is-system-running 2>/dev/null)
    case $state in running | degraded | maintenance | stopping) break ;; esac
    sleep 1
  done
  [ "$state" = running ] || { echo "$h: $state"; ct "$h" systemctl --failed --no-legend; return 1; }
}
# ct HOST command...: run inside the booted container (all its namespaces and cgroup).
ct() {
  local h=$1
  shift
  nsenter -t "${leader[$h]}" -m -u -i -n -p -C -- \
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 TERM=dumb "$@"
}
# sh HOST 'script': a shell script inside the container.
sh_in() { ct "$1" sh -ec "$2"; }
# until_ok SECONDS command...: retries until it succeeds.
until_ok() {
  local t=$1 end
  shift
  end=$((SECONDS + t))
  until "$@"; do [ $SECONDS -ge $end ] && return 1; sleep 1; done
}
rows() { ct bravo sqlite3 "$1" 'SELECT count(*) FROM fruits'; }

step "boot ALPHA and BRAVO"
check "network namespaces and veth pair" setup_net
check "ALPHA boots (systemctl is-system-running: running)" boot alpha
check "BRAVO boots (systemctl is-system-running: running)" boot bravo
check "CHARLIE boots (systemctl is-system-running: running)" boot charlie
if [ -z "${leader[alpha]:-}" ] || [ -z "${leader[bravo]:-}" ] || [ -z "${leader[charlie]:-}" ]; then
  echo "$passed passed, $failed failed"
  exit 1
fi
check "BRAVO reaches ALPHA over the veth pair" ct bravo timeout 5 bash -c 'echo > /dev/tcp/alpha/22'
check "CHARLIE reaches ALPHA over its own veth pair" ct charlie timeout 5 bash -c 'echo > /dev/tcp/alpha/22'

# ---------------------------------------------------------------------------------------------
# The story's key exchange, shared by the .deb and the .rpm runs.
authorize_and_trust() {
  # HOST (default bravo): a key for the service; its public half onto ALPHA (BRAVO's replaces
  # the list, another host's is added to it); ALPHA's host key trusted after comparing the
  # fingerprint walship sees with the one ALPHA reports for its own keys.
  local h=${1:-bravo} add=tee
  [ "$h" = bravo ] || add="tee -a"
  sh_in "$h" "[ -e /etc/walship/replicator.key ] || ssh-keygen -q -t ed25519 -N '' -C walship@$h -f /etc/walship/replicator.key" &&
  ct "$h" cat /etc/walship/replicator.key.pub | ct alpha $add /etc/ssh/authorized_keys_replicator >/dev/null &&
  local fp &&
  # Without --fingerprint/--yes, trust only shows the key (and exits 1).
  fp=$( (ct "$h" walship trust sftp://replicator@alpha/db --known-hosts /tmp/scan 2>&1 || :) | sed -n 's/^fingerprint: //p') &&
  echo "walship sees $fp" &&
  [ -n "$fp" ] &&
  local fps &&
  fps=$(sh_in alpha 'for k in /etc/ssh/ssh_host_*_key.pub; do ssh-keygen -lf "$k"; done') &&
  echo "ALPHA has: $fps" &&
  grep -qF " $fp " <<<"$fps" &&
  ct "$h" walship trust sftp://replicator@alpha/db --fingerprint "$fp" >/dev/null
}
fruits_toml='db = "/var/data/db/fruits.db"

[[replica]]
name = "alpha"
url = "sftp://replicator@alpha/db/fruits"
key-path = "/etc/walship/replicator.key"
'
# Writes N rows as the application's user `app`, one transaction each.
write_rows() {
  ct bravo runuser -u app -- sqlite3 /var/data/db/fruits.db \
    "$(for i in $(seq 1 "$2"); do echo "INSERT INTO fruits(name) VALUES ('$1-$i');"; done)"
}
verify_caught_up() { ct bravo walship verify --config fruits >/dev/null 2>&1; }
# The content summary of fruits.db on HOST, and whether CHARLIE's standby has BRAVO's content.
summary() { ct "$1" sqlite3 -readonly /var/data/db/fruits.db 'SELECT count(*), sum(length(name)), max(id) FROM fruits' 2>/dev/null; }
standby_equal() { local b c; b=$(summary bravo) && c=$(summary charlie) && [ -n "$b" ] && [ "$b" = "$c" ]; }
write_and_verify() { write_rows "$1" "$2" >/dev/null && until_ok 60 verify_caught_up; }

# ---------------------------------------------------------------------------------------------
step "1. ALPHA: apt-get install ./walship-replicator_*.deb"
ct alpha systemctl is-active -q ssh.service || ct alpha systemctl start ssh.service
check "apt-get install walship-replicator" sh_in alpha 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/pkgs/walship-replicator_*.deb'
check "user replicator exists, locked, shell nologin" sh_in alpha 'getent passwd replicator | grep -q ":/usr/sbin/nologin$" && getent shadow replicator | cut -d: -f2 | grep -qx "!\*"'
check "chroot /var/data/replicator root 0755, db/ replicator 0700" sh_in alpha '[ "$(stat -c %U:%a /var/data/replicator)" = root:755 ] && [ "$(stat -c %U:%a /var/data/replicator/db)" = replicator:700 ]'
check "empty /etc/ssh/authorized_keys_replicator, root 0644" sh_in alpha '[ "$(stat -c %U:%a:%s /etc/ssh/authorized_keys_replicator)" = root:644:0 ]'
check "sshd applies the Match block to replicator only" sh_in alpha 'sshd -T -C user=replicator,host=b,addr=10.77.0.2 | grep -qx "forcecommand internal-sftp" && ! sshd -T -C user=root,host=b,addr=10.77.0.2 | grep -qx "forcecommand internal-sftp"'
check "sshd was reloaded by postinst" sh_in alpha 'journalctl -u ssh.service --no-pager | grep -q "Reload"'

step "2. BRAVO: apt-get install ./walship_*.deb, key, trust, fruits.toml, enable --now"
check "apt-get install walship" sh_in bravo 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/pkgs/walship_*.deb'
check "no walship instance runs after installation" sh_in bravo '[ -z "$(systemctl list-units --no-legend "walship@*")" ] && [ -f /lib/systemd/system/walship@.service ] && [ -f /etc/walship/example.toml.sample ]'
check "man walship.toml(5) and completions installed" sh_in bravo '[ -f /usr/share/man/man5/walship.toml.5.gz ] && [ -f /usr/share/bash-completion/completions/walship ] && [ -f /usr/share/zsh/vendor-completions/_walship ] && [ -f /usr/share/fish/vendor_completions.d/walship.fish ]'
check "key on ALPHA, ALPHA's host key trusted (fingerprint checked on ALPHA)" authorize_and_trust
check "application user app and its database (seed rows)" sh_in bravo '
  id app >/dev/null 2>&1 || useradd -m -u 1000 app
  install -d -o app -g app /var/data/db
  runuser -u app -- sqlite3 /var/data/db/fruits.db "PRAGMA journal_mode=WAL; CREATE TABLE IF NOT EXISTS fruits(id INTEGER PRIMARY KEY, name TEXT); INSERT INTO fruits(name) VALUES (\"apple\"),(\"banana\"),(\"cherry\");" >/dev/null'
printf '%s' "$fruits_toml" | ct bravo tee /etc/walship/fruits.toml >/dev/null
check "systemctl enable --now walship@fruits (returns on READY)" ct bravo timeout 120 systemctl enable --now walship@fruits.service
check "walship@fruits is active, Type=notify" sh_in bravo 'systemctl is-active -q walship@fruits && [ "$(systemctl show -P Type walship@fruits)" = notify ]'
check "runs as app (generator drop-in), sandboxed" sh_in bravo '[ "$(ps -o user= -p $(systemctl show -P MainPID walship@fruits))" = app ] && systemctl cat walship@fruits | grep -q "^ReadWritePaths=/var/data/db"'
check "the shipper runs at nice 10, the main thread at 0 (the unit lets it lower its priority)" sh_in bravo '
  ps -L -o nice=,comm= -p "$(systemctl show -P MainPID walship@fruits)" >/tmp/threads
  cat /tmp/threads
  grep -q "^ *10 ship-alpha$" /tmp/threads && head -1 /tmp/threads | grep -q "^ *0 walship$"'
check "systemctl status shows the STATUS line" sh_in bravo 'systemctl status walship@fruits --no-pager | grep -q "Status: \"" && [ -n "$(systemctl show -P StatusText walship@fruits)" ]'
ct bravo systemctl status walship@fruits --no-pager 2>&1 | sed -n '/Status:/p' | sed 's/^/     /'

step "3. writes on BRAVO reach ALPHA; structured journal entries"
check "write 200 rows as app" write_rows w3 200
check "walship verify --config fruits passes (replica == database)" until_ok 60 verify_caught_up
check "segments on ALPHA, owned by replicator" sh_in alpha '[ -n "$(find /var/data/replicator/db/fruits -type f -user replicator | head -1)" ]'
check "journal entries with structured fields (REPLICA=alpha)" sh_in bravo 'journalctl -u walship@fruits -o verbose --no-pager | grep -q "^ *REPLICA=alpha" && journalctl -u walship@fruits -o verbose --no-pager | grep -q "^ *DB=/var/data/db/fruits.db"'

step "3b. CHARLIE: a warm standby follows ALPHA (walship-follow@fruits)"
check "CHARLIE: apt-get install walship" sh_in charlie 'DEBIAN_FRONTEND=noninteractive apt-get install -y -q /root/pkgs/walship_*.deb'
check "CHARLIE: walship-follow@.service installed" sh_in charlie '[ -f /lib/systemd/system/walship-follow@.service ]'
check "CHARLIE: its own key on ALPHA (added), ALPHA's host key trusted" authorize_and_trust charlie
check "CHARLIE: user app owns /var/data/db, fruits.toml as on BRAVO" sh_in charlie '
  id app >/dev/null 2>&1 || useradd -m -u 1000 app
  install -d -o app -g app /var/data/db'
printf '%s' "$fruits_toml" | ct charlie tee /etc/walship/fruits.toml >/dev/null
check "CHARLIE: systemctl enable --now walship-follow@fruits (returns on READY, after the restore)" sh_in charlie 'systemctl daemon-reload; timeout 120 systemctl enable --now walship-follow@fruits.service'
check "CHARLIE: follower runs as app, Type=notify, STATUS shows the lag" sh_in charlie '
  systemctl is-active -q walship-follow@fruits
  [ "$(ps -o user= -p $(systemctl show -P MainPID walship-follow@fruits))" = app ]
  [ "$(systemctl show -P Type walship-follow@fruits)" = notify ]
  systemctl show -P StatusText walship-follow@fruits | grep -q "lag"'
ct charlie systemctl status walship-follow@fruits --no-pager 2>&1 | sed -n '/Status:/p' | sed 's/^/     /'
check "write 100 rows on BRAVO" write_rows w3b 100
check "CHARLIE's standby has them within 30 s (equal to BRAVO's database, read by a read-only reader)" until_ok 30 standby_equal

step "4. watchdog, bad config (exit 78, no restart loop), second instance"
pid0=$(ct bravo systemctl show -P MainPID walship@fruits)
n0=$(ct bravo systemctl show -P NRestarts walship@fruits)
ct bravo kill -STOP "$pid0"
echo "     walship@fruits (pid $pid0) frozen with SIGSTOP; WatchdogSec=30s"
restarted() {
  local p n
  p=$(ct bravo systemctl show -P MainPID walship@fruits); n=$(ct bravo systemctl show -P NRestarts walship@fruits)
  [ "$p" != 0 ] && [ "$p" != "$pid0" ] && [ "$n" -gt "$n0" ] && ct bravo systemctl is-active -q walship@fruits
}
check "watchdog kills the hung instance and it is restarted" until_ok 90 restarted
check "journal says: watchdog timeout" sh_in bravo 'journalctl -u walship@fruits --no-pager | grep -qi "watchdog timeout"'
printf 'db = "/var/data/db/bad.db"\nretention = "forever"\n[[replica]]\nurl = "file:///srv/bad"\n' | ct bravo tee /etc/walship/bad.toml >/dev/null
ct bravo systemctl daemon-reload
ct bravo systemctl start walship@bad.service >/dev/null 2>&1
sleep 12
check "bad config: walship@bad failed with status 78" sh_in bravo '[ "$(systemctl show -P ExecMainStatus walship@bad)" = 78 ] && [ "$(systemctl show -P ActiveState walship@bad)" = failed ]'
check "bad config: no restart (NRestarts=0 after 12 s, RestartSec=5s)" sh_in bravo '[ "$(systemctl show -P NRestarts walship@bad)" = 0 ]'
check "bad config: the journal names file, line and column" sh_in bravo 'journalctl -u walship@bad --no-pager | grep -q "/etc/walship/bad.toml:2:"'
ct bravo systemctl reset-failed walship@bad.service; ct bravo rm -f /etc/walship/bad.toml
check "second instance walship@vegetables runs beside walship@fruits" sh_in bravo '
  runuser -u app -- sqlite3 /var/data/db/vegetables.db "PRAGMA journal_mode=WAL; CREATE TABLE v(x); INSERT INTO v VALUES (1);" >/dev/null
  printf "db = \"/var/data/db/vegetables.db\"\n[[replica]]\nname = \"alpha\"\nurl = \"sftp://replicator@alpha/db/vegetables\"\nkey-path = \"/etc/walship/replicator.key\"\n" > /etc/walship/vegetables.toml
  timeout 120 systemctl enable --now walship@vegetables
  systemctl is-active -q walship@vegetables && systemctl is-active -q walship@fruits
  walship verify --config vegetables >/dev/null'
ct bravo systemctl disable --now walship@vegetables.service >/dev/null 2>&1

step "4b. a database that does not exist yet: READY at once, status says so"
check "systemctl start walship@later returns at once though later.db does not exist" sh_in bravo '
  printf "db = \"/var/data/db/later.db\"\n[[replica]]\nname = \"alpha\"\nurl = \"sftp://replicator@alpha/db/later\"\nkey-path = \"/etc/walship/replicator.key\"\n" > /etc/walship/later.toml
  systemctl daemon-reload
  timeout 20 systemctl start walship@later.service
  systemctl show -P StatusText walship@later | grep -q "waiting for /var/data/db/later.db to be created"'
check "walship status later exits 7 (waiting for the database)" sh_in bravo 'rc=0; walship status later >/dev/null || rc=$?; [ $rc = 7 ]'
check "the database appears: walship@later replicates it" sh_in bravo '
  runuser -u app -- sqlite3 /var/data/db/later.db "PRAGMA journal_mode=WAL; CREATE TABLE t(x); INSERT INTO t VALUES (1);" >/dev/null
  for i in $(seq 1 60); do walship verify --config later >/dev/null 2>&1 && exit 0; sleep 1; done; exit 1'
ct bravo systemctl disable --now walship@later.service >/dev/null 2>&1

step "5. disaster: stop, rm -rf /var/data/db/*, walship restore --config fruits"
check "write 100 more rows, replicated" write_and_verify w5 100
before=$(rows /var/data/db/fruits.db)
sum_before=$(ct bravo sqlite3 /var/data/db/fruits.db "SELECT count(*), sum(length(name)), max(id) FROM fruits")
check "systemctl stop walship@fruits" ct bravo systemctl stop walship@fruits.service
ct bravo sh -c 'rm -rf /var/data/db/*'
check "database gone" sh_in bravo '[ ! -e /var/data/db/fruits.db ]'
# The issue writes `walship restore fruits`; the CLI takes the instance name as --config NAME.
check "walship restore --config fruits" ct bravo walship restore --config fruits
check "every row is back ($before rows, same content)" sh_in bravo "[ \"\$(sqlite3 /var/data/db/fruits.db 'SELECT count(*), sum(length(name)), max(id) FROM fruits')\" = '$sum_before' ]"
check "restored file belongs to app (the directory's owner)" sh_in bravo '[ "$(stat -c %U /var/data/db/fruits.db)" = app ]'
check "walship verify --config fruits passes after restore" verify_caught_up
check "systemctl start walship@fruits again" ct bravo timeout 120 systemctl start walship@fruits.service
check "replication goes on: 50 rows written, verify passes" write_and_verify w5b 50

step "6. ALPHA cut off during writes; catch-up"
ct bravo ip link set "wseb$id" down
echo "     link down"
writer_ok=1
for i in $(seq 1 20); do write_rows cut$i 10 >/dev/null || writer_ok=0; sleep 1; done
if [ $writer_ok = 1 ]; then ok "the app wrote 200 rows in 20 s while ALPHA was unreachable"; else ko "the app's writes failed while ALPHA was unreachable"; fi
check "walship@fruits stayed active (no restart) during the outage" sh_in bravo 'systemctl is-active -q walship@fruits'
ct bravo systemctl status walship@fruits --no-pager 2>&1 | sed -n '/Status:/p' | sed 's/^/     during: /'
ct bravo ip link set "wseb$id" up
echo "     link up"
check "replica catches up, nothing lost (verify passes)" until_ok 120 verify_caught_up
ct bravo systemctl status walship@fruits --no-pager 2>&1 | sed -n '/Status:/p' | sed 's/^/     after: /'

step "6b. stop while ALPHA is cut off: bounded by shutdown-timeout, exit 69 says commits are held back"
ct bravo ip link set "wseb$id" down
echo "     link down"
write_rows cut-stop 20 >/dev/null
t0=$(date +%s)
ct bravo systemctl stop walship@fruits.service
took=$(( $(date +%s) - t0 ))
echo "     systemctl stop took ${took} s (shutdown-timeout 20s, TimeoutStopSec=45s)"
if [ "$took" -le 30 ]; then ok "stop returned within shutdown-timeout (+10 s)"; else ko "stop took ${took} s"; fi
check "walship@fruits exited 69 (failed): commits were not on ALPHA" sh_in bravo '[ "$(systemctl show -P ExecMainStatus walship@fruits)" = 69 ] && [ "$(systemctl show -P ActiveState walship@fruits)" = failed ]'
check "the journal names the replica left behind" sh_in bravo 'journalctl -u walship@fruits --no-pager -n 30 | grep -q "alpha misses"'
ct bravo ip link set "wseb$id" up
echo "     link up"
ct bravo systemctl reset-failed walship@fruits.service
check "started again, the held-back commits reach ALPHA (verify passes)" sh_in bravo 'timeout 120 systemctl start walship@fruits.service'
check "replica catches up after the restart" until_ok 120 verify_caught_up

step "6c. CHARLIE followed BRAVO through the restore and the outages: promote it"
check "write 50 rows on BRAVO, replicated" write_and_verify w6c 50
check "CHARLIE's standby equals BRAVO's database" until_ok 60 standby_equal
check "CHARLIE: the follower never restarted" sh_in charlie '[ "$(systemctl show -P NRestarts walship-follow@fruits)" = 0 ]'
check "CHARLIE: systemctl stop walship-follow@fruits: exit 0 at a commit boundary" sh_in charlie '
  timeout 60 systemctl stop walship-follow@fruits.service
  [ "$(systemctl show -P ExecMainStatus walship-follow@fruits)" = 0 ] && [ "$(systemctl show -P ActiveState walship-follow@fruits)" = inactive ]'
check "CHARLIE (promoted): integrity ok, BRAVO's content, writable by the application" sh_in charlie "
  [ \"\$(runuser -u app -- sqlite3 /var/data/db/fruits.db 'PRAGMA integrity_check')\" = ok ]
  [ \"\$(sqlite3 -readonly /var/data/db/fruits.db 'SELECT count(*), sum(length(name)), max(id) FROM fruits')\" = '$(summary bravo)' ]
  runuser -u app -- sqlite3 /var/data/db/fruits.db \"INSERT INTO fruits(name) VALUES ('promoted')\""

step "8 (.deb). purge both packages"
check "apt-get purge walship" sh_in bravo 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q walship >/dev/null'
check "walship: instances stopped, unit, generator, binary gone" sh_in bravo '! systemctl is-active -q walship@fruits && [ ! -e /lib/systemd/system/walship@.service ] && [ ! -e /lib/systemd/system/walship-follow@.service ] && [ ! -e /lib/systemd/system-generators/walship-generator ] && [ ! -e /usr/bin/walship ] && [ -z "$(ls /etc/systemd/system/*.wants/ | grep walship@)" ]'
check "walship: /var/lib/walship gone, example gone, admin's files and the database stay" sh_in bravo '[ ! -e /var/lib/walship ] && [ ! -e /etc/walship/example.toml.sample ] && [ -f /etc/walship/fruits.toml ] && [ -f /etc/walship/replicator.key ] && [ -f /var/data/db/fruits.db ]'
check "CHARLIE: apt-get purge walship: follow unit, its enablement link and /var/lib/walship-follow gone, the standby stays" sh_in charlie '
  DEBIAN_FRONTEND=noninteractive apt-get purge -y -q walship >/dev/null
  [ ! -e /lib/systemd/system/walship-follow@.service ] && [ ! -e /var/lib/walship-follow ]
  [ -z "$(ls /etc/systemd/system/*.wants/ | grep walship-follow@)" ] && [ -f /var/data/db/fruits.db ]'
check "apt-get purge walship-replicator" sh_in alpha 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -q walship-replicator >/dev/null'
check "replicator: drop-in and authorized_keys gone, sshd no longer applies the Match block" sh_in alpha '[ ! -e /etc/ssh/sshd_config.d/walship-replicator.conf ] && [ ! -e /etc/ssh/authorized_keys_replicator ] && ! sshd -T -C user=replicator,host=b,addr=10.77.0.2 | grep -qx "forcecommand internal-sftp" && systemctl is-active -q ssh'
check "replicator: the replicas stay in /var/data/replicator" sh_in alpha '[ -n "$(find /var/data/replicator/db/fruits -type f | head -1)" ]'

step "7. the same story with the .rpm packages (rpm -i --nodeps in the Debian containers)"
check "ALPHA: rpm -i --nodeps walship-replicator-*.rpm" sh_in alpha 'rpm -i --nodeps /root/pkgs/walship-replicator-[0-9]*.noarch.rpm'
check "ALPHA: user, chroot, key list, Match block applied" sh_in alpha 'getent passwd replicator >/dev/null && [ "$(stat -c %U:%a /var/data/replicator/db)" = replicator:700 ] && [ "$(stat -c %U:%a /etc/ssh/authorized_keys_replicator)" = root:644 ] && sshd -T -C user=replicator,host=b,addr=10.77.0.2 | grep -qx "forcecommand internal-sftp"'
check "BRAVO: rpm -i --nodeps walship-*.rpm" sh_in bravo 'rpm -i --nodeps /root/pkgs/walship-[0-9]*.x86_64.rpm'
check "BRAVO: no instance started by the installation" sh_in bravo '[ -z "$(systemctl list-units --no-legend --state=active "walship@*")" ] && [ -f /usr/lib/systemd/system/walship@.service ] && [ -f /usr/lib/systemd/system/walship-follow@.service ]'
check "key on ALPHA again (purge removed the list), host key trusted" authorize_and_trust
check "systemctl enable --now walship@fruits (rpm)" ct bravo timeout 120 systemctl enable --now walship@fruits.service
check "runs as app, STATUS line" sh_in bravo '[ "$(ps -o user= -p $(systemctl show -P MainPID walship@fruits))" = app ] && [ -n "$(systemctl show -P StatusText walship@fruits)" ]'
check "writes reach ALPHA (verify passes)" write_and_verify r7 100
check "disaster and restore (rpm)" sh_in bravo '
  n=$(sqlite3 /var/data/db/fruits.db "SELECT count(*) FROM fruits")
  systemctl stop walship@fruits; rm -rf /var/data/db/*
  walship restore --config fruits >/dev/null
  [ "$(sqlite3 /var/data/db/fruits.db "SELECT count(*) FROM fruits")" = "$n" ]
  walship verify --config fruits >/dev/null
  systemctl start walship@fruits'
check "BRAVO: rpm -e walship: instances stopped and disabled, files gone, data stays" sh_in bravo 'rpm -e walship && ! systemctl is-active -q walship@fruits && [ ! -e /usr/bin/walship ] && [ ! -e /usr/lib/systemd/system/walship@.service ] && [ -z "$(ls /etc/systemd/system/*.wants/ | grep walship@)" ] && [ -f /var/data/db/fruits.db ]'
check "ALPHA: rpm -e walship-replicator: drop-in gone, sshd still runs, replicas stay" sh_in alpha 'rpm -e walship-replicator && [ ! -e /etc/ssh/sshd_config.d/walship-replicator.conf ] && ! sshd -T -C user=replicator,host=b,addr=10.77.0.2 | grep -qx "forcecommand internal-sftp" && systemctl is-active -q ssh && [ -n "$(find /var/data/replicator/db/fruits -type f | head -1)" ]'

echo
echo "$passed passed, $failed failed"
[ "$failed" -eq 0 ]
