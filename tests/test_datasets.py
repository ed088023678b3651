"""Tests for the torchvision data sets (minildm/data/datasets.py) on the real files in ../shared/data."""

import os
from pathlib import Path

import pytest
import torch

from minildm.data.datasets import DATASETS, DatasetNotFoundError, load_dataset, read_idx
from minildm.data.shapes import ShapesDataset


def shared_data() -> Path | None:
    """The checkout's sibling shared/data (where CI puts it), else $MINILDM_DATA."""
    for candidate in (Path(__file__).resolve().parents[2] / "shared" / "data", os.environ.get("MINILDM_DATA")):
        if candidate and Path(candidate).is_dir():
            return Path(candidate)
    return None


DATA = shared_data()
needs_data = pytest.mark.skipif(DATA is None, reason="no shared data: expected ../shared/data beside the "
                                                     "checkout or a folder in $MINILDM_DATA")


@needs_data
def test_mnist_test_split():
    ds = load_dataset("mnist", DATA, image_size=32, train=False)
    assert len(ds) == 10_000
    assert set(ds.base.targets.tolist()) == set(range(10))
    for i in range(0, 10_000, 500):
        item = ds[i]
        assert item["image"].shape == (3, 32, 32) and item["image"].dtype == torch.float32
        assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
        assert item["image"].min() == -1.0 and item["image"].max() > 0.9  # black background, white strokes
        assert torch.equal(item["image"][0], item["image"][2])  # grey copied to three channels
        assert item["label"] == ds.base.targets[i] and 0 <= item["label"] <= 9
    assert ds[0]["label"] == 7  # the first MNIST test digit is a 7
    grey = load_dataset("mnist", DATA, image_size=28, train=False, channels=1)[0]["image"]
    assert grey.shape == (1, 28, 28)


@needs_data
def test_read_idx_header():
    images = read_idx(DATA / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz")
    assert images.shape == (10_000, 28, 28) and images.dtype == torch.uint8


@needs_data
def test_mnist_train_split_missing_is_a_clear_error():
    if (DATA / "MNIST" / "raw" / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("this copy of MNIST has the training split")
    with pytest.raises(DatasetNotFoundError, match="mnist"):
        load_dataset("mnist", DATA, image_size=32, train=True)


@needs_data
def test_cifar10_test_as_image_folder():
    ds = load_dataset("imagefolder", DATA / "cifar10-test", image_size=32)
    assert len(ds) == 10_000 and len(ds.classes) == 10 and "airplane" in ds.classes
    item = ds[0]
    assert item["image"].shape == (3, 32, 32) and item["label"] == 0
    assert -1.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert ds[9_999]["label"] == 9
    assert load_dataset("imagefolder", DATA / "cifar10-test", image_size=16)[0]["image"].shape == (3, 16, 16)


@pytest.mark.parametrize("name, subpath", [
    ("mnist", "MNIST/raw"), ("fashion-mnist", "FashionMNIST/raw"), ("cifar10", "cifar-10-batches-py"),
    ("celeba", "celeba"), ("imagefolder", ""),
])
def test_missing_root_raises_dataset_not_found(tmp_path, name, subpath):
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset(name, root, image_size=32)
    message = str(info.value)
    assert name in message and str(root / subpath).rstrip("/") in message
    assert "download=True" in message or "put your images" in message
    assert isinstance(info.value, FileNotFoundError)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError) as info:
        load_dataset("imagenet", "/tmp", image_size=32)
    assert all(name in str(info.value) for name in DATASETS)


def test_bad_arguments():
    with pytest.raises(ValueError, match="channels"):
        load_dataset("shapes", None, image_size=32, channels=2)
    with pytest.raises(ValueError, match="image_size"):
        load_dataset("mnist", "/tmp", image_size=0)


def test_shapes_through_load_dataset():
    train, test = load_dataset("shapes", None, 32), load_dataset("shapes", None, 32, train=False)
    assert isinstance(train, ShapesDataset) and len(train) == 50_000 and len(test) == 10_000
    assert train[0]["image"].shape == (3, 32, 32)
    assert not torch.equal(train[0]["image"], test[0]["image"])  # different seeds
