"""Real image data sets through torchvision, with the same item format as Shapes (stage 1).

`load_dataset(name, root, image_size)` returns a Dataset of dicts: `image` (C, H, W) in [-1, 1],
resized and centre-cropped to image_size, plus `label` (or CelebA's 40 binary `attributes`).

Where the files come from, in order:
1. a local copy under `root` (no network needed);
2. with download=True, torchvision downloads it into `root`;
3. otherwise one clear DatasetNotFoundError naming the data set, the path we looked at and the fix.

MNIST and Fashion-MNIST are read straight from their IDX files (gzipped or not), one split at a time,
so a folder holding only the test split works; torchvision is used only to download them.
"""

from __future__ import annotations

import functools
import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision import datasets as tv
from torchvision import transforms as T

from minildm import distributed
from minildm.data.shapes import ShapesConfig, ShapesDataset

DATASETS = ("shapes", "mnist", "fashion-mnist", "cifar10", "celeba", "imagefolder")


class DatasetNotFoundError(FileNotFoundError):
    """A data set is neither under `root` nor downloadable (e.g. offline)."""

    def __init__(self, name: str, expected: Path, download: bool, cause: Exception | None = None):
        expected = Path(expected)
        because = f" [{type(cause).__name__}: {cause}]" if cause is not None else ""
        if name == "imagefolder":  # nothing to download: the images are the user's own
            what = (" (no such folder)" if not expected.exists() else
                    " (a file, not a folder)" if not expected.is_dir() else "")
            message = (f"data set 'imagefolder': no images found at {expected}{what}: put your images in "
                       f"{expected}/<class name>/<image> (the folders are the classes) or {expected}/<image> (no "
                       f"labels).{because}")
        else:
            how = (f"pass download=True on a machine that is online (torchvision saves it there), "
                   f"or copy the files to {expected}")
            tried = " and the download failed too" if download else " and download=False"
            message = (f"data set {name!r} not found at {expected}: no local copy there{tried}. To get it: "
                       f"{how}.{because}")
        super().__init__(message)
        self.name, self.expected = name, expected


class ImageDataset(Dataset):
    """Wraps a data set of (PIL image, target) pairs into dicts {image, label or attributes}."""

    def __init__(self, base, image_size: int, channels: int = 3, target_key: str = "label"):
        self.base, self.channels, self.target_key = base, channels, target_key
        self.classes = getattr(base, "classes", None)
        self.transform = T.Compose([
            T.Resize(image_size),      # shorter side -> image_size (antialiased)
            T.CenterCrop(image_size),  # non-square images -> square
            T.ToTensor(),              # (C, H, W) in [0, 1]
            T.Normalize([0.5] * channels, [0.5] * channels),  # -> [-1, 1]
        ])

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        image, target = self.base[index]
        image = image.convert("RGB" if self.channels == 3 else "L")  # grey <-> colour as asked
        return {"image": self.transform(image), self.target_key: target}


