#!/usr/bin/env bash
# The main job as a new user runs it, timed, then evaluated (one GPU, about 10 minutes):
#   `minildm train` from a cold start (autoencoder, latent diffusion, samples, the judge, evaluation at guidance 3
#   with DDPM, 1,000 steps), then `minildm evaluate` over a guidance sweep with DPM-Solver++(2M) at 20 steps;
#   then, in what is left of the 10 minutes, the CUDA tests and the training-speed benchmark without compilation.
# Usage on the GPU machine: OUT=<results folder> PYTHONPATH=$PWD bash benchmarks/run_main_job.sh
set -u
OUT=${OUT:-runs/main_job}; RUN=runs/main; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader | tee "$OUT/gpu.txt"
rm -f checkpoints/full/judge_64.pt  # a cold start trains the judge too
start=$(date +%s)
python3 -m minildm train --out $RUN --fresh 2>&1 | tr '\r' '\n' | grep -v "it/s]$\|s/it]$\|s of training" > "$OUT/train.txt"
echo "minildm train: $(( $(date +%s) - start )) s end to end" | tee -a "$OUT/train.txt"
tail -12 "$OUT/train.txt"
cp $RUN/evaluation.json "$OUT/evaluation_train.json"; cp $RUN/samples.png $RUN/reconstructions.png "$OUT/"
python3 -m minildm evaluate $RUN -n 512 --guidance 1 2 3 5 8 12 --sampler dpmpp_2m --steps 20 \
  --json "$OUT/evaluation_dpmpp_2m_20.json" 2>&1 | tail -10
timeout 60 python3 -m pytest -q tests -k "cuda or wait" -p no:cacheprovider --continue-on-collection-errors > "$OUT/cuda_tests.txt" 2>&1
tail -3 "$OUT/cuda_tests.txt"
timeout 75 python3 benchmarks/train_speed.py --skip-compile --seconds 4 --out runs/speed > "$OUT/speed.txt" 2>&1
tail -9 "$OUT/speed.txt"
