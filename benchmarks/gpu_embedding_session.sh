#!/usr/bin/env bash
# One H200 session for the embedding-cost issue: the changes made without a GPU on
# 2026-12-03 (fourth session), each measured beside its baseline in one run. Every step has
# its own timeout and the script goes on when one fails. Run from the repo root with $OUT an
# existing folder (Ray from the bundle .device/site.tar.xz when it is not installed):
#
#     STEPS="actor warm_start" bash benchmarks/gpu_embedding_session.sh      # one device call
#     STEPS="job_1 job_2" bash benchmarks/gpu_embedding_session.sh           # another
#
# TINY=1 runs the actor step at smoke size on the CPU, to check the wiring.
#
# Steps (timeout; expected run time in brackets, from earlier H200 runs of the same scripts):
#   actor       bench_actor.py: compiled vs compiled_inflight2 (--batches-in-flight 2) vs
#               compiled_oldhost (6a80843's host path), 256 pages, batch 32   300 s [~200 s]
#   pooling_check check_pooling_gpu.py: --pool-factor against colpali's reference on the GPU, and
#               Ward's merge loop on the GPU against scipy's, bit for bit, timed   180 s [~15 s]
#   warm_start  bench_warm_start.py: cold/warm first batch, model load by step, the first
#               batch's compile seconds by phase (WARM_EXTRA: more warm cases)   180 s [~120 s]
#   worker_start bench_worker_start.py: asking for a GPU actor to its constructor, with the
#               job's py_modules runtime env and without                          120 s [~40 s]
#   job_1       bench_embed.py --job-only, 3,000 pages, --batches-in-flight 1    200 s [~105 s]
#   job_2       the same with --batches-in-flight 2                              200 s [~100 s]
#   job_1b      job_1 again, with caches as warm as job_2 had them               200 s [~100 s]
#   job_nice    three 3,000-page jobs in one process: renderers at nice 10, 0, 10 560 s [~330 s]
#   mixed       bench_mixed_sizes.py: the compiled actor on batches of mixed page sizes (MIXED_EXTRA="--compare-uniform --profile": letter pages side by side, kernels by class)
#               (graphs, recompilations, s per batch; MIXED_EXTRA: more arguments)  200 s [~35 s]
#   kept        bench_kept_embedders.py: on one running Ray head, the plain 3,000-page job, then
#               three with --keep-embedders (the first starts the kept actor)   480 s [~330 s]
#   part1       issue 11 part 1 side by side, in one call (~400 s): the actor alone at two batches
#               in flight, with the Conv3d patch embedding of before 2026-12-05, and pooled at
#               factor 3 (bench_actor.py, 384 pages), then three plain
#               3,000-page jobs, the first cold (bench_kept_embedders.py --plain-after 3)   560 s
#   part2       the actor without Inductor's persistent reductions widened to the 1,280/1,536-wide
#               norms against the default (with them since 2026-12-05), both profiled (bench_actor.py
#               compiled_nopersistnorm,compiled; the norm kernels read triton_red_ / triton_per_)   300 s [~150 s]
#   part2all    part 2 in one call: the vision attention kernels alone (SDPA, the pointer Triton kernel,
#               six TMA configs; TMA_CONFIGS overrides), then bench_actor.py: seed (transformers'
#               plain forward), eager, compiled_inflight2 without and with persistent norms (the
#               default since 2026-12-05), + the fastest TMA kernel when one beats SDPA
#               (files part2all_*.json)                                         150 + 420 s [~450 s]
#   fa4         the vision attention alone: SDPA against FlashAttention 4 (needs both halves of
#               benchmarks/pack_fa4.sh unpacked; bench_actor.py's *_fa4 variants run it in the actor) 200 s
#   shapes      what a new SDPA call shape costs (bench_sdpa_shapes.py, per backend), then random
#               mixed batches of 32 with the vision attention's calls per run and cut into powers
#               of two (bench_mixed_sizes.py --random-mixes --split runs|pow2)           3 x 200 s
# (bench_actor.py variant *_helper: the timed batches on the blocks a compile helper compiled,
# VDR_COMPILE_HELPER=1, after eager batches until they are loaded; beside compiled_inflight2)
# ACTOR_VARIANTS overrides the actor step's variants, ACTOR_PAGES its pages, ACTOR_TIMEOUT its limit (300 s);
# ACTOR_EXTRA adds arguments.
# Each job step also builds the real-size model (12-17 s) and writes its corpus first, and a
# fresh machine's first Python imports are slow: job_1 needed ~200 s on one (2026-12-03).
# Do not wrap this script in a shorter `timeout`: that stops bash but not the running step,
# whose Ray then shares the machine with the next command.
set -u
: "${OUT:?set OUT to an existing folder}"
PY="${PYTHON:-python3}"
export PYTHONPATH="${PYTHONPATH:-$PWD}"
if ! "$PY" -c "import ray" 2>/dev/null && [ -f .device/site.tar.xz ]; then
  mkdir -p /tmp/site && ([ -d /tmp/site/ray ] || tar xJf .device/site.tar.xz -C /tmp/site)
  export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
