"""Training on real data sets (stage 11): finite data in memory, presets, bad input, class conditioning, the
course's classifier, and `minildm train --dataset ...` on the MNIST and CIFAR-10 copies in ../shared/data."""

import json

import pytest
import torch
from PIL import Image
from test_datasets import DATA, needs_data

from minildm.classifier import ClassifierConfig, accuracy, train_classifier
from minildm.cli import main
from minildm.config import DATA_PRESETS, data_preset
from minildm.data.datasets import DatasetNotFoundError, epoch_indices
from minildm.data.images import ImageTensors, load_images, tensor_batch_at
from minildm.denoiser import ClassDenoiser
from minildm.device import Runtime
from minildm.train import TrainConfig
from minildm.unet import UNetConfig

CPU = Runtime(device=torch.device("cpu"), dtype=torch.float32, fast=True)


def write_images(folder, specs):
    """specs: (name, mode, (w, h)) -> files in folder, each a different colour."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, (name, mode, size) in enumerate(specs):
        image = Image.new("RGB", size, (40 * i % 256, 200, 90)).convert(mode)
        image.save(folder / name)


# ---------------------------------------------------------------- image folders: bad input


def test_image_folder_without_images_is_a_clear_error(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "notes.txt").write_text("no pictures here")
    with pytest.raises(DatasetNotFoundError, match="no image files") as info:
        load_images("imagefolder", tmp_path, image_size=16)
    assert str(tmp_path) in str(info.value) and "put your images in" in str(info.value)


def test_train_on_an_empty_image_folder_exits_with_the_problem_and_the_fix(tmp_path, capsys):
    rc = main(["train", "--dataset", "imagefolder", "--root", str(tmp_path), "--out", str(tmp_path / "run"), "--fast"])
    err = capsys.readouterr().err
    assert rc == 2 and "no image files" in err and "put your images in" in err
    assert not (tmp_path / "run" / "autoencoder_kl_f4.pt").exists()


def test_mixed_sizes_and_modes_become_one_tensor(tmp_path):
    write_images(tmp_path / "a", [("grey.png", "L", (20, 30)), ("rgba.png", "RGBA", (64, 64)),
                                  ("palette.png", "P", (40, 40)), ("wide.jpg", "RGB", (100, 50))])
    write_images(tmp_path / "b", [("grey_alpha.png", "LA", (17, 17)), ("cmyk.jpg", "CMYK", (33, 21))])
    data = load_images("imagefolder", tmp_path, image_size=16)
    assert data.images.shape == (6, 3, 16, 16) and data.images.dtype == torch.uint8
    assert data.classes == ["a", "b"] and data.labels.tolist() == [0, 0, 0, 0, 1, 1]
    grey = data.images[0]  # a.grey.png, the first file of "a" in sorted order
    assert torch.equal(grey[0], grey[1]) and torch.equal(grey[1], grey[2])
    assert not torch.equal(data.images[3][0], data.images[3][1])  # colour stays colour
    assert not data.skipped
    single = load_images("imagefolder", tmp_path, image_size=8, channels=1)
    assert single.images.shape == (6, 1, 8, 8)


def test_sixteen_bit_and_float_grey_are_scaled_not_clipped(tmp_path):
    # PIL's convert("L") clips a 16-bit grey image at 255 (almost all white); the loader scales it to 8 bits.
    import numpy as np

    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (32, 1))  # dark at the left, white at the right
    folder = tmp_path / "grey"
    folder.mkdir()
    Image.fromarray(ramp).save(folder / "ramp16.png")
    Image.fromarray(ramp.astype(np.float32) / 65535).save(folder / "ramp_float.tif")
    for channels in (1, 3):
        images = load_images("imagefolder", tmp_path, image_size=32, channels=channels).images.float()
        for image in images:  # each file: the mean of a 0..255 ramp, its ends black and white
            assert abs(image.mean().item() - 127.5) < 3
            assert image[:, :, 0].max() <= 1 and image[:, :, -1].min() >= 254


def test_corrupt_files_are_skipped_with_a_warning_and_counted(tmp_path):
    write_images(tmp_path / "ok", [(f"{i}.png", "RGB", (12, 12)) for i in range(5)])
    good = (tmp_path / "ok" / "0.png").read_bytes()
    (tmp_path / "ok" / "truncated.png").write_bytes(good[: len(good) // 2])
    (tmp_path / "ok" / "text.jpg").write_text("not a jpeg")
    with pytest.warns(UserWarning, match="skipped 2 of 7 files"):
        data = load_images("imagefolder", tmp_path, image_size=8)
    assert len(data) == 5 and len(data.skipped) == 2
    assert {name.rsplit("/", 1)[-1] for name, _ in data.skipped} == {"truncated.png", "text.jpg"}
    batch_at = tensor_batch_at(data, 4, "cpu")
    for step in range(10):  # several epochs over what was kept: no file is read again, nothing can fail
        assert batch_at(step)["image"].shape == (4, 3, 8, 8)


def test_only_corrupt_files_is_an_error(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(ValueError, match="none of the 1 files could be read"):
        load_images("imagefolder", tmp_path, image_size=8)


def test_loose_images_beside_class_folders_are_left_out_with_a_warning(tmp_path):
    write_images(tmp_path / "dogs", [("d.png", "RGB", (9, 9))])
    write_images(tmp_path, [("loose.png", "RGB", (9, 9))])
    with pytest.warns(UserWarning, match="not in any class"):
        data = load_images("imagefolder", tmp_path, image_size=8)
    assert len(data) == 1 and data.classes == ["dogs"]


def test_condition_class_on_a_data_set_without_labels_is_refused(tmp_path, capsys):
    write_images(tmp_path / "pics", [(f"{i}.png", "RGB", (20, 20)) for i in range(12)])  # no class folders
    rc = main(["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--condition", "class",
               "--out", str(tmp_path / "run"), "--fast", "--image-size", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "--condition class needs class labels" in err and "--condition none" in err


def test_shapes_refuses_real_data_options(capsys):
    assert main(["train", "--condition", "class", "--fast"]) == 2
    assert "real data sets" in capsys.readouterr().err


# ---------------------------------------------------------------- finite data: splits, epochs, presets


def toy(n=10, classes=2):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 4, 4).clone()
    return ImageTensors(images, torch.arange(n) % classes, [str(c) for c in range(classes)])


def test_split_is_seeded_and_disjoint():
    train, held = toy(20).split(5, seed=3)
    ids = lambda d: set(d.images[:, 0, 0, 0].tolist())
    assert len(train) == 15 and len(held) == 5 and not ids(train) & ids(held)
    assert ids(toy(20).split(5, seed=3)[1]) == ids(held) and ids(toy(20).split(5, seed=4)[1]) != ids(held)
    with pytest.raises(ValueError, match="cannot hold out 20 of 20"):
        toy(20).split(20)


def test_held_out_images_of_a_class_sorted_data_set_come_mixed():
    """An image folder lists its classes one after another. The held-out images come in random order, and the
    evaluation's two halves (real images, FD reference) are drawn at random: each sees every class, in about
    equal shares, not one half of the classes each (which made session 12's first CIFAR-10 FD floor meaningless)."""
    from minildm.pipeline import real_and_reference

    labels = torch.arange(10).repeat_interleave(100)  # 0 x 100, 1 x 100, ...: sorted by class
    data = ImageTensors(torch.zeros(1000, 1, 4, 4, dtype=torch.uint8), labels, [str(c) for c in range(10)])
    _, held = data.split(400, seed=0)
    assert set(held.labels[:40].tolist()) == set(range(10))
    real, reference = real_and_reference(len(held), 200)
    assert not set(real.tolist()) & set(reference.tolist())
    for half in (real, reference):
        counts = torch.bincount(held.labels[half], minlength=10)
        assert counts.min() >= 8 and counts.max() <= 35  # 20 expected each; in file order: 0 or 100
    assert torch.equal(real_and_reference(len(held), 200)[0], real)  # seeded


def test_epochs_show_every_image_once_and_resume_sees_the_same_batches():
    data = toy(10)
    batch_at = tensor_batch_at(data, 5, "cpu", seed=1)
    seen = torch.cat([batch_at(s)["image"][:, 0, 0, 0] for s in range(2)])  # the first epoch
    assert sorted(seen.add(1).mul(127.5).round().long().tolist()) == list(range(10))
    again = tensor_batch_at(data, 5, "cpu", seed=1)  # a resumed run: a new feeder, the same steps
    for step in (3, 0, 7):
        assert torch.equal(again(step)["image"], batch_at(step)["image"])
        assert torch.equal(again(step)["label"], batch_at(step)["label"])
    assert epoch_indices(10, 5, 2, seed=1) != epoch_indices(10, 5, 0, seed=1)  # reshuffled each epoch
    flips = tensor_batch_at(ImageTensors(torch.randint(0, 255, (8, 1, 4, 4), dtype=torch.uint8)), 8, "cpu",
                            hflip=True)
    assert torch.equal(flips(5)["image"], flips(5)["image"])


def test_presets_describe_themselves_and_check_the_image_size():
    for name, preset in DATA_PRESETS.items():
        text = preset.describe(fast=False)
        assert name in text and f"f={preset.f}" in text and f"{preset.image_size} px" in text
    with pytest.raises(ValueError, match="multiple of 16"):
        data_preset("mnist", image_size=30)
    with pytest.raises(ValueError, match="no preset"):
        data_preset("imagenet")


# ---------------------------------------------------------------- class conditioning, the classifier


def test_class_denoiser_reads_names_numbers_and_refuses_unknown_ones():
    unet = UNetConfig(in_channels=4, image_size=8, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                      attention_levels=(0,), heads=2, context_dim=16)
    model = ClassDenoiser(unet, ["0 - zero", "1 - one", "cat"])
    assert model.tokenize(["zero", "1", "CAT", "0 - zero", ""]).tolist() == [0, 1, 2, 0, 3]
    with pytest.raises(ValueError, match="unknown class 'dog'.*cat"):
        model.tokenize(["dog"])
    with pytest.raises(ValueError, match="unconditional"):
        ClassDenoiser(unet, []).tokenize(["cat"])
    out = model(torch.randn(2, 4, 8, 8), torch.tensor([1, 5]), model.tokenize(["cat", ""]))
    assert out.shape == (2, 4, 8, 8)


def test_classifier_learns_an_easy_split():
    torch.manual_seed(0)
    labels = torch.arange(128) % 2  # class 1: a bright square in the middle
    images = (torch.rand(128, 1, 16, 16) * 60).to(torch.uint8)
    images[labels == 1, :, 5:11, 5:11] += 180
    train, held = ImageTensors(images, labels, ["dark", "bright"]).split(32)
    cfg = ClassifierConfig(1, 16, 2, width=8, feature_dim=16)
    steps = TrainConfig(steps=30, batch_size=16, lr=3e-3, ema_decay=None, log_every=10, ckpt_every=100)
    classifier = train_classifier(cfg, steps, tensor_batch_at(train, 16, "cpu"), CPU, None, progress=False)
    x = held.batch(range(len(held)))["image"]
    assert accuracy(classifier, x, held.labels) >= 0.9
    assert classifier.all_features(x).shape == (32, 16)
    with pytest.raises(ValueError, match="reads images"):
        classifier.features(torch.zeros(2, 3, 16, 16))


# ---------------------------------------------------------------- the whole command on the shared copies


def train_run(tmp_path_factory, name, root, *extra):
    out = tmp_path_factory.mktemp(name)
    rc = main(["train", "--dataset", name, "--root", str(root), "--out", str(out), "--fast", "--steps", "4",
               "--eval-n", "8", *extra])
    assert rc == 0
    return out


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    return train_run(tmp_path_factory, "mnist", DATA)


@needs_data
def test_train_on_mnist_class_conditional(mnist_run, capsys):
    manifest = json.loads((mnist_run / "data.json").read_text())
    assert manifest["condition"] == "class" and manifest["channels"] == 1 and len(manifest["classes"]) == 10
    result = json.loads((mnist_run / "evaluation.json").read_text())
    scores = result["data"]["by_guidance"][str(DATA_PRESETS["mnist"].guidance)]
    assert 0 <= scores["class_accuracy"] <= 1 and scores["fd"] >= 0 and result["data"]["fd_real_floor"] > 0
    assert "classifier" in result["feature_network"] and "not Inception" in result["feature_network"]
    for picture in ("reconstructions.png", "samples.png"):
        assert (mnist_run / picture).stat().st_size > 0
    # Run again: everything is finished, so nothing trains again and the checkpoints stay as they were.
    before = {p.name: p.stat().st_mtime_ns for p in mnist_run.glob("*.pt") if p.name != "held_out.pt"}
    assert main(["train", "--dataset", "mnist", "--root", str(DATA), "--out", str(mnist_run), "--fast", "--steps",
                 "4", "--eval-n", "8"]) == 0
    assert before == {p.name: p.stat().st_mtime_ns for p in mnist_run.glob("*.pt") if p.name != "held_out.pt"}
    assert "preset mnist: 32 px, 1 channel(s), f=4" in capsys.readouterr().out


@needs_data
def test_sample_takes_class_names_and_refuses_unknown_ones(mnist_run, capsys):
    out = mnist_run / "digits.png"
    assert main(["sample", "3", "seven", "--run", str(mnist_run), "-n", "2", "--out", str(out), "--fast",
                 "--sampler", "ddim", "--steps", "3"]) == 0
    assert out.stat().st_size > 0
    assert main(["sample", "cat", "--run", str(mnist_run), "--fast"]) == 2
    assert "unknown class 'cat'" in capsys.readouterr().err


@needs_data
def test_sample_defaults_to_the_guidance_of_the_runs_preset(mnist_run, monkeypatch):
    import minildm.pipeline

    scales, generate = [], minildm.pipeline.generate
    monkeypatch.setattr(minildm.pipeline, "generate",
                        lambda *a, **k: scales.append(k["guidance_scale"]) or generate(*a, **k))
    for extra in ([], ["--guidance", "4"]):
        assert main(["sample", "3", "--run", str(mnist_run), "-n", "1", "--out", str(mnist_run / "g.png"), "--fast",
                     "--sampler", "ddim", "--steps", "2", *extra]) == 0
    assert scales == [DATA_PRESETS["mnist"].guidance, 4.0]


@needs_data
def test_a_run_on_other_data_in_the_same_folder_is_refused(mnist_run, tmp_path, capsys):
    write_images(tmp_path / "a", [(f"{i}.png", "RGB", (20, 20)) for i in range(12)])
    rc = main(["train", "--dataset", "imagefolder", "--root", str(tmp_path), "--out", str(mnist_run), "--fast",
               "--image-size", "32"])
    assert rc == 2 and "holds a run on mnist" in capsys.readouterr().err


@needs_data
def test_train_on_cifar10_jpegs_then_evaluate(tmp_path_factory, capsys):
    run = train_run(tmp_path_factory, "cifar10", DATA / "cifar10-test")
    manifest = json.loads((run / "data.json").read_text())
    assert manifest["channels"] == 3 and manifest["f"] == 2 and "airplane" in manifest["classes"]
    assert manifest["split"] == "folder"  # JPEGs in class folders: whichever split they came from, not "train"
    assert f"(the images under {(DATA / 'cifar10-test').resolve()})" in capsys.readouterr().out
    assert main(["evaluate", str(run), "-n", "8", "--guidance", "1", "2", "--sampler", "ddim", "--steps", "3",
                 "--fast"]) == 0
    table = capsys.readouterr().out
    assert "class accuracy" in table and "FD/floor" in table and "cifar10 classifier (not Inception)" in table
    assert set(json.loads((run / "evaluation.json").read_text())["data"]["by_guidance"]) == {"1.0", "2.0"}


def test_unconditional_run_on_an_unlabelled_image_folder(tmp_path, capsys):
    write_images(tmp_path / "pics", [(f"{i}.png", "RGB", (24, 20)) for i in range(24)])
    out = tmp_path / "run"
    assert main(["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(out), "--fast",
                 "--image-size", "16", "--steps", "2", "--eval-n", "4"]) == 0
    assert json.loads((out / "data.json").read_text())["condition"] == "none"
    assert "no labels" in capsys.readouterr().out
    assert main(["sample", "--run", str(out), "-n", "2", "--out", str(tmp_path / "s.png"), "--fast", "--sampler",
                 "ddim", "--steps", "2"]) == 0
    assert main(["sample", "cat", "--run", str(out), "--fast"]) == 2
    assert "unconditional" in capsys.readouterr().err


def test_a_corrupt_file_is_counted_by_minildm_train_and_sample_refuses_an_unknown_class(tmp_path, capsys):
    # A labelled image folder with one unreadable file among good ones, of mixed sizes and modes: the run trains on
    # the others, records the skip in data.json, and `minildm sample` names the classes it knows.
    for label, mode in (("cats", "RGB"), ("dogs", "L"), ("owls", "P")):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", mode, (18 + i, 20)) for i in range(8)])
    (tmp_path / "pics" / "cats" / "broken.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="skipped 1 of 25 files"):
        rc = main(["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(out), "--fast",
                   "--image-size", "16", "--steps", "2", "--eval-n", "4"])
    assert rc == 0
    manifest = json.loads((out / "data.json").read_text())
    assert manifest["skipped"] == 1 and manifest["images"] == 24 and manifest["condition"] == "class"
    assert manifest["classes"] == ["cats", "dogs", "owls"]
    assert "1 unreadable files skipped" in capsys.readouterr().out
    assert main(["sample", "dog", "--run", str(out), "--fast"]) == 2
    err = capsys.readouterr().err
    assert "unknown class 'dog'" in err and "cats, dogs, owls" in err


def test_twelve_numbered_class_folders_train_and_draw_ten_rows_then_train_unconditionally(tmp_path):
    # Folders "0".."11" sort as 0, 1, 10, 11, 2, ...: each folder name must stay its own class (not label 2 for
    # "2"), the sample grid shows ten of the twelve classes without failing on a read of class 10 or 11, and the
    # same labelled folder trains unconditionally with --condition none (no class names given to that model).
    for c in range(12):
        write_images(tmp_path / "pics" / str(c), [(f"{i}.png", "RGB", (16, 16)) for i in range(3)])
    for condition in ("class", "none"):
        out = tmp_path / condition
        assert main(["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(out),
                     "--fast", "--image-size", "16", "--steps", "2", "--eval-n", "4", "--condition", condition]) == 0
        assert (out / "samples.png").exists() and (out / "evaluation.json").exists()
        assert json.loads((out / "data.json").read_text())["condition"] == condition


def test_class_names_that_are_numbers_stay_their_own_class():
    unet = UNetConfig(in_channels=4, image_size=8, base_channels=16, channel_mult=(1,), num_res_blocks=1,
                      attention_levels=(0,), heads=2, context_dim=16)
    classes = sorted(str(c) for c in range(12))  # ['0', '1', '10', '11', '2', ..., '9']: a folder listing
    model = ClassDenoiser(unet, classes)
    assert model.tokenize(classes).tolist() == list(range(12))
    mnist = ClassDenoiser(unet, ["0 - zero", "1 - one"])
    assert mnist.tokenize(["1", "one", "0 - zero"]).tolist() == [1, 1, 0]  # numbers and parts where no name clashes


def test_f_4_is_honoured_where_the_preset_says_otherwise(tmp_path, capsys):
    # CIFAR-10's preset trains f=2; `--f 4` (once the argument's default, so it was silently ignored) means f=4.
    for label in ("cats", "dogs"):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", "RGB", (32, 32)) for i in range(12)])
    out = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", "--root", str(tmp_path / "pics"), "--out", str(out), "--fast",
                 "--f", "4", "--steps", "2", "--eval-n", "2"]) == 0
    assert json.loads((out / "data.json").read_text())["f"] == 4 and (out / "autoencoder_kl_f4.pt").exists()
    assert "f=4" in capsys.readouterr().out


