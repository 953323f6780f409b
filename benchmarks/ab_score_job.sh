#!/usr/bin/env bash
# Side-by-side runs of bench_score_job.py from two source trees on one corpus, alternating
# A B A B, so both commits see the same machine, page cache and corpus.
#
#     A=/path/to/old/tree B=/path/to/new/tree OUT=/tmp/o bash benchmarks/ab_score_job.sh [bench args]
#
# Default bench args: the issue's size (20k pages x 1,000 queries, 40 files, 2 runs, --gen pool).
# ROUNDS (default 2) A/B pairs; CACHE=1 then writes the page cache once and adds an A/B pair
# reading it. A_COMMIT/B_COMMIT name the trees' commits in the JSON. Each tree
# runs its own benchmarks/bench_score_job.py with PYTHONPATH=<tree>:$SITE (Ray bundle).
set -u
: "${A:?old tree}" "${B:?new tree}" "${OUT:?output folder}"
SITE="${SITE:-/tmp/site}"
DIR="${DIR:-/tmp/ab_score_job}"
ARGS=("$@")
[ ${#ARGS[@]} -eq 0 ] && ARGS=(--pages 20000 --queries 1000 --files 40 --runs 2 --gen pool)
run() {  # run LABEL TREE EXTRA...
  local label=$1 tree=$2; shift 2
  echo "== $label ($tree) $*"
  (cd "$tree" && PYTHONPATH="$tree:$SITE" BENCH_COMMIT="$([ "${label:0:1}" = A ] && echo "${A_COMMIT:-A}" || echo "${B_COMMIT:-B}")" timeout --kill-after=10 150 \
     python3 benchmarks/bench_score_job.py "${ARGS[@]}" "$@" --dir "$DIR" --out "$OUT/$label.json") \
     > "$OUT/$label.log" 2>&1
  echo "   rc=$? $(grep -o '"total_s": [0-9.]*' "$OUT/$label.log" | tr '\n' ' ')"
}
for r in $(seq 1 "${ROUNDS:-2}"); do
  run "A_r$r" "$A"
  run "B_r$r" "$B"
done
if [ "${CACHE:-0}" = 1 ]; then  # one run writes the cache, then A and B read it
  run A_cache_write "$A" --cache --runs 1
  run A_cache "$A" --cache
  run B_cache "$B" --cache
fi
rm -rf "$DIR"