# TRANSFORMERS_BUNDLE=.device/transformers.tar.xz (benchmarks/pack_transformers.sh): the project's
# pinned transformers (5.23) and its pure dependencies ahead of the device's own 5.17 on PYTHONPATH,
# for every process of the call (drivers, Ray workers). The device's 5.17 imports scikit-learn at
# load (transformers.generation.candidate_generator; 1.0-1.3 s of a 9-10 s import without bytecode,
# 2026-12-06), 5.23 imports it only when assisted generation runs.
if [ -n "${TRANSFORMERS_BUNDLE:-}" ]; then
  mkdir -p /tmp/tfsite && ([ -d /tmp/tfsite/transformers ] || tar xJf "$TRANSFORMERS_BUNDLE" -C /tmp/tfsite)
  # checked before any step: the bundle imports, with torch and Ray beside it; else the call
  # goes on without it (the device's own transformers) and says so
  if PYTHONPATH="/tmp/tfsite:$PYTHONPATH" "$PY" -c "import torch, ray, transformers, huggingface_hub, tokenizers
from transformers import ColQwen2ForRetrieval, ColQwen2Processor
print('bundle in use: transformers', transformers.__version__, 'huggingface_hub', huggingface_hub.__version__,
      'tokenizers', tokenizers.__version__)" > "$OUT/transformers_bundle.txt" 2>&1; then
    export PYTHONPATH="/tmp/tfsite:$PYTHONPATH"
  else
    echo "TRANSFORMERS_BUNDLE did not import: this call runs on the device's own transformers" >> "$OUT/transformers_bundle.txt"
  fi
fi
# FlashAttention 4 (benchmarks/pack_fa4.sh): its two halves travel in two calls on one warm machine
# (.device/fa4a.tar.xz, then .device/fa4b.tar.xz); once both are unpacked in /tmp/fa4site, it is put
# on PYTHONPATH for the fa4 step and bench_actor.py's *_fa4 variants ($OUT/fa4_bundle.txt says which)
if [ -f .device/fa4a.tar.xz ] || [ -f .device/fa4b.tar.xz ] || [ -d /tmp/fa4site ]; then
  . benchmarks/fa4_unpack.sh > "$OUT/fa4_bundle.txt" 2>&1
fi
{ nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv; nproc; free -g; lscpu;
  "$PY" -c "import torch, transformers; print(torch.__version__, transformers.__version__)"; } > "$OUT/env_embed.txt" 2>&1

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
  if [ -n "${STEPS:-}" ] && [[ " $STEPS " != *" $name "* ]]; then return; fi
  local t=$(date +%s)
  echo "== $name (timeout ${limit}s) at +$((t - T0))s: $*" | tee -a "$OUT/session_embed.log"
  timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
  echo "   $name rc=$? in $(( $(date +%s) - t ))s" | tee -a "$OUT/session_embed.log"
  tail -n 3 "$OUT/$name.log" | cut -c1-300 | sed 's/^/   | /' | tee -a "$OUT/session_embed.log"
}

