#!/usr/bin/env bash
# 1 vs 2 GPUs, latent diffusion at the full recipe (issue 13), on the two-GPU machine (nvidia-h200-x2):
#   bash benchmarks/run_ddp_speed.sh [OUT]      (about 4 minutes; the results go to OUT/ddp_speed.jsonl)
# NVLink multicast (NVLS) stays off on the lent machines.
set -euo pipefail
OUT=${1:-${OUT:-runs/ddp}}
export NCCL_NVLS_ENABLE=0
run() { python3 -m torch.distributed.run --standalone --nproc_per_node="$1" benchmarks/ddp_speed.py --out "$OUT" --batch "$2"; }
run 1 256   # the recipe on one GPU
run 2 256   # the same global batch on two (128 per GPU)
run 2 512   # the same per-GPU batch on two (256 per GPU)
python3 - "$OUT/ddp_speed.jsonl" <<'PY'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1])][-3:]
one = rows[0]["images_per_s"]
for r in rows:
    print(f"{r['world_size']} GPU(s), global batch {r['global_batch']} ({r['per_gpu_batch']} per GPU): "
          f"{r['images_per_s']:.0f} images/s, {r['images_per_s'] / one:.2f}x one GPU")
PY
