#!/usr/bin/env bash
# benchmarks/vs_diffusers.py on the GPU machine: issue 10's table, minildm against diffusers side by side, in two
# device calls back to back on one machine (with cold compiler caches the whole table takes about 13 minutes, more
# than one 10-minute call: session 11's single call ran out in the CUDA-graph rows).
#   Here, once:  ../shared/tools/gpu-wheels.sh diffusers==0.42.1 "huggingface_hub<2"     (fills .whl/)
#   Device calls: carry [".whl"], `PHASE=1 bash benchmarks/run_vs_diffusers.sh`, then within 30 s
#                 `PHASE=2 bash benchmarks/run_vs_diffusers.sh` (each about 9 minutes, always under 9.5)
#   Back in $OUT: vs_diffusers.jsonl (the records), table.md (the tables), log.txt (everything printed). The two
#   phases' tables together: python benchmarks/vs_diffusers.py --table-from phase1.jsonl phase2.jsonl
# PHASE=1: the latent shape eager, then compiled in torch.compile's default mode (training and inference), then the
#          pixel shape eager. PHASE=2: the latent shape compiled and recorded as CUDA graphs ("reduce-overhead"),
#          then the sampler's CUDA graph with and without compilation (sampling_speed.py). Each step under a time
# limit: a process stopped by its limit keeps the records it has written, and table.md is made from what came back.
# PHASE=infer: only the compiled inference rows (about 5 minutes; TRAIN_SPEED=1 adds train_speed.py's shipped step).
# A smoke test on a CPU: SMOKE=1 OUT=/tmp/vsd PYTHON=<python with torch> PYTHONPATH=<diffusers> bash <this script>
set -u
PY=${PYTHON:-python3}
OUT=${OUT:-runs/vs_diffusers}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log="$OUT/log.txt"; res="$OUT/vs_diffusers.jsonl"
if [ -z "${SMOKE:-}" ]; then
  site=$(mktemp -d /tmp/site_vsd.XXXX)  # a fresh folder: a warm machine keeps /tmp, stale packages would shadow
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$site" .whl/*.whl || exit 1
  export PYTHONPATH=$site:$PWD
  nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv,noheader | tee -a "$log"
  args=(--seconds 2); limit_eager=100; limit_latent=330; total=540
else
  export PYTHONPATH=${PYTHONPATH:-}:$PWD
  args=(--smoke); limit_eager=600; limit_latent=900; total=1800
fi
# Cold compile caches, so that the compile times are those of a first run on a fresh machine.
export TORCHINDUCTOR_CACHE_DIR=$(mktemp -d /tmp/inductor_vsd.XXXX) TRITON_CACHE_DIR=$(mktemp -d /tmp/triton_vsd.XXXX)
bench() {  # bench <seconds allowed> <arguments...>
  echo "== $(date +%T) vs_diffusers.py ${*:2} (at most $1 s)" | tee -a "$log"
  timeout "$1" $PY benchmarks/vs_diffusers.py "${args[@]}" --out "$res" "${@:2}" >> "$log" 2>&1
  echo "== exit $? after $SECONDS s in all" | tee -a "$log"
}
if [ "${PHASE:-all}" = infer ]; then  # PHASE=infer: the compiled inference rows alone (each compile is cold); with
  # TRAIN_SPEED=1 also the Trainer's step as shipped, eager and with CUDA graphs, with its timeline (train_speed.py;
  # session 9 measured its cudagraphs variant: benchmarks/results/h200/speed_4_*)
  bench $limit_latent --modes compiled compiled-graphs --tasks infer --shapes latent
  $PY benchmarks/vs_diffusers.py --table-from "$res" | tee "$OUT/table.md"
  [ -z "${SMOKE:-}" ] && [ -n "${TRAIN_SPEED:-}" ] && timeout $(( total - SECONDS )) $PY benchmarks/train_speed.py --models diffusion \
    --no-channels-last --modes reduce-overhead cudagraphs --seconds 3 --peak-tflops 775 --out "$OUT/train_speed" > "$OUT/train_speed.txt" 2>&1
  tail -12 "$OUT/train_speed.txt" 2>/dev/null
  echo "run_vs_diffusers.sh (PHASE=infer): $SECONDS s"
  exit 0
fi
if [ "${PHASE:-1}" = 1 ]; then
  bench $limit_eager --modes eager --shapes latent --rounds 3  # eager is CPU-bound: three runs show its spread
  bench $limit_latent --modes compiled --shapes latent
  left=$(( total - SECONDS ))
  if [ $left -gt 40 ]; then bench $left --modes eager --shapes pixel --rounds 3; fi
elif [ "$PHASE" = 2 ]; then
  bench $(( total - 110 )) --modes compiled-graphs --shapes latent  # leaves the sampler its 90 s
  if [ -z "${SMOKE:-}" ]; then  # the sampler: eager, its CUDA graph, compiled then graphed (TRAIN_SPEED=1: the Trainer's step)
    timeout 90 $PY benchmarks/sampling_speed.py --spaces latent --steps 50 --batch 256 \
      --out "$OUT/sampling_speed.json" > "$OUT/sampling_speed.txt" 2>&1
    tail -4 "$OUT/sampling_speed.txt"
    [ -n "${TRAIN_SPEED:-}" ] && timeout $(( total - SECONDS )) $PY benchmarks/train_speed.py --models diffusion \
      --no-channels-last --seconds 3 --peak-tflops 775 --out "$OUT/train_speed" > "$OUT/train_speed.txt" 2>&1
  fi
else
  echo "PHASE must be 1, 2 or infer, got '$PHASE'" >&2; exit 2
fi
$PY benchmarks/vs_diffusers.py --table-from "$res" | tee "$OUT/table.md"
grep -i -m5 "error\|Traceback" "$log"
echo "run_vs_diffusers.sh (PHASE=${PHASE:-1}): $SECONDS s"
