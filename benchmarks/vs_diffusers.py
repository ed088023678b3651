"""minildm's UNet against diffusers' UNet2DConditionModel built the same: is our speed our code? (issue 10)

    python benchmarks/vs_diffusers.py --out runs/vs_diffusers.jsonl      # one GPU; needs diffusers 0.42.1
    python benchmarks/vs_diffusers.py --smoke                           # a CPU: tiny sizes, two steps per timing
    python benchmarks/vs_diffusers.py --table-from runs/vs_diffusers.jsonl   # the tables again, from the records

The latent-diffusion training step reaches about 3% of an H200's bf16 peak (docs/measured.md, "Training speed"). Is that
minildm's code, or does any UNet of this size run like that at 4x16x16? To find out, this script builds the same
network twice, as `minildm.unet.UNet` and as diffusers' `UNet2DConditionModel` (a widely used implementation), and
times both side by side in one process on one GPU, on the latents of the recipe (4x16x16, batch 256) and on pixels
(3x64x64, batch 32). For each it measures

- training images/s: one full step (forward, MSE loss against fixed noise, backward, AdamW lr 2e-4) under bf16
  autocast, on fixed random inputs so that no data pipeline is timed; eager and under `torch.compile`, each timed
  --rounds times (default 2), interleaved (minildm, diffusers, minildm, diffusers, ...), so that drift of the
  machine shows as a difference between a model's runs rather than between the models; both are called as a new
  user calls them (minildm's UNet reads a GPU t's values for its range check on its first call only, a warm-up
  call here); AdamW is fused on a GPU (one kernel for all tensors,
  as minildm's Trainer uses it) for both. Modes: "eager"; "compiled" (torch.compile's default mode: fused Triton
  kernels, launched one by one); "compiled-graphs" (mode "reduce-overhead": the same kernels replayed as CUDA
  graphs, so that the CPU no longer sets the pace);
- inference images/s: the forward pass alone, no grad, bf16 autocast, eager and compiled;
- TFLOP/s: images/s times the FLOP per image that torch.utils.flop_counter counts (matmuls, convolutions,
  attention), as a fraction of --peak-tflops (default 775, the bf16 matmul peak measured on an H200 in the issue)
  and of a large bf16 matmul timed in this same run;
- compile time: the first call of each compiled variant (tracing, code generation, the step itself), after a tiny
  warm-up compile that takes the compiler's one-time start-up;
- a profile of one training step per variant: kernels launched, milliseconds the GPU is busy, the share of the
  step it is idle, the most expensive kernels. At 4x16x16 each kernel does little work, so the CPU that launches
  them one by one sets the pace: the GPU waits for it (launch overhead), whichever implementation launches them.

The mapping (UNetConfig -> UNet2DConditionModel, `diffusers_twin`): channels base_channels * channel_mult ->
block_out_channels; num_res_blocks -> layers_per_block (diffusers' up blocks also have one more, as ours);
a level in attention_levels -> CrossAttnDownBlock2D / CrossAttnUpBlock2D, else DownBlock2D / UpBlock2D; the middle
block is UNetMidBlock2DCrossAttn (ResBlock, transformer, ResBlock, as ours); heads -> attention_head_dim (diffusers
reads that argument as the number of heads, for historical reasons); context_dim -> cross_attention_dim;
transformer_depth -> transformer_layers_per_block; our scale-shift time conditioning -> resnet_time_scale_shift=
"scale_shift" (diffusers' default adds a shift only: 64.1 M parameters instead of 66.5 M); our linear projections
into and out of the transformer -> use_linear_projection=True; cos-then-sin timestep features -> flip_sin_to_cos=True,
freq_shift=0. Both then have exactly the same parameters (66,502,404 at the recipe's widths). What differs: minildm
adds fixed 2D position embeddings to the tokens of every transformer (no parameters, a few small kernels each; the
row "minildm -posemb" switches them off: the exact twin, eager only), diffusers' transformer GroupNorm uses eps 1e-6
(ours 1e-5), and no padding mask is passed to either (the recipe masks padded caption tokens). The text encoder,
EMA and gradient clipping of minildm's Trainer are left out: only the UNets are compared.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType
from torch.utils.flop_counter import FlopCounterMode

from minildm.device import setup
from minildm.unet import UNet, UNetConfig

GET_DIFFUSERS = """diffusers 0.42.1 is needed (it is not a dependency of minildm). On a machine with network, into a
separate folder (so that it cannot replace your torch):
    python -m pip install --target /tmp/dsite "diffusers==0.42.1" "huggingface_hub<2"
    PYTHONPATH=/tmp/dsite python benchmarks/vs_diffusers.py ...