def test_a_folder_that_changed_since_its_run_is_refused(tmp_path, capsys):
    # Files added to a folder (or another --seed's subset in fast mode) would hold out images that the finished
    # checkpoints trained on: resuming into that run is refused, with what differs.
    for label in ("cats", "dogs"):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", "RGB", (16, 16)) for i in range(10)])
    run = ["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(tmp_path / "run"),
           "--fast", "--image-size", "16", "--steps", "2", "--eval-n", "2"]
    assert main(run) == 0
    assert main([*run, "--seed", "1"]) == 2
    assert "differs in: seed" in capsys.readouterr().err
    write_images(tmp_path / "pics" / "cats", [(f"new{i}.png", "RGB", (16, 16)) for i in range(3)])
    assert main(run) == 2
    assert "differs in: images" in capsys.readouterr().err
    assert main([*run, "--fresh"]) == 0


def test_one_class_folder_trains_unconditionally_and_says_so(tmp_path, capsys):
    # ~/pictures/cats/*.png: one class, nothing for a class embedding or a classifier to tell apart (a classifier
    # of one class used to fail after the whole pipeline had trained).
    write_images(tmp_path / "pics" / "cats", [(f"{i}.png", "RGB", (16, 16)) for i in range(12)])
    run = ["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(tmp_path / "run"),
           "--fast", "--image-size", "16", "--steps", "2", "--eval-n", "2"]
    assert main(run) == 0
    assert "has one class folder ('cats')" in capsys.readouterr().out
    manifest = json.loads((tmp_path / "run" / "data.json").read_text())
    assert manifest["condition"] == "none" and manifest["classes"] is None
    assert main([*run, "--condition", "class", "--fresh"]) == 2
    assert "it has one class folder" in capsys.readouterr().err


