"""The LDM paper's two central claims, measured small on Shapes (stage 11): by quality, not only by speed.

    python benchmarks/claims.py latent-vs-pixel --spaces pixel --out runs/claims    # (a) 18 min on one H200 (in
    python benchmarks/claims.py latent-vs-pixel --spaces latent --out runs/claims   #     two, see --resume), 6.5 min
    python benchmarks/claims.py f-study --f 1 --out runs/claims                     # (b) about 4.7 min per f
    python benchmarks/claims.py f-study --f 2 --out runs/claims                     #     (benchmarks/run_claims.sh
    ...                                                                             #     runs them one by one)
    python benchmarks/claims.py plot --out runs/claims                 # tables and PNGs again from the JSON
    python benchmarks/claims.py latent-vs-pixel --fast                 # tiny configs on a CPU, well under a minute

(a) **Latent vs pixel at equal wall time, by quality** (LDM Sec. 4.1, Fig. 6's message): the same UNet recipe
    trained in pixel space (3x64x64, batch 32) and on the 4x16x16 latents of the f=4 KL autoencoder (batch 256), each
    for up to its largest budget, evaluated along the way at the --curve points (seconds of training; by default the
    latent model to 240 s and the pixel model, which follows hardly any caption before about 500 s, to 960 s): caption
    accuracy read by the Shapes judge and FD / real-data floor on the judge's features (`evaluate_text_to_image`: n
    held-out captions, guidance 3, DPM-Solver++(2M) 20 steps). The result also holds the wall time at which each
    model first reaches the pixel model's final caption accuracy, object accuracy and FD / floor (the first curve
    point at or past it, and a linear interpolation between the two points around it). The latent model's seconds do
    not count training the autoencoder (reused from checkpoints/<mode>/autoencoder_kl_f4.pt, trained there if
    missing: 2 min, its reconstructions measured as in (b)): as in the paper,
    one first stage serves every diffusion model trained on it.
(b) **The downsampling-factor study** (LDM Sec. 4.1, Fig. 6 in small): KL autoencoders with f = 1, 2, 4, 8 on Shapes
    64 px, each trained for the same --ae-seconds (default 120, the f=4 recipe's budget; into --out, reused from
    there), then the same latent-diffusion recipe on each one's latents for the same --curve budgets, evaluated as in
    (a). The batch size follows the latent size so that every run fits about the same GPU memory (f=1: 32, like pixel
    space; f=2: 128; f=4, 8: 256). Each first stage is measured before diffusion trains on it (PSNR of its
    reconstructions of n held-out images, and the judge's object accuracy on them): it caps what the samples can
    show. The first stages need their time: on one H200, f=8 after 30 s (400 steps) reconstructed at 21.0 dB with 0%
    of objects right, after 60 s 24.9 dB and 15%; f=4 after 30 s 32.5 dB and 78.5% (session 14).

Each part writes claims_<part>.json (merged with an earlier invocation's spaces or factors, so the parts can run in
separate commands) and claims_<part>.png, and prints a table. Every run trains from scratch (its diffusion
checkpoints in --out are deleted first), unless --resume: then a space or factor the JSON already has goes on from
its checkpoint in --out (left there by an earlier command on the same machine) to the --curve budgets past its last
point, so a curve longer than one device call (10 minutes) is measured in several, e.g. the pixel model's default
curve: `--spaces pixel --curve 15 30 60 120 240 480`, then the same with `--curve 960 --resume`.
The judge is checkpoints/<mode>/judge_64.pt (trained there if missing: 80 s). GPU time on one H200 per invocation as
the script counts it (the whole command about 12 s more). Session 14: `--spaces latent` 386 s with the f=4
autoencoder's 120 s; `--spaces pixel` to 240 s 383 s with the judge's 80 s (5 evaluations, a checkpoint loaded and
saved at each budget). Session 15, on one GPU of a two-H200 machine: the pixel curve to 480 s 564 s (the judge
already there), then on to 960 s with --resume 495 s, so the default pixel curve takes about 18 minutes; one f of (b)
with the defaults 264-285 s (120 s + 120 s of training, 3 evaluations: two factors fit one call). Where a command
may run only 10 minutes, split as shown, into one --out (each part's JSON is written after every evaluation and merged
with the earlier ones; parts measured with another n, sampler, guidance, feature network, GPU model, first-stage
seconds or mode are refused before anything trains).
Training seconds count drawing and encoding the data, not evaluations or checkpoint saves (none inside the clock);
the budget is checked every 10 steps. Every model trains eagerly (no torch.compile: each budget resumes in a new
Trainer, which would compile again, about 30 s a time). The eager latent step at batch 256 is launch-bound on a big
GPU (docs/measured.md, "Training speed": CUDA graphs make it 2.2x faster) while the pixel step is closer to
GPU-bound, so the latent model's lead measured here is if anything smaller than with both compiled. The pixel
model's final accuracy is a target only when at least 10 of the n captions (of the objects scored) reach it, and
gives a ratio only when the pixel curve finished and first reaches it after its first point; every model starts
from the same seed, run alone or after another part.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from minildm.checkpoint import load_checkpoint
from minildm.config import autoencoder_recipe, checkpoint_dir, diffusion_recipe
from minildm.device import setup
from minildm.judge import judge_for
from minildm.pipeline import evaluate_autoencoder, evaluate_text_to_image, train_autoencoder, train_diffusion

GUIDANCE = 3.0
LOWER_IS_BETTER = {"fd_ratio"}  # the quality measures of a curve point where a smaller value is better
MIN_RIGHT = 10  # an accuracy the pixel model reaches for fewer captions (objects) than this is noise, not a level
F_BATCH = {1: 32, 2: 128, 4: 256, 8: 256}  # (b): latent diffusion batch per f (about equal GPU memory)
# what every part of one result shares: equal wall time means nothing across GPU models
SAME_SETTINGS = ("n", "guidance", "sampler", "feature_network", "fast", "gpu", "ae_seconds")
# seconds of training at which each run is evaluated, without --curve (fast mode: 1, 2). The pixel model goes on to
# 960 s: until about 500 s it follows hardly any caption (session 15), and its final accuracy must be a level the
# latent model can be timed to. Its first five points are the latent model's, so the two compare at equal seconds.
DEFAULT_CURVES = {"pixel": [15, 30, 60, 120, 240, 480, 960], "latent": [15, 30, 60, 120, 240], "f-study": [30, 60, 120]}


def curve_for(args, run: str, fast: bool) -> list[float]:
    """The budgets of one run ("pixel", "latent" or "f-study"): --curve where given, else the defaults."""
    curve = args.curve if args.curve is not None else [1, 2] if fast else DEFAULT_CURVES[run]
    return sorted(float(b) for b in curve)


def first_reach(points: list[dict], target: float, key: str = "caption") -> dict:
    """When a learning curve first reaches `target`: points are {"seconds", key} in training order.
    Returns {"first_point_s": seconds of the first point with key >= target (None if none),
    "interpolated_s": the linear interpolation between that point and the one before it,
    "at_first_point": True when the first point is already there (then both are its seconds, an upper bound)}.
    For "fd_ratio", where lower is better, the first point at or below the target."""
    sign = -1 if key in LOWER_IS_BETTER else 1  # compare -FD with -target: "reaches" means "falls to"
    for i, p in enumerate(points):
        if sign * p[key] >= sign * target:
            if i == 0:  # reached by the first evaluation already: its seconds are an upper bound
                return {"first_point_s": p["seconds"], "interpolated_s": p["seconds"], "at_first_point": True}
            q = points[i - 1]
            share = (target - q[key]) / (p[key] - q[key])  # q lies short of the target, p at or past it: p != q
            return {"first_point_s": p["seconds"], "at_first_point": False,
                    "interpolated_s": q["seconds"] + share * (p["seconds"] - q["seconds"])}
    return {"first_point_s": None, "interpolated_s": None, "at_first_point": False}


def learning_curve(recipe, rt, ckpt: Path, judge, autoencoder, curve: list[float], n: int, steps: int,
                   label: str, on_point=None, earlier: list[dict] | None = None) -> list[dict]:
    """Train to each budget of `curve` in turn (resuming the same checkpoint) and evaluate there; `on_point(points)`
    after every evaluation (to save them: a run cut short keeps what it measured). From scratch, unless `earlier`
    holds the points of an earlier command on the same checkpoint (--resume): then training goes on from it, and only
    the budgets past its last point are trained and evaluated."""
    points = list(earlier or [])
    todo = [b for b in sorted(curve) if not points or b > points[-1]["budget_s"]]
    if not points:
        ckpt.unlink(missing_ok=True)
        torch.manual_seed(0)  # the same initial weights whether this runs alone or after other parts in one process
    elif not todo:
        print(f"  {label}: nothing to train, its curve reaches {points[-1]['budget_s']:g} s already", flush=True)
    else:
        check_resumable(ckpt, points[-1], label)
    recipe.train.steps = 10**6  # seconds end every run, not the recipe's step count
    recipe.train.log_every = 10  # the budget is checked at log lines: overshoot at most 10 steps (< 2 s)
    recipe.train.ckpt_every = 10**9  # no 1-GB saves inside the clock: fit() saves at its end, outside it
    shape = (recipe.unet.in_channels, recipe.unet.image_size, recipe.unet.image_size)
    for budget in todo:
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
                 "caption": s["caption"], "object": s["object"], "objects_scored": s["objects"], "fd": s["fd"],
                 "fd_floor": scores["fd_real_floor"],
                 "fd_ratio": s["fd_ratio"], "eval_seconds": time.perf_counter() - start}
        points.append(point)
        if on_point is not None:
            on_point(points)
        print(f"  {label:10} {point['seconds']:6.0f} s, {point['steps']:5d} steps: captions {point['caption']:6.1%}, "
              f"objects {point['object']:6.1%}, FD/floor {point['fd_ratio']:6.2f} (eval {point['eval_seconds']:.0f} s)",
              flush=True)
    return points


def check_resumable(ckpt: Path, last: dict, label: str) -> None:
    """--resume goes on only from the checkpoint that made the JSON's last point: its saved training history must
    pass through that point's step and seconds (not another run's checkpoint left in --out)."""
    if not ckpt.is_file():
        raise SystemExit(f"--resume: {label} has points in the JSON but no checkpoint {ckpt} to go on from (a new "
                         "machine starts without it); run without --resume to train from scratch")
    history = load_checkpoint(ckpt)["history"]
    if not any(h["step"] == last["steps"] and h["seconds"] == last["seconds"] for h in history):
        raise SystemExit(f"--resume: {ckpt} is not the checkpoint of {label}'s last point in the JSON (step "
                         f"{last['steps']}, {last['seconds']} s); run without --resume to train from scratch")


def first_stage_scores(autoencoder, judge, rt, n: int) -> dict:
    """What the first stage keeps, which caps what any diffusion model on its latents can draw: mean PSNR of its
    reconstructions of n held-out images, and the judge's object and caption accuracy on them and on the originals."""
    scores = evaluate_autoencoder(autoencoder, judge, rt, n=n)
    real, recon = scores["judge_on_real"], scores["judge_on_reconstructions"]
    return {"psnr": scores["psnr"], "object": recon["object"], "caption": recon["caption"],
            "object_real": real["object"], "caption_real": real["caption"]}


