"""Latent diffusion training throughput on 1 vs N GPUs (issue 13), under torchrun:

    NCCL_NVLS_ENABLE=0 torchrun --standalone --nproc_per_node=2 benchmarks/ddp_speed.py --out runs/ddp
    benchmarks/run_ddp_speed.sh      # 1 GPU, then 2, at two global batches; prints the speed-ups

Times the full-mode latent diffusion recipe's Trainer step as shipped (each rank draws its part of every global
batch of Shapes and encodes it with an untrained autoencoder, which costs what a trained one costs), for --seconds
after a warm-up, and appends one JSON line (rank 0) to OUT/ddp_speed.jsonl: world size, global and per-GPU batch,
global images/s. Two ways to read 1 vs 2 GPUs:
- the same global batch (the recipe's 256): the same training, each GPU doing half the work per step;
- the same per-GPU batch (--batch 512 on 2 GPUs): each GPU as busy as alone. One training process keeps an H200
  about a third busy (docs/measured.md, "Training speed"), so halving a GPU's batch shortens its step by much less
  than half.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch

from minildm import distributed
from minildm.autoencoder import Autoencoder
from minildm.config import autoencoder_recipe, diffusion_recipe
from minildm.device import setup
from minildm.pipeline import DiffusionTask, diffusion_batch_fn
from minildm.train import Trainer


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/ddp"))
    parser.add_argument("--batch", type=int, default=None, help="global batch (default: the recipe's, 256)")
    parser.add_argument("--seconds", type=float, default=30.0, help="timed seconds")
    parser.add_argument("--warmup", type=int, default=10, help="untimed steps first")
    parser.add_argument("--fast", action="store_true", help="the fast-mode recipe (a smoke test on a CPU)")
    args = parser.parse_args(argv)
    rt = setup(0, fast=args.fast)
    here = distributed.place()
    ae = Autoencoder(autoencoder_recipe(fast=args.fast).model).to(rt.device).eval().requires_grad_(False)
    recipe = diffusion_recipe("latent", fast=args.fast, latent_shape=ae.cfg.latent_shape)
    train = dataclasses.replace(recipe.train, batch_size=args.batch or recipe.train.batch_size, max_seconds=None)
    trainer = Trainer(DiffusionTask(recipe.unet, recipe.text, recipe.diffusion), train, rt)
    batch_at = diffusion_batch_fn(recipe.data, train.batch_size, rt, ae)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)

    for step in range(args.warmup):
        trainer.train_step(batch_at(step))
    sync()
    distributed.barrier("the warm-up")
    steps, t0 = args.warmup, time.perf_counter()
    while distributed.from_main(time.perf_counter() - t0, rt.device) < args.seconds:  # all ranks stop together
        for _ in range(10):
            trainer.train_step(batch_at(steps))
            steps += 1
        sync()
    seconds = time.perf_counter() - t0
    timed = steps - args.warmup
    row = {"gpu": torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu", "torch": torch.__version__,
           "world_size": here.world_size, "global_batch": train.batch_size,
           "per_gpu_batch": trainer.local_batch_size, "steps": timed, "seconds": round(seconds, 2),
           "images_per_s": round(timed * train.batch_size / seconds, 1)}
    if here.is_main:
        print(json.dumps(row), flush=True)
        args.out.mkdir(parents=True, exist_ok=True)
        with open(args.out / "ddp_speed.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    distributed.cleanup()


if __name__ == "__main__":
    main()
