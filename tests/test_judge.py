"""The Shapes judge (stage 7): labels, caption accuracy on hand-made cases, softening, size checks, training."""

import pytest
import torch

from minildm.checkpoint import CheckpointError
from minildm.config import HOLDOUT_SEED, judge_recipe
from minildm.data.shapes import ShapesConfig, ShapesDataset
from minildm.device import Runtime
from minildm.judge import (
    CELLS,
    JudgeConfig,
    JudgeTask,
    ShapesJudge,
    caption_accuracy,
    cell_labels,
    confusion,
    load_judge,
    soften,
    train_judge,
)

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)
NONE = [-1, -1, -1, -1]


def attrs(*images):
    """Shapes attributes (B, 3, 4) from lists of (shape, colour, size, position) rows."""
    return torch.tensor([list(objs) + [NONE] * (3 - len(objs)) for objs in images])


def test_cell_labels_put_each_object_in_its_cell():
    a = attrs([[1, 2, 0, 4], [5, 0, 1, 8]], [[3, 3, 1, 0]])
    labels = cell_labels(a)
    assert labels.shape == (2, CELLS, 3)
    assert labels[0, 4].tolist() == [1, 2, 0] and labels[0, 8].tolist() == [5, 0, 1]
    assert labels[1, 0].tolist() == [3, 3, 1]
    assert (labels[0, [0, 1, 2, 3, 5, 6, 7]] == -1).all() and (labels[1, 1:] == -1).all()


def test_caption_accuracy_on_hand_made_cases():
    truth = attrs([[1, 2, 0, 4], [5, 0, 1, 8]], [[3, 3, 1, 0]], [[0, 1, 1, 2]])
    read = cell_labels(truth).clone()
    perfect = caption_accuracy(read, truth)
    assert perfect["object"] == perfect["caption"] == 1.0 and perfect["extra_per_image"] == 0.0
    assert perfect["objects"] == 4 and perfect["images"] == 3
    read[0, 8] = torch.tensor([5, 3, 1])  # image 0: the second object has the wrong colour
    read[1, 0] = -1                       # image 1: its only object is missing
    read[2, 5] = torch.tensor([2, 2, 0])  # image 2: an object nobody asked for
    r = caption_accuracy(read, truth)
    assert r["place"] == pytest.approx(3 / 4)
    assert r["colour"] == pytest.approx(2 / 4)  # wrong colour, and the missing object counts as wrong
    assert r["shape"] == pytest.approx(3 / 4) and r["size"] == pytest.approx(3 / 4)
    assert r["object"] == pytest.approx(2 / 4)
    assert r["caption"] == 0.0  # every image has one mistake
    assert r["extra_per_image"] == pytest.approx(1 / 3)


def test_caption_accuracy_errors():
    truth = attrs([[1, 2, 0, 4]])
    with pytest.raises(ValueError, match="judge's"):
        caption_accuracy(torch.zeros(1, 4, 3, dtype=torch.long), truth)
    with pytest.raises(ValueError, match="same B"):
        caption_accuracy(cell_labels(truth), attrs([[1, 2, 0, 4]], [[1, 2, 0, 4]]))
    with pytest.raises(ValueError, match="0 images"):
        caption_accuracy(torch.zeros(0, 9, 3, dtype=torch.long), torch.zeros(0, 3, 4, dtype=torch.long))


def test_confusion_counts_captioned_against_read_values():
    truth = attrs([[1, 2, 0, 4], [5, 0, 1, 8]])
    read = cell_labels(truth).clone()
    read[0, 8, 1] = 3  # colour 0 read as 3
    read[0, 4] = -1    # colour 2 read as nothing
    c = confusion(read, truth, "colour")
    assert c.shape == (7, 7) and c.sum() == 2
    assert c[0, 3] == 1 and c[2, 6] == 1


def test_soften_without_blur_or_noise_is_the_identity_and_blur_keeps_the_mean():
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    torch.testing.assert_close(soften(x, 0.0, 0.0), x, atol=1e-5, rtol=0)
    blurred = soften(x, 2.0, 0.0, torch.Generator().manual_seed(0))
    assert blurred.std() < x.std()
    assert (blurred.mean() - x.mean()).abs() < 0.05


def test_judge_refuses_another_image_size(tmp_path):
    judge = ShapesJudge(JudgeConfig(image_size=32, channels=8))
    with pytest.raises(ValueError, match="trained on 32x32 images but got 64x64"):
        judge(torch.zeros(1, 3, 64, 64))
    _, train_cfg = judge_recipe(32, fast=True)
    train_cfg.steps = 1
    train_judge(JudgeConfig(image_size=32, channels=8), train_cfg, CPU, tmp_path / "judge.pt", progress=False)
    with pytest.raises(CheckpointError, match="judge for 32x32 images, but the images to judge are 64x64"):
        load_judge(tmp_path / "judge.pt", image_size=64)
    with pytest.raises(ValueError, match="multiple of 8"):
        JudgeConfig(image_size=30)


def test_fast_judge_learns_to_read_place_and_colour(tmp_path):
    cfg, train_cfg = judge_recipe(32, fast=True)
    judge = train_judge(cfg, train_cfg, CPU, tmp_path / "judge.pt", progress=False)
    real = ShapesDataset(ShapesConfig(image_size=32, seed=HOLDOUT_SEED)).batch(range(128))
    r = caption_accuracy(judge.read(real["image"]), real["attributes"])
    assert r["place"] > 0.95 and r["colour"] > 0.9, r
    assert load_judge(tmp_path / "judge.pt").read(real["image"]).equal(judge.read(real["image"]))  # loads back


def test_judge_training_draws_depend_on_the_step_only():
    """The blur and noise of a judge step come from a generator seeded by the step: the same step gives the same loss
    (so a resumed run trains on what the interrupted one would have), another step other draws."""
    torch.manual_seed(0)
    task = JudgeTask(JudgeConfig(image_size=32, channels=8, blur_sigma=0.8, noise_std=0.1))
    batch = ShapesDataset(ShapesConfig(image_size=32)).batch(range(4))
    loss = [task.losses(batch, step)[0]["judge"].item() for step in (5, 5, 6)]
    assert loss[0] == loss[1]
    assert loss[0] != loss[2]
