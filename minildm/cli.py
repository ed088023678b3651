"""The `minildm` command (also `python -m minildm`). Every subcommand has --help.

    minildm train               the whole pipeline on Shapes: autoencoder, then latent diffusion; writes
                                reconstructions.png and samples.png (captioned)
    minildm sample              sample images for your own captions from a trained pipeline
    minildm data                write a grid of a data set's images with their captions/labels
    minildm grade               autograde submitted exercises with nbgrader, print a score table
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path

from minildm.device import FAST_ENV


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help=f"tiny configs for a CPU (same as {FAST_ENV}=1); full mode targets one GPU")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    import torch

    from minildm.config import HOLDOUT_SEED, autoencoder_recipe, diffusion_recipe
    from minildm.data.shapes import ShapesConfig, ShapesDataset
    from minildm.device import setup
    from minildm.pipeline import evaluate_reconstruction, generate, train_autoencoder, train_diffusion
    from minildm.viz import save_grid

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    start = time.perf_counter()
    out = Path(args.out)
    if args.fresh:
        for old in out.glob("*.pt"):
            old.unlink()

    # Stage 2: the autoencoder.
    recipe = autoencoder_recipe(regularizer=args.regularizer, f=args.f, fast=rt.fast)
    if args.steps is not None:
        recipe.train.steps = args.steps
    ckpt = out / f"autoencoder_{args.regularizer}_f{args.f}.pt"
    others = sorted(p.name for p in out.glob("autoencoder_*.pt") if p.name != ckpt.name)
    if others:  # its diffusion_latent.pt was trained on that autoencoder's latents and must not be reused
        raise ValueError(f"'{out}' holds a pipeline built on {others[0]}, not {ckpt.name}; use another --out, "
                         "or --fresh to start over there")
    print(f"[1/2] autoencoder ({args.regularizer.upper()}, f={args.f}): checkpoint {ckpt} "
          "(an interrupted run resumes from it)")
    autoencoder, _ = train_autoencoder(recipe, rt, ckpt)
    scores = evaluate_reconstruction(autoencoder, recipe.data, rt, n=64)
    held_out = ShapesDataset(ShapesConfig(image_size=recipe.data.image_size, seed=HOLDOUT_SEED)).batch(
        range(8), device=rt.device)
    x = held_out["image"]
    with torch.no_grad(), rt.autocast():
        recon = autoencoder(x, sample=False).recon.float()
    title = f"held-out images (top) and reconstructions (bottom), PSNR {scores.mean():.1f} dB"
    if rt.fast:
        title += "\n(fast mode: a tiny autoencoder trained for a few dozen steps)"
    grid = save_grid(out / "reconstructions.png", torch.cat([x, recon]), nrow=8, title=title)
    print(f"held-out reconstruction PSNR {scores.mean():.2f} dB; latent scale factor "
          f"{autoencoder.scale_factor.item():.3f}; wrote {grid}")
    if args.stage == "autoencoder":
        return 0

    # Stages 3-6: text-conditioned latent diffusion on the autoencoder's latents.
    autoencoder.requires_grad_(False)
    shape = autoencoder.cfg.latent_shape  # (c, H/f, W/f)
    ldm = diffusion_recipe("latent", fast=rt.fast)
    ldm.unet = dataclasses.replace(ldm.unet, in_channels=shape[0], out_channels=shape[0], image_size=shape[1])
    ckpt = out / "diffusion_latent.pt"
    print(f"[2/2] latent diffusion on {'x'.join(map(str, shape))} latents: checkpoint {ckpt}")
    denoiser, schedule, _ = train_diffusion(ldm, rt, ckpt, autoencoder=autoencoder)
    captions = held_out["caption"]
    samples = generate(denoiser, captions, schedule, shape, rt, prediction=ldm.diffusion.prediction,
                       autoencoder=autoencoder, progress=True)
    title = "latent diffusion samples for held-out captions"
    if rt.fast:
        title += "\n(fast mode: a tiny model trained for a few dozen steps; unset MINILDM_FAST on a GPU for real samples)"
    grid = save_grid(out / "samples.png", samples, nrow=4, captions=captions, title=title)
    print(f"wrote {grid}; {time.perf_counter() - start:.0f} s in all")
    return 0


def cmd_sample(args) -> int:
    from minildm.device import setup
    from minildm.pipeline import generate, load_autoencoder, load_diffusion
    from minildm.viz import save_grid

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    folder = Path(args.run)
    ae_ckpts = sorted(folder.glob("autoencoder_*.pt"))
    if not ae_ckpts or not (folder / "diffusion_latent.pt").exists():
        raise FileNotFoundError(f"no trained pipeline in '{folder}': expected autoencoder_*.pt and "
                                f"diffusion_latent.pt there; run `minildm train --out {folder}` first")
    autoencoder = load_autoencoder(ae_ckpts[0], device=rt.device)
    denoiser, schedule, diffusion_cfg = load_diffusion(folder / "diffusion_latent.pt", device=rt.device)
    captions = [c for c in args.caption for _ in range(args.n)]
    images = generate(denoiser, captions, schedule, autoencoder.cfg.latent_shape, rt,
                      prediction=diffusion_cfg.prediction, guidance_scale=args.guidance, autoencoder=autoencoder,
                      seed=args.seed, progress=True)
    path = save_grid(args.out, images, nrow=args.n, captions=captions)
    print(f"wrote {path}")
    return 0


def cmd_data(args) -> int:
    import torch

    from minildm.data import load_dataset
    from minildm.viz import save_grid

    dataset = load_dataset(args.dataset, root=args.root, image_size=args.image_size)
    items = [dataset[i] for i in range(min(args.n, len(dataset)))]
    images = torch.stack([it["image"] for it in items])
    if "caption" in items[0]:  # Shapes
        captions = [it["caption"] for it in items]
    else:
        captions = [str(it.get("label", "")) for it in items]
    path = save_grid(args.out, images, nrow=8, captions=captions)
    print(f"wrote {path} ({len(items)} images of {args.dataset}, {len(dataset)} in the data set)")
    return 0


def cmd_grade(args) -> int:
    from minildm.grade import autograde, report, scores

    course = Path(args.course).resolve()
    if not (course / "nbgrader_config.py").is_file():
        raise FileNotFoundError(f"'{course}' is not a course folder (no nbgrader_config.py); run this in the "
                                "minildm checkout or pass --course")
    if not (course / "solutions" / args.assignment).is_dir():
        known = sorted(p.name for p in (course / "solutions").iterdir() if p.is_dir())
        raise ValueError(f"unknown assignment {args.assignment!r}; known: {', '.join(known)}")
    print(f"autograding {args.assignment} (nbgrader; about 2 s per notebook) ...", flush=True)
    autograde(args.assignment, course, timeout=args.timeout)
    print(report(scores(args.assignment, course)))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minildm", description="Latent diffusion from scratch: the course's command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the pipeline on Shapes: autoencoder, then latent diffusion",
                       description="Train the autoencoder, then text-conditioned latent diffusion on its latents, on "
                       "the Shapes data set (each resuming from its checkpoint in --out if one exists). Writes "
                       "reconstructions.png (held-out images and reconstructions) and samples.png (samples for "
                       "held-out captions).")
    _add_common(p)
    p.add_argument("--out", default="runs/default", help="folder for the checkpoint and pictures (default: %(default)s)")
    p.add_argument("--regularizer", choices=["kl", "vq"], default="kl", help="KL (default) or VQ autoencoder")
    p.add_argument("--f", type=int, choices=[1, 2, 4, 8], default=4, help="downsampling factor (default: 4)")
    p.add_argument("--steps", type=int, default=None, help="autoencoder training steps (default: the preset's)")
    p.add_argument("--stage", choices=["autoencoder", "all"], default="all",
                   help="stop after the autoencoder, or train everything (default)")
    p.add_argument("--fresh", action="store_true", help="delete existing checkpoints in --out and start over")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="sample images for your own captions from a trained pipeline",
                       description="Load the checkpoints `minildm train` wrote and sample images for captions.")
    _add_common(p)
    p.add_argument("caption", nargs="+", help='one or more captions, e.g. "a big red circle at the center"')
    p.add_argument("--run", default="runs/default", help="folder written by `minildm train` (default: %(default)s)")
    p.add_argument("-n", type=int, default=4, help="samples per caption")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--out", default="runs/samples.png")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("data", help="write a grid of images from a data set, with captions or labels",
                       description="Write a captioned grid of the first images of a data set.")
    p.add_argument("--dataset", default="shapes", help="shapes, mnist, fashion-mnist, cifar10, celeba, imagefolder")
    p.add_argument("--root", default="data", help="where the data set lives (or is downloaded to)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("--out", default="runs/data.png")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("grade", help="autograde submitted exercises with nbgrader and print the scores",
                       description="Autograde submitted/<student>/<assignment>/*.ipynb with nbgrader (test cells and "
                       "hidden tests restored from solutions/) and print a per-exercise score table. Needs the "
                       "instructor extra: pip install -e '.[instructor]'.")
    p.add_argument("assignment", help="e.g. ex02-autoencoder")
    p.add_argument("--course", default=".", help="the course folder with nbgrader_config.py (default: here)")
    p.add_argument("--timeout", type=int, default=120, help="seconds a cell may run before it is cut off")
    p.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "fast", False):
        os.environ[FAST_ENV] = "1"
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("MINILDM_DEBUG"):
            raise
        print(f"minildm: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
