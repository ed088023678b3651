"""Finite image data sets for training (stage 11): decoded once into memory, split, fed by step.

Shapes is an endless stream; MNIST, CIFAR-10, CelebA and your own image folders are not. A run on one of them

1. decodes every image once (`load_images`): PIL opens it, torchvision transforms bring it to the asked number
   of channels (`T.Grayscale` for grey, RGB otherwise), resize its shorter side and crop the centre square, and it
   is kept as uint8 (N, C, S, S) (10,000 CIFAR-10 images at 32 px: 30 MB). A file that cannot be read is skipped
   with one warning and counted (`ImageTensors.skipped`), so a bad file never stops a run in the middle of an epoch;
2. sets a fixed, seeded part aside (`ImageTensors.split`): the held-out images evaluation and the classifier's test
   use, never trained on;
3. feeds the trainer by step (`tensor_batch_at`): epoch e is a permutation of the training images fixed by
   (seed, e), so a resumed run sees the batches the interrupted one would have seen. A batch is one index into a
   tensor already on the device, so the data never keeps the GPU waiting (`benchmarks/data_throughput.py`).

Image folders: `root/<class>/<image>` (the folder names are the classes, sorted), or `root/<image>` without
labels. Any mix of sizes and modes (grey, RGBA, palette, ...) is fine.
"""

from __future__ import annotations

import os
import signal
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T
from torchvision.datasets.folder import IMG_EXTENSIONS

from minildm import distributed
from minildm.data.datasets import DATASETS, DatasetNotFoundError, epoch_indices, load_dataset


@dataclass
class ImageTensors:
    """A finite labelled (or unlabelled) image data set in memory.

    images: uint8 (N, C, S, S); labels: int64 (N,) or None; classes: the label names (None without labels);
    skipped: (file, reason) for every file that could not be read."""

    images: torch.Tensor
    labels: torch.Tensor | None = None
    classes: list[str] | None = None
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    def subset(self, index: torch.Tensor) -> ImageTensors:
        labels = self.labels[index] if self.labels is not None else None
        return ImageTensors(self.images[index], labels, self.classes, self.skipped)

    def split(self, held_out: int, seed: int = 0) -> tuple[ImageTensors, ImageTensors]:
        """(train, held_out): a seeded random choice of `held_out` images set aside, the rest to train on. The
        held-out images come in that random order, so that any first k of them are a random sample of the whole
        (an image folder lists its classes one after another: in file order the first k would be one class)."""
        if not 0 < held_out < len(self):
            raise ValueError(f"cannot hold out {held_out} of {len(self)} images; hold out at least 1 and leave "
                             "some to train on (add images, or lower the preset's held_out)")
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
        return self.subset(order[held_out:].sort().values), self.subset(order[:held_out])

    def batch(self, index, device="cpu") -> dict:
        """{"image": float (B, C, S, S) in [-1, 1] on device, "label": (B,) int64 (when labelled)}."""
        index = torch.as_tensor(index, dtype=torch.long)
        out = {"image": to_float(self.images[index].to(device, non_blocking=True))}
        if self.labels is not None:
            out["label"] = self.labels[index].to(device, non_blocking=True)
        return out

    def to(self, device) -> ImageTensors:
        labels = self.labels.to(device) if self.labels is not None else None
        return ImageTensors(self.images.to(device), labels, self.classes, self.skipped)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float32 [-1, 1]."""
    return images.float().div_(127.5).sub_(1.0)


def image_transform(image_size: int, channels: int) -> T.Compose:
    """PIL image of any mode and size -> uint8 (channels, image_size, image_size): torchvision transforms only."""
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    to_channels = T.Grayscale(1) if channels == 1 else T.Lambda(_rgb)
    return T.Compose([
        T.Lambda(_eight_bit),                  # 16-bit and float grey -> 8 bits, scaled
        to_channels,
        T.Resize(image_size, antialias=True),  # shorter side -> image_size
        T.CenterCrop(image_size),              # -> square
        T.PILToTensor(),                       # (C, H, W) uint8
    ])


def _eight_bit(image: Image.Image) -> Image.Image:
    """Grey of more than 8 bits -> 8-bit grey (mode "L"), scaled: PIL's own convert("L") clips at 255, so a 16-bit
    PNG or TIFF (modes "I;16...", or "I") would come out almost white. Integer grey above 255 is read as 16-bit
    (0..65535 -> 0..255); float grey ("F") as 0..1 when it stays within it. Other modes pass unchanged."""
    if not (image.mode.startswith("I") or image.mode == "F"):
        return image
    values = np.asarray(image, dtype=np.float64)
    top = values.max() if values.size else 0.0
    if image.mode == "F":
        values = values * 255.0 if top <= 1.0 else values
    elif top > 255:
        values = values / 257.0  # 65535 -> 255
    return Image.fromarray(np.clip(np.rint(values), 0, 255).astype(np.uint8))  # 2-D uint8: mode "L"


def _rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB: grey through T.Grayscale(3) (three equal channels), palette and RGBA through PIL
    (a transparent pixel keeps the colour stored under it)."""
    if image.mode in ("L", "LA", "1"):  # ("I" and "F" grey arrive as "L" from _eight_bit)
        return T.Grayscale(3)(image.convert("L"))
    return image.convert("RGB")


