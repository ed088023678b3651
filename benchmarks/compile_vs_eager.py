"""Does training through torch.compile's cudagraphs backend follow eager training? (issue 10)

The latent recipe's full-size UNet and text encoder (66.5 M + 1.6 M parameters), batch 256 of Shapes latents from
a randomly initialised KL f=4 autoencoder (scale factor fixed at 0.379), trained `--steps` steps three times from
the same initial weights on the same batches and the same noise (the trainer seeds its generators by step): eager,
`TrainConfig.compile = "cudagraphs"`, eager again. CUDA's own nondeterminism (atomics in some backward kernels,
bf16) makes two eager runs drift apart; the compiled run should drift from the first eager run no further than the
second eager run does. Prints the largest difference of the per-step losses and the relative L2 difference of the
final weights and EMA weights, as JSON.

    python benchmarks/compile_vs_eager.py --steps 60             # on a GPU (about 60 s on an H200)
    python benchmarks/compile_vs_eager.py --steps 2 --device cpu --batch 4   # smoke test (compile is CUDA only)
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from minildm.autoencoder import Autoencoder
from minildm.config import autoencoder_recipe, diffusion_recipe
from minildm.device import setup
from minildm.pipeline import DiffusionTask, diffusion_batch_fn
from minildm.train import Trainer


def train_once(mode: str | None, steps: int, batch: int, rt, autoencoder) -> tuple[list[float], dict, dict]:
    rec = diffusion_recipe("latent", fast=False, latent_shape=(4, 16, 16))
    rec.train.batch_size, rec.train.steps, rec.train.log_every = batch, steps, 1
    rec.train.ckpt_every, rec.train.max_seconds, rec.train.compile = 10**9, None, mode
    torch.manual_seed(0)  # the same initial weights every time
    task = DiffusionTask(rec.unet, rec.text, rec.diffusion)
    trainer = Trainer(task, rec.train, rt, None)
    t0 = time.time()
    history = trainer.fit(diffusion_batch_fn(rec.data, batch, rt, autoencoder), progress=False)
    if rt.device.type == "cuda":
        torch.cuda.synchronize()
    print(f"{mode or 'eager'}: {time.time() - t0:.1f} s, compile {trainer.compile_seconds}", flush=True)
    weights = {k: v.detach().float().clone() for k, v in task.denoiser.state_dict().items()}
    ema = {k: v.detach().float().clone() for k, v in trainer.ema.shadow.items()}
    return [float(h["loss"]) for h in history], weights, ema


def relative_difference(a: dict, b: dict) -> float:
    """||a - b|| / ||a|| over all floating-point tensors."""
    keys = [k for k in a if a[k].is_floating_point()]
    num = sum(((a[k] - b[k]) ** 2).sum() for k in keys)
    den = sum((a[k] ** 2).sum() for k in keys)
    return float((num / den).sqrt())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args()
    rt = setup(seed=0, device=args.device, fast=False)
    torch.manual_seed(123)
    autoencoder = Autoencoder(autoencoder_recipe("kl", 4, fast=False).model).to(rt.device).eval()
    autoencoder.scale_factor.fill_(0.379)
    autoencoder.requires_grad_(False)
    runs = {name: train_once(mode, args.steps, args.batch, rt, autoencoder)
            for name, mode in [("eager_a", None), ("cudagraphs", "cudagraphs"), ("eager_b", None)]}
    losses_a, weights_a, ema_a = runs["eager_a"]
    result = {"steps": args.steps, "batch": args.batch, "device": rt.describe()}
    for name in ["cudagraphs", "eager_b"]:
        losses, weights, ema = runs[name]
        result[f"{name} vs eager_a"] = {
            "max_loss_diff": max(abs(x - y) for x, y in zip(losses_a, losses)),
            "weights_rel_diff": relative_difference(weights_a, weights),
            "ema_rel_diff": relative_difference(ema_a, ema),
            "last_losses": losses[-5:]}
    result["eager_a last_losses"] = losses_a[-5:]
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
