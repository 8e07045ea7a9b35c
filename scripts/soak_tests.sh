#!/usr/bin/env bash
# Soak the test suite: run the README's test command N times while a CPU load of one busy loop per
# core runs beside it, then report each run's result line and duration, and a summary.
#
# Usage: scripts/soak_tests.sh N [pytest args]
#   scripts/soak_tests.sh 5                                   # the whole suite, five times
#   scripts/soak_tests.sh 3 tests/faults -k case04            # a few tests, three times
# Environment: SOAK_LOAD=K busy loops instead of one per core (0: no load); SOAK_LOGS=DIR keeps each
# run's output there (default: a new folder under ${TMPDIR:-/tmp}); SOAK_PYTHON=PATH runs the tests
# with another venv's python. Exit status: 0 when every run passed, 1 otherwise (2: bad usage,
# 130: interrupted). The load stops when the script ends, however it ends (Ctrl-C included).
#
# The test command is the README's: `.venv/bin/python -m pytest -q` in the repository's venv (`.ci/run`
# runs the same command in a fresh venv). Set the venv up first as the README says:
#   python3 -m venv .venv && .venv/bin/pip install -e '.[worker,test]'
set -euo pipefail

usage() { echo "usage: $0 N [pytest args]   (N: how many runs, 1 or more)" >&2; exit 2; }
[ "$#" -ge 1 ] || usage
runs="$1"
shift
case "$runs" in '' | *[!0-9]* | 0) usage ;; esac

cd "$(dirname "$0")/.."
python="${SOAK_PYTHON:-.venv/bin/python}"
if [ ! -x "$python" ]; then
  echo "error: no python at $python; set the venv up first: python3 -m venv .venv && .venv/bin/pip install -e '.[worker,test]'" >&2
  exit 2
fi

load="${SOAK_LOAD:-$(nproc)}"
case "$load" in '' | *[!0-9]*) echo "error: SOAK_LOAD must be a number of busy loops, not '$load'" >&2; exit 2 ;; esac
logs="${SOAK_LOGS:-$(mktemp -d "${TMPDIR:-/tmp}/soak-tests.XXXXXX")}"
mkdir -p "$logs"

loaders=()
stop_load() {
  local pid
  for pid in "${loaders[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${loaders[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  loaders=()
}
trap stop_load EXIT
trap 'stop_load; echo "soak: interrupted" >&2; exit 130' INT
trap 'stop_load; exit 143' TERM

for _ in $(seq 1 "$load"); do
  python3 -c 'while True: pass' &
  loaders+=("$!")
done
echo "soak: $runs run(s) of '$python -m pytest -q${*:+ $*}' beside $load busy loop(s) on $(nproc) core(s); logs in $logs"

passed=0
durations=()
for i in $(seq 1 "$runs"); do
  log="$logs/run-$i.log"
  start=$(date +%s.%N)
  status=0
  "$python" -m pytest -q "$@" >"$log" 2>&1 || status=$?
  seconds=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { printf "%.0f", b - a }')
  durations+=("$seconds")
  # pytest -q ends with its result line, e.g. "607 passed, 3 skipped in 201.05s (0:03:21)".
  result=$(grep -E '^(=+ )?[0-9]+ (passed|failed|error|errors|skipped|deselected)|no tests ran' "$log" | tail -n 1 || true)
  if [ "$status" -eq 0 ]; then
    passed=$((passed + 1))
    verdict=green
  else
    verdict="red (exit $status)"
  fi
  printf 'run %d/%d: %s, %dm%02ds: %s\n' "$i" "$runs" "$verdict" $((seconds / 60)) $((seconds % 60)) \
    "${result:-no result line; see $log}"
  if [ "$status" -ne 0 ]; then
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/    /' || true
  fi
done

sorted=$(printf '%s\n' "${durations[@]}" | sort -n)
min=$(echo "$sorted" | head -n 1)
max=$(echo "$sorted" | tail -n 1)
total=0
for s in "${durations[@]}"; do total=$((total + s)); done
echo "soak: $passed of $runs run(s) green beside $load busy loop(s); wall time per run min ${min}s, mean $((total / runs))s, max ${max}s"
[ "$passed" -eq "$runs" ]
