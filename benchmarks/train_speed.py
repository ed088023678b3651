"""How fast do the full-mode training steps run, and what would make them faster? (issue 10)

    python benchmarks/train_speed.py --out runs/speed          # on a GPU; prints a table, writes speed.jsonl

Measures, side by side in one process on one GPU, images per second of one training step (forward, backward,
optimiser, EMA) of the full-mode recipes:

- diffusion (text encoder + UNet on 4x16x16 latents, batch 256) and the autoencoder (64 px, batch 64);
- as shipped (data drawn and encoded every step) and on one fixed batch (the model alone); the data alone, one
  batch per call as shipped and eight per call (diffusion: if eight per call are much faster per image, the data
  path is paced by launching kernels, and drawing several steps' batches at once would pay);
- the model alone in NCHW and in channels-last memory format, eager and under `torch.compile` (the Trainer's
  `TrainConfig.compile`): mode "default" (fused Triton kernels) and "reduce-overhead" (the same, replayed as CUDA
  graphs), with the first step's seconds (the compilation) in `first_step_s`;

and converts images/s into model FLOP/s (counted with torch's FlopCounterMode) and a fraction of the GPU's bf16
dense peak (--peak-tflops, default 989 for an H100/H200 SXM: NVIDIA's data sheet figure without sparsity).
It also counts host-device synchronisations in one step (each one stalls the CPU that queues the kernels) and
writes a torch.profiler table of the slowest kernels of the eager step.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from minildm.config import autoencoder_recipe, diffusion_recipe
from minildm.data import shapes_batch_at
from minildm.device import setup
from minildm.pipeline import AutoencoderTask, DiffusionTask, diffusion_batch_fn
from minildm.train import Trainer, compile_in_place


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_steps(step, batch_size: int, seconds: float, warmup: int = 5) -> float:
    """images/s of step() over about `seconds`, after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        step()
        n += 1
        if n % 10 == 0:
            sync()
    sync()
    return n * batch_size / (time.perf_counter() - t0)


def count_syncs(step) -> int:
    """How many times one call of step() makes the host wait for the device."""
    if not torch.cuda.is_available():
        return 0
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def flops_per_image(step, batch_size: int) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops() / batch_size


def make_diffusion(rt, channels_last: bool, compiled: str | None):
    recipe = diffusion_recipe("latent", fast=rt.fast)
    recipe.train.compile = compiled or None  # the Trainer then marks each step's start for CUDA graphs, as in fit()
    task = DiffusionTask(recipe.unet, recipe.text, recipe.diffusion)
    trainer = Trainer(task, recipe.train, rt)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    if compiled:  # as Trainer.fit does with TrainConfig.compile
        compile_in_place(task.denoiser.unet, compiled)
    return trainer, recipe


def make_autoencoder(rt, channels_last: bool, compiled: str | None):
    recipe = autoencoder_recipe(fast=rt.fast)
    recipe.train.compile = compiled or None
    task = AutoencoderTask(recipe.model, recipe.loss)
    trainer = Trainer(task, recipe.train, rt)
    if channels_last:
        task.to(memory_format=torch.channels_last)
    if compiled:
        compile_in_place(task.autoencoder, compiled)
    return trainer, recipe


def profile_table(step, out: Path) -> str:
    """torch.profiler's table of the kernels three calls of step() run, slowest first."""
    cuda = torch.cuda.is_available()
    activity = torch.profiler.ProfilerActivity.CUDA if cuda else torch.profiler.ProfilerActivity.CPU
    with torch.profiler.profile(activities=[activity]) as prof:
        for _ in range(3):
            step()
        sync()
    table = prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=25)
    out.write_text(table)
    return table


def bench_variant(rt, args, record, model, make, batch_fn, name, channels_last, compiled, flops):
    """Time one variant (and, for eager, the shipped loop, the data alone and a profile); returns FLOP/image."""
    trainer, recipe = make(rt, channels_last, compiled)
    ae = None
    if model == "diffusion":  # an untrained first stage costs the same to run as a trained one
        ae = make_autoencoder(rt, False, False)[0].task.autoencoder.eval()
    batches = batch_fn(recipe, ae)
    fixed = batches(0)
    if channels_last and model == "autoencoder":
        fixed["image"] = fixed["image"].contiguous(memory_format=torch.channels_last)
    bs = recipe.train.batch_size

    def step():
        trainer.train_step(fixed)

    t0 = time.perf_counter()
    step()
    sync()
    first_step_s = time.perf_counter() - t0  # includes compilation
    flops = flops or flops_per_image(step, bs)
    extra = {"batch_size": bs, "first_step_s": round(first_step_s, 1), "syncs_per_step": count_syncs(step),
             "gflop_per_image": round(flops / 1e9, 2)}
    record(model, name + " (fixed batch)", time_steps(step, bs, args.seconds), flops, **extra)
    if name == "eager" or compiled in ("reduce-overhead", "cudagraphs"):  # as `minildm train` runs it: new data
        counter = iter(range(1, 10**9))

        def shipped():
            trainer.train_step(batches(next(counter)))

        record(model, f"{name} (as shipped: data every step)", time_steps(shipped, bs, args.seconds), flops,
               batch_size=bs, **timeline(shipped, args.out / f"timeline_{model}_{name.split()[0]}.txt"))
        if name == "eager":
            record(model, "data alone (draw + encode)",
                   time_steps(lambda: batches(next(counter)), bs, args.seconds / 2), 0.0, batch_size=bs)
            if model == "diffusion":  # the same work 8 batches per call: is the data path launch-bound?
                big = diffusion_batch_fn(recipe.data, 8 * bs, rt, ae)
                record(model, "data alone, 8 batches per call (draw + encode)",
                       time_steps(lambda: big(next(counter)), 8 * bs, args.seconds / 2, warmup=2), 0.0,
                       batch_size=8 * bs)
            print(profile_table(step, args.out / f"profile_{model}.txt")[:6000], flush=True)
    return flops


