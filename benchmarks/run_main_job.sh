#!/usr/bin/env bash
# The main job as a new user runs it, timed, then evaluated (one GPU, about 10 minutes):
#   `minildm train` from a cold start (autoencoder, judge, latent diffusion, samples, evaluation at guidance 3),
#   then `minildm evaluate` at several guidance scales with DDPM (1,000 steps) and with DPM-Solver++(2M) at 20 steps.
# Usage on the GPU machine: OUT=<results folder> PYTHONPATH=$PWD bash benchmarks/run_main_job.sh
set -u
OUT=${OUT:-runs/main_job}; RUN=runs/main; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
rm -f checkpoints/full/judge_64.pt  # a cold start trains the judge too
start=$(date +%s)
python3 -m minildm train --out $RUN --fresh 2>&1 | tr '\r' '\n' | grep -v "it/s]$\|s/it]$" > "$OUT/train.txt"
echo "minildm train: $(( $(date +%s) - start )) s end to end" | tee -a "$OUT/train.txt"
tail -8 "$OUT/train.txt"
cp $RUN/evaluation.json "$OUT/evaluation_train.json"; cp $RUN/*.png "$OUT/"
python3 -m minildm evaluate $RUN -n 512 --guidance 1 2 3 5 --json "$OUT/evaluation_ddpm.json" 2>&1 | tail -9
python3 -m minildm evaluate $RUN -n 512 --guidance 1 2 3 5 --sampler dpmpp_2m --steps 20 \
  --json "$OUT/evaluation_dpmpp_2m_20.json" 2>&1 | tail -9
