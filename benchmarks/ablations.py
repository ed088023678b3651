"""Ablations behind the recipe: which first-stage loss terms and which conditioning changes earn their place.

Each variant is one process (run several side by side on one big GPU), trained from scratch and measured with the
Shapes judge (stage 7). Results are JSON lines in --out, one file per variant:

    python benchmarks/ablations.py judge --out runs/abl
    python benchmarks/ablations.py autoencoder --variant no_gan --out runs/abl
    python benchmarks/ablations.py diffusion --variant mask --ae runs/abl/ae_no_gan.pt --out runs/abl

Variants run side by side share the GPU, so their wall time is not their solo speed: they are compared by what
they reach in the same budget, not with the solo recipe's numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time
from pathlib import Path

import torch

from minildm.config import autoencoder_recipe, diffusion_recipe, judge_recipe
from minildm.device import setup
from minildm.judge import load_judge, train_judge
from minildm.pipeline import (
    evaluate_autoencoder,
    evaluate_text_to_image,
    held_out_batch,
    load_autoencoder,
    train_autoencoder,
    train_diffusion,
)

AE_VARIANTS = {  # name -> changes to the default AutoencoderLossConfig
    "default": {},
    "no_gan": {"disc_weight": 0.0},
    "old_gan": {"disc_betas": (0.9, 0.999), "disc_ramp": 1, "max_adaptive_weight": 1e4, "disc_fp32": False},
}
DIFFUSION_VARIANTS = {  # name -> (TextConfig changes, UNetConfig changes, TrainConfig changes) to the recipe
    "old": ({"mask_padding": False}, {"position_embedding": False}, {}),
    "mask": ({}, {"position_embedding": False}, {}),
    "mask_attn0": ({}, {"attention_levels": (0, 1, 2), "position_embedding": False}, {}),
    "mask_attn0_deep_text": ({"depth": 4}, {"attention_levels": (0, 1, 2), "position_embedding": False}, {}),
    "mask_attn0_lr": ({}, {"attention_levels": (0, 1, 2), "position_embedding": False}, {"lr": 5e-4}),
    "mask_unit_token_init": ({}, {"position_embedding": False}, {}),  # token embeddings drawn from N(0, 1)
    "posemb": ({}, {}, {}),  # the recipe since ablation 4
    "posemb_lr": ({}, {}, {"lr": 5e-4}),
    "posemb_attn0": ({}, {"attention_levels": (0, 1, 2)}, {}),
    "posemb_deep_text": ({"depth": 4}, {}, {}),
}


def image_size(rt) -> int:
    return autoencoder_recipe(fast=rt.fast).data.image_size


def write(out: Path, name: str, result: dict) -> None:
    """One JSON line per variant, appended to results.jsonl in $ABLATION_RESULTS (default: out)."""
    folder = Path(os.environ.get("ABLATION_RESULTS", out))
    folder.mkdir(parents=True, exist_ok=True)
    line = json.dumps({"name": name, **result}, default=str)
    with open(folder / "results.jsonl", "a") as f:
        f.write(line + "\n")
    print(line[:3000], flush=True)


def cmd_judge(args) -> None:
    rt = setup()
    size = image_size(rt)
    cfg, train_cfg = judge_recipe(size, fast=rt.fast)
    if args.seconds:
        train_cfg.max_seconds = args.seconds
    start = time.perf_counter()
    judge = train_judge(cfg, train_cfg, rt, args.out / f"judge_{size}.pt", progress=False).to(rt.device)
    seconds = time.perf_counter() - start
    from minildm.judge import caption_accuracy, soften
    real = held_out_batch(2048, size, rt.device)
    result = {"train_seconds": seconds, "on_real": caption_accuracy(judge.read(real["image"]), real["attributes"])}
    g = torch.Generator(device=rt.device).manual_seed(1)
    for sigma in (0.5, 1.0):
        soft = soften(real["image"], sigma, 0.0, g)
        result[f"on_blur_{sigma}"] = caption_accuracy(judge.read(soft), real["attributes"])
    write(args.out, "judge", result)


def cmd_autoencoder(args) -> None:
    rt = setup()
    recipe = autoencoder_recipe(regularizer=args.regularizer, f=args.f, fast=rt.fast)
    recipe.loss = dataclasses.replace(recipe.loss, **AE_VARIANTS[args.variant])
    if args.disc_start is not None:
        recipe.loss = dataclasses.replace(recipe.loss, disc_start=args.disc_start)
    if args.seconds:
        recipe.train.max_seconds = args.seconds
    start = time.perf_counter()
    name = f"ae_{args.variant}" + ("" if (args.regularizer, args.f) == ("kl", 4) else f"_{args.regularizer}_f{args.f}")
    autoencoder, history = train_autoencoder(recipe, rt, args.out / f"{name}.pt", progress=False)
    seconds = time.perf_counter() - start
    judge = load_judge(args.out / f"judge_{image_size(rt)}.pt", rt.device)
    result = {"variant": args.variant, "regularizer": args.regularizer, "f": args.f,
              "loss": dataclasses.asdict(recipe.loss), "seconds": seconds,
              "steps": history[-1]["step"], "history": history[::10],
              **evaluate_autoencoder(autoencoder, judge, rt, n=512)}
    write(args.out, name, result)


def cmd_diffusion(args) -> None:
    rt = setup()
    autoencoder = load_autoencoder(args.ae, device=rt.device).requires_grad_(False)
    shape = autoencoder.cfg.latent_shape
    text, unet, train = DIFFUSION_VARIANTS[args.variant]
    if args.variant == "mask_unit_token_init":  # the encoder as it was before its embeddings shared one scale
        from torch import nn

        from minildm import text as text_module
        original_init = text_module.TextEncoder.__init__

        def unit_token_init(self, *a, **kw):
            original_init(self, *a, **kw)
            nn.init.normal_(self.token_emb.weight, std=1.0)

        text_module.TextEncoder.__init__ = unit_token_init
    recipe = diffusion_recipe("latent", fast=rt.fast, latent_shape=shape)
    recipe.text = dataclasses.replace(recipe.text, **text)
    recipe.unet = dataclasses.replace(recipe.unet, **unet)
    recipe.train = dataclasses.replace(recipe.train, **train)
    budgets = args.curve or [args.seconds or recipe.train.max_seconds]
    judge = None
    kwargs = {"n": args.n, "guidance_scales": tuple(args.guidance), "prediction": recipe.diffusion.prediction,
              "sampler": args.sampler, "steps": args.steps}
    start = time.perf_counter()
    if not rt.fast:  # the budgets are seconds of training; the recipe's step count must not end a run first
        recipe.train.steps = 10**6
    for budget in budgets:  # a learning curve: train to each budget in turn (resuming), evaluate at each
        recipe.train.max_seconds = budget
        denoiser, schedule, history = train_diffusion(recipe, rt, args.out / f"ldm_{args.variant}.pt", autoencoder,
                                                      progress=False)
        seconds = time.perf_counter() - start
        judge = judge or load_judge(args.out / f"judge_{image_size(rt)}.pt", rt.device)
        try:
            scores = evaluate_text_to_image(denoiser, schedule, shape, rt, judge, autoencoder, **kwargs)
        except RuntimeError as e:  # keep the run's numbers if graph capture fails; the error is printed
            print(f"CUDA-graph sampling failed ({e}); sampling eagerly", flush=True)
            scores = evaluate_text_to_image(denoiser, schedule, shape, rt, judge, autoencoder, cuda_graph=False,
                                            **kwargs)
        scores.pop("captions"), scores.pop("attributes")
        write(args.out, f"ldm_{args.variant}", {"variant": args.variant, "train_budget_s": budget,
                                                "seconds": seconds, "train_steps": history[-1]["step"],
                                                "loss": history[-1]["loss"], "sampler": args.sampler,
                                                "sampler_steps": args.steps, **scores})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    p = sub.add_parser("judge")
    p.set_defaults(func=cmd_judge)
    p = sub.add_parser("autoencoder")
    p.add_argument("--variant", choices=sorted(AE_VARIANTS), required=True)
    p.add_argument("--disc-start", type=int, default=None)
    p.add_argument("--regularizer", choices=["kl", "vq"], default="kl")
    p.add_argument("--f", type=int, default=4, help="downsampling factor")
    p.set_defaults(func=cmd_autoencoder)
    p = sub.add_parser("diffusion")
    p.add_argument("--variant", choices=sorted(DIFFUSION_VARIANTS), required=True)
    p.add_argument("--ae", type=Path, required=True)
    p.add_argument("-n", type=int, default=256)
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 6.0])
    p.add_argument("--sampler", default="ddpm")
    p.add_argument("--steps", type=int, default=None, help="sampler steps (default: the sampler's)")
    p.add_argument("--curve", type=float, nargs="+", default=None,
                   help="training budgets in seconds: train to each in turn and evaluate at each")
    p.set_defaults(func=cmd_diffusion)
    for p in sub.choices.values():
        p.add_argument("--out", type=Path, default=Path("runs/ablations"))
        p.add_argument("--seconds", type=float, default=None, help="training budget (default: the recipe's)")
    args = parser.parse_args()
    args.func(args)


if __name__ == "__main__":
    main()