def timeline(step, out: Path, steps: int = 5) -> dict:
    """Where the wall time of step() goes: milliseconds per step on the clock and with the GPU busy (kernels and
    copies), so the GPU's idle share; and the host-side operations that take the most CPU time (what the GPU waits
    for when it idles), written to `out`."""
    if not torch.cuda.is_available():
        return {}
    from torch.autograd import DeviceType

    step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    t0 = time.perf_counter()
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    wall_ms = (time.perf_counter() - t0) / steps * 1e3
    gpu = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    busy_ms = sum(e.time_range.elapsed_us() for e in gpu) / steps / 1e3
    out.write_text(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))
    return {"wall_ms_per_step": round(wall_ms, 1), "gpu_busy_ms_per_step": round(busy_ms, 1),
            "gpu_idle_share": round(max(0.0, 1 - busy_ms / wall_ms), 3)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/speed"))
    parser.add_argument("--seconds", type=float, default=8.0, help="timed seconds per variant")
    parser.add_argument("--peak-tflops", type=float, default=989.0)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--models", nargs="+", choices=["diffusion", "autoencoder"], default=["diffusion", "autoencoder"])
    parser.add_argument("--no-channels-last", action="store_true", help="skip the channels-last variants")
    parser.add_argument("--modes", nargs="+", choices=["default", "reduce-overhead", "cudagraphs"],
                        help="of the compiled variants, only these TrainConfig.compile values (default: all; "
                        "`--modes reduce-overhead cudagraphs`: those with CUDA graphs, what `minildm train` may use)")
    parser.add_argument("--fast", action="store_true", help="the fast-mode recipes (a smoke test on a CPU)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rt = setup(0, fast=args.fast)
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    results = []

    def record(model: str, variant: str, images_per_s: float, flops: float, **extra) -> None:
        row = {"gpu": gpu, "torch": torch.__version__, "model": model, "variant": variant,
               "images_per_s": round(images_per_s, 1), "tflops": round(images_per_s * flops / 1e12, 2),
               "fraction_of_peak": round(images_per_s * flops / 1e12 / args.peak_tflops, 4), **extra}
        results.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out / "speed.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")

    for model, make, batch_fn in (
            ("diffusion", make_diffusion,
             lambda recipe, ae: diffusion_batch_fn(recipe.data, recipe.train.batch_size, rt, ae)),
            ("autoencoder", make_autoencoder,
             lambda recipe, ae: shapes_batch_at(recipe.data, recipe.train.batch_size, rt.device))):
        if model not in args.models:
            continue
        variants = [("eager", False, None), ("eager channels_last", True, None)]
        if not args.skip_compile:
            variants += [("compiled", False, "default"), ("compiled channels_last", True, "default"),
                         ("compiled reduce-overhead (CUDA graphs)", False, "reduce-overhead"),
                         ("cudagraphs backend (eager kernels as CUDA graphs)", False, "cudagraphs")]
        if args.no_channels_last:
            variants = [v for v in variants if not v[1]]
        if args.modes:
            variants = [v for v in variants if v[2] is None or v[2] in args.modes]
        flops = None
        for name, channels_last, compiled in variants:
            flops = bench_variant(rt, args, record, model, make, batch_fn, name, channels_last, compiled, flops)
            torch.cuda.empty_cache()

    print(f"\n{gpu}, torch {torch.__version__}, bf16 autocast; peak {args.peak_tflops} TFLOP/s")
    print(f"{'model':12s} {'variant':42s} {'images/s':>9s} {'TFLOP/s':>8s} {'% peak':>7s}")
    for r in results:
        print(f"{r['model']:12s} {r['variant']:42s} {r['images_per_s']:9.0f} {r['tflops']:8.1f} "
              f"{100 * r['fraction_of_peak']:6.1f}%")


if __name__ == "__main__":
    main()
