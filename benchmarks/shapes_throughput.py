"""How fast does the Shapes data set generate images? (fast enough to feed a GPU?)

    python benchmarks/shapes_throughput.py                     # CPU, and CUDA when available
    python benchmarks/shapes_throughput.py --device cpu --batch-size 256 --seconds 5

Times, after a warm-up, attribute sampling (CPU) and rendering (on the device) separately, then
both together through ShapesDataset.batch and through shapes_batch_at (the trainers' feeder, which samples the next batch
in a background thread), and prints images per second.
"""

from __future__ import annotations

import argparse
import time

import torch

from minildm.data.shapes import ShapesConfig, ShapesDataset, render, sample_scenes, shapes_batch_at


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def images_per_second(step, batch_size: int, seconds: float, device: torch.device) -> float:
    """Call step(start_index) on fresh indices for about `seconds`; return images / s."""
    step(0)  # warm-up (CUDA context, kernel caches)
    _sync(device)
    start, done, t0 = batch_size, 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds or done == 0:
        step(start)
        start, done = start + batch_size, done + batch_size
    _sync(device)
    return done / (time.perf_counter() - t0)


def bench(device: torch.device, image_size: int, batch_size: int, seconds: float) -> dict[str, float]:
    cfg = ShapesConfig(image_size=image_size)
    dataset = ShapesDataset(cfg)
    fixed = sample_scenes(range(batch_size), cfg)  # for timing rendering alone
    batch_at = shapes_batch_at(cfg, batch_size, device)  # samples the next step's scenes in a background thread
    return {
        "sample": images_per_second(lambda i: sample_scenes(range(i, i + batch_size), cfg),
                                    batch_size, seconds, device),
        "render": images_per_second(lambda i: render(fixed, image_size, device), batch_size, seconds, device),
        "batch": images_per_second(lambda i: dataset.batch(range(i, i + batch_size), device),
                                   batch_size, seconds, device),
        "batches": images_per_second(lambda i: batch_at(i // batch_size), batch_size, seconds, device),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cpu, and cuda if available)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per measurement")
    args = parser.parse_args(argv)
    devices = [args.device] if args.device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

    print(f"Shapes throughput, {args.image_size} px, batch {args.batch_size}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads")
    print(f"{'device':<8} {'sampling img/s':>15} {'rendering img/s':>16} {'batch() img/s':>14} "
          f"{'shapes_batch_at img/s':>21}")
    for name in devices:
        device = torch.device(name)
        r = bench(device, args.image_size, args.batch_size, args.seconds)
        print(f"{name:<8} {r['sample']:>15,.0f} {r['render']:>16,.0f} {r['batch']:>14,.0f} "
              f"{r['batches']:>21,.0f}")


if __name__ == "__main__":
    main()