# --------------------------------------------------------------------------------------------------
# Image folders
# --------------------------------------------------------------------------------------------------


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMG_EXTENSIONS and not path.name.startswith(".")


def scan_image_folder(root: str | Path) -> tuple[list[Path], list[int] | None, list[str] | None]:
    """(files, labels, classes) of an image folder: root/<class>/**/<image> -> labelled by folder (classes sorted),
    or root/<image> -> unlabelled (labels and classes None)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DatasetNotFoundError("imagefolder", root, download=False)
    classes, files, labels = [], [], []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        found = sorted(p for p in folder.rglob("*") if p.is_file() and is_image_file(p))
        if found:
            labels += [len(classes)] * len(found)
            classes.append(folder.name)
            files += found
    loose = sorted(p for p in root.iterdir() if p.is_file() and is_image_file(p))
    if classes:
        if loose:
            warnings.warn(f"{root} has class folders and {len(loose)} images beside them (e.g. {loose[0].name}); "
                          "those are not in any class and are left out: move them into a class folder",
                          stacklevel=2)
        return files, labels, classes
    if not loose:
        raise DatasetNotFoundError("imagefolder", root, download=False,
                                   cause=ValueError(f"no image files ({', '.join(IMG_EXTENSIONS)}) in it or in "
                                                    "its subfolders"))
    return loose, None, None


class _Decode(torch.utils.data.Dataset):
    """Item i -> (uint8 tensor or None, error or None): decoding in DataLoader workers, one file at a time."""

    def __init__(self, load: Callable[[int], Image.Image], n: int, transform):
        self.load, self.n, self.transform = load, n, transform

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int):
        try:
            return self.transform(self.load(i)), None
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:  # what PIL raises
            return None, f"{type(err).__name__}: {err}"


def _open(path: Path) -> Image.Image:
    with Image.open(path) as image:
        image.load()  # decode now: a truncated file fails here, inside the try of _Decode
        return image.copy()


def _leave_ctrl_c_to_main(worker_id: int) -> None:
    """Ctrl-C reaches every process of the terminal: the workers ignore it and the main process stops them, so an
    interrupted decode ends with one line, not a traceback from each worker."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def decode_all(load: Callable[[int], Image.Image], n: int, image_size: int, channels: int, names: list[str],
               workers: int | None = None) -> tuple[torch.Tensor, list[int], list[tuple[str, str]]]:
    """Decode items 0..n-1 -> (uint8 (K, C, S, S), kept indices, skipped (name, reason)); in parallel when large."""
    if workers is None:  # worker processes pay off for thousands of files; forked ones need no pickling
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        forks = torch.multiprocessing.get_start_method(allow_none=True) in (None, "fork") and os.name == "posix"
        workers = min(8, cores) if n >= 4096 and cores > 1 and forks else 0
    loader = torch.utils.data.DataLoader(_Decode(load, n, image_transform(image_size, channels)), batch_size=256,
                                         num_workers=workers, collate_fn=list, worker_init_fn=_leave_ctrl_c_to_main)
    images, kept, skipped = [], [], []
    for chunk_start, chunk in zip(range(0, n, 256), loader):
        for i, (image, error) in enumerate(chunk, chunk_start):
            if error is None:
                images.append(image)
                kept.append(i)
            else:
                skipped.append((names[i], error))
    if not images:
        raise ValueError(f"none of the {n} files could be read as an image (first: {skipped[0][0]}: "
                         f"{skipped[0][1]}); check that they are images")
    if skipped:
        warnings.warn(f"skipped {len(skipped)} of {n} files that could not be read as images (e.g. {skipped[0][0]}: "
                      f"{skipped[0][1]}); kept the other {len(kept)}", stacklevel=2)
    return torch.stack(images), kept, skipped