For the GPU machine (no network), from the project root here:
    ../shared/tools/gpu-wheels.sh diffusers==0.42.1 "huggingface_hub<2"
then two device calls with carry [".whl"]: `PHASE=1 bash benchmarks/run_vs_diffusers.sh`, then `PHASE=2 ...`."""

# name: (in_channels, image size, batch); --smoke shrinks them
SHAPES = {"latent": (4, 16, 256), "pixel": (3, 64, 32)}
SMOKE_SHAPES = {"latent": (4, 8, 4), "pixel": (3, 16, 2)}


COMPILE_MODES = {"compiled": {}, "compiled-graphs": {"mode": "reduce-overhead"}}  # mode name -> torch.compile options


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def minildm_config(in_channels: int, size: int, smoke: bool, position_embedding: bool = True) -> UNetConfig:
    """The UNet of the full latent recipe (minildm.config.diffusion_recipe), or a narrow one for --smoke."""
    return UNetConfig(in_channels=in_channels, image_size=size, base_channels=32 if smoke else 128,
                      channel_mult=(1, 2, 3), num_res_blocks=2, attention_levels=(1, 2), heads=4,
                      context_dim=32 if smoke else 256, position_embedding=position_embedding)


def diffusers_twin(cfg: UNetConfig):
    """diffusers' UNet2DConditionModel with the architecture of `cfg` (the mapping is in the module docstring)."""
    from diffusers import UNet2DConditionModel

    attends = [level in cfg.attention_levels for level in range(len(cfg.channel_mult))]
    return UNet2DConditionModel(
        sample_size=cfg.image_size, in_channels=cfg.in_channels, out_channels=cfg.out_channels,
        block_out_channels=tuple(cfg.base_channels * m for m in cfg.channel_mult),
        down_block_types=tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attends),
        mid_block_type="UNetMidBlock2DCrossAttn",
        up_block_types=tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attends)),
        layers_per_block=cfg.num_res_blocks, transformer_layers_per_block=cfg.transformer_depth,
        attention_head_dim=cfg.heads, cross_attention_dim=cfg.context_dim, norm_num_groups=32, norm_eps=1e-5,
        resnet_time_scale_shift="scale_shift", use_linear_projection=True, flip_sin_to_cos=True, freq_shift=0,
        dropout=cfg.dropout)


