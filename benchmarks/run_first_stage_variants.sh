#!/usr/bin/env bash
# The first-stage check for VQ and for f = 8 (one GPU, about 3 minutes): the judge (90 s), the VQ f=4 and the KL
# f=8 autoencoders of the default recipe (no GAN, 120 s), three processes side by side on one GPU (one alone keeps
# an H200 about a third busy: the CPU that queues its kernels sets its pace), then PSNR and the judge on 512
# held-out reconstructions each. Usage: OUT=<results folder> bash benchmarks/run_first_stage_variants.sh
set -u
RUNS=runs/ablations; mkdir -p $RUNS
export ABLATION_RESULTS=$OUT PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD
A="python3 benchmarks/ablations.py"
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
$A judge --seconds 90 --out $RUNS > "$OUT/log_judge.txt" 2>&1 &
sleep 5
for variant in "vq 4" "kl 8"; do
  set -- $variant
  $A autoencoder --variant no_gan --regularizer $1 --f $2 --out $RUNS > "$OUT/log_$1_f$2.txt" 2>&1 &
done
wait
