#!/usr/bin/env bash
# The ablation screen behind the recipe on a two-GPU machine (see benchmarks/ablations.py), about 8 minutes:
# phase 1: the default first stage alone on GPU 0 (its 170-s recipe) while the judge trains on GPU 1;
# phase 2: four conditioning variants on that autoencoder's latents, two per GPU, 240 s of training each,
#          then 256 held-out captions sampled per guidance scale and read by the judge.
# Usage: OUT=<results folder> bash benchmarks/run_ablations.sh
set -u
OUT=${OUT:-runs/ablations}; RUNS=runs/ablations; mkdir -p "$OUT" "$RUNS"
export ABLATION_RESULTS=$OUT PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4
A="python3 benchmarks/ablations.py"
CUDA_VISIBLE_DEVICES=0 $A autoencoder --variant default --out $RUNS >>"$OUT/log.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $A judge --out $RUNS >>"$OUT/log.txt" 2>&1 &
wait
gpu=0
for v in old mask mask_attn0 mask_attn0_deep_text; do
  CUDA_VISIBLE_DEVICES=$((gpu % 2)) $A diffusion --variant $v --ae $RUNS/ae_default.pt --seconds 240 --out $RUNS \
    >>"$OUT/log.txt" 2>&1 &
  gpu=$((gpu + 1))
done
wait
