"""The `minildm` command (also `python -m minildm`). Every subcommand has --help.

    minildm train               train the autoencoder on Shapes, write a reconstruction grid
    minildm data                write a grid of a data set's images with their captions/labels
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from minildm.device import FAST_ENV


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help=f"tiny configs for a CPU (same as {FAST_ENV}=1); full mode targets one GPU")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    import torch

    from minildm.config import autoencoder_recipe
    from minildm.device import setup
    from minildm.pipeline import evaluate_reconstruction, train_autoencoder
    from minildm.viz import save_grid

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    recipe = autoencoder_recipe(regularizer=args.regularizer, f=args.f, fast=rt.fast)
    if args.steps is not None:
        recipe.train.steps = args.steps
    out = Path(args.out)
    ckpt = out / f"autoencoder_{args.regularizer}_f{args.f}.pt"
    if args.fresh and ckpt.exists():
        ckpt.unlink()
    print(f"training the {args.regularizer.upper()} autoencoder (f={args.f}) for {recipe.train.steps} steps; "
          f"checkpoint: {ckpt} (an interrupted run resumes from it)")
    autoencoder, _ = train_autoencoder(recipe, rt, ckpt)
    scores = evaluate_reconstruction(autoencoder, recipe.data, rt, n=64)
    from minildm.config import HOLDOUT_SEED
    from minildm.data.shapes import ShapesConfig, ShapesDataset

    held_out = ShapesDataset(ShapesConfig(image_size=recipe.data.image_size, seed=HOLDOUT_SEED))
    x = held_out.batch(range(8), device=rt.device)["image"]
    with torch.no_grad(), rt.autocast():
        recon = autoencoder(x, sample=False).recon.float()
    grid = save_grid(out / "reconstructions.png", torch.cat([x, recon]), nrow=8,
                     title=f"held-out images (top) and reconstructions (bottom), PSNR {scores.mean():.1f} dB")
    print(f"held-out reconstruction PSNR: {scores.mean():.2f} dB (64 images); "
          f"latent scale factor {autoencoder.scale_factor.item():.3f}")
    print(f"wrote {grid}")
    return 0


def cmd_data(args) -> int:
    from minildm.data import load_dataset
    from minildm.data.shapes import class_name
    from minildm.viz import save_grid

    dataset = load_dataset(args.dataset, root=args.root, image_size=args.image_size)
    items = [dataset[i] for i in range(min(args.n, len(dataset)))]
    import torch

    images = torch.stack([it["image"] for it in items])
    if "caption" in items[0]:
        captions = [it["caption"] for it in items]
    elif args.dataset == "shapes":
        captions = [class_name(it["label"]) for it in items]
    else:
        captions = [str(it.get("label", "")) for it in items]
    path = save_grid(args.out, images, nrow=8, captions=captions)
    print(f"wrote {path} ({len(items)} images of {args.dataset}, {len(dataset)} in the data set)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minildm", description="Latent diffusion from scratch: the course's command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the first-stage autoencoder on Shapes and write a reconstruction grid",
                       description="Train the autoencoder on the Shapes data set (resuming from its checkpoint if "
                       "one exists) and write reconstructions.png with held-out images and their reconstructions.")
    _add_common(p)
    p.add_argument("--out", default="runs/default", help="folder for the checkpoint and pictures (default: %(default)s)")
    p.add_argument("--regularizer", choices=["kl", "vq"], default="kl", help="KL (default) or VQ autoencoder")
    p.add_argument("--f", type=int, choices=[1, 2, 4, 8], default=4, help="downsampling factor (default: 4)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the preset's)")
    p.add_argument("--fresh", action="store_true", help="delete an existing checkpoint and start over")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("data", help="write a grid of images from a data set, with captions or labels",
                       description="Write a captioned grid of the first images of a data set.")
    p.add_argument("--dataset", default="shapes", help="shapes, mnist, fashion-mnist, cifar10, celeba, imagefolder")
    p.add_argument("--root", default="data", help="where the data set lives (or is downloaded to)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("-n", type=int, default=16, help="number of images")
    p.add_argument("--out", default="runs/data.png")
    p.set_defaults(func=cmd_data)
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
