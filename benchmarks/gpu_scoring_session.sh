#!/usr/bin/env bash
# One H200 session for the scoring-scale issue (parts 3, 4, 5): every step has its own
# timeout and the script goes on when one fails or times out. Run from the repo root with
# PYTHONPATH set (repo root; Ray from the bundle: /tmp/site) and $OUT an existing folder:
#
#     bash benchmarks/gpu_scoring_session.sh
#
# TINY=1 runs every step at dry-run sizes on a CPU (TRITON_INTERPRET=1), to check the wiring.
#
# Budgets (timeout per step; expected run time in brackets, estimated from CPU runs and the
# H200 figures in shared/docs/FACTS.md, not measured yet):
#   1. bench_small_queries.py              110 s  [~90 s: sweep stops at --budget-s 70]
#   2. bench_fp8_topk.py --gpu --reps 3    120 s  [~80 s: 2 data models, 20k x 1,000, each
#      fp8_topk twice: re-scoring in place and on copies]
#   3. bench_score_scale.py (40k, 8 shards) 160 s [~120 s: generation ~15 s, 3 job runs]
#   4. bench_score_job.py 20k x 1,000, 2 runs     70 s  [~55 s]
#   5. the same with --cache (same corpus)        65 s  [~50 s]
#   5b. the same, pinned memory through cudaHostRegister  65 s  [~40 s]
#   6. bench_read.py, 5,000 pages (one shard)     35 s  [~25 s]
#   total of timeouts 560 s (9.3 min); expected ~420 s.
# Scratch data goes to $SCRATCH (default /tmp/gpu_scoring; ~7 GB Parquet + ~7 GB cache for
# step 3, deleted after it; ~3.5 GB + cache for steps 4-5), never under $OUT.
# Do not wrap this script in a shorter `timeout`: that stops bash but not the running step,
# whose Ray then shares the machine with the next command (2026-12-03, fifth session).
set -u
: "${OUT:?set OUT to an existing folder}"
SCRATCH="${SCRATCH:-/tmp/gpu_scoring}"
PY="${PYTHON:-python3}"
mkdir -p "$SCRATCH"
export PYTHONPATH="${PYTHONPATH:-$PWD}"

# Ray is not installed on the GPU machines: unpack the bundle if it came along.
if ! "$PY" -c "import ray" 2>/dev/null && [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site && tar xJf .device/site.tar.xz -C /tmp/site && export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
"$PY" -c "import ray; print('ray', ray.__version__)" > "$OUT/env.txt" 2>&1 || echo "no ray: steps 3-5 will fail" >> "$OUT/env.txt"
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nproc; free -g; df -h "$SCRATCH";
  git rev-parse --short HEAD; "$PY" -c "import torch, triton; print(torch.__version__, triton.__version__)"; } >> "$OUT/env.txt" 2>&1

# Bytecode as a pip-installed image has it: the device's Python sets PYTHONDONTWRITEBYTECODE=1 and
# its torch has no .pyc, so without this every process (each job, each Ray worker) compiled torch's
# and transformers' sources: 7.4 s + 7.7-14.5 s of imports against 1.8 s + 5.1 s (2026-12-04, RESULTS.md,
# ninth session). COMPILE_BYTECODE=0 measures the machine as it comes.
if [ "${COMPILE_BYTECODE:-1}" = 1 ]; then
  SP=$("$PY" -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
  t=$(date +%s)
  timeout 200 "$PY" -m compileall -q -j 0 "$SP" $(echo "${PYTHONPATH:-}" | tr ':' ' ') >/dev/null 2>&1
  echo "bytecode compiled (rc $?) in $(( $(date +%s) - t )) s: $SP ${PYTHONPATH:-}" >> "$OUT/bytecode.txt"
fi
T0=$(date +%s)
step() {  # step NAME TIMEOUT_S COMMAND...: log to $OUT/NAME.log, record rc and seconds
  local name=$1 limit=$2; shift 2
  # STEPS="small_queries score_job" runs only those (default: all)
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then echo "-- $name skipped (STEPS)" >> "$OUT/session.log"; return; fi
  local t=$(date +%s)
  echo "== $name (timeout ${limit}s) at +$((t - T0))s: $*" | tee -a "$OUT/session.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "   $name rc=$rc in $(( $(date +%s) - t ))s" | tee -a "$OUT/session.log"
  tail -n 3 "$OUT/$name.log" | sed 's/^/   | /' | cut -c1-300 | tee -a "$OUT/session.log"
}

if [ "${TINY:-0}" = 1 ]; then  # CPU dry run of every step (Triton interpreter, small sizes)
  export TRITON_INTERPRET=1
  SQ=(--tiny); FP=(--gpu --tiny); SC=(--tiny); JOB=(--pages 200 --queries 4 --files 2 --runs 2); RD=(--pages 200 --files 2)
else
  SQ=(--budget-s 70); FP=(--gpu --reps ${FP8_REPS:-3})
  SC=(--pages 40000 --files 40 --shard-size-pages 5000 --queries 1000)
  JOB=(--pages 20000 --queries 1000 --files 40 --runs 2); RD=(--pages 5000 --files 5)
fi
step small_queries 110 "$PY" benchmarks/bench_small_queries.py "${SQ[@]}" --out "$OUT/small_queries.json"
# FP8_MODELS="topics" and FP8_CONFIGS="256,64,8,3;128,64,4,4" narrow or widen this step
step fp8_topk 120 "$PY" benchmarks/bench_fp8_topk.py "${FP[@]}" --models ${FP8_MODELS:-random topics} \
  --fp8-configs "${FP8_CONFIGS:-}" --json "$OUT/fp8_topk.json"
step score_scale 160 "$PY" benchmarks/bench_score_scale.py "${SC[@]}" --dir "$SCRATCH/scale" --out "$OUT/score_scale.json"
rm -rf "$SCRATCH/scale"
step score_job 70 "$PY" benchmarks/bench_score_job.py "${JOB[@]}" --gen pool --dir "$SCRATCH/job" --out "$OUT/score_job.json"
step score_job_cache 65 "$PY" benchmarks/bench_score_job.py "${JOB[@]}" --gen pool --cache --dir "$SCRATCH/job" \
  --out "$OUT/score_job_cache.json"
# The same cache read with torch's pinned host memory from malloc + cudaHostRegister on 8
# threads instead of one cudaHostAlloc: the 3.5 GB shard's pinned buffer took 2.0-2.4 s to
# allocate on the H200 host (2026-12-03, fifth session; summary field host_alloc_s)
step score_job_cache_hostreg 65 env PYTORCH_CUDA_ALLOC_CONF=pinned_use_cuda_host_register:True,pinned_num_register_threads:8 \
  "$PY" benchmarks/bench_score_job.py "${JOB[@]}" --gen pool --cache --dir "$SCRATCH/job" \
  --out "$OUT/score_job_cache_hostreg.json"
rm -rf "$SCRATCH/job"
step read 35 "$PY" benchmarks/bench_read.py "${RD[@]}" --reps 1 --only "job default" --dir "$SCRATCH/read" --out "$OUT/read.json"
rm -rf "$SCRATCH"
echo "session done in $(( $(date +%s) - T0 ))s" | tee -a "$OUT/session.log"