def test_a_labelled_folder_too_small_to_evaluate_is_refused_before_training(tmp_path, capsys):
    for label in ("cats", "dogs"):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", "RGB", (16, 16)) for i in range(6)])
    assert main(["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(tmp_path / "run"),
                 "--fast", "--image-size", "16", "--steps", "2"]) == 2
    assert "12 images of 2 classes are too few" in capsys.readouterr().err
    assert not list((tmp_path / "run").glob("*.pt"))  # nothing trained


def test_minildm_data_shows_a_random_sample_of_an_image_folder(tmp_path, monkeypatch, capsys):
    # A folder lists its classes one after another: the first eight images would all be "a".
    import minildm.viz

    for label in ("a", "b", "c"):
        write_images(tmp_path / label, [(f"{i}.png", "RGB", (16, 16)) for i in range(8)])
    shown = {}
    monkeypatch.setattr(minildm.viz, "save_grid", lambda path, images, nrow, captions: shown.update(c=captions) or path)
    assert main(["data", "--dataset", "imagefolder", "--root", str(tmp_path), "-n", "8", "--image-size", "16",
                 "--out", str(tmp_path / "grid.png")]) == 0
    assert len(shown["c"]) == 8 and len(set(shown["c"])) >= 2 and set(shown["c"]) <= {"a", "b", "c"}  # class names
    # It reads the folder as `minildm train` does: an unreadable file is skipped and counted, not a traceback.
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 of"):
        assert main(["data", "--dataset", "imagefolder", "--root", str(tmp_path), "-n", "25", "--image-size", "16",
                     "--out", str(tmp_path / "grid.png")]) == 0
    assert len(shown["c"]) == 24 and "1 unreadable files skipped" in capsys.readouterr().out


