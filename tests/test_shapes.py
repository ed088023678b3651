"""Tests for the procedural Shapes data set (minildm/data/shapes.py)."""

import math
import re

import numpy as np
import pytest
import torch

from minildm.data.shapes import (
    COLOUR_NAMES,
    COLOURS,
    MAX_OBJECTS,
    NUM_CLASSES,
    POSITIONS,
    PREPOSITIONS,
    SHAPES,
    SIZE_RADIUS,
    SIZES,
    Background,
    Scene,
    ShapeObject,
    ShapesConfig,
    ShapesDataset,
    caption,
    class_name,
    render,
    sample_scenes,
    shapes_batch_at,
    vocabulary,
)

BLACK = Background(base=(0.0, 0.0, 0.0))
RED, CIRCLE, LARGE, CENTER = COLOUR_NAMES.index("red"), SHAPES.index("circle"), 1, POSITIONS.index("center")


@pytest.fixture(scope="module")
def many():
    """300 images at 32 px, with their attributes and captions."""
    return ShapesDataset(ShapesConfig(image_size=32, seed=3), length=300).batch(range(300))


def one_object(shape, colour=RED, size=LARGE, position=CENTER, size_px=64):
    return render([Scene((ShapeObject(shape, colour, size, position),), BLACK)], size_px)


@pytest.mark.parametrize("size", [32, 64])
def test_item_shapes_dtypes_and_range(size):
    ds = ShapesDataset(ShapesConfig(image_size=size), length=10)
    item = ds[3]
    assert item["image"].shape == (3, size, size) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (size, size) and item["mask"].dtype == torch.int64
    assert item["attributes"].shape == (MAX_OBJECTS, 4) and item["attributes"].dtype == torch.int64
    assert isinstance(item["caption"], str) and isinstance(item["label"], int)
    batch = ds.batch(range(10))
    assert batch["image"].shape == (10, 3, size, size)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert batch["image"].std() > 0.1  # not blank
    assert len(batch["caption"]) == 10 and batch["label"].shape == (10,)
    with pytest.raises(IndexError):
        ds[10]


def test_deterministic_from_seed_and_index():
    cfg = ShapesConfig(image_size=32, seed=7)
    a, b = ShapesDataset(cfg)[5], ShapesDataset(cfg)[5]
    assert torch.equal(a["image"], b["image"]) and a["caption"] == b["caption"]
    other = ShapesDataset(ShapesConfig(image_size=32, seed=8))[5]
    assert not torch.allclose(a["image"], other["image"])
    assert not torch.allclose(a["image"], ShapesDataset(cfg)[6]["image"])