def first_stage_line(stage: dict) -> str:
    return (f"reconstructions {stage['psnr']:.1f} dB, objects right {stage['object']:.1%} (originals "
            f"{stage['object_real']:.1%})")


def refuse_other_settings(path: Path, info: dict) -> dict:
    """The part's JSON so far ({} if none), refused when it was measured otherwise: another n, sampler, guidance,
    feature network, GPU model, first-stage seconds or mode (a setting one side lacks counts as different).
    Called before anything trains, and again at every save."""
    result = json.loads(path.read_text()) if path.exists() else {}
    differ = [k for k in SAME_SETTINGS if result and result.get(k) != info.get(k)]
    if differ:
        was = ", ".join(f"{k} {result.get(k)!r}" for k in differ)
        now = ", ".join(repr(info.get(k)) for k in differ)
        raise SystemExit(f"{path} holds results measured with other settings ({was}, now {now}); use another --out, "
                         "or delete that file")
    return result


def write_json(path: Path, result: dict) -> None:
    """Atomically: a command killed while writing leaves the last complete file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    os.replace(tmp, path)


def merged(path: Path, key: str, new: dict, info: dict) -> dict:
    """The part's JSON with `new` entries under `key` merged over an earlier invocation's, written after every
    evaluation so that a run cut short keeps what it measured; results measured otherwise are refused."""
    result = refuse_other_settings(path, info)
    info = {**info, "curve_s": sorted(set(result.get("curve_s", [])) | set(info["curve_s"]))}
    result.update(info)
    result.setdefault(key, {}).update(new)
    write_json(path, result)
    return result


def common_info(rt, args, curve) -> dict:
    return {"device": rt.describe(), "gpu": rt.device_name(), "fast": rt.fast, "n": args.n, "guidance": GUIDANCE,
            "sampler": f"dpmpp_2m, {args.steps} steps", "feature_network": "the Shapes judge (not Inception)",
            "curve_s": sorted(curve)}


# ---------------------------------------------------------------------------------------------- (a)


def cmd_latent_vs_pixel(args, rt) -> dict:
    curves = {space: curve_for(args, space, rt.fast) for space in args.spaces}
    path = args.out / "claims_latent_vs_pixel.json"
    info = common_info(rt, args, set().union(*curves.values()))  # curve_s: every budget of any space
    refuse_other_settings(path, info)  # before minutes of training, not after them
    judge = judge_for(64 if not rt.fast else 32, rt, checkpoint_dir(rt.fast), progress=False)
    autoencoder = None
    for space in args.spaces:
        recipe = diffusion_recipe(space, fast=rt.fast)
        if space == "latent":
            ae_path = checkpoint_dir(rt.fast) / "autoencoder_kl_f4.pt"
            torch.manual_seed(0)
            autoencoder, _ = train_autoencoder(autoencoder_recipe("kl", 4, fast=rt.fast), rt, ae_path, progress=False)
            autoencoder.requires_grad_(False)
            recipe = diffusion_recipe("latent", fast=rt.fast, latent_shape=autoencoder.cfg.latent_shape)
        stage = first_stage_scores(autoencoder, judge, rt, args.n) if space == "latent" else None
        print(f"{space}: batch {recipe.train.batch_size}, curve {curves[space]} s"
              + (f"; f=4 first stage: {first_stage_line(stage)}" if stage else ""), flush=True)
        run = {"batch": recipe.train.batch_size, **({"first_stage": stage} if stage else {})}
        run["curve"] = learning_curve(recipe, rt, args.out / f"claims_{space}.pt", judge,
                                      autoencoder if space == "latent" else None, curves[space], args.n, args.steps,
                                      space, on_point=save_as_it_grows(path, "spaces", space, run, info),
                                      earlier=earlier_points(args, path, "spaces", space))
        result = merged(path, "spaces", {space: {**run, "finished": True}}, info)
    return finish_latent_vs_pixel(result, args.out)


def save_as_it_grows(path: Path, key: str, name: str, run: dict, info: dict):
    """Saves a curve as it grows, marked unfinished: a command stopped by the device's time limit keeps its points."""
    return lambda points: merged(path, key, {name: {**run, "curve": points, "finished": False}}, info)