@needs_data
def test_minildm_data_and_train_read_minildm_data_when_no_root_is_given(tmp_path, monkeypatch, capsys):
    import minildm.viz

    monkeypatch.setenv("MINILDM_DATA", str(DATA))
    shown = {}
    monkeypatch.setattr(minildm.viz, "save_grid", lambda path, images, nrow, captions: shown.update(
        images=images, c=captions) or path)
    assert main(["data", "--dataset", "mnist", "-n", "8", "--out", str(tmp_path / "grid.png")]) == 0
    assert shown["images"].shape == (8, 1, 32, 32) and all(" - " in c for c in shown["c"])  # "7 - seven"
    assert "test split" in capsys.readouterr().out  # ../shared/data holds MNIST's test split only
    assert main(["data", "--dataset", "cifar10", "-n", "4", "--out", str(tmp_path / "grid.png")]) == 0
    assert "cifar10-test" in capsys.readouterr().out  # the course's CIFAR-10 JPEGs, one folder per class
    assert main(["train", "--dataset", "imagefolder", "--out", str(tmp_path / "run"), "--fast"]) == 2
    assert "imagefolder needs --root PATH" in capsys.readouterr().err  # never a guess at the user's own images
    monkeypatch.setenv("MINILDM_DATA", str(tmp_path / "nowhere"))
    assert main(["train", "--dataset", "mnist", "--out", str(tmp_path / "run"), "--fast"]) == 2
    assert "no --root given" in (err := capsys.readouterr().err) and "the folder that holds MNIST/raw/" in err


