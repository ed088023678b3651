"""Stage 1, the data: the procedural Shapes data set and real image data sets through torchvision, and one batch
feeder for each (`shapes_batch_at`, `dataset_batch_at`, and `tensor_batch_at` for finite data decoded into memory):
`batch_at(step)`, what the Trainer consumes."""

from minildm.data.datasets import DATASETS, DatasetNotFoundError, ImageDataset, dataset_batch_at, load_dataset
from minildm.data.images import ImageTensors, load_images, tensor_batch_at
from minildm.data.shapes import (
    COLOURS,
    MAX_OBJECTS,
    NUM_CLASSES,
    POSITIONS,
    SHAPES,
    SIZES,
    Background,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    attributes,
    caption,
    class_name,
    make_batch,
    render,
    sample_scene,
    sample_scenes,
    shapes_batch_at,
    vocabulary,
)

__all__ = [
    "COLOURS",
    "DATASETS",
    "MAX_OBJECTS",
    "NUM_CLASSES",
    "POSITIONS",
    "SHAPES",
    "SIZES",
    "Background",
    "DatasetNotFoundError",
    "ImageDataset",
    "ImageTensors",
    "Scene",
    "ShapeObject",
    "ShapesConfig",
    "ShapesDataset",
    "attributes",
    "caption",
    "class_name",
    "dataset_batch_at",
    "load_dataset",
    "load_images",
    "make_batch",
    "render",
    "sample_scene",
    "sample_scenes",
    "shapes_batch_at",
    "tensor_batch_at",
    "vocabulary",
]