if [ "${TINY:-0}" = 1 ]; then
  step actor 300 "$PY" benchmarks/bench_actor.py --smoke --variants compiled,compiled_inflight2,compiled_oldhost \
    --out "$OUT/actor.json"
  exit 0
fi
# The vision attention alone, SDPA (cuDNN) against FlashAttention 4's varlen and batched kernels, at
# batches of 32 and 16 letter pages and 16 mixed pages (bench_fa4_attention.py)                 ~60 s
step fa4 200 "$PY" benchmarks/bench_fa4_attention.py --out "$OUT/fa4_attention.json"
step actor "${ACTOR_TIMEOUT:-300}" "$PY" benchmarks/bench_actor.py --pages "${ACTOR_PAGES:-256}" --fid-pages 256 --queries 50 \
  --variants "${ACTOR_VARIANTS:-compiled,compiled_inflight2,compiled_oldhost}" ${ACTOR_EXTRA:-} --out "$OUT/actor.json"
# --pool-factor's checks on the GPU (seventeenth session): colpali's reference through the default
# path (Ward's merge loop on the GPU since then), and the merge kernel against scipy's loop on the
# same GPU distances of 32 pages of 755 vectors, bit for bit, with its time per batch      ~15 s
step pooling_check 180 "$PY" benchmarks/check_pooling_gpu.py --json "$OUT/pooling_check.json"
step warm_start "${WARM_TIMEOUT:-180}" "$PY" benchmarks/bench_warm_start.py ${WARM_EXTRA:-} --out "$OUT/warm_start.json"
step worker_start 120 "$PY" benchmarks/bench_worker_start.py --out "$OUT/worker_start.json"
step job_1 260 env BENCH_JOB_EXTRA="--batches-in-flight 1" "$PY" benchmarks/bench_embed.py --job-only \
  --job-pages 3000 --out "$OUT/job_inflight1.json"
step job_2 260 env BENCH_JOB_EXTRA="--batches-in-flight 2" "$PY" benchmarks/bench_embed.py --job-only \
  --job-pages 3000 --out "$OUT/job_inflight2.json"
# job_1 again, after job_2: the compile caches are then as warm for it as they were for job_2
step job_1b 260 env BENCH_JOB_EXTRA="--batches-in-flight 1" "$PY" benchmarks/bench_embed.py --job-only \
  --job-pages 3000 --out "$OUT/job_inflight1b.json"
# Renderers at nice +10 (the default since 2026-12-04) against nice 0, both at 2 batches in
# flight, after a first job that fills the compile caches for both: one process, one model
# build, one corpus.
step job_nice 560 env BENCH_JOB_EXTRA="--batches-in-flight 2" \
  BENCH_JOB_ENVS="PIPELINE_RENDER_NICENESS=10;PIPELINE_RENDER_NICENESS=0;PIPELINE_RENDER_NICENESS=10" \
  "$PY" benchmarks/bench_embed.py --job-only --job-pages 3000 --out "$OUT/job_nice.json"