class IdxDataset(Dataset):
    """MNIST-style images (N, H, W) uint8 with integer labels; items are (PIL image, int)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, classes: list[str]):
        if len(images) != len(labels):
            raise ValueError(f"IDX files disagree: {len(images)} images but {len(labels)} labels")
        self.images, self.targets, self.classes = images, labels, classes

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return Image.fromarray(self.images[index].numpy()), int(self.targets[index])  # 2-D uint8 -> "L"


def read_idx(path: Path) -> torch.Tensor:
    """Read an IDX file of unsigned bytes (MNIST's format), gzipped or not.

    Layout: two zero bytes, a type code (0x08 = uint8), the number of dimensions d,
    d big-endian int32 sizes, then the data in row-major order.
    """
    with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] != 0x08:
        raise ValueError(f"{path} is not an IDX file of unsigned bytes; delete it and download it again")
    shape = tuple(np.frombuffer(data, dtype=">i4", count=data[3], offset=4))
    pixels = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * data[3])
    return torch.from_numpy(pixels.reshape(shape).copy())


def _find(folder: Path, stem: str) -> Path:
    for path in (folder / stem, folder / f"{stem}.gz"):
        if path.is_file():
            return path
    raise FileNotFoundError(f"neither {stem} nor {stem}.gz in {folder}")


def _load_idx(tv_class, root: Path, train: bool, download: bool) -> IdxDataset:
    raw = root / tv_class.__name__ / "raw"
    split = "train" if train else "t10k"
    stems = (f"{split}-images-idx3-ubyte", f"{split}-labels-idx1-ubyte")
    try:
        paths = [_find(raw, stem) for stem in stems]
    except FileNotFoundError:
        if not download:
            raise
        tv_class(str(root), train=train, download=True)  # downloads both splits into raw/
        paths = [_find(raw, stem) for stem in stems]
    return IdxDataset(read_idx(paths[0]), read_idx(paths[1]).long(), list(tv_class.classes))


def expected_path(name: str, root: Path) -> Path:
    """Where `name`'s files live under root (what torchvision's download creates)."""
    return {"mnist": root / "MNIST" / "raw", "fashion-mnist": root / "FashionMNIST" / "raw",
            "cifar10": root / "cifar-10-batches-py", "celeba": root / "celeba", "imagefolder": root}[name]


def load_dataset(name: str, root, image_size: int, train: bool = True, download: bool = False,
                 channels: int = 3) -> Dataset:
    """A data set of dicts {image (channels, image_size, image_size) in [-1, 1], label | attributes}.

    name: one of DATASETS. "shapes" is generated (root is ignored; train -> seed 0, 50,000 images,
    else seed 1, 10,000 images). "imagefolder" reads root/<class>/<image> (train is ignored).
    """
    key = name.lower().strip()
    if key not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; known data sets: {', '.join(DATASETS)}")
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"image_size must be a positive int, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 (grey) or 3 (RGB), got {channels!r}")
    if key == "shapes":
        if channels != 3:
            raise ValueError("Shapes is defined by its colours; load it with channels=3")
        return ShapesDataset(ShapesConfig(image_size=image_size, seed=0 if train else 1),
                             length=50_000 if train else 10_000)
    if root is None:
        raise ValueError(f"load_dataset({name!r}) needs a root folder to find (or download) the files in")
    root = Path(root).expanduser()
    target_key = "label"
    try:
        if key == "mnist":
            base = _load_idx(tv.MNIST, root, train, download)
        elif key == "fashion-mnist":
            base = _load_idx(tv.FashionMNIST, root, train, download)
        elif key == "cifar10":
            base = tv.CIFAR10(str(root), train=train, download=download)
        elif key == "celeba":
            base = tv.CelebA(str(root), split="train" if train else "test", target_type="attr", download=download)
            target_key = "attributes"
        else:
            base = tv.ImageFolder(str(root))
    except (OSError, RuntimeError) as err:  # torchvision: RuntimeError when missing, OSError when offline
        raise DatasetNotFoundError(key, expected_path(key, root), download, err) from err
    return ImageDataset(base, image_size, channels, target_key)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> list[int]:
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()


def epoch_indices(n: int, batch_size: int, step: int, seed: int = 0) -> list[int]:
    """The indices of batch `step` when a data set of n items is read in epochs: epoch e is a permutation of
    range(n) fixed by (seed, e), and batches run through the epochs back to back (one may span two)."""
    positions = (divmod(k, n) for k in range(step * batch_size, (step + 1) * batch_size))
    return [_permutation(n, seed, epoch)[pos] for epoch, pos in positions]


def dataset_batch_at(dataset, batch_size: int, seed: int = 0, collate=None, rank: int | None = None,
                     world_size: int | None = None) -> Callable[[int], object]:
    """The batch feeder of a map-style data set: `batch_at(step)`, a fresh permutation each epoch fixed by
    (seed, epoch), so a resumed run sees the batches the interrupted one would have seen.

    Data parallel (torchrun), this is the distributed sampler: batch_size is the global batch, every rank computes
    the same permutation and takes its contiguous part b = batch_size / world_size of each global batch, so the
    ranks' parts are disjoint and together are the batch one process would see. rank and world_size default to
    this process's place in the process group (rank 0 of 1 without torchrun)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    mine = distributed.rank_slice(batch_size, rank, world_size)  # this rank's part of each global batch
    n = len(dataset)
    if n == 0:
        raise ValueError("dataset_batch_at got an empty data set")
    collate = collate or torch.utils.data.default_collate

    def batch_at(step: int):
        return collate([dataset[i] for i in epoch_indices(n, batch_size, step, seed)[mine]])

    return batch_at