def test_image_alone_equals_image_inside_batch():
    ds = ShapesDataset(ShapesConfig(image_size=64, seed=1))
    batch = ds.batch([40, 5, 17, 3])
    alone = ds[5]
    torch.testing.assert_close(batch["image"][1], alone["image"], atol=1e-6, rtol=0)
    assert torch.equal(batch["mask"][1], alone["mask"])
    assert batch["caption"][1] == alone["caption"]
    assert torch.equal(batch["attributes"][1], alone["attributes"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cpu_and_gpu_agree():
    ds = ShapesDataset(ShapesConfig(image_size=64))
    cpu, gpu = ds.batch(range(8)), ds.batch(range(8), device="cuda")
    torch.testing.assert_close(gpu["image"].cpu(), cpu["image"], atol=1e-4, rtol=0)
    assert (gpu["mask"].cpu() != cpu["mask"]).float().mean() < 1e-3  # only pixels right at coverage 0.5


def test_mask_and_colour_of_a_known_scene():
    out = one_object(CIRCLE)
    image, mask = out["image"][0], out["mask"][0]
    assert mask[32, 32] == 1 + CIRCLE and mask[0, 0] == 0 and mask[63, 63] == 0
    expected = torch.tensor(COLOURS["red"]) * 2 - 1
    torch.testing.assert_close(image[:, 32, 32], expected)
    torch.testing.assert_close(image[:, 0, 0], torch.full((3,), -1.0))  # black background


def test_circle_coverage_matches_the_closed_form():
    """On black, red channel = 0.9 * coverage, and coverage = clamp(0.5 - (|p - c| - r), 0, 1) in pixels."""
    S = 64
    red = (one_object(CIRCLE, size_px=S)["image"][0, 0] + 1) / 2
    centre = torch.arange(S) + 0.5
    distance = torch.hypot(centre.view(1, S) - S / 2, centre.view(S, 1) - S / 2)
    expected = (0.5 - (distance - SIZE_RADIUS[LARGE] * S)).clamp(0, 1) * COLOURS["red"][0]
    torch.testing.assert_close(red, expected, atol=1e-5, rtol=0)
    edge = (red > 0.05) & (red < 0.85)
    assert edge.sum() >= 20  # anti-aliased: a ring of intermediate values along the edge


@pytest.mark.parametrize("shape, area", [
    ("circle", math.pi), ("square", 1.6 ** 2), ("triangle", 3 * math.sqrt(3) / 4 * 1.15 ** 2),
    ("diamond", 2 * 0.7), ("hexagon", 3 * math.sqrt(3) / 2), ("ring", math.pi * (1 - 0.4 ** 2)),
])
def test_shape_areas(shape, area):
    """Summed coverage of each shape ~ its area (in units of r^2): catches wrong SDFs and wrong sizes."""
    S = 64
    red = (one_object(SHAPES.index(shape), size_px=S)["image"][0, 0] + 1) / 2 / COLOURS["red"][0]
    r_px = SIZE_RADIUS[LARGE] * S
    assert red.sum().item() == pytest.approx(area * r_px ** 2, rel=0.03)
    assert red.max() == pytest.approx(1.0) and red[0, 0] == 0


def test_topmost_object_wins_the_mask():
    big, small = ShapeObject(CIRCLE, RED, 1, CENTER), ShapeObject(SHAPES.index("square"), 4, 0, CENTER)
    out = render([Scene((big, small), BLACK)], 64)
    assert out["mask"][0, 32, 32] == 1 + SHAPES.index("square")
    torch.testing.assert_close(out["image"][0, :, 32, 32], torch.tensor(COLOURS[COLOUR_NAMES[4]]) * 2 - 1)


def test_mask_agrees_with_attributes(many):
    for mask, attrs in zip(many["mask"][:50], many["attributes"][:50]):
        present = attrs[attrs[:, 0] >= 0]
        assert set(mask.unique().tolist()) - {0} <= {1 + s for s in present[:, 0].tolist()}
        for shape, _, _, position in present.tolist():  # the mask shows the object in its grid cell
            row, col = divmod(position, 3)
            cell = mask[row * 32 // 3:(row + 1) * 32 // 3, col * 32 // 3:(col + 1) * 32 // 3]
            assert (cell == 1 + shape).any()


def test_class_label_formula(many):
    attrs = many["attributes"]
    assert torch.equal(many["label"], attrs[:, 0, 0] * len(COLOURS) + attrs[:, 0, 1])
    assert NUM_CLASSES == 36 and many["label"].max() < NUM_CLASSES
    assert class_name(0) == "red circle" and class_name(1 * 6 + 4) == "blue square"
    with pytest.raises(ValueError, match="0 to 35"):
        class_name(36)


def test_every_attribute_value_appears(many):
    attrs = many["attributes"]
    present = attrs[attrs[:, :, 0] >= 0]  # (n_objects, 4)
    for column, names in enumerate([SHAPES, COLOURS, SIZES, POSITIONS]):
        assert set(present[:, column].tolist()) == set(range(len(names)))
    counts = (attrs[:, :, 0] >= 0).sum(1)
    assert set(counts.tolist()) == {1, 2, 3}
    assert (attrs[:, 1:, 0][counts[:, None] <= torch.arange(1, 3)] == -1).all()  # padding after the last
    for row in attrs:
        positions = row[row[:, 0] >= 0, 3].tolist()
        assert len(positions) == len(set(positions))  # distinct cells


def test_captions_describe_every_object(many):
    words, preps = set(vocabulary()), "|".join(PREPOSITIONS)
    for text, attrs in zip(many["caption"], many["attributes"]):
        assert set(text.split()) <= words, text
        for shape, colour, _, position in attrs[attrs[:, 0] >= 0].tolist():
            pattern = rf"\b{COLOUR_NAMES[colour]} {SHAPES[shape]} ({preps}) the {POSITIONS[position]}(?! left| right)\b"
            assert re.search(pattern, text), (pattern, text)
    assert len(set(many["caption"])) == len(many["caption"])
    used = {w for text in many["caption"] for w in text.split()}
    assert {"big", "large", "small", "tiny", "little", "there", "with", "and"} <= used  # varied wording


def test_caption_uses_the_given_rng():
    scene = sample_scenes([0], ShapesConfig(max_objects=3, min_objects=3))[0]
    texts = {caption(scene, np.random.default_rng(s)) for s in range(20)}
    assert len(texts) > 5
    assert caption(scene, np.random.default_rng(1)) == caption(scene, np.random.default_rng(1))


def test_shapes_batch_at_is_a_function_of_the_step_whatever_the_order_of_calls():
    """The feeder prefetches the next step's scenes; a resumed run (any other step) must get the same batches."""
    cfg = ShapesConfig(image_size=16)
    batch_at = shapes_batch_at(cfg, batch_size=4)
    in_order = [batch_at(step)["image"] for step in (0, 1, 2)]
    torch.testing.assert_close(in_order[1], ShapesDataset(cfg).batch(range(4, 8))["image"])
    resumed = shapes_batch_at(cfg, batch_size=4)
    torch.testing.assert_close(resumed(2)["image"], in_order[2])
    torch.testing.assert_close(resumed(0)["image"], in_order[0])  # after a prefetch of step 3
    assert batch_at(5)["caption"] == ShapesDataset(cfg).batch(range(20, 24))["caption"]


def test_bad_inputs_raise_clear_errors():
    for bad in (8, 15, 32.0, "64"):
        with pytest.raises(ValueError, match=">= 16"):
            ShapesConfig(image_size=bad)
    with pytest.raises(ValueError, match=">= 16"):
        render(sample_scenes([0], ShapesConfig()), image_size=12)
    with pytest.raises(ValueError, match="max_objects"):
        ShapesConfig(max_objects=4)
    with pytest.raises(ValueError, match=">= 0"):
        sample_scenes([-1], ShapesConfig())
    with pytest.raises(ValueError, match="batch_size"):
        shapes_batch_at(ShapesConfig(), batch_size=0)  # raised at the call, not at the first batch


# ---- exclude_pairs: a colour-shape pair held out of training (notebook 09's compositions) ------------------------


def test_excluded_pairs_never_appear_in_attributes_nor_captions():
    excluded = (("blue", "triangle"), ("red", "circle"))
    cfg = ShapesConfig(image_size=16, seed=0, exclude_pairs=excluded)
    plain = sample_scenes(range(3000), ShapesConfig(image_size=16, seed=0))
    scenes = sample_scenes(range(3000), cfg)
    pairs = {(COLOUR_NAMES[o.colour], SHAPES[o.shape]) for s in scenes for o in s.objects}
    assert not pairs & set(excluded)
    assert len(pairs) == len(COLOURS) * len(SHAPES) - 2  # every other pair still appears
    for s in scenes:
        assert "blue triangle" not in s.caption and "red circle" not in s.caption
    # the pair was there without the option (about 2 objects in 36 per image), and only those objects changed
    changed = 0
    for a, b in zip(plain, scenes):
        assert len(a.objects) == len(b.objects) and a.background == b.background
        for oa, ob in zip(a.objects, b.objects):
            assert (oa.size, oa.position, oa.jitter) == (ob.size, ob.position, ob.jitter)
            if (COLOUR_NAMES[oa.colour], SHAPES[oa.shape]) in excluded:
                changed += 1
            else:
                assert (oa.shape, oa.colour) == (ob.shape, ob.colour)
        if a.objects == b.objects:
            assert a.caption == b.caption  # images without the pair are exactly the plain ones
    n_objects = sum(len(s.objects) for s in plain)
    assert abs(changed / n_objects - 2 / 36) < 0.015, changed / n_objects


def test_redrawn_pairs_are_uniform_over_the_allowed_ones_and_deterministic():
    cfg = ShapesConfig(image_size=16, seed=1, exclude_pairs=[["blue", "triangle"]])  # lists are accepted
    assert cfg.exclude_pairs == (("blue", "triangle"),)
    scenes = sample_scenes(range(6000), cfg)
    counts = np.zeros((len(SHAPES), len(COLOURS)))
    for s in scenes:
        for o in s.objects:
            counts[o.shape, o.colour] += 1
    blue, triangle = COLOUR_NAMES.index("blue"), SHAPES.index("triangle")
    assert counts[triangle, blue] == 0
    allowed = np.delete(counts.flatten(), triangle * len(COLOURS) + blue)
    expected = allowed.sum() / len(allowed)  # uniform over the 35 allowed pairs: 1/35 each
    assert np.abs(allowed - expected).max() < 4.5 * math.sqrt(expected), (allowed.min(), allowed.max(), expected)
    again = ShapesDataset(cfg).batch([7, 123])
    assert again["caption"] == [scenes[7].caption, scenes[123].caption]
    assert torch.equal(ShapesDataset(cfg).batch([123])["image"][0], again["image"][1])


@pytest.mark.parametrize("pairs, message", [
    ((("blue", "dog"),), "colour, shape"),
    ((("triangle", "blue"),), "colour, shape"),
    (tuple((c, s) for c in COLOURS for s in SHAPES), "every"),
])
def test_bad_excluded_pairs_are_refused(pairs, message):
    with pytest.raises(ValueError, match=message):
        ShapesConfig(exclude_pairs=pairs)
