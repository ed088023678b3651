"""One trainer for every stage: AdamW, autocast, grad scaling, clipping, EMA, checkpoints, resume.

A *task* is an `nn.Module` that knows its models and losses; the `Trainer` knows nothing about
autoencoders or diffusion. A task provides

- `param_groups() -> {name: parameters}`: one AdamW optimiser per entry, stepped in this order; an entry may
  also be a dict {"params": ..., "betas": ..., "grad_clip": ...} to override the TrainConfig for that optimiser
  (the autoencoder's discriminator trains with Adam betas (0.5, 0.9) and no clipping, as in taming-transformers);
- `losses(batch, step) -> ({name: loss}, {log_name: float})`: one loss per optimiser;
- `ema_module()`: the module whose exponential moving average is kept (or None);
- `kind` and `config_dict()`: stored in the checkpoint so the model can be rebuilt;
- optionally `compile_target()`: the network that `TrainConfig.compile` hands to torch.compile.

Compilation (`TrainConfig.compile`, on CUDA only): torch.compile traces the network's forward and backward once
and generates fused kernels for them; the mode "reduce-overhead" also records them as CUDA graphs, so one launch
replays the thousands of small kernels of a step (a 4x16x16 latent step is launch-bound: the GPU waits for the CPU
that queues its kernels). "cudagraphs" (torch.compile's backend of that name) records the step's own eager kernels
as CUDA graphs without generating new ones: no fusion, but a fraction of the compile time (tracing alone). The
first step pays for the compilation; `Trainer.compile_seconds` holds that step's time and the progress line
reports it. `Module.compile()` compiles in place, so the state dict and the checkpoints keep their plain names.

Batches come from `batch_at(step)`, a function of the step number, so a resumed run sees exactly
the batches the interrupted one would have seen. The data package has one such feeder per kind of data:
`shapes_batch_at` (the procedural Shapes images) and `dataset_batch_at` (any map-style data set, e.g. MNIST).

Under torchrun the same Trainer trains data-parallel (distributed.py): `batch_size` is the global batch, each of the
N processes trains on batch_size / N of it (the feeders hand each rank its part), the gradients of each optimiser are
averaged over the processes after its backward pass, so every rank takes the same step and keeps the same weights
and EMA, and only rank 0 writes checkpoints. The learning rate is the one for the global batch. A checkpoint holds
the plain module's state, so a run resumes with any number of processes.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from minildm import distributed
from minildm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from minildm.device import Runtime, no_value_checks
from minildm.ema import EMA
from minildm.progress import progress_bar


@dataclass
class TrainConfig:
    steps: int = 2000
    batch_size: int = 64  # the global batch: under torchrun each of N processes trains on batch_size / N images
    lr: float = 2e-4
    weight_decay: float = 0.0
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float | None = 1.0  # max global grad norm per optimiser; None disables
    ema_decay: float | None = 0.999  # None disables EMA
    ckpt_every: int = 500
    log_every: int = 25
    max_seconds: float | None = None  # stop early after this much training time (a wall-clock budget)
    seed: int = 0
    compile: str | None = None  # None, a torch.compile mode ("default", "reduce-overhead") or "cudagraphs": CUDA only


# TrainConfig.compile's values: torch.compile's modes, and its "cudagraphs" backend (`compile_in_place`).
COMPILE_CHOICES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs", "cudagraphs")


def compile_in_place(module: nn.Module, how: str) -> None:
    """`module.compile(...)` for a TrainConfig.compile value: a torch.compile mode (Inductor's fused kernels), or
    "cudagraphs", the backend that records the module's eager kernels as CUDA graphs through AOT autograd."""
    if how == "cudagraphs":
        module.compile(backend="cudagraphs")
    else:
        module.compile(mode=how)


class Trainer:
    """Runs `task` for `cfg.steps` steps, saving to `ckpt_path` and resuming from it if it exists."""

    def __init__(self, task: nn.Module, cfg: TrainConfig, runtime: Runtime, ckpt_path: str | Path | None = None):
        self.task = task.to(runtime.device)
        self.cfg, self.rt = cfg, runtime
        self.ckpt_path = Path(ckpt_path) if ckpt_path is not None else None
        self.place = distributed.place()  # rank 0 of 1 without torchrun
        self.local_batch_size = distributed.local_batch_size(cfg.batch_size, self.place.world_size)
        if self.place.distributed:  # every rank starts from rank 0's weights (a checkpoint, if any, is loaded below)
            distributed.broadcast_tensors([*task.parameters(), *task.buffers()])
            if self.place.is_main:
                print(f"data parallel: {self.place.world_size} processes x {self.local_batch_size} images = global "
                      f"batch {cfg.batch_size}; lr {cfg.lr:g} is the learning rate for that global batch (gradients "
                      "are averaged over the processes)", flush=True)
        self.optimizers, self.grad_clip = {}, {}
        for name, group in task.param_groups().items():
            group = dict(group) if isinstance(group, dict) else {"params": group}
            self.grad_clip[name] = group.pop("grad_clip", cfg.grad_clip)
            settings = {"lr": cfg.lr, "betas": cfg.adam_betas, "weight_decay": cfg.weight_decay, **group}
            # fused: one kernel updates every tensor (CUDA), instead of a dozen multi-tensor kernels
            self.optimizers[name] = torch.optim.AdamW(**settings, fused=runtime.device.type == "cuda" or None)
        ema_target = task.ema_module()
        self.ema = EMA(ema_target, decay=cfg.ema_decay) if (cfg.ema_decay and ema_target is not None) else None
        # fp16 needs loss scaling to keep small gradients from underflowing; bf16 and fp32 do not.
        self.scaler = torch.amp.GradScaler("cuda") if runtime.needs_grad_scaler else None
        self.step = 0
        self.history: list[dict] = []
        self.train_seconds = 0.0
        self.extra: dict = {}  # plain values a task stores with the checkpoint (e.g. the latent scale factor)
        # the network fit() runs compiled (`Module.compile`, in place: the state dict keeps its names) and leaves
        # plain again, so that sampling (other batch sizes, its own CUDA graphs) never meets the training graphs
        self.compiled, self.compile_seconds = self._compile(cfg.compile), None
        if self.ckpt_path is not None and self.ckpt_path.exists():
            self.load(self.ckpt_path)

    def _compile(self, mode: str | None) -> nn.Module | None:
        """The network that fit() hands to torch.compile (validated here, compiled in fit), or None."""
        if mode is None:
            return None
        if mode not in COMPILE_CHOICES:
            raise ValueError(f"TrainConfig.compile={mode!r} is not a torch.compile mode; use None or one of "
                             f"{COMPILE_CHOICES}")
        target = getattr(self.task, "compile_target", lambda: None)()
        if target is None or self.rt.device.type != "cuda":
            if self.place.is_main:
                print(f"TrainConfig.compile={mode!r} ignored: "
                      + ("compilation is used on CUDA only" if target is not None
                         else f"the {self.task.kind} task names no network to compile"), flush=True)
            return None
        return target

    def _stop_compiling(self) -> None:
        """Undo what fit() did with `Module.compile()`: the compile target runs eagerly again."""
        if self.compiled is not None:
            self.compiled._compiled_call_impl = None

    def _first_compiled_step(self, batch, sync) -> dict:
        """The first step of a compiled run, timed alone (it compiles). If compiling fails (a torch version or a
        platform the compiler does not support), say why and train on eagerly: the step is simply taken again."""
        sync()
        t0 = time.perf_counter()
        try:
            logs = self.train_step(batch)
            sync()
        except Exception as err:  # any compiler failure (checked below); the step is then taken eagerly
            if isinstance(err, distributed.DistributedError) or not _is_compiler_error(err):
                raise
            self._stop_compiling()
            self.compiled = None
            print(f"torch.compile ({self.cfg.compile}) failed: {type(err).__name__}: {str(err).splitlines()[0][:300]}; "
                  "training on without compilation", file=sys.stderr, flush=True)
            return self.train_step(batch)
        self.compile_seconds = time.perf_counter() - t0
        if self.place.is_main:
            tqdm.write(f"torch.compile ({self.cfg.compile}): the first {self.task.kind} step took "
                       f"{self.compile_seconds:.0f} s (compilation; counted in the training time)")
        return logs

    # ---- checkpoints -------------------------------------------------------------------------
    def state(self) -> dict:
        return {
            "kind": self.task.kind,
            "config": self.task.config_dict(),
            "train_config": asdict(self.cfg),
            "step": self.step,
            "train_seconds": self.train_seconds,
            "model": self.task.state_dict(),
            "ema": self.ema.state_dict() if self.ema else None,
            "optimizers": {k: o.state_dict() for k, o in self.optimizers.items()},
            "scaler": self.scaler.state_dict() if self.scaler else None,
            "history": self.history,
            "extra": self.extra,
        }

    def save(self, path: str | Path | None = None, wait: bool = True) -> Path:
        """Write the checkpoint (atomically). Under torchrun only rank 0 writes; with `wait` every rank waits
        until it has, so that no rank reads a checkpoint that is still being written."""
        path = Path(path or self.ckpt_path)
        if self.place.is_main:
            save_checkpoint(path, self.state())
        if wait:
            distributed.barrier(f"saving {path} at step {self.step}")
        return path

    def load(self, path: str | Path) -> None:
        state = load_checkpoint(path, kind=self.task.kind, map_location=self.rt.device)
        check_same_config(state.get("config"), self.task.config_dict(), path)
        self.task.load_state_dict(state["model"])
        for k, opt in self.optimizers.items():
            opt.load_state_dict(state["optimizers"][k])
        if self.ema and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        if self.scaler and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        self.step, self.history = state["step"], list(state["history"])
        self.train_seconds = state.get("train_seconds", 0.0)
        self.extra = dict(state.get("extra") or {})

    # ---- training ----------------------------------------------------------------------------
    def train_step(self, batch) -> dict:
        """One optimisation step of every optimiser; returns the logs."""
        self.task.train()
        if self.compiled is not None:
            torch.compiler.cudagraph_mark_step_begin()  # a new iteration: CUDA graphs may reuse last step's buffers
        with self.rt.autocast(), no_value_checks():  # no check may stall the GPU (device.py)
            losses, logs = self.task.losses(batch, self.step)
        for name, opt in self.optimizers.items():
            loss = losses[name]
            if not loss.requires_grad:  # e.g. the discriminator before it is switched on
                continue
            opt.zero_grad(set_to_none=True)  # last step's grads, and any an earlier loss left on these params
            if self.scaler:
                self.scaler.scale(loss).backward()
            else:
                loss.backward()
            if self.place.distributed:  # every rank now holds the gradient of the global batch
                distributed.average_gradients([p for g in opt.param_groups for p in g["params"]],
                                              f"averaging the gradients of {name!r} at step {self.step}")
            if self.scaler:
                self.scaler.unscale_(opt)
            if self.grad_clip[name]:
                params = [p for g in opt.param_groups for p in g["params"]]
                logs[f"grad_norm/{name}"] = torch.nn.utils.clip_grad_norm_(params, self.grad_clip[name])
            if self.scaler:
                self.scaler.step(opt)
            else:
                opt.step()
        if self.scaler:
            self.scaler.update()
        if self.ema:
            self.ema.update(self.task.ema_module())
        return logs

    def fit(self, batch_at: Callable[[int], object], steps: int | None = None, progress: bool = True) -> list[dict]:
        """Train until `steps` (default cfg.steps) or `cfg.max_seconds` of training; checkpoint on the way."""
        total = steps if steps is not None else self.cfg.steps
        budget = self.cfg.max_seconds

        def done() -> bool:
            return self.step >= total or (budget is not None and self.train_seconds >= budget)

        if progress and self.place.is_main and self.step > 0:  # say what a checkpoint found in place means
            if not done():
                print(f"{self.task.kind}: resuming from step {self.step} ({self.train_seconds:.0f} s of training "
                      f"so far) in {self.ckpt_path}", flush=True)
            else:
                more = f", more than the {total} asked for" if self.step > total else ""
                print(f"{self.task.kind}: already trained in {self.ckpt_path} ({self.step} steps, "
                      f"{self.train_seconds:.0f} s{more}): nothing to train", flush=True)
        bar_args = {"desc": self.task.kind, "disable": not progress or done() or not self.place.is_main,
                    "dynamic_ncols": True}
        if budget is None:
            bar = progress_bar(total=total, initial=self.step, **bar_args)
        else:  # a wall-clock budget: the bar counts its seconds (the postfix the steps, where they may end it first)
            bar = progress_bar(total=budget, initial=min(self.train_seconds, budget), unit="s",
                       bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s of training{postfix}", **bar_args)
        sync = torch.cuda.synchronize if self.rt.device.type == "cuda" else (lambda: None)
        sync()
        first_step = self.step
        t_last, images_since = time.perf_counter(), 0
        if self.compiled is not None:
            compile_in_place(self.compiled, self.cfg.compile)
        try:
            while not done():
                batch = batch_at(self.step)
                if self.compiled is not None and self.compile_seconds is None:  # the first step compiles: time it alone
                    logs = self._first_compiled_step(batch, sync)
                else:
                    logs = self.train_step(batch)
                self.step += 1
                self.extra.clear()  # values derived from the weights (e.g. a scale factor) are stale now
                images_since += self.cfg.batch_size
                if budget is None:
                    bar.update(1)
                else:  # host-side seconds (the GPU may lag behind until the next log line): fine for a progress bar
                    bar.update(min(self.train_seconds + time.perf_counter() - t_last, budget) - bar.n)
                if self.step % self.cfg.log_every == 0 or self.step == total:
                    sync()
                    now = time.perf_counter()
                    self.train_seconds += now - t_last
                    logs = {k: float(v) for k, v in logs.items()}  # one device sync per log line, not per step
                    if self.place.distributed:  # the losses of the global batch; rank 0's clock, so all stop together
                        logs = distributed.mean_over_ranks(logs, self.rt.device)
                        self.train_seconds = distributed.from_main(self.train_seconds, self.rt.device)
                    logs.update(step=self.step, seconds=round(self.train_seconds, 2),
                                images_per_s=images_since / max(now - t_last, 1e-9))
                    t_last, images_since = now, 0
                    self.history.append(logs)
                    step = f"{self.step}/{total}" if budget is not None and total < 10**6 else self.step  # which limit ends it
                    bar.set_postfix({"step": step} | {k: f"{v:.3g}" for k, v in logs.items() if k.startswith("loss")})
                if self.ckpt_path is not None and self.step % self.cfg.ckpt_every == 0:
                    self.save()
        except KeyboardInterrupt:
            if self.ckpt_path is not None:
                self.save(wait=False)  # the other ranks may be stopping too: waiting for them could hang
                if self.place.is_main:
                    print(f"\nInterrupted at step {self.step}; saved {self.ckpt_path}. Run again to resume.")
            raise
        except Exception as err:
            if self.place.distributed and not isinstance(err, distributed.DistributedError):
                print(f"rank {self.place.rank} of {self.place.world_size} failed at step {self.step}: "
                      f"{type(err).__name__}: {err}; the other ranks will stop too", file=sys.stderr, flush=True)
            raise
        finally:
            bar.close()
            self._stop_compiling()
        sync()
        if self.step == first_step:  # nothing trained (e.g. a finished checkpoint was loaded): nothing to save
            return self.history
        self.train_seconds += time.perf_counter() - t_last
        if self.place.distributed:
            self.train_seconds = distributed.from_main(self.train_seconds, self.rt.device)
        if self.ckpt_path is not None:
            self.save()
        if not bar_args["disable"]:  # the run's summary as a plain line, for logs and saved notebooks
            last = self.history[-1] if self.history else {}
            losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items() if k.startswith("loss"))
            print(f"{self.task.kind}: {self.step} steps, {self.train_seconds:.0f} s of training"
                  + (f", {last['images_per_s']:,.0f} images/s" if "images_per_s" in last else "")
                  + (f"; {losses}" if losses else ""), flush=True)
        return self.history


def _is_compiler_error(err: BaseException) -> bool:
    """Whether an exception comes from torch.compile's machinery (Dynamo, Inductor, Triton, the C++ compiler)."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor", "triton")) or "BackendCompilerFailed" in type(err).__name__


def check_same_config(saved: dict | None, current: dict, path) -> None:
    """Refuse to resume a checkpoint of another model config (its weights would not fit, or would fit a model that
    the checkpoint's config no longer describes). Keys only one side has (a field added since) are not compared."""
    def flat(d, prefix=""):
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update(flat(v, f"{prefix}{k}."))
            else:
                out[f"{prefix}{k}"] = list(v) if isinstance(v, (tuple, list)) else v
        return out

    if not saved:
        return
    old, new = flat(saved), flat(current)
    differ = [k for k in sorted(set(old) & set(new)) if old[k] != new[k]]
    if differ:
        shown = "; ".join(f"{k}: checkpoint {old[k]!r:.60}, this run {new[k]!r:.60}" for k in differ[:4])
        raise CheckpointError(f"'{path}' was trained with another config ({shown}"
                              f"{'; ...' if len(differ) > 4 else ''}). Resume it with the config it was trained "
                              "with, or train this config into another checkpoint path (or delete the old one; "
                              "`minildm train --fresh`).")
