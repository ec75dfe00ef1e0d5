#!/usr/bin/env bash
# Issue 32's check: `.ci/run` (both tiers) twice in a row on fresh clones of this repository's main branch while a
# second copy of the whole suite (`pytest -q -m ""`) runs beside it, over and over, on the same cores. Results in
# $WORK/ci.txt and $WORK/beside.txt (each run's output beside them). On 2 cores every suite runs about 5x slower
# than alone: measured 2026-12-02, one `.ci/run` took 56 minutes beside the other copy (both passed), so the whole
# check takes about 2 hours. The clones need nothing beside them.
#
#     bash scripts/load_check.sh [WORK]        # WORK: a scratch folder (default /tmp/load), emptied first
set -u
repo=$(cd "$(dirname "$0")/.." && pwd)
work=${1:-/tmp/load}
rm -rf "$work" && mkdir -p "$work/ci" "$work/beside"
git clone -q "$repo" "$work/beside/main"
(cd "$work/beside/main" && python3 -m venv .venv && .venv/bin/pip install -q -r requirements.txt)
setsid bash -c "cd '$work/beside/main'; i=0; while true; do i=\$((i+1)); .venv/bin/python -m pytest -q -m '' -p no:cacheprovider \
  > '$work/beside_'\$i.log 2>&1; echo \"beside run \$i: rc \$? at \$(date +%T)\" >> '$work/beside.txt'; done" &
beside=$!
for n in 1 2; do
  cd "$work/ci" && rm -rf main && git clone -q "$repo" main && cd main
  start=$(date +%s)
  bash .ci/run > "$work/ci_$n.log" 2>&1
  echo "ci run $n: rc $? in $(( $(date +%s) - start )) s at $(date +%T)" >> "$work/ci.txt"
done
# SIGKILL to the beside loop's process group: a SIGTERM that lands while a test runs the CLI in-process is that
# command's clean stop (cli.terminate_on_sigterm), and that pytest went on running
kill -KILL -- -"$beside"
wait "$beside" 2>/dev/null
echo "finished at $(date +%T)" >> "$work/ci.txt"
