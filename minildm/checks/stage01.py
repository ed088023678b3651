"""Checkers for exercise 01 (the data): reading the Shapes format of minildm/data/shapes.py. The attribute tensor
(B, 3, 4) holds one row (shape, colour, size, position) per object in painting order and rows of -1 for absent
objects; the class label is shape * 6 + colour of the first object; a caption names every object as
"a SIZE COLOUR SHAPE at the POSITION". References: minildm.data.shapes (attributes, make_batch, caption,
ShapeObject.center)."""

from __future__ import annotations

import numpy as np
import torch

from minildm.checks import ExerciseError, expect_tensor, known_mistake, passed, run, written_here
from minildm.data import shapes as ref


def _attributes(seed: int, n: int = 16, min_objects: int = 1) -> torch.Tensor:
    """(n, 3, 4) attributes of Shapes images `seed * 100 + i` (1 to 3 objects each)."""
    cfg = ref.ShapesConfig(seed=seed, min_objects=min_objects)
    return ref.attributes(ref.sample_scenes(range(n), cfg))


def _hand_made() -> torch.Tensor:
    """Three images: one object; three objects; two objects (the first not in the lowest-numbered cell)."""
    return torch.tensor([[[0, 0, 1, 4], [-1, -1, -1, -1], [-1, -1, -1, -1]],
                         [[5, 2, 0, 8], [1, 4, 1, 0], [3, 1, 0, 2]],
                         [[2, 5, 0, 7], [4, 3, 1, 1], [-1, -1, -1, -1]]])


def _cases() -> dict[str, torch.Tensor]:
    return {"3 hand-made images with 1, 3 and 2 objects": _hand_made(),
            "16 Shapes images (seed 0)": _attributes(0),
            "32 Shapes images (seed 5)": _attributes(5, 32)}


# ---------------------------------------------------------------- 1. objects per image


def check_count_objects(fn) -> None:
    """fn(attributes (B, 3, 4) int64) -> (B,) int64: how many objects each image shows (rows that are not -1)."""
    name = "count_objects"
    written_here(fn, name)
    for case, attrs in _cases().items():
        got = run(fn, name, case, attrs.clone())
        want = (attrs[..., 0] >= 0).sum(1)
        known_mistake(got, {
            "every image got 3: rows of -1 are absent objects and must not be counted (an object is there when "
            "its shape index is >= 0).": torch.full_like(want, 3),
            "you counted the entries >= 0 (4 per object) instead of the rows: test one column, e.g. "
            "attributes[..., 0] >= 0, then sum over the objects.": (attrs >= 0).sum((1, 2)),
            "you counted the absent objects (the rows of -1), not the present ones.": 3 - want,
        }, name, case, want)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype != torch.int64:
            raise ExerciseError(f"{name} ({case}): expected int64 counts, got {got.dtype}: summing a bool tensor "
                                "gives int64; do not convert to float.")
        expect_tensor(got, want, name, case)
    passed(name, "one count per image, absent rows (-1) not counted, int64")


# ---------------------------------------------------------------- 2. class labels


def check_class_label(fn) -> None:
    """fn(attributes (B, 3, 4)) -> (B,) int64: shape * 6 + colour of the FIRST object (row 0), as make_batch does."""
    name = "class_label"
    written_here(fn, name)
    n_colours = len(ref.COLOURS)
    for case, attrs in _cases().items():
        got = run(fn, name, case, attrs.clone())
        want = attrs[:, 0, 0] * n_colours + attrs[:, 0, 1]
        present = attrs[..., 0] >= 0
        lowest_cell = torch.where(present, attrs[..., 3], 99).argmin(1)  # the object in the lowest-numbered cell
        first_by_cell = attrs[torch.arange(len(attrs)), lowest_cell]
        last = attrs[torch.arange(len(attrs)), present.sum(1) - 1]
        known_mistake(got, {
            "shape and colour are swapped: the label is shape * 6 + colour (read make_batch in shapes.py), so "
            "labels 0-5 are the six colours of a circle.": attrs[:, 0, 1] * n_colours + attrs[:, 0, 0],
            "that is only the shape of the first object; the label is shape * 6 + colour.": attrs[:, 0, 0],
            "the first object is row 0 of the attributes (the first one painted and named in the caption), not "
            "the one in the lowest-numbered cell.": first_by_cell[:, 0] * n_colours + first_by_cell[:, 1],
            "you took the last object of each image; the label is that of the first one, row 0.":
                last[:, 0] * n_colours + last[:, 1],
        }, name, case, want)
        expect_tensor(got, want, name, case)
    passed(name, "shape * 6 + colour of row 0, for every image; ShapesDataset's labels")


# ---------------------------------------------------------------- 3. captions


class _FirstChoices:
    """A stand-in for the NumPy generator given to shapes.caption: every pick takes the first option, which is the
    plain wording ("small"/"large", "at", "and", no opening)."""

    def random(self, count: int) -> np.ndarray:
        return np.zeros(count)


