"""The LDM paper's two central claims, measured small on Shapes (stage 11): by quality, not only by speed.

    python benchmarks/claims.py latent-vs-pixel --out runs/claims     # (a) about 9 min on one H200, see below
    python benchmarks/claims.py latent-vs-pixel --spaces pixel         #     or one space per invocation (~5 min each)
    python benchmarks/claims.py f-study --out runs/claims              # (b) about 8 min; --f 1 2 / --f 4 8: ~4 each
    python benchmarks/claims.py plot --out runs/claims                 # tables and PNGs again from the JSON
    python benchmarks/claims.py latent-vs-pixel --fast                 # tiny configs on a CPU, well under a minute

(a) **Latent vs pixel at equal wall time, by quality** (LDM Sec. 4.1, Fig. 6's message): the same UNet recipe
    trained in pixel space (3x64x64, batch 32) and on the 4x16x16 latents of the f=4 KL autoencoder (batch 256), each
    for up to the largest budget, evaluated along the way at the --curve points (seconds of training): caption
    accuracy read by the Shapes judge and FD / real-data floor on the judge's features (`evaluate_text_to_image`: n
    held-out captions, guidance 3, DPM-Solver++(2M) 20 steps). The result also holds the wall time at which each
    model first reaches the pixel model's final caption accuracy (the first curve point at or above it, and a linear
    interpolation between the two points around it). The latent model's seconds do not count training the
    autoencoder (reused from checkpoints/<mode>/autoencoder_kl_f4.pt, trained there if missing: 2 min): as in the paper,
    one first stage serves every diffusion model trained on it.
(b) **The downsampling-factor study** (LDM Sec. 4.1, Fig. 6 in small): KL autoencoders with f = 1, 2, 4, 8 on Shapes
    64 px, each trained for the same --ae-seconds (into --out, reused from there), then the same latent-diffusion
    recipe on each one's latents for the same --curve budgets, evaluated as in (a). The batch size follows the
    latent size so that every run fits about the same GPU memory (f=1: 32, like pixel space; f=2: 128; f=4, 8: 256).

Each part writes claims_<part>.json (merged with an earlier invocation's spaces or factors, so the parts can run in
separate commands) and claims_<part>.png, and prints a table. Every run trains from scratch (its diffusion
checkpoints in --out are deleted first). The judge is checkpoints/<mode>/judge_64.pt (trained there if missing: 80
s). GPU time on one H200 (estimated from the recipes' measured speeds, not yet run): (a) 2 x 240 s of training
plus 10 evaluations, about 9 min with the autoencoder and judge present; (b) 4 x 30 s of autoencoders, 4 x 80 s of
diffusion, 12 evaluations: about 8 min. Keep each command under the device's 10 minutes by splitting as shown.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch

from minildm.config import autoencoder_recipe, checkpoint_dir, diffusion_recipe
from minildm.device import setup
from minildm.judge import judge_for
from minildm.pipeline import evaluate_text_to_image, train_autoencoder, train_diffusion

GUIDANCE = 3.0
F_BATCH = {1: 32, 2: 128, 4: 256, 8: 256}  # (b): latent diffusion batch per f (about equal GPU memory)


def first_reach(points: list[dict], target: float, key: str = "caption") -> dict:
    """When a learning curve first reaches `target`: points are {"seconds", key} in training order.
    Returns {"first_point_s": seconds of the first point with key >= target (None if none),
    "interpolated_s": the linear interpolation between that point and the one before it (the first point's own
    seconds when it is the first point)}."""
    for i, p in enumerate(points):
        if p[key] >= target:
            if i == 0:
                return {"first_point_s": p["seconds"], "interpolated_s": p["seconds"]}
            q = points[i - 1]
            share = (target - q[key]) / (p[key] - q[key]) if p[key] > q[key] else 1.0
            return {"first_point_s": p["seconds"],
                    "interpolated_s": q["seconds"] + share * (p["seconds"] - q["seconds"])}
    return {"first_point_s": None, "interpolated_s": None}


def learning_curve(recipe, rt, ckpt: Path, judge, autoencoder, curve: list[float], n: int, steps: int,
                   label: str) -> list[dict]:
    """Train from scratch to each budget of `curve` in turn (resuming the same checkpoint) and evaluate there."""
    ckpt.unlink(missing_ok=True)
    recipe.train.steps = 10**6  # seconds end every run, not the recipe's step count
    shape = (recipe.unet.in_channels, recipe.unet.image_size, recipe.unet.image_size)
    points = []
    for budget in sorted(curve):
        recipe.train.max_seconds = budget
        denoiser, schedule, history = train_diffusion(recipe, rt, ckpt, autoencoder=autoencoder, progress=False)
        if points and history[-1]["step"] == points[-1]["steps"]:  # the last run overshot this budget already
            continue
        start = time.perf_counter()
        scores = evaluate_text_to_image(denoiser, schedule, shape, rt, judge, autoencoder, n=n,
                                        guidance_scales=(GUIDANCE,), prediction=recipe.diffusion.prediction,
                                        sampler="dpmpp_2m", steps=steps)
        s = scores["by_guidance"][GUIDANCE]
        point = {"budget_s": budget, "seconds": history[-1]["seconds"], "steps": history[-1]["step"],
                 "images_per_s": history[-1]["step"] * recipe.train.batch_size / max(history[-1]["seconds"], 1e-9),
                 "caption": s["caption"], "object": s["object"], "fd": s["fd"], "fd_floor": scores["fd_real_floor"],
                 "fd_ratio": s["fd_ratio"], "eval_seconds": time.perf_counter() - start}
        points.append(point)
        print(f"  {label:10} {point['seconds']:6.0f} s, {point['steps']:5d} steps: captions {point['caption']:6.1%}, "
              f"objects {point['object']:6.1%}, FD/floor {point['fd_ratio']:6.2f} (eval {point['eval_seconds']:.0f} s)",
              flush=True)
    return points


def merged(path: Path, key: str, new: dict, info: dict) -> dict:
    """The part's JSON with `new` entries under `key` merged over an earlier invocation's."""
    result = json.loads(path.read_text()) if path.exists() else {}
    result.update(info)
    result.setdefault(key, {}).update(new)
    path.write_text(json.dumps(result, indent=1))
    return result


def common_info(rt, args) -> dict:
    return {"device": rt.describe(), "gpu": rt.device_name(), "n": args.n, "guidance": GUIDANCE, "sampler": f"dpmpp_2m, {args.steps} steps",
            "feature_network": "the Shapes judge (not Inception)", "curve_s": sorted(args.curve)}


# ---------------------------------------------------------------------------------------------- (a)


def cmd_latent_vs_pixel(args, rt) -> dict:
    judge = judge_for(64 if not rt.fast else 32, rt, checkpoint_dir(rt.fast), progress=False)
    autoencoder = None
    runs = {}
    for space in args.spaces:
        recipe = diffusion_recipe(space, fast=rt.fast)
        if space == "latent":
            ae_path = checkpoint_dir(rt.fast) / "autoencoder_kl_f4.pt"
            autoencoder, _ = train_autoencoder(autoencoder_recipe("kl", 4, fast=rt.fast), rt, ae_path, progress=False)
            autoencoder.requires_grad_(False)
            recipe = diffusion_recipe("latent", fast=rt.fast, latent_shape=autoencoder.cfg.latent_shape)
        print(f"{space}: batch {recipe.train.batch_size}, curve {sorted(args.curve)} s", flush=True)
        runs[space] = {"batch": recipe.train.batch_size,
                       "curve": learning_curve(recipe, rt, args.out / f"claims_{space}.pt", judge,
                                               autoencoder if space == "latent" else None, args.curve, args.n,
                                               args.steps, space)}
    result = merged(args.out / "claims_latent_vs_pixel.json", "spaces", runs, common_info(rt, args))
    return finish_latent_vs_pixel(result, args.out)


def finish_latent_vs_pixel(result: dict, out: Path) -> dict:
    spaces = result["spaces"]
    if "pixel" in spaces:
        target = spaces["pixel"]["curve"][-1]["caption"]
        result["target_caption"] = target
        result["reach"] = {space: first_reach(run["curve"], target) for space, run in spaces.items()}
        pixel_s, latent = result["reach"]["pixel"]["interpolated_s"], result["reach"].get("latent", {})
        if latent.get("interpolated_s") is not None and pixel_s:
            result["latent_over_pixel_time"] = latent["interpolated_s"] / pixel_s
    (out / "claims_latent_vs_pixel.json").write_text(json.dumps(result, indent=1))
    print(table_latent_vs_pixel(result))
    plot(result, "spaces", out / "claims_latent_vs_pixel.png", "latent (f=4) vs pixel diffusion at equal training time")
    return result


def table_latent_vs_pixel(result: dict) -> str:
    lines = [f"{result['device']}",
             (f"caption accuracy (judge) and FD / floor (FD on {result['feature_network']}), n = {result['n']} "
              f"held-out captions, guidance {result['guidance']:g}, {result['sampler']}"),
             "| space | batch | training s | steps | captions right | objects right | FD / floor |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for space, run in result["spaces"].items():
        for p in run["curve"]:
            lines.append(f"| {space} | {run['batch']} | {p['seconds']:.0f} | {p['steps']} | {p['caption']:.1%} | "
                         f"{p['object']:.1%} | {p['fd_ratio']:.2f} |")
    if "reach" in result:
        lines.append(f"pixel model's final caption accuracy: {result['target_caption']:.1%}; first reached at")
        for space, r in result["reach"].items():
            when = ("never within the curve" if r["first_point_s"] is None else
                    f"the {r['first_point_s']:.0f}-s point (interpolated {r['interpolated_s']:.0f} s)")
            lines.append(f"  {space}: {when}")
        if "latent_over_pixel_time" in result:
            lines.append(f"  latent / pixel time to get there: {result['latent_over_pixel_time']:.2f} "
                         "(the issue's goal: at most 0.25)")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- (b)


def cmd_f_study(args, rt) -> dict:
    judge = judge_for(64 if not rt.fast else 32, rt, checkpoint_dir(rt.fast), progress=False)
    runs = {}
    for f in args.f:
        ae_recipe = autoencoder_recipe("kl", f, fast=rt.fast)
        if not rt.fast:
            ae_recipe.train.max_seconds, ae_recipe.train.steps = args.ae_seconds, 10**6
        else:  # a few steps: fast mode only shows that the code runs
            ae_recipe.train.steps = 8
        ae_path = args.out / f"claims_ae_f{f}.pt"
        autoencoder, ae_history = train_autoencoder(ae_recipe, rt, ae_path, progress=False)
        autoencoder.requires_grad_(False)
        recipe = diffusion_recipe("latent", fast=rt.fast, latent_shape=autoencoder.cfg.latent_shape)
        if not rt.fast:
            recipe.train.batch_size = F_BATCH[f]
        shape = autoencoder.cfg.latent_shape
        print(f"f={f}: latents {'x'.join(map(str, shape))}, autoencoder {ae_history[-1]['seconds']:.0f} s, diffusion "
              f"batch {recipe.train.batch_size}, curve {sorted(args.curve)} s", flush=True)
        runs[str(f)] = {"batch": recipe.train.batch_size, "latent_shape": list(shape),
                        "autoencoder_seconds": ae_history[-1]["seconds"],
                        "curve": learning_curve(recipe, rt, args.out / f"claims_ldm_f{f}.pt", judge, autoencoder,
                                                args.curve, args.n, args.steps, f"f={f}")}
    result = merged(args.out / "claims_f_study.json", "factors", runs, common_info(rt, args))
    return finish_f_study(result, args.out)


def finish_f_study(result: dict, out: Path) -> dict:
    result["factors"] = dict(sorted(result["factors"].items(), key=lambda kv: int(kv[0])))
    (out / "claims_f_study.json").write_text(json.dumps(result, indent=1))
    print(table_f_study(result))
    plot(result, "factors", out / "claims_f_study.png", "latent diffusion with f = 1, 2, 4, 8 (LDM Fig. 6, small)")
    return result


def table_f_study(result: dict) -> str:
    curve = result["curve_s"]
    lines = [f"{result['device']}",
             (f"caption accuracy (judge) / FD / floor (FD on {result['feature_network']}) after each training "
              f"budget; n = {result['n']}, guidance {result['guidance']:g}, {result['sampler']}"),
             "| f | latents | batch | " + " | ".join(f"{b:g} s" for b in curve) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in curve) + " |"]
    for f, run in result["factors"].items():
        at = {p["budget_s"]: p for p in run["curve"]}  # a budget the run had passed already has no point of its own
        cells = [f"{at[b]['caption']:.1%} / {at[b]['fd_ratio']:.2f}" if b in at else "-" for b in curve]
        lines.append(f"| {f} | {'x'.join(map(str, run['latent_shape']))} | {run['batch']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- plots


def plot(result: dict, key: str, path: Path, title: str) -> Path:
    """Caption accuracy and FD / floor against seconds of training, one line per space or factor, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    from minildm.viz import quality_over_time, save_figure

    save_figure(quality_over_time(result, key, title), path)
    print(f"wrote {path}")
    return path