# Cold nodes (fifteenth session): plain 3,000-page jobs, every compile cache emptied before each.
# COLD_ENVS sets each job's environment in turn. Until commit 2d994f1 only the job's driver got
# it (the actors run in the Ray cluster this step started): call B of the fifteenth session
# compared nothing for that reason. Since then the driver sends the switches the workers read
# (pipeline.cluster.WORKER_ENV) in the job's runtime env; bench_warm_start.py --only-cold A/Bs
# an actor setting in separate processes                                                   ~330 s
# (COLD_JOBS, COLD_ENVS and COLD_TIMEOUT change the count, the environments in turn and the limit;
# COLD_ONLY=N[,M]: only these jobs (1-based) start from emptied caches, e.g. COLD_ONLY=1: a cold job, then warm ones;
# COLD_ARGS: each job's extra arguments in turn, ';' between jobs, ',' between arguments, e.g.
# "--compile-cache,/tmp/vdr-shared-cc;--compile-cache,/tmp/vdr-shared-cc;" with COLD_ONLY=1,2,3: a new node that
# fills a shared cache, a new node that reads it, a new node without it; the emptying leaves that folder alone;
# COLD_KEEP: caches the emptying leaves alone, per job in turn, e.g. ";;triton;inductor")
# The jobs run at --batch-size 32 (bench_kept_embedders.py's default, as bench_actor.py's actor alone), not at
# the job's own default of 16: JOB_BATCH_SIZE=16 (with ACTOR_EXTRA="--batch-size 16") measures the defaults
# (in every step that runs whole jobs: part1_cold, helper_blocks, warm_ab, mixed_job; since 2026-12-06 in
# the last three too: warm_ab ran at 32 in the twenty-third session's call D for want of it).
step part1_cold "${COLD_TIMEOUT:-420}" "$PY" benchmarks/bench_kept_embedders.py --pages 3000 --kept-runs 0 --no-plain \
  --plain-after "${COLD_JOBS:-4}" --cold-caches ${COLD_ONLY:+--cold-jobs "$COLD_ONLY"} --plain-envs "${COLD_ENVS:-}" \
  ${COLD_ARGS:+--plain-args="$COLD_ARGS"} ${COLD_KEEP:+--cold-keep="$COLD_KEEP"} ${JOB_BATCH_SIZE:+--batch-size "$JOB_BATCH_SIZE"} --out "$OUT/part1_cold.json"
# helper_blocks: are the blocks the compile helpers compile (VDR_COMPILE_HELPER=1; the default on a GPU since f422871) as fast as the
# actor's own? Four plain 3,000-page jobs: cold without the helper, warm (loads the actor's blocks),
# cold with the helper, warm (loads the helper's blocks); compare the warm jobs' actors after their
# first batch (with `actor` for the actor alone)                                           ~300 s
step helper_blocks "${HELPER_BLOCKS_TIMEOUT:-420}" "$PY" benchmarks/bench_kept_embedders.py --pages 3000 --kept-runs 0 \
  --no-plain --plain-after 4 --cold-caches --cold-jobs 1,3 \
  --plain-envs "VDR_COMPILE_HELPER=0;VDR_COMPILE_HELPER=0;VDR_COMPILE_HELPER=1;VDR_COMPILE_HELPER=0" \
  ${JOB_BATCH_SIZE:+--batch-size "$JOB_BATCH_SIZE"} --out "$OUT/helper_blocks.json"
# warm_ab: plain 3,000-page jobs on a node whose caches an earlier job filled (no emptying), each
# with its own environment (WARM_ENVS, 'A=1;A=0;A=1'; WARM_JOBS jobs, default 3)        ~200 s
step warm_ab "${WARM_AB_TIMEOUT:-330}" "$PY" benchmarks/bench_kept_embedders.py --pages 3000 --kept-runs 0 --no-plain \
  --plain-after "${WARM_JOBS:-3}" --plain-envs "${WARM_ENVS:-}" ${JOB_BATCH_SIZE:+--batch-size "$JOB_BATCH_SIZE"} \
  --out "$OUT/warm_ab.json"
# A whole job of mixed page sizes (six shapes), cold then warm, with today's defaults (pow2 split);
# with `actor` for the actor alone on letter pages in the same call                      ~250 s
# (MIXED_JOBS: how many, 2; MIXED_JOB_TIMEOUT: the limit)
step mixed_job "${MIXED_JOB_TIMEOUT:-330}" "$PY" benchmarks/bench_kept_embedders.py --pages 3000 --kept-runs 0 --no-plain \
  --plain-after "${MIXED_JOBS:-2}" --mixed-sizes ${JOB_BATCH_SIZE:+--batch-size "$JOB_BATCH_SIZE"} --out "$OUT/mixed_job.json"
if [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" part1 "* ]]; then
  [ -n "${STEPS:-}" ] && STEPS="$STEPS part1_actor part1_jobs"
  # the actor's compile caches apart from the node's: the first job after it compiles cold, as
  # the step says (sharing them, the jobs' actors loaded the blocks part1_actor had compiled)
  step part1_actor 200 env VDR_COMPILE_CACHE=/tmp/part1_actor/vdr TORCHINDUCTOR_CACHE_DIR=/tmp/part1_actor/inductor \
    "$PY" benchmarks/bench_actor.py --pages 384 --fid-pages 256 --queries 50 \
    --variants compiled_inflight2,compiled_inflight2_convpatch,compiled_inflight2_pool3 --out "$OUT/part1_actor.json"
  step part1_jobs 330 "$PY" benchmarks/bench_kept_embedders.py --pages 3000 --kept-runs 0 --no-plain \
    --plain-after 3 --out "$OUT/part1_jobs.json"