def reference_caption(rows: torch.Tensor) -> str:
    """The plain caption of one image's attributes (3, 4), through minildm.data.shapes.caption."""
    objects = tuple(ref.ShapeObject(*row) for row in rows.tolist() if row[0] >= 0)
    return ref.caption(ref.Scene(objects), _FirstChoices())


def _caption_mistakes(rows: torch.Tensor, want: str) -> dict[str, str]:
    present = [row for row in rows.tolist() if row[0] >= 0]

    def describe(rows, template="a {size} {colour} {shape} at the {position}", joiner=" and "):
        return joiner.join(template.format(size=ref.SIZES[s], colour=ref.COLOUR_NAMES[c], shape=ref.SHAPES[h],
                                           position=ref.POSITIONS[p]) for h, c, s, p in rows)

    return {
        "the rows of -1 are absent objects, but your caption describes them (index -1 is the last name of each "
        "list: 'a large purple ring at the bottom right'); skip the rows whose shape is -1.":
            describe(rows.tolist()),
        "the words are in the wrong order: 'a SIZE COLOUR SHAPE at the POSITION', e.g. 'a large red circle at "
        "the center'.": describe(present, "a {colour} {size} {shape} at the {position}"),
        "'the' is missing before the position: '... at the top left'.": describe(present, "a {size} {colour} "
                                                                                  "{shape} at {position}"),
        "objects are joined with ' and ' (a space on each side), not commas.": describe(present, joiner=", "),
        "no full stop at the end: captions are lower case words separated by single spaces.": want + ".",
        "the caption starts with a capital letter; captions are all lower case.": want[:1].upper() + want[1:],
    }


def check_caption_of(fn) -> None:
    """fn(rows (3, 4) int64, one image's attributes) -> str, the plain caption."""
    name = "caption_of"
    written_here(fn, name)
    cases = {f"hand-made image {i} {rows.tolist()}": rows for i, rows in enumerate(_hand_made())}
    attrs = _attributes(3, 8, min_objects=2)
    cases.update({f"Shapes image {i} (seed 3) {attrs[i].tolist()}": attrs[i] for i in range(8)})
    for case, rows in cases.items():
        got = run(fn, name, case, rows.clone())
        want = reference_caption(rows)
        if not isinstance(got, str):
            raise ExerciseError(f"{name} ({case}): return a str, got {type(got).__name__}.")
        for message, wrong in _caption_mistakes(rows, want).items():
            if got == wrong and wrong != want:
                raise ExerciseError(f"{name} ({case}): {message} Got {got!r}.")
        if got != want:
            raise ExerciseError(f"{name} ({case}): expected {want!r}, got {got!r}.")
    passed(name, "'a SIZE COLOUR SHAPE at the POSITION', joined with 'and', absent rows skipped")


# ---------------------------------------------------------------- 4. where an object sits


def check_object_centre(fn) -> None:
    """fn(position int 0..8, image_size int) -> (x, y) in pixels of the centre of that grid cell (no jitter),
    x to the right, y down: ShapeObject.center times the image size."""
    name = "object_centre"
    written_here(fn, name)
    for size in (64, 48, 32):
        for position in range(len(ref.POSITIONS)):
            case = f"position {position} ({ref.POSITIONS[position]!r}), image_size {size}"
            got = run(fn, name, case, position, size)
            cx, cy = ref.ShapeObject(0, 0, 0, position).center
            want = (cx * size, cy * size)
            row, col = divmod(position, 3)
            if not (isinstance(got, (tuple, list)) and len(got) == 2):
                raise ExerciseError(f"{name} ({case}): return a tuple (x, y), got {got!r}.")
            try:
                got = (float(got[0]), float(got[1]))
            except (TypeError, ValueError):
                raise ExerciseError(f"{name} ({case}): x and y must be numbers, got {got!r}.") from None
            mistakes = {
                "x and y are swapped: the position counts row by row (0 = top left, 1 = top, 2 = top right), so "
                "the column gives x and the row gives y; row, col = divmod(position, 3).": (want[1], want[0]),
                "that is the top-left corner of the cell; its centre is half a cell further: (col + 0.5) / 3.":
                    (col / 3 * size, row / 3 * size),
                "the centre is in [0, 1] image coordinates; multiply by image_size for pixels.":
                    ((col + 0.5) / 3, (row + 0.5) / 3),
            }
            for message, wrong in mistakes.items():
                if wrong != want and all(abs(a - b) < 1e-6 for a, b in zip(got, wrong)):
                    raise ExerciseError(f"{name} ({case}): {message}")
            if any(abs(a - b) > 1e-6 for a, b in zip(got, want)):
                raise ExerciseError(f"{name} ({case}): expected (x, y) = {want}, got {got}.")
    passed(name, "cell centres ((col + 0.5) / 3, (row + 0.5) / 3) * image_size, x to the right, y down")
