#!/bin/bash
# The fault campaign of issue #6 at full size: every end-to-end fault scenario of the test
# suite (tests/e2e.rs, tests/e2e_sftp.rs) on the release build, one at a time, with walship
# killed (-9) at ROUNDS random moments (default 100; CI runs 20), sshd killed and frozen for
# CYCLES cycles (default 20; CI runs 1), and CUTS simulated power cuts (default 40; CI runs 8).
# Each scenario runs concurrent writers, ends with a restore compared page for page with the
# source and checks every committed row; its figures (rounds, commits, commits lost, recovery
# time, leftover temporary files, errors logged) are appended by the tests to
# OUT/campaign.jsonl (WALSHIP_REPORT) and printed here as the Markdown table of
# docs/RELIABILITY.md, with every e2e test's verdict.
# Takes ~35 min (the 20 sshd cycles alone ~22 min). Needs root (sshd, tmpfs, netns, loop).
# usage: bench/campaign.sh   env: ROUNDS CYCLES CUTS OUT
set -eu
REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$REPO/bench/out}"; mkdir -p "$OUT"
ROUNDS="${ROUNDS:-100}"; CYCLES="${CYCLES:-20}"; CUTS="${CUTS:-40}"
JSON="$OUT/campaign.jsonl"; LOG="$OUT/campaign.log"
rm -f "$JSON"
cd "$REPO"
REV="$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src tests Cargo.toml || echo +changes)"
t0=$(date +%s)
set +e
WALSHIP_REPORT="$JSON" WALSHIP_KILL9_ROUNDS="$ROUNDS" WALSHIP_SSHD_CYCLES="$CYCLES" \
    WALSHIP_POWER_CUT_ROUNDS="$CUTS" \
    cargo test --release --test tests e2e -- --test-threads=1 >"$LOG" 2>&1
rc=$?
set -e
echo "# campaign.sh  $(date -u +%FT%TZ)  $(nproc) cores  kill -9 rounds $ROUNDS, sshd cycles $CYCLES  main at $REV  $(( $(date +%s) - t0 )) s  cargo test exit $rc"
python3 - "$JSON" "$LOG" <<'PY'
import json, os, re, sys
rows = [json.loads(l) for l in open(sys.argv[1])] if os.path.exists(sys.argv[1]) else []

def kinds(msgs):
    """The distinct errors, shortened: which replica failed and paths are blanked already."""
    out = []
    for m in msgs:
        m = re.sub(r'N+', 'N', m)
        m = re.sub(r'^replica \S+ failing: ', '', m)
        m = re.sub(r'(<path> )+', '', m).strip()
        if m not in out:
            out.append(m)
    return '; '.join(out[:4]) + (' (+%d more)' % (len(out) - 4) if len(out) > 4 else '') or '-'

print('| scenario | rounds | commits written | commits lost | recovery (max) | temp files left | errors logged (warnings) | distinct errors |')
print('|---|---|---|---|---|---|---|---|')
for r in rows:
    rec = '-' if r['recovery_max_ms'] is None else '%.1f s (%d)' % (r['recovery_max_ms'] / 1000, r['recoveries'])
    print('| %s | %d | %s | %d | %s | %d | %d (%d) | %s |' % (
        r['scenario'], r['rounds'], r['commits'] or '-', r['lost'], rec, r['temp_files'],
        r['errors'], r['warnings'], kinds(r['error_messages'])))
print()
verdicts = re.findall(r'^test (\S+) \.\.\. (\w+)', open(sys.argv[2]).read(), re.M)
print('tests: %d passed, %d failed: %s' % (
    sum(v == 'ok' for _, v in verdicts), sum(v == 'FAILED' for _, v in verdicts),
    ', '.join('%s %s' % (t.split('::')[-1], v) for t, v in verdicts)))
lost = sum(r['lost'] for r in rows); temps = sum(r['temp_files'] for r in rows)
print('RESULT campaign scenarios=%d commits=%d lost=%d temp_files=%d' % (
    len(rows), sum(r['commits'] for r in rows), lost, temps))
PY
echo "cargo output: $LOG"
exit $rc