def earlier_points(args, path: Path, key: str, name: str) -> list[dict] | None:
    """With --resume, the curve an earlier command measured for this space or factor (None: train from scratch)."""
    if not args.resume:
        return None
    earlier = json.loads(path.read_text()).get(key, {}).get(name, {}).get("curve") if path.exists() else None
    if not earlier:
        print(f"--resume: no earlier points for {name} in {path}: training it from scratch", flush=True)
    return earlier


def unfinished_lines(runs: dict) -> list[str]:
    return [f"{name}: cut short after {run['curve'][-1]['seconds']:.0f} s of training (its command did not finish)"
            for name, run in runs.items() if run.get("finished") is False]


def finish_latent_vs_pixel(result: dict, out: Path) -> dict:
    """Targets from the pixel model's last point (captions fully right; objects right, which moves more gradually
    early on; FD / floor, which moves before either), when each space first reaches them, and latent / pixel time
    where the target means something. An accuracy is a level only when at least MIN_RIGHT of the n captions (of the
    objects scored) reach it; FD / floor is measured on all n samples and is always one. No ratio either when the
    pixel curve was cut short (its last point is not its final) or reaches the target at its first point (its time
    is then only an upper bound); a latent time from its first point is an upper bound, and the ratio says "at
    most"."""
    spaces = result["spaces"]
    for key in ("target_caption", "reach", "latent_over_pixel_time", "targets"):  # recomputed from the curves
        result.pop(key, None)
    if "pixel" not in spaces:
        print("no pixel curve in this result yet: run `--spaces pixel` into the same --out for targets and ratios")
    else:
        final = spaces["pixel"]["curve"][-1]
        result["targets"] = {}
        for key in ("caption", "object", "fd_ratio"):
            reach = {space: first_reach(run["curve"], final[key], key) for space, run in spaces.items()}
            # objects scored: about 2 per caption (runs of session 14 did not record it: n, the stricter test)
            scored = final.get("objects_scored", result["n"]) if key == "object" else result["n"]
            entry = {"target": final[key], "usable": key in LOWER_IS_BETTER or final[key] * scored >= MIN_RIGHT,
                     "reach": reach}
            pixel, latent = reach["pixel"], reach.get("latent")
            if not entry["usable"]:
                entry["no_ratio"] = f"{final[key]:.1%} of {scored} is under {MIN_RIGHT} right, too few to be a level"
            elif spaces["pixel"].get("finished") is False:
                entry["no_ratio"] = "the pixel curve was cut short: its last point is not its final"
            elif pixel["at_first_point"]:
                entry["no_ratio"] = "the pixel model is there at its first point: its time is only an upper bound"
            elif latent is not None and latent["interpolated_s"] is not None:
                entry["latent_over_pixel_time"] = latent["interpolated_s"] / pixel["interpolated_s"]
                entry["at_most"] = latent["at_first_point"]  # the latent time is an upper bound
            result["targets"][key] = entry
        captions = result["targets"]["caption"]  # the headline figures, under their earlier names
        result["target_caption"], result["reach"] = captions["target"], captions["reach"]
        if "latent_over_pixel_time" in captions:
            result["latent_over_pixel_time"] = captions["latent_over_pixel_time"]
    write_json(out / "claims_latent_vs_pixel.json", result)
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
    lines += unfinished_lines(result["spaces"])
    stage = result["spaces"].get("latent", {}).get("first_stage")
    if stage:
        lines.append(f"the latent model's f=4 first stage on n held-out images: {first_stage_line(stage)}")
    for key, entry in result.get("targets", {}).items():
        level = f"FD / floor: {entry['target']:.2f}" if key == "fd_ratio" else f"{key} accuracy: {entry['target']:.1%}"
        lines.append(f"pixel model's final {level}; first reached at")
        for space, r in entry["reach"].items():
            when = ("never within the curve" if r["first_point_s"] is None else
                    f"<= {r['first_point_s']:.0f} s (its first evaluation)" if r.get("at_first_point") else
                    f"the {r['first_point_s']:.0f}-s point (interpolated {r['interpolated_s']:.0f} s)")
            lines.append(f"  {space}: {when}")
        if "no_ratio" in entry:
            lines.append(f"  no ratio: {entry['no_ratio']}")
        elif "latent_over_pixel_time" in entry:
            goal = " (the goal: at most 0.25)" if key == "caption" else ""
            at_most = "at most " if entry.get("at_most") else ""
            lines.append(f"  latent / pixel time to get there: {at_most}{entry['latent_over_pixel_time']:.2f}{goal}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- (b)


def cmd_f_study(args, rt) -> dict:
    path = args.out / "claims_f_study.json"
    curve = curve_for(args, "f-study", rt.fast)
    info = {**common_info(rt, args, curve), "ae_seconds": None if rt.fast else args.ae_seconds}
    refuse_other_settings(path, info)  # before minutes of training, not after them
    judge = judge_for(64 if not rt.fast else 32, rt, checkpoint_dir(rt.fast), progress=False)
    for f in args.f:
        ae_recipe = autoencoder_recipe("kl", f, fast=rt.fast)
        if not rt.fast:
            ae_recipe.train.max_seconds, ae_recipe.train.steps = args.ae_seconds, 10**6
        else:  # a few steps: fast mode only shows that the code runs
            ae_recipe.train.steps = 8
        ae_path = args.out / f"claims_ae_f{f}.pt"
        torch.manual_seed(0)
        autoencoder, ae_history = train_autoencoder(ae_recipe, rt, ae_path, progress=False)
        autoencoder.requires_grad_(False)
        recipe = diffusion_recipe("latent", fast=rt.fast, latent_shape=autoencoder.cfg.latent_shape)
        if not rt.fast:
            recipe.train.batch_size = F_BATCH[f]
        shape = autoencoder.cfg.latent_shape
        stage = first_stage_scores(autoencoder, judge, rt, args.n)
        print(f"f={f}: latents {'x'.join(map(str, shape))}, autoencoder {ae_history[-1]['seconds']:.0f} s "
              f"({ae_history[-1]['step']} steps): {first_stage_line(stage)}; diffusion batch "
              f"{recipe.train.batch_size}, curve {curve} s", flush=True)
        run = {"batch": recipe.train.batch_size, "latent_shape": list(shape),
               "autoencoder_seconds": ae_history[-1]["seconds"], "autoencoder_steps": ae_history[-1]["step"],
               "first_stage": stage}
        run["curve"] = learning_curve(recipe, rt, args.out / f"claims_ldm_f{f}.pt", judge, autoencoder, curve,
                                      args.n, args.steps, f"f={f}",
                                      on_point=save_as_it_grows(path, "factors", str(f), run, info),
                                      earlier=earlier_points(args, path, "factors", str(f)))
        result = merged(path, "factors", {str(f): {**run, "finished": True}}, info)
    return finish_f_study(result, args.out)


def finish_f_study(result: dict, out: Path) -> dict:
    result["factors"] = dict(sorted(result["factors"].items(), key=lambda kv: int(kv[0])))
    write_json(out / "claims_f_study.json", result)
    print(table_f_study(result))
    plot(result, "factors", out / "claims_f_study.png", "latent diffusion with f = 1, 2, 4, 8 (LDM Fig. 6, small)")
    return result


def table_f_study(result: dict) -> str:
    curve = sorted({p["budget_s"] for run in result["factors"].values() for p in run["curve"]})
    lines = [f"{result['device']}",
             (f"captions right (objects right) / FD / floor, read by and FD on {result['feature_network']}, after "
              f"each training budget; n = {result['n']}, guidance {result['guidance']:g}, {result['sampler']}"),
             ("the first stage" + (f", trained {result['ae_seconds']:g} s" if result.get("ae_seconds") else "")
              + ": PSNR of its reconstructions of n held-out images, and objects the judge reads right in them (-: not "
              "recorded by that run)"),
             "| f | latents | batch | first stage | " + " | ".join(f"{b:g} s" for b in curve) + " |",
             "| --- | --- | --- | --- | " + " | ".join("---" for _ in curve) + " |"]
    for f, run in result["factors"].items():
        at = {p["budget_s"]: p for p in run["curve"]}  # a budget the run had passed already has no point of its own
        cells = [f"{at[b]['caption']:.1%} ({at[b]['object']:.1%}) / {at[b]['fd_ratio']:.2f}" if b in at else "-"
                 for b in curve]
        scores = run.get("first_stage")
        stage = f"{scores['psnr']:.1f} dB, {scores['object']:.1%}" if scores else "-"
        lines.append(f"| {f} | {'x'.join(map(str, run['latent_shape']))} | {run['batch']} | {stage} | "
                     + " | ".join(cells) + " |")
    lines += unfinished_lines({f"f={f}": run for f, run in result["factors"].items()})
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
                   help="seconds of training at which to evaluate, for every space given (default: pixel 15 30 60 120 "
                        "240 480 960, latent 15 30 60 120 240; fast: 1 2)")
    b = sub.add_parser("f-study", help="(b): latent diffusion with f = 1, 2, 4, 8 at the same budget")
    b.add_argument("--f", type=int, nargs="+", choices=[1, 2, 4, 8], default=[1, 2, 4, 8])
    b.add_argument("--curve", type=float, nargs="+", default=None,
                   help="seconds of training at which to evaluate (default 30 60 120; fast: 1 2)")
    b.add_argument("--ae-seconds", type=float, default=120,
                   help="training seconds of each autoencoder (default 120)")
    p = sub.add_parser("plot", help="tables and PNGs again from the JSON files in --out")
    for s in (a, b, p):
        s.add_argument("--out", type=Path, default=Path("runs/claims"))
        s.add_argument("--fast", action="store_true", help="tiny configs on a CPU (same as MINILDM_FAST=1)")
    for s in (a, b):
        s.add_argument("--resume", action="store_true",
                       help="go on from the checkpoints and JSON an earlier command left in --out (the same machine): "
                            "train and evaluate only the budgets (--curve or the defaults) past its last point")
        s.add_argument("-n", type=int, default=None, help="held-out captions per evaluation (default 256; fast: 8)")
        s.add_argument("--steps", type=int, default=20, help="DPM-Solver++(2M) steps per sample (default 20)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.part == "plot":
        return cmd_plot(args)
    rt = setup(seed=0, fast=True if args.fast else None)
    if args.n is None:
        args.n = 8 if rt.fast else 256
    if args.curve is not None and any(not math.isfinite(c) or c <= 0 for c in args.curve):
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
