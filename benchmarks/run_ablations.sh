#!/usr/bin/env bash
# The ablation screen behind the recipe, on one GPU, variants side by side (see benchmarks/ablations.py).
# Usage: OUT=<results folder> bash benchmarks/run_ablations.sh   (about 9.5 minutes on one H200)
set -u
OUT=${OUT:-runs/ablations}; RUNS=runs/ablations; mkdir -p "$OUT" "$RUNS"
export ABLATION_RESULTS=$OUT PYTHONUNBUFFERED=1 OMP_NUM_THREADS=2
A="python3 benchmarks/ablations.py"
# Phase 1 (150 s): the judge and three first-stage variants (GAN from step 500 so it joins within the budget).
$A judge --out $RUNS >>"$OUT/log.txt" 2>&1 &
for v in no_gan default old_gan; do
  $A autoencoder --variant $v --seconds 150 --disc-start 500 --out $RUNS >>"$OUT/log.txt" 2>&1 &
done
wait
# Phase 2: conditioning variants on the no-GAN autoencoder's latents, 210 s of training each, then 256 samples per
# guidance scale.
for v in old mask mask_attn0 mask_attn0_deep_text mask_attn0_lr; do
  $A diffusion --variant $v --ae $RUNS/ae_no_gan.pt --seconds 210 --out $RUNS >>"$OUT/log.txt" 2>&1 &
done
wait
