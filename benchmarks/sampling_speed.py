"""How long does DDPM sampling take: eager, a recorded CUDA graph, or compiled and then recorded? (needs a CUDA GPU)

    python benchmarks/sampling_speed.py --steps 200 --batch 16

For each space (the full-mode UNet on 4x16x16 latents and on 3x64x64 pixels) it samples `--batch` captions
with classifier-free guidance (so the UNet sees a batch of 2 x --batch) through a `--steps`-step schedule,
once in eager mode and once with `generate(..., cuda_graph=True)`, from the same seed, and prints the time
per sampler step (in ms, which is also the seconds a 1000-step DDPM sample takes), the speed-up, and the largest difference
between the two sample sets (it should be rounding noise). A third run compiles the UNet first (torch.compile's default
mode: fused Triton kernels, no CUDA graphs of its own) and records that as the graph: its compile seconds are reported
apart, and its time per step is that of a second call, so the column says what a long evaluation would gain. The graph time includes recording the graph once
(one warm-up pass and the capture), spread over the timed steps. The weights are random (speed does not depend on
them), with the zero-initialised output layer perturbed so that the samples are not trivially equal.
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from minildm.config import HOLDOUT_SEED, diffusion_recipe
from minildm.data.shapes import ShapesConfig, ShapesDataset, vocabulary
from minildm.device import setup
from minildm.pipeline import Denoiser, generate
from minildm.schedules import NoiseSchedule
from minildm.text import WordTokenizer


def timed_generate(denoiser, captions, schedule, shape, rt, cuda_graph: bool) -> tuple[float, torch.Tensor]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    x = generate(denoiser, captions, schedule, shape, rt, guidance_scale=3.0, seed=0, cuda_graph=cuda_graph)
    torch.cuda.synchronize()
    return time.perf_counter() - start, x


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200, help="sampler steps timed per call (default 200)")
    parser.add_argument("--batch", type=int, default=16, help="captions per call (default 16)")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument("--skip-compile", action="store_true", help="no compiled run")
    parser.add_argument("--spaces", nargs="+", choices=["latent", "pixel"], default=["latent", "pixel"])
    args = parser.parse_args()
    rt = setup(seed=0, fast=False)
    if rt.device.type != "cuda":
        raise SystemExit("sampling_speed.py compares eager and CUDA-graph sampling: it needs a CUDA GPU")
    held_out = ShapesDataset(ShapesConfig(seed=HOLDOUT_SEED))
    captions = [held_out[i]["caption"] for i in range(args.batch)]
    schedule = NoiseSchedule.from_name("linear", T=args.steps)
    results = {"device": rt.describe(), "steps": args.steps, "batch": args.batch}
    print(results["device"])
    print("ms per sampler step (= seconds per 1,000-step sample)")
    print(f"{'space':8} {'eager':>8} {'graph':>8} {'speed-up':>9} {'max |diff|':>11} {'compiled+graph':>15} "
          f"{'compile s':>10}")
    for space in args.spaces:
        recipe = diffusion_recipe(space, fast=False)
        denoiser = Denoiser(recipe.unet, recipe.text, WordTokenizer(vocabulary())).to(rt.device)
        torch.nn.init.normal_(denoiser.unet.out[-1].weight, std=1e-2)
        shape = (recipe.unet.in_channels, recipe.unet.image_size, recipe.unet.image_size)
        timed_generate(denoiser, captions[:2], NoiseSchedule.from_name("cosine", T=3), shape, rt, False)  # warm-up
        eager_s, eager = timed_generate(denoiser, captions, schedule, shape, rt, cuda_graph=False)
        graph_s, graphed = timed_generate(denoiser, captions, schedule, shape, rt, cuda_graph=True)
        row = {"eager_ms_per_step": 1e3 * eager_s / args.steps, "graph_ms_per_step": 1e3 * graph_s / args.steps,
               "speedup": eager_s / graph_s, "max_abs_diff": (eager - graphed).abs().max().item()}
        if not args.skip_compile:
            denoiser.unet.compile()
            first_s, _ = timed_generate(denoiser, captions, schedule, shape, rt, cuda_graph=True)  # compiles
            compiled_s, compiled = timed_generate(denoiser, captions, schedule, shape, rt, cuda_graph=True)
            row.update(compiled_graph_ms_per_step=1e3 * compiled_s / args.steps, compile_s=first_s - compiled_s,
                       compiled_max_abs_diff=(compiled - graphed).abs().max().item())
        results[space] = row
        print(f"{space:8} {row['eager_ms_per_step']:8.1f} {row['graph_ms_per_step']:8.1f} {row['speedup']:8.1f}x "
              f"{row['max_abs_diff']:11.2e} {row.get('compiled_graph_ms_per_step', float('nan')):15.2f} "
              f"{row.get('compile_s', float('nan')):10.0f}", flush=True)
        del denoiser
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