def cmd_plot(args, rt=None) -> None:
    done = False
    for name, finish in (("latent_vs_pixel", finish_latent_vs_pixel), ("f_study", finish_f_study)):
        path = args.out / f"claims_{name}.json"
        if path.exists():
            finish(json.loads(path.read_text()), args.out)
            done = True
    if not done:
        raise SystemExit(f"no claims_*.json in {args.out}: run the latent-vs-pixel or f-study part first")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="part", required=True)
    a = sub.add_parser("latent-vs-pixel", help="(a): latent (f=4) vs pixel diffusion by quality at equal time")
    a.add_argument("--spaces", nargs="+", choices=["pixel", "latent"], default=["pixel", "latent"])
    a.add_argument("--curve", type=float, nargs="+", default=None,
                   help="seconds of training at which to evaluate (default 15 30 60 120 240; fast: 1 2)")
    b = sub.add_parser("f-study", help="(b): latent diffusion with f = 1, 2, 4, 8 at the same budget")
    b.add_argument("--f", type=int, nargs="+", choices=[1, 2, 4, 8], default=[1, 2, 4, 8])
    b.add_argument("--curve", type=float, nargs="+", default=None,
                   help="seconds of training at which to evaluate (default 20 40 80; fast: 1 2)")
    b.add_argument("--ae-seconds", type=float, default=30, help="training seconds of each autoencoder (default 30)")
    p = sub.add_parser("plot", help="tables and PNGs again from the JSON files in --out")
    for s in (a, b, p):
        s.add_argument("--out", type=Path, default=Path("runs/claims"))
        s.add_argument("--fast", action="store_true", help="tiny configs on a CPU (same as MINILDM_FAST=1)")
    for s in (a, b):
        s.add_argument("-n", type=int, default=None, help="held-out captions per evaluation (default 256; fast: 8)")
        s.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps per sample (default 20)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "plot":
        return cmd_plot(args)
    rt = setup(seed=0, fast=True if args.fast else None)
    if args.n is None:
        args.n = 8 if rt.fast else 256
    if args.curve is None:
        args.curve = [1, 2] if rt.fast else ([15, 30, 60, 120, 240] if args.part == "latent-vs-pixel" else [20, 40, 80])
    if any(not math.isfinite(c) or c <= 0 for c in args.curve):
        raise SystemExit(f"--curve takes positive seconds of training, got {args.curve}")
    if rt.fast:
        args.steps = min(args.steps, 5)
    start = time.perf_counter()
    (cmd_latent_vs_pixel if args.part == "latent-vs-pixel" else cmd_f_study)(args, rt)
    if rt.device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    print(f"{time.perf_counter() - start:.0f} s in all", flush=True)


if __name__ == "__main__":
    main()
