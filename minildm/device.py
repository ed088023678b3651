"""Device, precision and seeding: picked for the student, printed in every notebook's first cell.

Precision rules (COURSE.md, "Modes"):
- CUDA with bf16 support (Ampere and later): bf16 autocast, no grad scaler.
- older CUDA (e.g. a Colab T4): fp16 autocast with a grad scaler.
- Apple MPS and CPU: fp32.
"""

from __future__ import annotations

import contextlib
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from minildm import distributed

FAST_ENV = "MINILDM_FAST"


def fast_mode() -> bool:
    """True when the environment variable MINILDM_FAST is set to 1/true/yes (CI sets it)."""
    return os.environ.get(FAST_ENV, "").strip().lower() in {"1", "true", "yes", "on"}


def pick_device(prefer: str | None = None) -> torch.device:
    """CUDA if present, else Apple MPS, else CPU. `prefer` ("cpu", "cuda", "mps") overrides."""
    if prefer is not None:
        return torch.device(prefer)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def pick_dtype(device: torch.device) -> torch.dtype:
    """The autocast dtype this device trains in: bf16, fp16 (+ grad scaler) or fp32."""
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def autocast_off(device: torch.device):
    """A context that switches autocast off on CUDA and CPU (other devices have nothing to switch off)."""
    if device.type in ("cuda", "cpu"):
        return torch.autocast(device_type=device.type, enabled=False)
    return contextlib.nullcontext()


@dataclass(frozen=True)
class Runtime:
    """Where and how a notebook or command runs."""

    device: torch.device
    dtype: torch.dtype
    fast: bool

    @property
    def needs_grad_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self, cache_enabled: bool = True):
        """Autocast context for forward passes; a no-op in fp32. Inside a CUDA graph pass
        cache_enabled=False (the cached low-precision weights must not outlive the recording)."""
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype, cache_enabled=cache_enabled)

    def device_name(self) -> str:
        """The device in a few words, for figure titles: "NVIDIA H200", "cpu", "mps"."""
        return torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else self.device.type

    def describe(self) -> str:
        mode = "fast (tiny configs, CPU-friendly)" if self.fast else "full"
        if self.device.type == "cuda":
            mem = torch.cuda.get_device_properties(self.device).total_memory / 2**30
            where = f"cuda ({self.device_name()}, {mem:.0f} GiB)"
        elif self.device.type == "cpu":
            threads = torch.get_num_threads()
            where = f"cpu ({threads} thread{'s' if threads > 1 else ''})"
        else:
            where = self.device.type
        precision = {torch.bfloat16: "bf16 autocast", torch.float16: "fp16 autocast + grad scaler",
                     torch.float32: "fp32"}[self.dtype]
        here = distributed.place()
        ranks = f" | data parallel: {here.world_size} processes" if here.distributed else ""
        return f"minildm | mode: {mode} | device: {where} | precision: {precision} | torch {torch.__version__}{ranks}"


def setup(seed: int = 0, device: str | None = None, fast: bool | None = None, verbose: bool = True) -> Runtime:
    """Seed everything, pick device and precision, and (by default) print them. First cell of every notebook.
    Under torchrun it also joins the process group (distributed.py) and picks GPU LOCAL_RANK; only rank 0 prints."""
    seed_everything(seed)  # the same seed on every rank: the same initial weights
    dev = pick_device(device)
    here = distributed.init(dev)
    if dev.type == "cuda" and here.distributed:
        dev = torch.device("cuda", here.local_rank)
    rt = Runtime(device=dev, dtype=pick_dtype(dev), fast=fast_mode() if fast is None else fast)
    if dev.type == "cpu":
        torch.set_num_threads(cpu_threads())
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if verbose and here.is_main:
        print(rt.describe())
    return rt


def cpu_threads() -> int:
    """Threads for torch on a CPU: OMP_NUM_THREADS when set, else half the cores this process may use (at least 1).

    torch's default, one thread per core, assumes nothing else runs: on a two-core laptop with a browser (or a
    Jupyter server, or a second kernel) busy, its threads wait for each other and fast mode ran about 5 times slower
    than with one thread (40 autoencoder steps: 54 s against 12 s, two cores, another process running)."""
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, cores // 2)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --------------------------------------------------------------------------------------------------
# Keeping the GPU busy: no host-device synchronisation in a training step
# --------------------------------------------------------------------------------------------------
# The CPU queues kernels and the GPU runs them, and a step is fast when the CPU stays ahead. Anything that
# needs a CUDA tensor's value on the host (`.item()`, `if tensor.any():`, `int(t.min())`, `torch.nonzero`, a
# copy from ordinary host memory) makes the CPU wait until the GPU has drained its queue; the GPU then idles
# while the CPU queues the next kernels. A dozen such waits per step cost the full-mode UNet two thirds of its
# speed on an H200 (benchmarks/train_speed.py). Outside the Trainer, the UNet reads a GPU t's values on its
# first call only (`UNet.check_inputs`), so a loop of one's own pays one wait, not one per step.

_value_checks = True


@contextlib.contextmanager
def no_value_checks():
    """Skip the input checks that read CUDA tensors' values (timesteps in range, token ids in the vocabulary) in
    this block. The Trainer runs its steps here: their inputs come from the training code, not from a user, and
    each check would stall the GPU. Shape and dtype checks still run (they need no values)."""
    global _value_checks
    previous, _value_checks = _value_checks, False
    try:
        yield
    finally:
        _value_checks = previous


def may_read_values(x: torch.Tensor) -> bool:
    """Whether an input check may read x's values on the host now: not under torch.compile, not while a CUDA graph
    records, and not for a CUDA tensor inside `no_value_checks()`."""
    if torch.compiler.is_compiling():
        return False
    if x.is_cuda:
        return _value_checks and not torch.cuda.is_current_stream_capturing()
    return True


def to_device(x: torch.Tensor, device) -> torch.Tensor:
    """Copy a CPU tensor to `device` without making the host wait: through pinned (page-locked) memory with
    non_blocking=True on CUDA, a plain copy elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def cuda_graphed(fn, *example_args: torch.Tensor, warmup: int = 1):
    """Record `fn(*example_args)` once as a CUDA graph; return a function that replays it on new tensors of the
    same shapes, dtypes and device (copied into the recorded input buffers) and returns a copy of the output.

    Why: a sampler calls the same network on same-shaped inputs hundreds of times. In eager mode the CPU launches
    the ~1,000 kernels of one UNet forward one by one, and at sampling batch sizes that launching, not the GPU,
    sets the pace. A replayed graph launches them all at once. While recording, `fn` must not synchronise with the
    host (no `.item()`, no branching on tensor values): the UNet skips its timestep-range check then.
    Follows the recipe of the PyTorch CUDA-graphs notes: warm up on a side stream, record, replay.
    """
    static_args = [a.clone() for a in example_args]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    # warm-up: cuDNN/cuBLAS pick their algorithms and workspaces on the first call; one pass does it (each pass is a
    # full model call, which a 20-step sampler would pay for again and again: notebook 08 times it per sample)
    with torch.cuda.stream(side):
        for _ in range(warmup):
            fn(*static_args)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = fn(*static_args)

    def replay(*args: torch.Tensor) -> torch.Tensor:
        for buffer, value in zip(static_args, args, strict=True):
            if buffer.shape != value.shape:
                raise ValueError(f"this CUDA graph was recorded for inputs of shape {tuple(buffer.shape)}, "
                                 f"got {tuple(value.shape)}; record a new one for new shapes")
            buffer.copy_(value)
        graph.replay()
        return static_out.clone()

    return replay