def _pick(n: int, limit: int | None, seed: int) -> list[int]:
    """All of range(n), or a seeded random `limit` of them (sorted)."""
    if limit is None or limit >= n:
        return list(range(n))
    return sorted(torch.randperm(n, generator=torch.Generator().manual_seed(seed))[:limit].tolist())


def has_class_folders(root: Path) -> bool:
    return root.is_dir() and any(p.is_dir() and any(map(is_image_file, p.iterdir())) for p in root.iterdir())


def reads_class_folders(name: str, root: Path) -> bool:
    """Whether `load_images` reads data set `name` from class folders root/<class>/<image>: an image folder always,
    CIFAR-10 where root holds such folders instead of torchvision's cifar-10-batches-py (e.g. its test JPEGs)."""
    return name == "imagefolder" or (name == "cifar10" and not (root / "cifar-10-batches-py").is_dir()
                                     and has_class_folders(root))


def load_images(name: str, root, image_size: int, channels: int = 3, train: bool = True,
                limit: int | None = None, seed: int = 0) -> ImageTensors:
    """Decode a real data set once into an `ImageTensors` (`limit`: only a seeded random subset of that many).

    name: mnist, fashion-mnist, cifar10, celeba or imagefolder. cifar10 reads torchvision's cifar-10-batches-py
    under root, or root/<class>/<image> (e.g. the test split's JPEGs). MNIST-like data sets read their `train`
    split. Labels: the class of each image (CelebA has attributes, not classes: no labels)."""
    key = name.lower().strip()
    if key not in DATASETS or key == "shapes":
        raise ValueError(f"unknown finite data set {name!r}; known: {', '.join(d for d in DATASETS if d != 'shapes')}"
                         " (Shapes is generated, not loaded)")
    root = Path(root).expanduser()
    if reads_class_folders(key, root):
        files, labels, classes = scan_image_folder(root)
        pick = _pick(len(files), limit, seed)
        names = [str(files[i]) for i in pick]
        images, kept, skipped = decode_all(lambda i: _open(files[pick[i]]), len(pick), image_size, channels, names)
        labels = torch.tensor([labels[pick[i]] for i in kept]) if labels is not None else None
        return ImageTensors(images, labels, classes, skipped)
    base = load_dataset(key, root, image_size, train=train, channels=channels).base  # (PIL image, target) pairs
    pick = _pick(len(base), limit, seed)
    images, kept, skipped = decode_all(lambda i: base[pick[i]][0], len(pick), image_size, channels,
                                       [f"{key}[{i}]" for i in pick])
    if key == "celeba":
        return ImageTensors(images, None, None, skipped)
    targets = getattr(base, "targets", None)
    labels = torch.as_tensor([int(targets[pick[i]]) for i in kept]) if targets is not None else \
        torch.tensor([int(base[pick[i]][1]) for i in kept])
    return ImageTensors(images, labels, list(base.classes), skipped)


def tensor_batch_at(data: ImageTensors, batch_size: int, device, seed: int = 0, hflip: bool = False,
                    rank: int | None = None, world_size: int | None = None) -> Callable[[int], dict]:
    """The batch feeder of an `ImageTensors`: batch_at(step) -> {"image", "label"} on `device`. Epochs are seeded
    permutations (as `dataset_batch_at`); `hflip` mirrors a random half of each batch, also fixed by the step.
    Under torchrun batch_size is the global batch and each rank gets its contiguous part (as `dataset_batch_at`)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if len(data) == 0:
        raise ValueError("tensor_batch_at got an empty data set")
    mine = distributed.rank_slice(batch_size, rank, world_size)  # this rank's part of each global batch
    data = data.to(device)  # uint8: the whole data set moves once; a batch is then one index on the device

    def batch_at(step: int) -> dict:
        index = torch.as_tensor(epoch_indices(len(data), batch_size, step, seed)[mine], device=device)
        batch = data.batch(index, device)
        if hflip:  # drawn for the global batch, so N ranks flip what one process would
            flip = torch.rand(batch_size, generator=torch.Generator().manual_seed(seed * 100_003 + step)) < 0.5
            x = batch["image"]
            batch["image"] = torch.where(flip[mine].to(device)[:, None, None, None], x.flip(-1), x)
        return batch

    return batch_at
