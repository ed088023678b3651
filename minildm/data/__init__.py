"""Stage 1, the data: the procedural Shapes data set and real image data sets through torchvision."""

from minildm.data.datasets import DATASETS, DatasetNotFoundError, ImageDataset, load_dataset
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
    shapes_batches,
    vocabulary,
)

__all__ = [
    "COLOURS", "DATASETS", "MAX_OBJECTS", "NUM_CLASSES", "POSITIONS", "SHAPES", "SIZES",
    "Background", "DatasetNotFoundError", "ImageDataset", "Scene", "ShapeObject", "ShapesConfig",
    "ShapesDataset", "attributes", "caption", "class_name", "load_dataset", "make_batch", "render", "sample_scene",
    "sample_scenes", "shapes_batches", "vocabulary",
]