@pytest.mark.parametrize("dataset", ["mnist", "cifar10"])
def test_a_root_without_the_data_set_says_what_it_must_hold(tmp_path, capsys, dataset):
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes.txt").write_text("not a folder")
    run = ["train", "--dataset", dataset, "--out", str(tmp_path / "run"), "--fast", "--root"]
    for root, says in ((tmp_path / "empty", "--root must be the folder that holds"),
                       (tmp_path / "missing", "does not exist"), (tmp_path / "notes.txt", "is a file")):
        assert main([*run, str(root)]) == 2
        err = capsys.readouterr().err
        assert says in err and ("MNIST/raw/" if dataset == "mnist" else "ROOT/<class>/<image>") in err, err
        assert "download=True" not in err  # the Python API's remedy, not one the command line has


def test_another_regularizer_in_a_finished_run_folder_is_refused_not_mixed(tmp_path, capsys):
    # The diffusion model in --out was trained on the KL autoencoder's latents: a VQ autoencoder trained beside it
    # would be sampled through that model (and evaluated with the KL one). Refused before anything trains.
    for label in ("cats", "dogs"):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", "RGB", (16, 16)) for i in range(12)])
    out = tmp_path / "run"
    run = ["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(out), "--fast",
           "--image-size", "16", "--steps", "2", "--eval-n", "2"]
    assert main(run) == 0
    assert main([*run, "--regularizer", "vq"]) == 2
    assert "another --regularizer, --f or data set preset" in capsys.readouterr().err
    assert not (out / "autoencoder_vq_f4.pt").exists()
    # An empty class name is the null class inside the model, not a row of the grid: refused, not a traceback.
    assert main(["sample", "", "--run", str(out), "--fast", "--steps", "2", "--sampler", "ddim"]) == 2
    assert "empty class name" in capsys.readouterr().err
    assert main(["sample", "cats", "--run", str(out), "-n", "1", "--fast", "--steps", "2", "--sampler", "ddim"]) == 0
    assert (out / "sampled.png").exists()  # beside the run's own samples.png, not in the folder above it
    # A folder that holds two autoencoders (left by an older minildm) is not guessed from.
    (out / "autoencoder_vq_f4.pt").write_bytes((out / "autoencoder_kl_f4.pt").read_bytes())
    assert main(["evaluate", str(out), "-n", "2", "--fast"]) == 2
    assert "holds 2 autoencoders" in capsys.readouterr().err


