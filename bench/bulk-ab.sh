#!/bin/bash
# The 200 MiB bulk load of `bulk.sh` with several walship builds, interleaved (A, B, A, B, ...)
# so that the machine's drift hits them alike: one line per run, then for each build the
# median ratio against plain sqlite3 in the same run, the mean load time and walship's median
# CPU per load.
# usage: bench/bulk-ab.sh PAIRS MODE BIN...
#   MODE: file | sftp | sftp2 (sftp, TWO_HOST=1) | jfile (file, JOURNALED=1)
N=${1:?usage: $0 PAIRS MODE BIN...}; M=${2:?usage: $0 PAIRS MODE BIN...}; shift 2
[ $# -ge 1 ] || { echo "usage: $0 PAIRS MODE BIN..." >&2; exit 2; }
case $M in
    file) env=""; mode=file ;; sftp) env=""; mode=sftp ;;
    sftp2) env="TWO_HOST=1"; mode=sftp ;; jfile) env="JOURNALED=1"; mode=file ;;
    *) echo "unknown MODE $M" >&2; exit 2 ;;
esac
out=$(mktemp)
trap 'rm -f "$out"' EXIT
for i in $(seq 1 "$N"); do for b in "$@"; do
    r=$(env $env WALSHIP="$b" bash "$(dirname "$0")/bulk.sh" 200 $mode 2>&1 \
        | grep -E "load time|RESULT|CPU s per GiB" | tr '\n' ' ' | sed -E 's/ +/ /g')
    echo "$b $r" | tee -a "$out"
done; done
python3 - "$out" <<'PY'
import re, statistics as st, sys, collections
d = collections.defaultdict(lambda: collections.defaultdict(list))
for line in open(sys.argv[1]):
    b = line.split()[0]
    m = re.search(r'load time \(ms\) (\d+) (\d+) ([\d.]+)x', line)
    if not m:
        print(f"{b}: a run without a result: {line.strip()}")
        continue
    d[b]['load'].append(int(m.group(1))); d[b]['ratio'].append(float(m.group(3)))
    c = re.search(r'\(([\d.]+) s for', line)
    if c: d[b]['cpu'].append(float(c.group(1)))
    c = re.search(r'catch_ms=(-?\d+)', line)
    if c: d[b]['catch'].append(int(c.group(1)))
for b, v in d.items():
    cpu = f"{st.median(v['cpu']):.3f} s" if v['cpu'] else "?"
    catch = f"{min(v['catch'])}-{max(v['catch'])} ms" if v['catch'] else "?"
    print(f"{b}: {len(v['load'])} runs, median ratio {st.median(v['ratio']):.3f}x, "
          f"mean load {st.mean(v['load']):.0f} ms, walship CPU {cpu} per load, catch-up {catch}")
PY