fi
# part2all: every part-2 candidate beside the seed's forward, in one call (~450 s): the attention
# kernels alone first (a TMA kernel that kills its process cannot take the actor run with it),
# then the actor with the fastest TMA config, when one beats SDPA as the model calls it.
if [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" part2all "* ]]; then
  [ -n "${STEPS:-}" ] && STEPS="$STEPS part2_attn part2_actor"
  step part2_attn 150 "$PY" benchmarks/bench_vision_attention.py --reps 10 --configs 128_64_4_4 \
    --tma-configs "${TMA_CONFIGS:-128_64_4_3_1,128_64_4_4_1,128_128_4_3_1,128_128_8_3_1,128_64_4_3_0,128_128_8_3_0}" \
    --out "$OUT/part2all_attn.json"
  BEST_TMA=$("$PY" - "$OUT/part2all_attn.json" <<'PYEOF' 2>/dev/null
import json, sys
v = json.load(open(sys.argv[1]))["variants"]
sdpa = v.get("sdpa", {}).get("ms")
tma = sorted((r["ms"], k[4:]) for k, r in v.items() if k.startswith("tma_") and "ms" in r)
if tma and sdpa and tma[0][0] < sdpa:
    print(tma[0][1])
PYEOF
)
  P2_VARIANTS="seed,eager,compiled_inflight2_nopersistnorm,compiled_inflight2"
  [ -n "$BEST_TMA" ] && P2_VARIANTS="$P2_VARIANTS,compiled_inflight2_tritontma"
  echo "part2all: best TMA config '${BEST_TMA}' (empty: none beat SDPA); variants $P2_VARIANTS" | tee -a "$OUT/session_embed.log"
  step part2_actor 420 env VDR_VISION_TMA_CONFIG="$BEST_TMA" "$PY" benchmarks/bench_actor.py --pages 384 \
    --fid-pages 256 --queries 50 --variants "$P2_VARIANTS" \
    --profile-variants compiled_inflight2_nopersistnorm,compiled_inflight2 --out "$OUT/part2all_actor.json"
fi
step part2 300 "$PY" benchmarks/bench_actor.py --pages 384 --fid-pages 256 --queries 50 \
  --variants compiled_nopersistnorm,compiled --out "$OUT/part2_actor.json"
if [ -z "${STEPS:-}" ] || [[ " $STEPS " == *" shapes "* ]]; then
  [ -n "${STEPS:-}" ] && STEPS="$STEPS sdpa_shapes mixed_runs mixed_pow2"
  step sdpa_shapes 200 "$PY" benchmarks/bench_sdpa_shapes.py --out "$OUT/sdpa_shapes.json"
  step mixed_runs 200 "$PY" benchmarks/bench_mixed_sizes.py --random-mixes --batch-size 32 --batches 16 \
    --split runs --compare-uniform --out "$OUT/mixed_runs.json"
  step mixed_pow2 200 "$PY" benchmarks/bench_mixed_sizes.py --random-mixes --batch-size 32 --batches 16 \
    --split pow2 --out "$OUT/mixed_pow2.json"
fi
step mixed 200 "$PY" benchmarks/bench_mixed_sizes.py ${MIXED_EXTRA:-} --out "$OUT/mixed.json"
step kept "${KEPT_TIMEOUT:-480}" "$PY" benchmarks/bench_kept_embedders.py --kept-runs "${KEPT_RUNS:-3}" ${KEPT_EXTRA:-} --timeline-dir "$OUT/timelines" --out "$OUT/kept.json"
echo "done in $(( $(date +%s) - T0 ))s" | tee -a "$OUT/session_embed.log"
