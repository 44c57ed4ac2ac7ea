#!/bin/bash
# Fuzzes the parsers of everything walship reads from disk or a replica (WAL files, snapshot and
# segment files, replica file names, generation ids, positions, the replica marker) and the
# restore planner, with the property tests of the unit suite run at CASES cases each (default
# 100000; the normal suite runs 256-512). Prints the executions run per property and in all.
# usage: bench/fuzz.sh [CASES]
set -euo pipefail
cd "$(dirname "$0")/.."
CASES="${1:-100000}"
props=(arbitrary_bytes_never_panic mutated_real_wal_never_panics arbitrary_files_never_panic
  arbitrary_content_never_panics mutations_of_a_good_file_never_panic arbitrary_names_never_panic
  restore_plans_are_contiguous_chains)
start=$(date +%s)
total=0
for p in "${props[@]}"; do
  t0=$(date +%s.%N)
  out=$(WALSHIP_FUZZ_CASES=$CASES cargo test --release --quiet --lib -- --exact \
    "$(cargo test --release --quiet --lib -- --list 2>/dev/null | sed -n "s/^\(.*::$p\): test$/\1/p" | head -1)" 2>&1) || {
    echo "$out" | tail -30; echo "FAIL $p"; exit 1; }
  echo "$out" | grep -q "1 passed" || { echo "$out" | tail -20; echo "FAIL $p: did not run"; exit 1; }
  printf '%-42s %9d cases  %6.1f s  ok\n' "$p" "$CASES" "$(python3 -c "print($(date +%s.%N) - $t0)")"
  total=$((total + CASES))
done
echo "RESULT fuzz properties=${#props[@]} executions=$total seconds=$(( $(date +%s) - start ))  $(date -u +%FT%TZ)  $(nproc) cores"
