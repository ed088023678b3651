"""Is the data loader the bottleneck when training on a real data set? (Stage 11; run it on the GPU machine.)

For each data set found under --root (MNIST under ROOT/MNIST/raw, CIFAR-10 as ROOT/cifar10-test/<class>/*.jpg) it
measures, with the full-mode preset and recipes:

1. decoding: seconds to decode the whole data set once into memory (`load_images`), images/s;
2. the feeder alone: images/s of `tensor_batch_at` at the full recipe's batch sizes (autoencoder and latent
   diffusion), synchronised, on the device;
3. a training step: images/s of full-recipe latent-diffusion steps (`Trainer.train_step`, on latents of an untrained
   autoencoder of the preset: the cost of encoding is in it, as in a real run), fed by that feeder.

The feeder is not the bottleneck when (2) is many times (3); the last column prints the share of a training step
that fetching its batch takes. Prints a table and writes JSON lines to --out.

    python benchmarks/data_throughput.py --root ../shared/data --out benchmarks/results/h200/data_throughput.jsonl
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from minildm.config import HOLDOUT_SEED, data_preset
from minildm.data.images import load_images, tensor_batch_at
from minildm.device import setup
from minildm.pipeline import AutoencoderTask, DiffusionTask, diffusion_batch_fn
from minildm.train import Trainer


def timed(fn, repeats: int, sync) -> float:
    """Seconds per call of fn(step), steps 2, 3, ... (after two warm-up calls, steps 0 and 1)."""
    for step in range(2):
        fn(step)
    sync()
    start = time.perf_counter()
    for step in range(2, 2 + repeats):
        fn(step)
    sync()
    return (time.perf_counter() - start) / repeats


def training_step(trainer: Trainer, batch_at):
    return lambda step: trainer.train_step(batch_at(step))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="../shared/data")
    parser.add_argument("--steps", type=int, default=30, help="timed training steps per data set")
    parser.add_argument("--out", default=None, help="append one JSON line per data set here")
    parser.add_argument("--fast", action="store_true", help="fast-mode recipes (a smoke test of this script on a CPU)")
    args = parser.parse_args()
    rt = setup(fast=args.fast)
    sync = torch.cuda.synchronize if rt.device.type == "cuda" else (lambda: None)
    root = Path(args.root)
    sources = {"mnist": root, "cifar10": root / "cifar10-test"}
    rows = []
    for name, where in sources.items():
        preset = data_preset(name)
        try:
            start = time.perf_counter()
            data = load_images(name, where, preset.image_size, preset.channels, train=False)
            decode_s = time.perf_counter() - start
        except (FileNotFoundError, ValueError) as err:
            print(f"{name}: skipped ({err})")
            continue
        train, _held = data.split(preset.held_out_for(len(data), fast=rt.fast), seed=HOLDOUT_SEED)
        ae_recipe = preset.autoencoder_recipe(fast=rt.fast)
        row = {"dataset": name, "device": rt.describe(), "images": len(data), "decode_s": round(decode_s, 2),
               "decode_images_per_s": round(len(data) / decode_s)}
        feeders = {}
        ldm = preset.diffusion_recipe((4, preset.image_size // preset.f, preset.image_size // preset.f), "class",
                                      fast=rt.fast)
        for stage, batch in (("autoencoder", ae_recipe.train.batch_size), ("diffusion", ldm.train.batch_size)):
            feeders[stage] = feed = tensor_batch_at(train, batch, rt.device, hflip=preset.hflip)
            row[f"feeder_{stage}_images_per_s"] = round(batch / timed(feed, 50, sync))
        task = AutoencoderTask(ae_recipe.model, ae_recipe.loss).to(rt.device)
        autoencoder = task.autoencoder.eval().requires_grad_(False)
        dtask = DiffusionTask(ldm.unet, ldm.text, ldm.diffusion, classes=data.classes)
        trainer = Trainer(dtask, ldm.train, rt)
        batch_at = diffusion_batch_fn(ldm.data, ldm.train.batch_size, rt, autoencoder, feeders["diffusion"])
        step_s = timed(training_step(trainer, batch_at), args.steps, sync)
        row["train_step_images_per_s"] = round(ldm.train.batch_size / step_s)
        row["feeder_share_of_step"] = round(row["train_step_images_per_s"] / row["feeder_diffusion_images_per_s"], 4)
        rows.append(row)
        print(json.dumps(row))
        if args.out:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    print("data set | decode images/s | feeder images/s (AE batch, LDM batch) | LDM train step images/s | "
          "feeder share of a step")
    for r in rows:
        print(f"{r['dataset']:8} | {r['decode_images_per_s']:15,} | {r['feeder_autoencoder_images_per_s']:>10,} "
              f"{r['feeder_diffusion_images_per_s']:>10,} | {r['train_step_images_per_s']:23,} | "
              f"{100 * r['feeder_share_of_step']:.1f}%")


if __name__ == "__main__":
    main()
