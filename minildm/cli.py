"""The `minildm` command (also `python -m minildm`). Every subcommand has --help.

    minildm train               the whole pipeline on Shapes: autoencoder, then latent diffusion; writes
                                reconstructions.png and samples.png (captioned)
    minildm sample              sample images for your own captions from a trained pipeline
    minildm evaluate            score a trained pipeline: PSNR, caption accuracy (the Shapes judge), FD, KID
    minildm data                write a grid of a data set's images with their captions/labels
    minildm grade               autograde submitted exercises with nbgrader, print a score table
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import time
from pathlib import Path

from minildm.device import FAST_ENV


def _add_sampler(p: argparse.ArgumentParser) -> None:
    from minildm.samplers import SAMPLERS

    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm",
                   help="ddpm (all T steps, the default), ddim, euler, heun or dpmpp_2m (see minildm/samplers.py)")
    p.add_argument("--steps", type=int, default=None,
                   help="sampling steps (default: all T for ddpm, 50 for the others)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fast", action="store_true",
                   help=f"tiny configs for a CPU (same as {FAST_ENV}=1); full mode targets one GPU")
    p.add_argument("--device", default=None, help="cuda, mps or cpu (default: the best available)")
    p.add_argument("--seed", type=int, default=0)


def cmd_train(args) -> int:
    import torch

    from minildm import distributed

    if args.dataset != "shapes":
        return cmd_train_data(args)
    if args.condition is not None or args.image_size is not None or args.root is not None:
        raise ValueError("--condition, --image-size and --root are for real data sets (--dataset mnist, cifar10, "
                         "...); Shapes trains text-conditioned at its preset size")

    from minildm.config import HOLDOUT_SEED, autoencoder_recipe, diffusion_recipe
    from minildm.data.shapes import ShapesConfig, ShapesDataset
    from minildm.device import setup
    from minildm.pipeline import evaluate_reconstruction, generate, train_diffusion
    from minildm.viz import save_grid

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)  # under torchrun: joins the group
    main = distributed.is_main()  # under torchrun every rank trains; rank 0 alone writes, draws and evaluates
    start = time.perf_counter()
    out = Path(args.out)
    if args.fresh and main:
        for old in out.glob("*.pt"):
            old.unlink()
    distributed.barrier("deleting the old checkpoints (--fresh)")

    if args.eval_n is None:
        args.eval_n = 32 if rt.fast else 512
    if args.f is None:
        args.f = 4
    # Stage 2: the autoencoder.
    recipe = autoencoder_recipe(regularizer=args.regularizer, f=args.f, fast=rt.fast)
    if args.steps is not None:
        recipe.train.steps = args.steps
    if args.gan:
        recipe.loss = dataclasses.replace(recipe.loss, disc_weight=0.5)
    ckpt = out / f"autoencoder_{args.regularizer}_f{args.f}.pt"
    refuse_another_autoencoder(out, ckpt)
    if main:
        print(f"[1/2] autoencoder ({args.regularizer.upper()}, f={args.f}): checkpoint {ckpt} "
              "(an interrupted run resumes from it)")
    autoencoder = first_stage(recipe, rt, ckpt)
    if not main:  # straight on to the next stage, which starts by waiting for rank 0
        if args.stage == "autoencoder":
            distributed.cleanup()
            return 0
        return _train_diffusion_rank(args, rt, autoencoder)
    scores = evaluate_reconstruction(autoencoder, recipe.data, rt, n=64)
    held_out = ShapesDataset(ShapesConfig(image_size=recipe.data.image_size, seed=HOLDOUT_SEED)).batch(
        range(8), device=rt.device)
    x = held_out["image"]
    with torch.no_grad(), rt.autocast():
        recon = autoencoder(x, sample=False).recon.float()
    title = (f"held-out images (top) and reconstructions (bottom), PSNR {scores.mean():.1f} dB "
             f"({rt.device_name()})")
    if rt.fast:
        title += "\n(fast mode: a tiny autoencoder trained for a few dozen steps)"
    grid = save_grid(out / "reconstructions.png", torch.cat([x, recon]), nrow=8, title=title)
    print(f"held-out reconstruction PSNR {scores.mean():.2f} dB; latent scale factor "
          f"{autoencoder.scale_factor.item():.3f}; wrote {grid}")
    if args.stage == "autoencoder":
        distributed.cleanup()
        return 0

    # Stages 3-6: text-conditioned latent diffusion on the autoencoder's latents.
    autoencoder.requires_grad_(False)
    shape = autoencoder.cfg.latent_shape  # (c, H/f, W/f)
    ldm = diffusion_recipe("latent", fast=rt.fast, latent_shape=shape)
    ldm.train.compile = compile_mode(args, rt)
    ckpt = out / "diffusion_latent.pt"
    print(f"[2/2] latent diffusion on {'x'.join(map(str, shape))} latents: checkpoint {ckpt}")
    denoiser, schedule, _ = train_diffusion(ldm, rt, ckpt, autoencoder=autoencoder)
    distributed.cleanup()  # training is over: rank 0 samples and evaluates alone, the other ranks have exited
    captions = held_out["caption"]
    guidance = 3.0 if args.guidance is None else args.guidance  # the evaluation's scale below
    samples = generate(denoiser, captions, schedule, shape, rt, prediction=ldm.diffusion.prediction,
                       guidance_scale=guidance, autoencoder=autoencoder, progress=True)
    title = (f"latent diffusion samples for held-out captions (DDPM {schedule.T:,} steps, guidance {guidance:g}; "
             f"{rt.device_name()})")
    if rt.fast:
        title += "\n(fast mode: a tiny model trained for a few dozen steps; unset MINILDM_FAST on a GPU for real samples)"
    grid = save_grid(out / "samples.png", samples, nrow=4, captions=captions, title=title)
    print(f"wrote {grid}; {time.perf_counter() - start:.0f} s of training and sampling")
    result = evaluate_run(out, rt, n=args.eval_n, guidance_scales=(guidance,))
    print(format_evaluation(result))
    print(f"wrote {out / 'evaluation.json'}; {time.perf_counter() - start:.0f} s in all")
    return 0


def refuse_another_autoencoder(out: Path, ckpt: Path) -> None:
    """A run folder holds one pipeline: its diffusion_latent.pt was trained on the latents of the autoencoder there,
    so another regularizer or f in the same --out would be trained beside it and mixed with it."""
    others = sorted(p.name for p in out.glob("autoencoder_*.pt") if p.name != ckpt.name)
    if others:
        raise ValueError(f"'{out}' holds a pipeline built on {others[0]}, not {ckpt.name} (another --regularizer, "
                         "--f or data set preset); use another --out, or --fresh to start over there")


def first_stage(recipe, rt, ckpt: Path, **train_args):
    """The run's autoencoder: trained, resumed or loaded when finished; but only loaded where the run's diffusion
    model exists already, since that model was trained on the latents of this autoencoder as it is (training it on,
    e.g. after a rerun with more --steps, would leave the diffusion model decoding through another one)."""
    from minildm import distributed
    from minildm.pipeline import load_autoencoder, train_autoencoder

    if ckpt.exists() and (ckpt.parent / "diffusion_latent.pt").exists():
        if distributed.is_main():
            print(f"autoencoder: {ckpt} kept as it is (the diffusion model beside it was trained on its latents; "
                  "--fresh trains both again)")
        return load_autoencoder(ckpt, device=rt.device)
    return train_autoencoder(recipe, rt, ckpt, **train_args)[0]


def compile_mode(args, rt) -> str | None:
    """`--compile` as a TrainConfig.compile mode. "auto": the UNet's own kernels recorded and replayed as CUDA graphs
    (torch.compile's "cudagraphs" backend) on a GPU in full mode, nothing on a CPU or in fast mode (a few dozen steps
    do not repay compiling). Measured on an H200 (docs/measured.md, sessions 8 and 9), a latent step as shipped (new
    data every step): eager 204 ms; "cudagraphs" 93 ms after 28 s of compiling; "reduce-overhead" (Inductor's fused
    kernels as CUDA graphs) 79 ms after 111-133 s of compiling with a cold compiler cache, 8 s with a warm one. For
    the recipe's 2,200 steps on a first run that is about 233 s against 285 s: "cudagraphs" is the default because
    most runs of a course are first runs; pass --compile reduce-overhead to trade a long first compile for the
    fastest steps after it."""
    if args.compile == "auto":
        return "cudagraphs" if rt.device.type == "cuda" and not rt.fast else None
    return None if args.compile == "off" else args.compile


def _train_diffusion_rank(args, rt, autoencoder) -> int:
    """What a rank other than 0 does in `minildm train` after the autoencoder: train latent diffusion, then leave."""
    from minildm import distributed
    from minildm.config import diffusion_recipe
    from minildm.pipeline import train_diffusion

    autoencoder.requires_grad_(False)
    ldm = diffusion_recipe("latent", fast=rt.fast, latent_shape=autoencoder.cfg.latent_shape)
    ldm.train.compile = compile_mode(args, rt)
    train_diffusion(ldm, rt, Path(args.out) / "diffusion_latent.pt", autoencoder=autoencoder, progress=False)
    distributed.cleanup()
    return 0


MANIFEST = "data.json"  # what a run on a real data set was trained on (`minildm train --dataset ...`)


def read_manifest(run: Path) -> dict | None:
    """The data.json of a run of `minildm train --dataset`, with the guidance it was evaluated at (older runs did
    not record it: their preset's); None for a Shapes run."""
    import json

    from minildm.config import data_preset

    path = Path(run) / MANIFEST
    if not path.exists():
        return None
    manifest = json.loads(path.read_text())
    manifest.setdefault("guidance", data_preset(manifest["dataset"]).guidance)
    return manifest


ROOT_LAYOUT = {  # what --root must hold, per data set (torchvision's folder layouts, or class folders)
    "mnist": "the folder that holds MNIST/raw/ (torchvision's layout; e.g. ../shared/data)",
    "fashion-mnist": "the folder that holds FashionMNIST/raw/ (torchvision's layout)",
    "cifar10": ("the folder that holds cifar-10-batches-py/ (torchvision's download), or one folder per class, "
                "ROOT/<class>/<image> (e.g. ../shared/data/cifar10-test)"),
    "celeba": "the folder that holds celeba/ (torchvision's layout)",
    "imagefolder": "a folder of class folders, ROOT/<class>/<image>, or of images, ROOT/<image> (no labels)",
}


def data_root_arg(root: str | None, dataset: str) -> Path:
    """--root; without it, the course's data folder (`config.data_root()`: $MINILDM_DATA, else <project>/data, with
    CIFAR-10's test JPEGs in its cifar10-test/ as in ../shared/data), said so. An image folder is always named."""
    from minildm import distributed
    from minildm.config import data_root

    given = root is not None
    if not given:
        if dataset == "imagefolder":
            raise ValueError(f"--dataset imagefolder needs --root PATH: {ROOT_LAYOUT['imagefolder']}")
        base = data_root()
        jpegs = base / "cifar10-test"
        root = jpegs if dataset == "cifar10" and jpegs.is_dir() and not (base / "cifar-10-batches-py").is_dir() \
            else base
    path = Path(root).expanduser().resolve()
    if not path.is_dir():
        name = "--root" if given else "the data folder (no --root given: $MINILDM_DATA, else data/)"
        what = "is a file" if path.exists() else "does not exist"
        raise FileNotFoundError(f"{name} {path} {what}; for {dataset}, --root must be {ROOT_LAYOUT[dataset]}")
    if not given and distributed.is_main():
        print(f"{dataset}: no --root given, reading {path} ($MINILDM_DATA, else data/)")
    return path


def load_training_images(preset, root: Path, fast: bool, seed: int, limit: int | None = None,
                         use: str = "training on part of the test split, the rest held out"):
    """(images, split name) of a real data set for training: the training split, or (MNIST-like data sets whose
    training split is absent, e.g. ../shared/data) the test split, said so; "folder" for images read from class
    folders (an image folder, or CIFAR-10 as JPEGs such as ../shared/data/cifar10-test: whichever split they are).
    Fast mode decodes a few hundred; `limit` decodes a seeded random sample of that many."""
    from minildm.data.datasets import DatasetNotFoundError
    from minildm.data.images import load_images, reads_class_folders

    limit = limit or (preset.fast_images if fast else None)
    how = {"image_size": preset.image_size, "channels": preset.channels, "limit": limit, "seed": seed}
    try:
        if preset.name not in ("mnist", "fashion-mnist"):
            split = "folder" if reads_class_folders(preset.name, root) else "train"
            return load_images(preset.name, root, **how), split
        try:
            return load_images(preset.name, root, train=True, **how), "train"
        except DatasetNotFoundError:
            images = load_images(preset.name, root, train=False, **how)
            print(f"{preset.name}: no training split under {root}; {use}")
            return images, "test"
    except DatasetNotFoundError as e:
        if preset.name == "imagefolder":  # its message names the layout already
            raise
        raise FileNotFoundError(f"no {preset.name} data under {root}: --root must be {ROOT_LAYOUT[preset.name]}. "
                                "minildm does not download data sets: copy the files there") from e


def cmd_train_data(args) -> int:
    """`minildm train --dataset NAME --root PATH`: the two stages on a real data set, class-conditional where it has
    labels, then the course's classifier for it and the evaluation."""
    import json

    import torch

    from minildm import distributed
    from minildm.classifier import train_classifier
    from minildm.config import HOLDOUT_SEED, data_preset
    from minildm.data.images import has_class_folders, tensor_batch_at
    from minildm.device import setup
    from minildm.metrics import psnr
    from minildm.pipeline import generate, reconstruct, train_diffusion
    from minildm.viz import misreads, save_figure, save_grid, show_class_rows

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)  # under torchrun: joins the group
    main = distributed.is_main()  # every rank trains; rank 0 alone writes, draws and evaluates
    start = time.perf_counter()
    preset = data_preset(args.dataset, image_size=args.image_size)
    if args.f is not None:  # the preset's f unless asked for another (CIFAR-10's is 2, so --f 4 means 4)
        preset = dataclasses.replace(preset, f=args.f)
    if main:
        print(preset.describe(rt.fast))
    if args.steps is not None and main:
        print(f"  --steps {args.steps}: the autoencoder trains {args.steps} step{'s' if args.steps != 1 else ''} "
              "instead of the preset's budget")
    if rt.device.type == "cpu" and not rt.fast and main:
        print("  full mode on a CPU: the budgets above are seconds on one GPU, so this trains far less than the preset "
              f"means and decodes every image (memory); for a quick run use --fast ({FAST_ENV}=1)")
    guidance = preset.guidance if args.guidance is None else args.guidance
    eval_n = args.eval_n or (16 if rt.fast else 1000)  # fast mode holds out 32: 16 sampled for, 16 the reference
    root = data_root_arg(args.root, args.dataset)
    out = Path(args.out)
    if args.fresh and main:
        for old in (*out.glob("*.pt"), out / MANIFEST):
            old.unlink(missing_ok=True)
    distributed.barrier("deleting the old checkpoints (--fresh)")
    data, split = load_training_images(preset, root, rt.fast, args.seed)
    one_class = data.classes is not None and len(data.classes) == 1
    if one_class and args.condition != "class" and main:  # nothing to tell apart: no class conditioning or classifier
        print(f"{args.dataset} at {root} has one class folder ({data.classes[0]!r}): its images are trained on "
              "without labels, and evaluated by reconstruction PSNR only")
        if has_class_folders(root / data.classes[0]):  # e.g. --root ../shared/data for ../shared/data/cifar10-test
            print(f"  {root / data.classes[0]} holds class folders itself: for its classes, pass --root "
                  f"{root / data.classes[0]}")
    if one_class:
        data = dataclasses.replace(data, labels=None, classes=None)
    condition = args.condition or ("class" if data.labels is not None else "none")
    if condition == "class" and data.labels is None:
        why = ("it has one class folder" if one_class
               else "its folder holds images but no class folders" if args.dataset == "imagefolder"
               else "it has attributes, not classes" if args.dataset == "celeba" else "it has no labels")
        raise ValueError(f"--condition class needs class labels, but {args.dataset} at {root} has none ({why}); "
                         "train with --condition none, or sort the images into class folders ROOT/<class>/<image>")
    train, held = data.split(preset.held_out_for(len(data), rt.fast), seed=HOLDOUT_SEED)
    if data.labels is not None and len(held) < 4:  # found now, not after training: FD needs 2 real + 2 reference
        raise ValueError(f"{len(data)} images of {len(data.classes)} classes are too few: the evaluation on the "
                         "classifier's features needs 4 held-out images (a fifth of the data), so at least 20 "
                         "images; add images")
    manifest = {"dataset": args.dataset, "root": str(root), "split": split, "image_size": preset.image_size,
                "channels": preset.channels, "f": preset.f, "condition": condition, "classes": data.classes,
                "images": len(data), "held_out": len(held), "skipped": len(data.skipped), "seed": args.seed,
                "guidance": guidance, "eval_n": eval_n}  # the last two: what `minildm evaluate` defaults to
    old = out / MANIFEST
    if old.exists():
        was = json.loads(old.read_text())
        # The images too: a folder with files added or removed (or, in fast mode, another --seed's subset) would
        # hold out images that the finished checkpoints trained on.
        keys = ("dataset", "root", "image_size", "channels", "f", "condition", "images", "held_out",
                *(("seed",) if rt.fast else ()))
        differ = [k for k in keys if was.get(k) != manifest[k]]
        if differ:
            raise ValueError(f"'{out}' holds a run on {was.get('dataset')} at {was.get('root')} "
                             f"({was.get('image_size')} px, condition {was.get('condition')}, {was.get('images')} "
                             f"images), not this one (differs in: {', '.join(differ)}); use another --out, or "
                             "--fresh to start over there")
    refuse_another_autoencoder(out, out / f"autoencoder_{args.regularizer}_f{preset.f}.pt")
    if main:
        out.mkdir(parents=True, exist_ok=True)
        old.write_text(json.dumps(manifest, indent=1))
        save_held_out(out / "held_out.pt", held)
    skipped = f" ({len(data.skipped)} unreadable files skipped)" if data.skipped else ""
    where = f"the images under {root}" if split == "folder" else f"{split} split"
    if main:
        print(f"{len(data)} images of {args.dataset} ({where}){skipped}: {len(train)} to train on, {len(held)} held "
              f"out; condition: {condition}" + (f" ({len(data.classes)} classes)" if condition == "class" else ""))

    def feeder(batch_size: int):
        epoch = -(-len(train) // batch_size)
        if main:
            print(f"  batch {batch_size}: one epoch = {epoch} step{'s' if epoch > 1 else ''} (shuffled anew each "
                  "epoch)")
        return tensor_batch_at(train, batch_size, rt.device, seed=args.seed, hflip=preset.hflip)

    recipe = preset.autoencoder_recipe(args.regularizer, fast=rt.fast)
    if args.steps is not None:
        recipe.train.steps, recipe.train.max_seconds = args.steps, None
    ckpt = out / f"autoencoder_{args.regularizer}_f{preset.f}.pt"
    stages = 1 if args.stage == "autoencoder" else 3 if data.labels is not None else 2  # a classifier needs labels
    if main:
        print(f"[1/{stages}] autoencoder ({args.regularizer.upper()}, f={preset.f}): checkpoint {ckpt}")
    autoencoder = first_stage(recipe, rt, ckpt, images_at=feeder(recipe.train.batch_size))
    if not main and args.stage == "autoencoder":
        distributed.cleanup()
        return 0
    x = held.batch(range(min(8, len(held))), rt.device)["image"]
    recon = reconstruct(autoencoder, x, rt)
    title = (f"held-out images (top) and reconstructions (bottom), PSNR {psnr(x, recon).mean():.1f} dB "
             f"({rt.device_name()})")
    if main:
        print(f"wrote {save_grid(out / 'reconstructions.png', torch.cat([x, recon]), nrow=len(x), title=title)}")
    if args.stage == "autoencoder":
        distributed.cleanup()
        return 0

    autoencoder.requires_grad_(False)
    shape = autoencoder.cfg.latent_shape
    ldm = preset.diffusion_recipe(shape, condition, fast=rt.fast)
    ldm.train.compile = compile_mode(args, rt)
    ckpt = out / "diffusion_latent.pt"
    if main:
        print(f"[2/{stages}] latent diffusion ({condition}) on {'x'.join(map(str, shape))} latents: checkpoint {ckpt}")
    denoiser, schedule, _ = train_diffusion(ldm, rt, ckpt, autoencoder=autoencoder,
                                            images_at=feeder(ldm.train.batch_size), classes=data.classes)
    distributed.cleanup()  # training is over: rank 0 samples, trains the classifier and evaluates alone
    if not main:
        return 0
    # DPM-Solver++(2M) in 20 steps for the samples and the evaluation: 50x fewer model calls than DDPM
    per_class = (2 if rt.fast else 4) if condition == "class" else 16
    rows = range(min(10, len(data.classes))) if condition == "class" else range(1)  # at most ten classes drawn
    names = [data.classes[row] if condition == "class" else "" for row in rows for _ in range(per_class)]
    samples = generate(denoiser, names, schedule, shape, rt, prediction=ldm.diffusion.prediction,
                       guidance_scale=guidance if condition == "class" else 1.0, autoencoder=autoencoder,
                       progress=True, sampler="dpmpp_2m", steps=20)
    classifier = None
    if data.labels is not None:
        cfg, train_cfg = preset.classifier_recipe(len(data.classes), fast=rt.fast)
        print(f"[3/3] the course's classifier for {args.dataset} (class accuracy, FD/KID features): "
              f"checkpoint {out / 'classifier.pt'}")
        classifier = train_classifier(cfg, train_cfg, feeder(train_cfg.batch_size), rt, out / "classifier.pt",
                                      data.classes)
    title = f"{args.dataset}: samples, DPM-Solver++(2M) 20 steps"
    title += f", guidance {guidance:g} ({rt.device_name()})" if condition == "class" else f" ({rt.device_name()})"
    read = classifier.predict(samples).cpu() if condition == "class" and classifier is not None else None
    if read is not None:  # a red frame where the course's classifier reads another class than the row's
        wrong = int(misreads(read, rows, per_class).sum())
        title += f": {wrong} of {len(names)} read as another class (red)"
    if rt.fast:
        title += "\n(fast mode: tiny models trained for a few steps)"
    if condition == "class":  # a row per class
        path = save_figure(show_class_rows(samples, data.classes, per_class, title, read, rows=rows),
                           out / "samples.png")
    else:
        path = save_grid(out / "samples.png", samples, nrow=8, title=title)
    print(f"wrote {path}")
    result = evaluate_run(out, rt, n=eval_n, guidance_scales=(guidance,),
                          sampler="dpmpp_2m", steps=20)
    print(format_evaluation(result))
    print(f"wrote {out / 'evaluation.json'}; {time.perf_counter() - start:.0f} s in all")
    return 0


def save_held_out(path: Path, held) -> None:
    from minildm.checkpoint import save_checkpoint

    save_checkpoint(path, {"kind": "held_out", "images": held.images.cpu(), "classes": held.classes,
                           "labels": held.labels.cpu() if held.labels is not None else None})


def load_held_out(path: Path):
    from minildm.checkpoint import load_checkpoint
    from minildm.data.images import ImageTensors

    state = load_checkpoint(path, kind="held_out")
    return ImageTensors(state["images"], state["labels"], state["classes"])


def load_run(folder: Path, device):
    """(autoencoder, denoiser, schedule, DiffusionConfig) of a `minildm train` folder, or a clear error."""
    from minildm.pipeline import load_autoencoder, load_diffusion

    ae_ckpts = sorted(folder.glob("autoencoder_*.pt"))
    if not ae_ckpts or not (folder / "diffusion_latent.pt").exists():
        raise FileNotFoundError(f"no trained pipeline in '{folder}': expected autoencoder_*.pt and "
                                f"diffusion_latent.pt there; run `minildm train --out {folder}` first")
    if len(ae_ckpts) > 1:  # which one the diffusion model was trained on is not recorded: refuse to guess
        raise ValueError(f"'{folder}' holds {len(ae_ckpts)} autoencoders ({', '.join(p.name for p in ae_ckpts)}) "
                         "and one diffusion model trained on one of them; train again into a new --out (or "
                         "--fresh)")
    autoencoder = load_autoencoder(ae_ckpts[0], device=device)
    return (autoencoder, *load_diffusion(folder / "diffusion_latent.pt", device=device))


def evaluate_run(folder: Path, rt, n: int, guidance_scales: tuple[float, ...], judge_path: str | None = None,
                 json_path: Path | None = None, sampler: str = "ddpm", steps: int | None = None) -> dict:
    """Stage 7 on a trained pipeline: the judge (loaded, or trained once per image size into the checkpoint
    folder), reconstruction PSNR and caption accuracy, then caption accuracy, FD and KID of n samples per guidance
    scale. Writes the result as JSON (default <folder>/evaluation.json) and returns it."""
    import json

    from minildm.config import checkpoint_dir
    from minildm.judge import judge_for, load_judge
    from minildm.pipeline import evaluate_autoencoder, evaluate_text_to_image

    if n < 2:
        raise ValueError(f"asked to evaluate {n} samples; caption accuracy and FD need at least 2 (e.g. -n 512)")
    autoencoder, denoiser, schedule, diffusion_cfg = load_run(folder, rt.device)
    if (folder / MANIFEST).exists():  # a run on a real data set: the course's classifier for it is the referee
        if judge_path is not None:
            raise ValueError(f"--judge is a Shapes judge, but '{folder}' holds a run on a real data set: its samples "
                             "are read by the run's own classifier.pt; evaluate without --judge")
        return evaluate_data_run(folder, rt, n, guidance_scales, autoencoder, denoiser, schedule, diffusion_cfg,
                                 json_path, sampler, steps)
    size = autoencoder.cfg.image_size
    if judge_path is not None:
        judge = load_judge(judge_path, rt.device, image_size=size)
    else:
        print(f"judge: {checkpoint_dir(rt.fast) / f'judge_{size}.pt'} (trained once when missing)")
        judge = judge_for(size, rt, checkpoint_dir(rt.fast))
    result = {"run": str(folder), "device": rt.describe(), "first_stage": evaluate_autoencoder(autoencoder, judge, rt,
                                                                                                n=n)}
    samples = evaluate_text_to_image(denoiser, schedule, autoencoder.cfg.latent_shape, rt, judge, autoencoder, n=n,
                                     guidance_scales=guidance_scales, prediction=diffusion_cfg.prediction,
                                     sampler=sampler, steps=steps)
    result["text_to_image"] = {k: v for k, v in samples.items() if k not in ("captions", "attributes")}
    path = json_path or folder / "evaluation.json"
    path.write_text(json.dumps(result, indent=1))
    return result


def evaluate_data_run(folder: Path, rt, n, guidance_scales, autoencoder, denoiser, schedule, diffusion_cfg,
                      json_path=None, sampler="ddpm", steps=None) -> dict:
    """Stage 7 on a run of `minildm train --dataset ...`: `pipeline.evaluate_classes` with its held-out images and
    its classifier (none for unlabelled data: PSNR only). Writes JSON (default <folder>/evaluation.json)."""
    import json

    from minildm.classifier import load_classifier
    from minildm.pipeline import evaluate_classes

    manifest = json.loads((folder / MANIFEST).read_text())
    classifier = None
    if manifest["classes"]:
        if not (folder / "classifier.pt").exists():
            raise FileNotFoundError(f"no classifier.pt in '{folder}': `minildm train` trains it after the diffusion "
                                    "model; run the same `minildm train` command again to finish")
        classifier = load_classifier(folder / "classifier.pt", rt.device)
    scores = evaluate_classes(denoiser, schedule, autoencoder, rt, classifier, load_held_out(folder / "held_out.pt"),
                              n=n, guidance_scales=guidance_scales, prediction=diffusion_cfg.prediction,
                              sampler=sampler, steps=steps)
    result = {"run": str(folder), "device": rt.describe(), "dataset": manifest["dataset"],
              "condition": manifest["condition"],
              "feature_network": f"the course's {manifest['dataset']} classifier (not Inception)" if classifier
              else None, "data": scores}
    (json_path or folder / "evaluation.json").write_text(json.dumps(result, indent=1))
    return result


def format_evaluation(result: dict) -> str:
    """The evaluation as a text table; every line names its number of samples and guidance scale."""
    if "data" in result:
        return format_data_evaluation(result)
    first, t2i = result["first_stage"], result["text_to_image"]
    recon, real = first["judge_on_reconstructions"], first["judge_on_real"]
    lines = [(f"first stage, {first['n']} held-out images: PSNR {first['psnr']:.2f} dB; judge, objects right: "
             f"{100 * recon['object']:.1f}% of reconstructions, {100 * real['object']:.1f}% of the real images"),
             (f"text to image, {t2i['n']} held-out captions ({t2i['sampler']}, {t2i['steps']} steps, "
              "1 sample each); FD on the judge's features, "
             f"real-data floor {t2i['fd_real_floor']:.2f}:"),
             "  guidance | place  shape  colour  size | objects  captions | extra/img |    FD  FD/floor | KID",
             ]
    for scale, r in t2i["by_guidance"].items():
        lines.append(f"  {float(scale):8.1f} | {100 * r['place']:5.1f}  {100 * r['shape']:5.1f}  {100 * r['colour']:6.1f}"
                     f"  {100 * r['size']:4.1f} | {100 * r['object']:6.1f}%  {100 * r['caption']:7.1f}% | "
                     f"{r['extra_per_image']:9.2f} | {r['fd']:5.2f}  {r['fd_ratio']:8.2f} | "
                     f"{r['kid']:.4f} +- {r['kid_std']:.4f}")
    r = next(iter(t2i["by_guidance"].values()))
    se = 100 * math.sqrt(r["object"] * (1 - r["object"]) / max(r["objects"], 1))
    lines.append(f"  {r['objects']} objects per scale: an objects figure has a sampling error of about "
                 f"+- {se:.1f} points (binomial s.e.);")
    lines.append("  judges of one recipe differ by up to ~1.5 points on the same images (README): compare runs "
                 "with one --judge file")
    return "\n".join(lines)


def format_data_evaluation(result: dict) -> str:
    d = result["data"]
    lines = [f"{result['dataset']}, {d['n']} held-out images: reconstruction PSNR {d['psnr']:.2f} dB"]
    if result["feature_network"] is None:
        lines.append("  no labels, so no classifier of the course: no class accuracy, FD or KID (not built yet)")
        return "\n".join(lines)
    if "accuracy_real" in d:
        lines.append(f"  classifier accuracy: {100 * d['accuracy_real']:.1f}% on the real held-out images, "
                     f"{100 * d['accuracy_reconstructions']:.1f}% on their reconstructions")
    drawn = "one per held-out label" if result["condition"] == "class" else "unconditional"
    lines.append(f"  samples ({result['condition']}, {d['sampler']}, {d['steps']} steps, {d['n']} samples, {drawn}); "
                 f"FD and KID on the features of {result['feature_network']}, real-data floor "
                 f"{d['fd_real_floor']:.2f}:")
    lines.append("  guidance | class accuracy |     FD  FD/floor | KID")
    for scale, r in d["by_guidance"].items():
        acc = f"{100 * r['class_accuracy']:13.1f}%" if "class_accuracy" in r else f"{'-':>14}"
        lines.append(f"  {float(scale):8.1f} | {acc} | {r['fd']:6.2f}  {r['fd_ratio']:8.2f} | "
                     f"{r['kid']:.4f} +- {r['kid_std']:.4f}")
    if d.get("n_asked", d["n"]) > d["n"]:
        lines.append(f"  {d['n_asked']} samples were asked; {d['n']} is as many as the held-out images allow (the "
                     "other half is the FD reference)")
    if d["n"] < 100:
        lines.append(f"  n = {d['n']}: FD, KID and class accuracy are rough at this size (KID is unbiased, so it can "
                     "be negative); compare runs of the same n only")
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from minildm.device import setup

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    real = read_manifest(args.run)  # None for a Shapes run
    if args.n is None:  # what `minildm train` evaluated with
        args.n = (32 if rt.fast else 512) if real is None else real.get("eval_n", 16 if rt.fast else 1000)
    if args.guidance is None:
        args.guidance = [1.0, 3.0, 5.0] if real is None else [real["guidance"]]
    result = evaluate_run(Path(args.run), rt, n=args.n, guidance_scales=tuple(args.guidance), judge_path=args.judge,
                          json_path=Path(args.json) if args.json else None, sampler=args.sampler, steps=args.steps)
    print(format_evaluation(result))
    print(f"wrote {args.json or Path(args.run) / 'evaluation.json'}")
    return 0


def cmd_sample(args) -> int:
    from minildm.classifier import load_classifier
    from minildm.device import setup
    from minildm.pipeline import generate
    from minildm.viz import misreads, save_figure, save_grid, show_class_rows

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    autoencoder, denoiser, schedule, diffusion_cfg = load_run(Path(args.run), rt.device)
    out = Path(args.out) if args.out else Path(args.run) / "sampled.png"
    guidance = args.guidance
    if guidance is None:  # the scale the run was evaluated at, or 3 on Shapes
        real = read_manifest(args.run)
        guidance = 3.0 if real is None else real["guidance"]
    if diffusion_cfg.condition == "none":
        if args.caption:
            raise ValueError(f"the run in '{args.run}' is unconditional: it takes no class names or captions, got "
                             f"{args.caption[:3]}; run `minildm sample --run {args.run} -n 16` without them")
        captions, guidance = [""] * args.n, 1.0
    elif not args.caption:
        kind = "class names (e.g. " + ", ".join(denoiser.classes[:3]) + ")" if diffusion_cfg.condition == "class" \
            else "captions"
        raise ValueError(f"the run in '{args.run}' is conditional: name one or more {kind}")
    else:
        if diffusion_cfg.condition == "class" and any(not c.strip() for c in args.caption):
            raise ValueError(f"an empty class name was given to the class-conditional run in '{args.run}'; name "
                             f"classes, e.g. {denoiser.classes[0]!r}")
        captions = [c for c in args.caption for _ in range(args.n)]
    images = generate(denoiser, captions, schedule, autoencoder.cfg.latent_shape, rt,
                      prediction=diffusion_cfg.prediction, guidance_scale=guidance, autoencoder=autoencoder,
                      seed=args.seed, progress=True, sampler=args.sampler, steps=args.steps)
    if diffusion_cfg.condition == "class":  # a row per asked class; the run's classifier marks misreads in red
        rows = [denoiser.label(name) for name in args.caption]
        classifier_path = Path(args.run) / "classifier.pt"
        read = load_classifier(classifier_path, rt.device).predict(images).cpu() if classifier_path.exists() else None
        title = f"{args.sampler}, {args.steps or schedule.T} steps, guidance {guidance:g} ({rt.device_name()})"
        if read is not None:
            wrong = int(misreads(read, rows, args.n).sum())
            title += f": {wrong} of {len(images)} read as another class by the run's classifier (red)"
        path = save_figure(show_class_rows(images, denoiser.classes, args.n, title, read, rows), out)
    else:
        path = save_grid(out, images, nrow=args.n, captions=captions if any(captions) else None)
    print(f"wrote {path}")
    return 0


def cmd_data(args) -> int:
    """A grid of a data set's images as training sees them: Shapes with captions, a real data set through the
    loader of `minildm train --dataset` (same root, preset size and channels, unreadable files skipped) with class
    names, a seeded random sample (an image folder lists its classes one after another)."""
    import torch

    from minildm.data.datasets import DATASETS
    from minildm.viz import save_grid

    name = args.dataset.lower().strip()
    if name not in DATASETS:
        raise ValueError(f"unknown data set {args.dataset!r}; known: {', '.join(DATASETS)}")
    if name == "shapes":
        from minildm.data import load_dataset

        dataset = load_dataset("shapes", image_size=args.image_size or 64)
        items = [dataset[i] for i in range(args.n)]  # Shapes is drawn at random already
        images, captions = torch.stack([it["image"] for it in items]), [it["caption"] for it in items]
        total = "generated on the fly"
    else:
        from minildm.config import data_preset

        preset = data_preset(args.dataset, image_size=args.image_size)
        root = data_root_arg(args.root, preset.name)
        data, split = load_training_images(preset, root, fast=False, seed=0, limit=args.n,
                                           use="showing the test split")
        images = data.batch(range(len(data)), "cpu")["image"]  # (n, C, S, S) in [-1, 1], as training sees them
        captions = [data.classes[int(y)] for y in data.labels] if data.labels is not None else None
        where = f"the images under {root}" if split == "folder" else f"{split} split"
        skipped = f"; {len(data.skipped)} unreadable files skipped" if data.skipped else ""
        total = f"a random sample of {where}{skipped}"
    path = save_grid(args.out, images, nrow=8, captions=captions)
    print(f"wrote {path} ({len(images)} images of {args.dataset}, {total})")
    return 0


def cmd_grade(args) -> int:
    from minildm.grade import grade

    course = Path(args.course).resolve()
    if not (course / "nbgrader_config.py").is_file():
        raise FileNotFoundError(f"'{course}' is not a course folder (no nbgrader_config.py); run this in the "
                                "minildm checkout or pass --course")
    if not (course / "solutions" / args.assignment).is_dir():
        known = sorted(p.name for p in (course / "solutions").iterdir() if p.is_dir())
        raise ValueError(f"unknown assignment {args.assignment!r}; known: {', '.join(known)}")
    print(f"autograding {args.assignment} with nbgrader (a few seconds per notebook; a cell may run "
          f"{args.timeout} s) ...", flush=True)
    report = grade(args.assignment, course, timeout=args.timeout, progress=lambda line: print(line, flush=True),
                   sandbox=args.sandbox)
    notes = report.notes()
    if notes:
        print("notes:\n" + "\n".join(f"  {note}" for note in notes))
    for path, write in ((args.csv, report.write_csv), (args.json, report.write_json)):
        if path:
            print(f"wrote {write(path)}")
    graded = sum(nb.graded for s in report.students for nb in s.notebooks)
    total = sum(len(s.notebooks) for s in report.students)
    print(f"graded {graded} of {total} notebooks of {len(report.students)} students in {report.seconds:.1f} s")
    print(report.table(), flush=True)
    for failure in report.failures:
        print(f"minildm: error: grading failed: {failure}", file=sys.stderr)
    return 1 if report.failures else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="minildm", description="Latent diffusion from scratch: the course's command.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("train", help="train the pipeline: autoencoder, then latent diffusion",
                       description="Train the autoencoder, then latent diffusion on its latents (each resuming from "
                       "its checkpoint in --out if one exists): text-conditioned on the Shapes data set, or on a real "
                       "data set (--dataset, --root) class-conditional where it has labels, unconditional otherwise, "
                       "then the course's classifier for it. Writes reconstructions.png (held-out images and "
                       "reconstructions), samples.png and evaluation.json.")
    _add_common(p)
    p.add_argument("--out", default="runs/default", help="folder for the checkpoint and pictures (default: %(default)s)")
    p.add_argument("--regularizer", choices=["kl", "vq"], default="kl", help="KL (default) or VQ autoencoder")
    p.add_argument("--f", type=int, choices=[1, 2, 4, 8], default=None,
                   help="the autoencoder's downsampling factor (default: 4 on Shapes, the preset's with --dataset)")
    p.add_argument("--steps", type=int, default=None, help="autoencoder training steps (default: the preset's)")
    p.add_argument("--stage", choices=["autoencoder", "all"], default="all",
                   help="stop after the autoencoder, or train everything (default)")
    p.add_argument("--fresh", action="store_true", help="delete existing checkpoints in --out and start over")
    p.add_argument("--gan", action="store_true",
                   help="add the PatchGAN term to the autoencoder's loss (off by default: on Shapes it costs fidelity)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="samples for the final evaluation, one per held-out caption or label (default: 512 on "
                   "Shapes, 1,000 on a real data set; 32 in fast mode)")
    p.add_argument("--guidance", type=float, default=None,
                   help="guidance scale of the samples and the evaluation (default: 3 on Shapes, the preset's on a "
                   "real data set)")
    p.add_argument("--dataset", default="shapes", choices=["shapes", "mnist", "fashion-mnist", "cifar10", "celeba",
                                                            "imagefolder"],
                   help="what to train on (default: Shapes, text-conditioned); a real data set uses its preset "
                   "(image size, channels, f, budgets: minildm/config.py DATA_PRESETS, printed at the start)")
    p.add_argument("--root", default=None,
                   help="folder of a real data set (default: the course's data folder, $MINILDM_DATA or data/, "
                   "except for an image folder): e.g. ../shared/data (holding "
                   "MNIST/raw), or an image folder ROOT/<class>/<image> (the folders are the classes) or ROOT/<image> "
                   "(no labels)")
    p.add_argument("--image-size", type=int, default=None, help="image size instead of the preset's")
    p.add_argument("--condition", choices=["class", "none"], default=None,
                   help="class-conditional or unconditional (default: class where the data set has labels)")
    p.add_argument("--compile", choices=["auto", "off", "default", "reduce-overhead", "cudagraphs"], default="auto",
                   help="torch.compile the diffusion UNet while training (its first step compiles): auto (default) "
                   "= cudagraphs on a GPU in full mode, off elsewhere; cudagraphs = the eager kernels recorded and "
                   "replayed as CUDA graphs, nothing generated (about 30 s to compile on an H200, steps 2.2x faster "
                   "than eager); reduce-overhead = fused kernels replayed as CUDA graphs (about 2 minutes to compile "
                   "on a first run, seconds once the compiler's cache is warm; steps 15%% faster than cudagraphs)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a trained pipeline: PSNR, caption or class accuracy, FD and KID",
                       description="Evaluate the pipeline `minildm train` wrote in RUN. On Shapes: held-out "
                       "reconstruction PSNR and how often the Shapes judge (a classifier the course trains; trained "
                       "once per image size when missing) reads the captioned objects in reconstructions and in "
                       "samples for held-out captions, per guidance scale, with FD and KID on the judge's features. "
                       "On a real data set (`minildm train --dataset`): the same with the run's own classifier, class "
                       "accuracy of samples drawn for held-out labels, and FD / KID to held-out images (at most half "
                       "of them are sampled for: the rest is the reference). Prints a table and writes JSON.")
    _add_common(p)
    p.add_argument("run", help="folder written by `minildm train` (e.g. runs/default)")
    p.add_argument("-n", type=int, default=None,
                   help="samples (one per held-out caption or label) and held-out images (default: 512 on Shapes, "
                   "1,000 on a real data set, as `minildm train`)")
    p.add_argument("--guidance", type=float, nargs="+", default=None,
                   help="classifier-free guidance scales to evaluate (default: 1 3 5 on Shapes, the data set's preset "
                   "on a real data set)")
    p.add_argument("--judge", default=None, help="a judge checkpoint to use instead of the cached one")
    p.add_argument("--json", default=None, help="where to write the results (default: RUN/evaluation.json)")
    _add_sampler(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="sample images for your own captions from a trained pipeline",
                       description="Load the checkpoints `minildm train` wrote and sample images for captions.")
    _add_common(p)
    p.add_argument("caption", nargs="*", help='captions, e.g. "a big red circle at the center", or class names '
                   "(a run on a real data set, e.g. cat dog, or 3 7 for MNIST); none for an unconditional run")
    p.add_argument("--run", default="runs/default", help="folder written by `minildm train` (default: %(default)s)")
    p.add_argument("-n", type=int, default=4, help="samples per caption")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale (1 = none; default: the data set's preset for a run of "
                   "`minildm train --dataset`, else 3)")
    p.add_argument("--out", default=None,
                   help="the PNG to write (default: RUN/sampled.png, beside the run's own samples.png)")
    _add_sampler(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("data", help="write a grid of images from a data set, with captions or labels",
                       description="Write a grid of a data set's images as `minildm train` sees them, with their "
                       "captions (Shapes) or class names: a seeded random sample of a real data set, read from "
                       "--root as `minildm train --dataset` reads it.")
    p.add_argument("--dataset", default="shapes", help="shapes (default), mnist, fashion-mnist, cifar10, celeba or "
                   "imagefolder")
    p.add_argument("--root", default=None, help="folder of a real data set, as for `minildm train` (default: the "
                   "course's data folder, $MINILDM_DATA or data/; an image folder must be named)")
    p.add_argument("--image-size", type=int, default=None, help="image size (default: the preset's; Shapes 64)")
    p.add_argument("-n", type=int, default=16, help="number of images (default: %(default)s)")
    p.add_argument("--out", default="runs/data.png", help="the PNG to write (default: %(default)s)")
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("grade", help="autograde submitted exercises with nbgrader and print the scores",
                       description="Autograde submitted/<student>/<assignment>/*.ipynb with nbgrader, one notebook "
                       "at a time (test cells, deleted ones included, and hidden tests restored from solutions/; "
                       "LMS-renamed copies such as 'name (1).ipynb' renamed first) and print a table: one row per "
                       "student, points per task, the total, the grading time and a status (graded, timed out, "
                       "kernel died, invalid notebook, missing notebook). Exits non-zero only when grading itself "
                       "failed. Needs the instructor extra: pip install -e '.[instructor]'.")
    p.add_argument("assignment", help="e.g. ex02-autoencoder")
    p.add_argument("--course", default=".", help="the course folder with nbgrader_config.py (default: here)")
    p.add_argument("--timeout", type=int, default=120,
                   help="seconds a cell may run before nbgrader interrupts it (default: %(default)s)")
    p.add_argument("--sandbox", choices=["auto", "bwrap", "none"], default="auto",
                   help="run each student's kernel in a bubblewrap sandbox (own folder only, no course folder, no "
                   "network): 'auto' where bwrap runs, else grade without isolation after a warning; 'bwrap' "
                   "refuse to grade without it; 'none' skip it (default: %(default)s)")
    p.add_argument("--csv", default=None, metavar="PATH",
                   help="also write one row per student and task: points, status, the failed check's message")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="also write everything as JSON: per student, notebook and task")
    p.set_defaults(func=cmd_grade)
    return parser


def main(argv: list[str] | None = None) -> int:
    import warnings

    args = build_parser().parse_args(argv)
    if getattr(args, "fast", False):
        os.environ[FAST_ENV] = "1"
    if args.command in ("sample", "data") and args.n < 1:
        print(f"minildm: error: -n is the number of images to draw, at least 1, got {args.n}", file=sys.stderr)
        return 2
    format_warning = warnings.formatwarning  # minildm's own warnings read as one line, not Python's source line

    def one_line(message, category, filename, *rest, **kw):
        if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
            return f"minildm: warning: {message}\n"
        return format_warning(message, category, filename, *rest, **kw)

    warnings.formatwarning = one_line
    try:
        return args.func(args)
    except KeyboardInterrupt:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one line, not one per process
            print("\nminildm: interrupted", file=sys.stderr)
        return 130
    except (ValueError, FileNotFoundError, RuntimeError) as e:
        if os.environ.get("MINILDM_DEBUG"):
            raise
        print(f"minildm: error: {e}", file=sys.stderr)
        return 2
    finally:
        warnings.formatwarning = format_warning


if __name__ == "__main__":
    sys.exit(main())
