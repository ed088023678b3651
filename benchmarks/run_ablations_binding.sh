#!/usr/bin/env bash
# Ablation 4 (four-GPU machine, about 9 minutes): what makes the denoiser bind attributes to their objects.
#   GPU 0: the training-speed benchmark (benchmarks/train_speed.py), then the CUDA tests, then one late variant;
#   GPU 1: a 75-s first stage without the GAN; GPU 2: the judge; then
#   GPUs 1-3: three conditioning variants, each one alone on its GPU, with a learning curve
#   (evaluated with DPM-Solver++(2M), 20 steps, on 256 held-out captions, at 120, 240 and 360 s of training).
# Usage: OUT=<results folder> bash benchmarks/run_ablations_binding.sh
set -u
RUNS=runs/ablations; mkdir -p $RUNS
export ABLATION_RESULTS=$OUT PYTHONUNBUFFERED=1 OMP_NUM_THREADS=8 PYTHONPATH=$PWD
A="python3 benchmarks/ablations.py"
D="diffusion --ae $RUNS/ae_no_gan.pt -n 256 --guidance 3 5 --sampler dpmpp_2m --steps 20 --out $RUNS"
nvidia-smi --query-gpu=name --format=csv,noheader > "$OUT/gpu.txt"
( CUDA_VISIBLE_DEVICES=0 python3 benchmarks/train_speed.py --out "$OUT" > "$OUT/speed.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 timeout 100 python3 -m pytest -q -x tests -k "cuda or wait" > "$OUT/cuda_tests.txt" 2>&1
  CUDA_VISIBLE_DEVICES=0 $A $D --variant ${LATE:-posemb_attn0} --curve 120 240 >>"$OUT/log0.txt" 2>&1 ) &
CUDA_VISIBLE_DEVICES=1 $A autoencoder --variant no_gan --seconds 75 --out $RUNS >>"$OUT/log1.txt" 2>&1 &
CUDA_VISIBLE_DEVICES=2 $A judge --seconds 60 --out $RUNS >>"$OUT/log2.txt" 2>&1 &
while [ ! -f $RUNS/ae_no_gan.pt ] || [ ! -f $RUNS/judge_64.pt ] || pgrep -f "ablations.py (autoencoder|judge)" >/dev/null; do sleep 2; done
i=1
for v in ${VARIANTS:-mask posemb posemb_lr}; do
  CUDA_VISIBLE_DEVICES=$i $A $D --variant $v --curve 120 240 360 >>"$OUT/log$i.txt" 2>&1 &
  i=$((i + 1))
done
wait