def forward(net, x, t, context):
    """Both UNets as one function of (x_t, t, context) -> predicted noise."""
    if isinstance(getattr(net, "_orig_mod", net), UNet):
        return net(x, t, context)
    return net(x, t, encoder_hidden_states=context, return_dict=False)[0]


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def make_steps(net, opt, inputs, device) -> dict:
    """{"train": a training step, "infer": a forward pass} of `net` (eager, or a torch.compile of it) on fixed
    inputs."""
    x, t, context, noise = inputs

    def train_step():
        with autocast(device):
            loss = F.mse_loss(forward(net, x, t, context).float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    def infer_step():
        with torch.no_grad(), autocast(device):
            forward(net, x, t, context)

    return {"train": train_step, "infer": infer_step}


def images_per_s(step, batch: int, seconds: float, warmup: int = 2, min_steps: int = 2) -> float:
    """images/s of step() over about `seconds` (at least min_steps calls), after `warmup` calls."""
    for _ in range(warmup):
        step()
    sync()
    n, t0 = 0, time.perf_counter()
    while n < min_steps or time.perf_counter() - t0 < seconds:
        step()
        n += 1
    sync()
    return n * batch / (time.perf_counter() - t0)


def flops_of(step) -> float:
    with FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def matmul_tflops(device: torch.device) -> float:
    """The bf16 TFLOP/s of a large square matmul (fp32 and small on a CPU): the practical peak of this machine."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (512, torch.float32)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(5):
        a @ b
    sync()
    reps, t0 = 100, time.perf_counter()
    for _ in range(reps):
        a @ b
    sync()
    return 2 * n**3 * reps / (time.perf_counter() - t0) / 1e12


def warm_up_compiler(device: torch.device, backend: str) -> float:
    """Compile and run a tiny function once; returns its seconds. The compiler's one-time start-up (imports, worker
    processes) is then not charged to whichever UNet compiles first."""
    layer = torch.nn.Linear(8, 8).to(device)
    f = torch.compile(lambda x: F.gelu(layer(x)).sum(), backend=backend)
    t0 = time.perf_counter()
    with autocast(device):
        f(torch.randn(4, 8, device=device)).backward()
    sync()
    return time.perf_counter() - t0


def profile(step, steps: int = 3) -> dict:
    """What one call of step() asks of the GPU: kernels (and copies) launched, their total milliseconds, the top 5.
    On a CPU (--smoke) it counts aten operators instead, and there is no GPU time."""
    cuda = torch.cuda.is_available()
    step()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU] + ([torch.profiler.ProfilerActivity.CUDA] if cuda else [])
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        sync()
    if cuda:  # kernels, memcpy and memset on the GPU's timeline; user annotations only bracket them
        ops = [e for e in prof.events() if e.device_type == DeviceType.CUDA and not e.is_user_annotation]
    else:
        ops = [e for e in prof.events() if e.name.startswith("aten::")]
    per_name = defaultdict(float)
    for e in ops:
        per_name[e.name] += e.time_range.elapsed_us() if cuda else e.self_cpu_time_total
    total = sum(per_name.values()) or 1.0
    top = sorted(per_name.items(), key=lambda kv: -kv[1])[:5]
    return {"kernels_per_step": round(len(ops) / steps),
            "gpu_busy_ms": round(total / steps / 1e3, 2) if cuda else None,
            "top_kernels": [[name[:90], round(us / total, 3)] for name, us in top]}


def bench_shape(shape: str, args, device, record) -> None:
    in_channels, size, batch = (SMOKE_SHAPES if args.smoke else SHAPES)[shape]
    torch.manual_seed(0)
    nets = {"minildm": UNet(minildm_config(in_channels, size, args.smoke))}
    if "eager" in args.modes:  # the exact twin of diffusers' network, timed eager only (compiling costs minutes)
        nets["minildm -posemb"] = UNet(minildm_config(in_channels, size, args.smoke, position_embedding=False))
    nets["diffusers"] = diffusers_twin(nets["minildm"].cfg)
    x, noise = (torch.randn(batch, in_channels, size, size, device=device) for _ in range(2))
    t = torch.randint(0, 1000, (batch,), device=device)
    tokens = 8 if args.smoke else 32  # caption tokens, as TextConfig.max_length
    inputs = (x, t, torch.randn(batch, tokens, nets["minildm"].cfg.context_dim, device=device), noise)
    steps, gflop = {}, {}
    for name, net in nets.items():
        net.to(device)
        opt = torch.optim.AdamW(net.parameters(), lr=2e-4, fused=device.type == "cuda" or None)
        steps[name, "eager"] = make_steps(net, opt, inputs, device)
        for mode, options in COMPILE_MODES.items():
            if mode in args.modes and name != "minildm -posemb":
                options = options if args.backend == "inductor" else {}  # modes are inductor's (--smoke: aot_eager)
                steps[name, mode] = make_steps(torch.compile(net, backend=args.backend, **options), opt, inputs,
                                               device)
        gflop[name] = {task: flops_of(step) / batch / 1e9 for task, step in steps[name, "eager"].items()}
        record(kind="model", shape=shape, model=name, batch=batch, input=[in_channels, size, size],
               params=sum(p.numel() for p in net.parameters()),
               **{f"gflop_per_image_{task}": round(g, 3) for task, g in gflop[name].items()})
    for mode in args.modes:
        names = [name for name, m in steps if m == mode]
        for task in args.tasks:
            if mode != "eager":  # the first call compiles: time it alone
                for name in names:
                    nets[name].train(task == "train")
                    t0 = time.perf_counter()
                    steps[name, mode][task]()
                    sync()
                    record(kind="compile", shape=shape, model=name, task=task, mode=mode,
                           seconds=round(time.perf_counter() - t0, 1))
            ms = defaultdict(list)
            for rnd in range(1, args.rounds + 1):  # A B A B: a model's runs show the drift
                for name in names:
                    nets[name].train(task == "train")
                    ips = images_per_s(steps[name, mode][task], batch, args.seconds)
                    ms[name].append(1e3 * batch / ips)
                    tflops = ips * gflop[name][task] / 1e3
                    record(kind=task, shape=shape, model=name, mode=mode, round=rnd, batch=batch,
                           images_per_s=round(ips, 1), tflops=round(tflops, 2),
                           fraction_of_peak=round(tflops / args.peak_tflops, 4),
                           fraction_of_measured_peak=round(tflops / args.measured_peak, 4))
            if task == "train":
                for name in names:
                    prof = profile(steps[name, mode]["train"])
                    step_ms = sum(ms[name]) / len(ms[name])  # without the profiler's own overhead
                    idle = None if prof["gpu_busy_ms"] is None else max(0.0, 1 - prof["gpu_busy_ms"] / step_ms)
                    record(kind="profile", shape=shape, model=name, mode=mode, step_ms=round(step_ms, 2),
                           gpu_idle=None if idle is None else round(idle, 3), **prof)
    del nets, steps
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ---- the tables -------------------------------------------------------------------------------------------------


def fmt(x, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def mean(rs: list[dict], key: str) -> float | None:
    return sum(r[key] for r in rs) / len(rs) if rs else None


def tables(records: list[dict]) -> str:
    """Markdown: speed per (shape, model, mode), minildm's speed over diffusers', then the training-step profiles.
    Works on partial records."""
    if not records:
        return "(no records)"
    first = records[0]
    peaks = sorted({r["tflops"] for r in records if r["kind"] == "peak"})
    lines = [(f"{first['gpu']}, torch {first['torch']}, diffusers {first['diffusers']}, {first['date'][:10]}; "
              f"fraction of the given peak {first['peak_tflops']:g} TFLOP/s and of the bf16 matmul measured in the "
              f"run ({', '.join(f'{p:.3g}' for p in peaks)} TFLOP/s)"), ""]
    models = {(r["shape"], r["model"]): r for r in records if r["kind"] == "model"}
    runs, compiles, profiles = defaultdict(list), {}, []
    for r in records:
        if r["kind"] in ("train", "infer"):
            runs[r["shape"], r["model"], r["mode"], r["kind"]].append(r)
        elif r["kind"] == "compile":
            compiles[r["shape"], r["model"], r.get("mode", "compiled"), r["task"]] = r["seconds"]
        elif r["kind"] == "profile":
            profiles.append(r)
    lines += [("| shape, batch | model (M params, GFLOP/image train) | mode | train images/s, each run "
               "| train TFLOP/s | % peak / % matmul | inference images/s, each run | inference % peak "
               "| compile s, train / inference |"),
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    rows = list(dict.fromkeys(k[:3] for k in runs))  # in the order measured, then by shape and mode
    shapes = list(dict.fromkeys(k[0] for k in rows))
    for shape, model, mode in sorted(rows, key=lambda k: (shapes.index(k[0]), ["eager", *COMPILE_MODES].index(k[2]))):
        m = models.get((shape, model), {})
        train, infer = runs.get((shape, model, mode, "train"), []), runs.get((shape, model, mode, "infer"), [])

        def each(rs):
            return " / ".join(fmt(r["images_per_s"]) for r in rs) or "-"

        compile_s = (f"{fmt(compiles.get((shape, model, mode, 'train')), '.0f')} / "
                     f"{fmt(compiles.get((shape, model, mode, 'infer')), '.0f')}" if mode != "eager" else "")
        lines.append(
            f"| {shape} {'x'.join(map(str, m.get('input', [])))}, {m.get('batch', '?')} "
            f"| {model} ({fmt(m.get('params', 0) / 1e6, '.1f')} M, {fmt(m.get('gflop_per_image_train'), '.2f')}) "
            f"| {mode} | {each(train)} | {fmt(mean(train, 'tflops'), '.1f')} "
            f"| {fmt(mean(train, 'fraction_of_peak'), '.1%')} / "
            f"{fmt(mean(train, 'fraction_of_measured_peak'), '.1%')} "
            f"| {each(infer)} | {fmt(mean(infer, 'fraction_of_peak'), '.1%')} | {compile_s} |")
    lines += ["", "minildm / diffusers, mean images/s of the runs (above 1: minildm faster):", "",
              "| shape | mode | training | inference |", "| --- | --- | --- | --- |"]
    for shape, mode in dict.fromkeys((k[0], k[2]) for k in rows):
        ratios = []
        for task in ("train", "infer"):
            ours, theirs = (mean(runs.get((shape, model, mode, task), []), "images_per_s")
                            for model in ("minildm", "diffusers"))
            ratios.append(fmt(ours / theirs, ".3f") if ours and theirs else "-")
        lines.append(f"| {shape} | {mode} | {ratios[0]} | {ratios[1]} |")
    lines += ["", "Training step, profiled (3 steps; step ms from the timed runs, without the profiler):", "",
              "| shape | model | mode | step ms | GPU busy ms | GPU idle | kernels / step | top kernels (of GPU time) |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in sorted(profiles, key=lambda r: (shapes.index(r["shape"]) if r["shape"] in shapes else 0,
                                             r["mode"] != "eager")):
        top = "; ".join(f"{name[:40]} {share:.0%}" for name, share in r["top_kernels"][:3])
        lines.append(f"| {r['shape']} | {r['model']} | {r['mode']} | {r['step_ms']:.1f} "
                     f"| {fmt(r['gpu_busy_ms'], '.1f')} "
                     f"| {fmt(r['gpu_idle'], '.0%')} | {r['kernels_per_step']:,} | {top} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/vs_diffusers.jsonl"), help="JSON lines, appended")
    parser.add_argument("--shapes", nargs="+", choices=list(SHAPES), default=list(SHAPES))
    parser.add_argument("--modes", nargs="+", choices=["eager", *COMPILE_MODES], default=["eager", *COMPILE_MODES])
    parser.add_argument("--tasks", nargs="+", choices=["train", "infer"], default=["train", "infer"])
    parser.add_argument("--seconds", type=float, default=3.0, help="timed seconds per run (default 3)")
    parser.add_argument("--rounds", type=int, default=2,
                        help="timed runs per model, interleaved A B A B ... (default 2)")
    parser.add_argument("--peak-tflops", type=float, default=775.0,
                        help="bf16 peak for the fraction column (default 775: an H200's measured matmul peak)")
    parser.add_argument("--smoke", action="store_true",
                        help="tiny widths and shapes, two steps per timing, compiled with aot_eager (a CPU)")
    parser.add_argument("--table-from", type=Path, nargs="+",
                        help="only print the tables of these JSON-lines files (e.g. the two phases of one run)")
    args = parser.parse_args(argv)
    if args.table_from:
        print(tables([json.loads(line) for path in args.table_from for line in path.read_text().splitlines()
                      if line.strip()]))
        return
    try:
        import diffusers
    except ImportError:
        raise SystemExit(GET_DIFFUSERS) from None
    if diffusers.__version__ != "0.42.1":
        print(f"note: diffusers {diffusers.__version__}, not the 0.42.1 this benchmark was written for")
    # --smoke compiles with "aot_eager": torch.compile's tracing (Dynamo, AOTAutograd) without code generation,
    # which checks in seconds that both UNets compile; inductor would compile C++ for minutes on a small CPU.
    args.seconds, args.backend = (0.0, "aot_eager") if args.smoke else (args.seconds, "inductor")
    rt = setup(0, fast=args.smoke)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    common = {"gpu": torch.cuda.get_device_name() if rt.device.type == "cuda" else "cpu",
              "torch": torch.__version__, "diffusers": diffusers.__version__,
              "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "peak_tflops": args.peak_tflops, "smoke": args.smoke, "compile_backend": args.backend}
    records = []

    def record(**row) -> None:
        row = {**common, **row}
        records.append(row)
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")

    args.measured_peak = matmul_tflops(rt.device)
    record(kind="peak", tflops=round(args.measured_peak, 3))
    if set(args.modes) & set(COMPILE_MODES):
        record(kind="compile_warm_up", seconds=round(warm_up_compiler(rt.device, args.backend), 1))
    for shape in args.shapes:  # as a new user calls the UNets (minildm's checks a GPU t on its first call only)
        bench_shape(shape, args, rt.device, record)
    print()
    print(tables(records))


if __name__ == "__main__":
    main()
