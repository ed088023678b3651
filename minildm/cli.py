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

    if args.eval_n is None:
        args.eval_n = 32 if rt.fast else 512
    # Stage 2: the autoencoder.
    recipe = autoencoder_recipe(regularizer=args.regularizer, f=args.f, fast=rt.fast)
    if args.steps is not None:
        recipe.train.steps = args.steps
    if args.gan:
        recipe.loss = dataclasses.replace(recipe.loss, disc_weight=0.5)
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
    ldm = diffusion_recipe("latent", fast=rt.fast, latent_shape=shape)
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
    print(f"wrote {grid}; {time.perf_counter() - start:.0f} s of training and sampling")
    result = evaluate_run(out, rt, n=args.eval_n, guidance_scales=(args.guidance,))
    print(format_evaluation(result))
    print(f"wrote {out / 'evaluation.json'}; {time.perf_counter() - start:.0f} s in all")
    return 0


def load_run(folder: Path, device):
    """(autoencoder, denoiser, schedule, DiffusionConfig) of a `minildm train` folder, or a clear error."""
    from minildm.pipeline import load_autoencoder, load_diffusion

    ae_ckpts = sorted(folder.glob("autoencoder_*.pt"))
    if not ae_ckpts or not (folder / "diffusion_latent.pt").exists():
        raise FileNotFoundError(f"no trained pipeline in '{folder}': expected autoencoder_*.pt and "
                                f"diffusion_latent.pt there; run `minildm train --out {folder}` first")
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


def format_evaluation(result: dict) -> str:
    """The evaluation as a text table; every line names its number of samples and guidance scale."""
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
    return "\n".join(lines)


def cmd_evaluate(args) -> int:
    from minildm.device import setup

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    result = evaluate_run(Path(args.run), rt, n=args.n, guidance_scales=tuple(args.guidance), judge_path=args.judge,
                          json_path=Path(args.json) if args.json else None, sampler=args.sampler, steps=args.steps)
    print(format_evaluation(result))
    print(f"wrote {args.json or Path(args.run) / 'evaluation.json'}")
    return 0


def cmd_sample(args) -> int:
    from minildm.device import setup
    from minildm.pipeline import generate
    from minildm.viz import save_grid

    rt = setup(seed=args.seed, device=args.device, fast=True if args.fast else None)
    autoencoder, denoiser, schedule, diffusion_cfg = load_run(Path(args.run), rt.device)
    captions = [c for c in args.caption for _ in range(args.n)]
    images = generate(denoiser, captions, schedule, autoencoder.cfg.latent_shape, rt,
                      prediction=diffusion_cfg.prediction, guidance_scale=args.guidance, autoencoder=autoencoder,
                      seed=args.seed, progress=True, sampler=args.sampler, steps=args.steps)
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
    p.add_argument("--gan", action="store_true",
                   help="add the PatchGAN term to the autoencoder's loss (off by default: on Shapes it costs fidelity)")
    p.add_argument("--eval-n", type=int, default=None,
                   help="held-out captions sampled for the final evaluation (default: 512, 32 in fast mode)")
    p.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the samples and the evaluation")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("evaluate", help="score a trained pipeline: PSNR, caption accuracy, FD and KID",
                       description="Evaluate the pipeline `minildm train` wrote in RUN: held-out reconstruction PSNR "
                       "and how often the Shapes judge (a classifier the course trains; trained once per image size "
                       "when missing) reads the captioned objects in reconstructions and in samples for held-out "
                       "captions, per guidance scale, with FD and KID on the judge's features. Prints a table and "
                       "writes JSON.")
    _add_common(p)
    p.add_argument("run", help="folder written by `minildm train` (e.g. runs/default)")
    p.add_argument("-n", type=int, default=512, help="held-out captions (one sample each) and images (default: 512)")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 5.0],
                   help="classifier-free guidance scales to evaluate (default: 1 3 5)")
    p.add_argument("--judge", default=None, help="a judge checkpoint to use instead of the cached one")
    p.add_argument("--json", default=None, help="where to write the results (default: RUN/evaluation.json)")
    _add_sampler(p)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("sample", help="sample images for your own captions from a trained pipeline",
                       description="Load the checkpoints `minildm train` wrote and sample images for captions.")
    _add_common(p)
    p.add_argument("caption", nargs="+", help='one or more captions, e.g. "a big red circle at the center"')
    p.add_argument("--run", default="runs/default", help="folder written by `minildm train` (default: %(default)s)")
    p.add_argument("-n", type=int, default=4, help="samples per caption")
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--out", default="runs/samples.png")
    _add_sampler(p)
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
