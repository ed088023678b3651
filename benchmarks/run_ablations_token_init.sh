#!/usr/bin/env bash
# Ablation 3 (two-GPU machine, about 5 minutes): the text encoder's token-embedding scale, on the latents of a
# 75-s first stage without the GAN. Usage: OUT=<results folder> bash benchmarks/run_ablations_token_init.sh
set -u
RUNS=runs/ablations; mkdir -p $RUNS
export ABLATION_RESULTS=$OUT PYTHONUNBUFFERED=1 OMP_NUM_THREADS=4 PYTHONPATH=$PWD
A="python3 benchmarks/ablations.py"
CUDA_VISIBLE_DEVICES=0 $A autoencoder --variant no_gan --seconds 75 --out $RUNS >>"$OUT/log.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $A judge --seconds 60 --out $RUNS >>"$OUT/log.txt" 2>&1 &
wait
CUDA_VISIBLE_DEVICES=0 $A diffusion --variant mask_unit_token_init --ae $RUNS/ae_no_gan.pt --seconds 150 --guidance 1 3 --out $RUNS >>"$OUT/log.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $A diffusion --variant mask --ae $RUNS/ae_no_gan.pt --seconds 150 --guidance 1 3 --out $RUNS >>"$OUT/log.txt" 2>&1 &
wait