def test_a_rerun_with_more_steps_keeps_the_autoencoder_its_diffusion_model_was_trained_on(tmp_path, capsys,
                                                                                        monkeypatch):
    # Training the autoencoder on would leave the finished diffusion model decoding through another first stage.
    import minildm.pipeline

    for label in ("cats", "dogs"):
        write_images(tmp_path / "pics" / label, [(f"{i}.png", "RGB", (16, 16)) for i in range(12)])
    out = tmp_path / "run"
    run = ["train", "--dataset", "imagefolder", "--root", str(tmp_path / "pics"), "--out", str(out), "--fast",
           "--image-size", "16", "--eval-n", "2", "--guidance", "1.5"]
    assert main([*run, "--steps", "2"]) == 0
    before = (out / "autoencoder_kl_f4.pt").read_bytes()
    assert main(run) == 0  # the preset's 20 steps: more than the 2 the run's diffusion model saw
    assert (out / "autoencoder_kl_f4.pt").read_bytes() == before
    assert "kept as it is" in capsys.readouterr().out
    # `minildm evaluate` and `minildm sample` default to what the run was evaluated with: its n and guidance.
    asked = {}
    evaluate = minildm.pipeline.evaluate_classes
    monkeypatch.setattr(minildm.pipeline, "evaluate_classes",
                        lambda *a, **k: asked.update(n=k["n"], g=k["guidance_scales"]) or evaluate(*a, **k))
    assert main(["evaluate", str(out), "--fast", "--steps", "2", "--sampler", "ddim"]) == 0
    assert asked == {"n": 2, "g": (1.5,)}
    assert "2 samples were asked" not in capsys.readouterr().out
    assert main(["evaluate", str(out), "--fast", "--steps", "2", "--sampler", "ddim", "-n", "50"]) == 0
    out_text = capsys.readouterr().out
    assert "50 samples were asked; 2 is as many as the held-out images allow" in out_text
    assert "n = 2: FD, KID and class accuracy are rough" in out_text
    assert main(["evaluate", str(out), "--fast", "--judge", str(out / "classifier.pt")]) == 2  # not silently ignored
    assert "--judge is a Shapes judge" in capsys.readouterr().err


def test_the_commands_warnings_and_interruptions_are_one_line():
    # In a terminal: minildm's own warning as one line (not Python's file:line and source), Ctrl-C as one line.
    import subprocess
    import sys

    code = """if True:
        import sys, warnings
        import minildm.cli as cli
        def warn_then_stop(args):
            warnings.warn_explicit("skipped 1 of 3 files", UserWarning, cli.__file__, 1)
            raise KeyboardInterrupt
        cli.cmd_data = warn_then_stop
        sys.exit(cli.main(["data"]))
    """
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 130
    assert done.stderr.splitlines() == ["minildm: warning: skipped 1 of 3 files", "", "minildm: interrupted"]
