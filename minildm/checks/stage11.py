"""Checkers for exercise 11 (real data): the transform that brings any image (MNIST's grey digits, photos of any size)
to the model's float tensors in [-1, 1], the class accuracy of class-conditional samples (overall and per asked
class), and the FD of the samples as a multiple of the real-data floor. Everything runs on synthetic images and
features: no data set is needed. References: minildm.data.images (image_transform, to_float),
minildm.classifier.accuracy and minildm.pipeline.evaluate_classes (fd_real_floor, fd_ratio)."""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image
from torchvision import transforms as T

from minildm.checks import ExerciseError, expect_tensor, expect_value_error, passed, run, written_here
from minildm.data.images import _rgb, image_transform, to_float
from minildm.metrics import frechet_distance

ATOL = 0.02  # resizing a float tensor instead of the PIL image differs by under 1/127.5 from the reference


# ---------------------------------------------------------------- 1. the transform


def synthetic_images() -> dict[str, Image.Image]:
    """Deterministic test images: an MNIST-like grey 28 x 28 digit-ish stroke on black, a landscape RGB photo-like
    48 x 36 and a portrait RGB 30 x 45, each with smooth parts and texture (so that resampling mistakes show)."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:28, 0:28]
    ring = np.exp(-((np.hypot(yy - 14, xx - 13) - 8) ** 2) / 6)  # a "0" of width ~3 px
    grey = np.clip(255 * ring + rng.normal(0, 12, (28, 28)), 0, 255).astype(np.uint8)

    def photo(h, w):
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1)
        return np.clip(127.5 + 90 * base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)

    return {"an MNIST-like grey 28 x 28 image": Image.fromarray(grey, "L"),
            "an RGB 48 x 36 (width x height) image": Image.fromarray(photo(36, 48), "RGB"),
            "an RGB 30 x 45 (width x height) image": Image.fromarray(photo(45, 30), "RGB")}


def reference_transform(image_size: int, channels: int):
    """The package's transform followed by its conversion: PIL -> float32 (channels, S, S) in [-1, 1]."""
    decode = image_transform(image_size, channels)
    return lambda image: to_float(decode(image))


def _variant(image, channels: int, *steps) -> torch.Tensor:
    """The image through the package's channel conversion, then `steps` (a wrong resize or crop), as [-1, 1]."""
    to_channels = T.Grayscale(1) if channels == 1 else T.Lambda(_rgb)
    return to_float(T.Compose([to_channels, *steps, T.PILToTensor()])(image))


def _near(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and a.shape == b.shape and a.is_floating_point()
            and bool(((a.double() - b.double()).abs() <= ATOL).all()))


def check_image_transform(fn) -> None:
    """fn(image_size, channels) -> a callable (e.g. T.Compose) taking a PIL image of any mode and size to a float32
    tensor (channels, S, S) in [-1, 1]: grey or RGB, shorter side resized to S (bilinear, antialiased), centre
    square cropped, [0, 255] mapped to [-1, 1]."""
    name = "image_transform"
    written_here(fn, name)
    images = synthetic_images()
    grey, wide, tall = images.values()
    cases = [(grey, 32, 1), (grey, 32, 3), (wide, 16, 3), (wide, 16, 1), (tall, 16, 3)]
    for image, size, channels in cases:
        label = next(k for k, v in images.items() if v is image)
        case = f"{label}, image_size={size}, channels={channels}"
        transform = run(fn, name, f"image_size={size}, channels={channels}", size, channels)
        if not callable(transform):
            raise ExerciseError(f"{name} ({case}): return the transform itself (e.g. a T.Compose of torchvision "
                                f"transforms), a callable that takes a PIL image; got {type(transform).__name__}.")
        got = run(transform, name + "'s transform", case, image.copy())
        want = reference_transform(size, channels)(image)
        if not isinstance(got, torch.Tensor):
            raise ExerciseError(f"{name} ({case}): the transform returned a {type(got).__name__}; end it with a step "
                                "that makes a tensor (T.ToTensor() or T.PILToTensor() and a conversion).")
        if got.dtype == torch.uint8:
            raise ExerciseError(f"{name} ({case}): the transform returned uint8 values in [0, 255] (PILToTensor "
                                "keeps them); the model reads float32 in [-1, 1]: x / 127.5 - 1, or T.ToTensor() "
                                "then T.Normalize with mean 0.5 and std 0.5 per channel.")
        if got.shape != want.shape:
            s, hint = size, None
            if tuple(got.shape) == (s, s):
                hint = "the channel dimension is missing: images are (C, S, S)"
            elif got.ndim == 3 and tuple(got.shape[1:]) == (s, s):
                hint = ("asked for 3 channels, a grey image must be repeated into three (T.Grayscale(3), or "
                        "image.convert('RGB'))" if channels == 3 else
                        "asked for 1 channel, a colour image must become one grey channel (T.Grayscale(1))")
            elif got.ndim == 3 and got.shape[0] == channels and got.shape[1] == got.shape[2]:
                hint = f"the image was not resized to image_size: T.Resize({size}) (then T.CenterCrop({size}))"
            elif got.ndim == 3 and got.shape[0] == channels:
                hint = ("the image is not square: resize its shorter side to image_size (T.Resize(image_size)), then "
                        "cut the centre square (T.CenterCrop(image_size))")
            raise ExerciseError(f"{name} ({case}): expected shape {tuple(want.shape)}, got {tuple(got.shape)}"
                                + (f": {hint}." if hint else "."))
        unit = (want + 1) / 2  # [0, 1]
        mistakes = {
            "the values are in [0, 1] (where T.ToTensor() stops); the model reads [-1, 1]: add "
            "T.Normalize([0.5] * channels, [0.5] * channels), or x * 2 - 1.": unit,
            "the values were standardised with MNIST's mean and std (0.1307, 0.3081), as classifiers of MNIST do; "
            "a diffusion model's data lie in [-1, 1]: T.Normalize([0.5] * channels, [0.5] * channels).":
                (unit - 0.1307) / 0.3081,
            "the values are floats in [0, 255]; divide by 127.5 and subtract 1 for [-1, 1].": unit * 255,
            "the values are inverted (white is -1); [0, 255] maps to [-1, 1] increasing: x / 127.5 - 1.": -want,
            "the image was squashed to a square (T.Resize((S, S)) changes its aspect ratio); resize the shorter side, "
            "T.Resize(S), then T.CenterCrop(S).": _variant(image, channels, T.Resize((size, size), antialias=True)),
            "the image was cropped without resizing (a 28 px digit asked for 32 px got a black frame); first "
            "T.Resize(S), then T.CenterCrop(S).": _variant(image, channels, T.CenterCrop(size)),
            "the image was resized by nearest neighbour (blocky, and aliased when shrinking); use T.Resize's default, "
            "bilinear with antialias.": _variant(image, channels, T.Resize(size, interpolation=T.InterpolationMode.NEAREST), T.CenterCrop(size)),
        }
        if channels == 1 and image.mode == "RGB":
            rgb = reference_transform(size, 3)(image)
            mistakes["grey was made by averaging R, G and B; T.Grayscale(1) (PIL's 'L') weighs them as the eye does, "
                     "0.299 R + 0.587 G + 0.114 B."] = rgb.mean(0, keepdim=True)
        for message, wrong in mistakes.items():
            if wrong.shape == want.shape and _near(got, wrong) and not _near(wrong, want):
                raise ExerciseError(f"{name} ({case}): {message}")
        expect_tensor(got, want, name, case, atol=ATOL, rtol=0)
    passed(name, "any image to float32 (channels, S, S) in [-1, 1]: grey or RGB, shorter side resized, centre crop")


# ---------------------------------------------------------------- 2. class accuracy


def reference_class_accuracy(logits: torch.Tensor, asked: torch.Tensor) -> tuple[float, torch.Tensor]:
    """(fraction of samples read as the asked class, per asked class (K,) float32, NaN where never asked)."""
    right = (logits.argmax(1) == asked).float()  # (N,)
    K = logits.shape[1]
    count = torch.bincount(asked, minlength=K).float()
    per_class = torch.bincount(asked, weights=right, minlength=K).float() / count  # 0 / 0 = NaN
    return right.mean().item(), per_class


def _logits_case(n_per_class, K, correct, seed):
    """Logits (N, K) and asked labels (N,) with a chosen fraction `correct` of samples read as asked."""
    g = torch.Generator().manual_seed(seed)
    asked = torch.cat([torch.full((n,), k) for k, n in enumerate(n_per_class)])
    asked = asked[torch.randperm(len(asked), generator=g)]
    logits = torch.randn(len(asked), K, generator=g)
    hit = torch.rand(len(asked), generator=g) < correct
    wrong_class = (asked + torch.randint(1, K, asked.shape, generator=g)) % K
    target = torch.where(hit, asked, wrong_class)
    logits[torch.arange(len(asked)), target] += 4.0  # the class the classifier reads
    return logits, asked


def check_class_accuracy(fn) -> None:
    """fn(logits (N, K), asked (N,) int64) -> (accuracy: float, per_class: float32 (K,)): the fraction of samples
    whose argmax is the asked class; per asked class the same, NaN for a class never asked. Lengths that differ and
    labels outside 0..K-1 are ValueErrors."""
    name = "class_accuracy"
    written_here(fn, name)
    cases = {
        "12 samples of 4 classes asked 6, 3, 2 and 1 times": _logits_case([6, 3, 2, 1], 4, 0.6, 0),
        "200 samples of 10 classes, class 7 never asked": _logits_case([25, 20, 15, 30, 20, 25, 20, 0, 25, 20], 10,
                                                                       0.7, 1),
        "50 samples of 3 classes, none read right": _logits_case([20, 20, 10], 3, 0.0, 2),
    }
    for case, (logits, asked) in cases.items():
        got = run(fn, name, case, logits.clone(), asked.clone(),
                  hint="logits are (N, K): the class each sample is read as is logits.argmax(dim=1).")
        want_acc, want_per = reference_class_accuracy(logits, asked)
        if not isinstance(got, (tuple, list)) or len(got) != 2:
            raise ExerciseError(f"{name} ({case}): return two things, (accuracy, per_class); got "
                                f"{type(got).__name__}.")
        acc, per = got
        if isinstance(acc, torch.Tensor) and acc.numel() == 1:
            raise ExerciseError(f"{name} ({case}): return the accuracy as a Python float (`.item()`), not a tensor.")
        if not isinstance(acc, float):
            raise ExerciseError(f"{name} ({case}): the accuracy must be a Python float, got {type(acc).__name__}.")
        right = logits.argmax(1) == asked
        probs = logits.softmax(1)[torch.arange(len(asked)), asked]
        acc_mistakes = {
            "that is the mean of the per-class accuracies; the accuracy is over samples, the fraction of all N read "
            "as their asked class (the two differ when classes are asked unequally often).": want_per.nanmean().item(),
            "that is the error rate, the fraction read wrongly; the accuracy is the fraction read right.":
                1 - want_acc,
            "that is a count; divide by the number of samples.": float(right.sum()),
            "that is the mean probability of the asked class; accuracy counts the samples whose most likely class "
            "(argmax) is the asked one.": probs.mean().item(),
        }
        for message, wrong in acc_mistakes.items():
            if math.isclose(acc, wrong, abs_tol=1e-6) and not math.isclose(wrong, want_acc, abs_tol=1e-6):
                raise ExerciseError(f"{name} ({case}): accuracy {acc:.4g}, expected {want_acc:.4g}: {message}")
        if not math.isclose(acc, want_acc, abs_tol=1e-6):
            raise ExerciseError(f"{name} ({case}): accuracy {acc:.4g}, expected {want_acc:.4g}, the fraction of "
                                "samples with logits.argmax(1) == asked.")
        if not isinstance(per, torch.Tensor):
            raise ExerciseError(f"{name} ({case}): per_class must be a tensor of shape ({logits.shape[1]},), got "
                                f"{type(per).__name__}.")
        K = logits.shape[1]
        pred = logits.argmax(1)
        by_prediction = torch.bincount(pred, weights=right.float(), minlength=K) / torch.bincount(pred, minlength=K)
        per_mistakes = {
            "that groups the samples by the class they were read as (the classifier's precision); group them by "
            "the class they were asked for.": by_prediction.float(),
            "a class never asked got 0, as if the model always failed it; it has no accuracy: NaN (0 / 0).":
                torch.nan_to_num(want_per, nan=0.0),
            "those are counts of right samples per class; divide by how often each class was asked.":
                torch.bincount(asked, weights=right.float(), minlength=K).float(),
        }
        if per.shape == want_per.shape and per.is_floating_point():
            for message, wrong in per_mistakes.items():
                same_nan = torch.equal(per.isnan(), wrong.isnan())
                if same_nan and torch.allclose(per.nan_to_num(-1.0).double(), wrong.nan_to_num(-1.0).double(),
                                               atol=1e-6) and not (torch.equal(wrong.isnan(), want_per.isnan()) and
                                                                   torch.allclose(wrong.nan_to_num(-1.0),
                                                                                  want_per.nan_to_num(-1.0))):
                    raise ExerciseError(f"{name} ({case}): per_class: {message}")
            if not torch.equal(per.isnan(), want_per.isnan()):
                nan_got, nan_want = (x.isnan().nonzero().flatten().tolist() for x in (per, want_per))
                raise ExerciseError(f"{name} ({case}): per_class is NaN for classes {nan_got}; expected NaN exactly "
                                    f"for the classes never asked, {nan_want}.")
        expect_tensor(per.nan_to_num(-1.0) if isinstance(per, torch.Tensor) else per, want_per.nan_to_num(-1.0), name,
                      case + ", per_class (NaN shown as -1)", atol=1e-6)
    logits, asked = cases["12 samples of 4 classes asked 6, 3, 2 and 1 times"]
    expect_value_error(fn, name, "12 rows of logits, 11 labels", logits, asked[:11],
                       why="says the logits and the asked labels must have the same length")
    expect_value_error(fn, name, "a label 4 with logits of 4 classes", logits, asked.clone().fill_(4),
                       why="says the labels must lie in 0..K-1")
    passed(name, "the fraction of samples read as asked, and per asked class (NaN where never asked); bad input "
                 "refused")


# ---------------------------------------------------------------- 3. FD over the real-data floor


class RecordingFD:
    """frechet_distance that remembers which feature sets it compared (by their values), and can be told to
    answer 0 for the floor."""

    def __init__(self, sets: dict[str, torch.Tensor], zero_floor: bool = False):
        self.sets, self.zero_floor, self.pairs = sets, zero_floor, []

    def which(self, x) -> str:
        for label, s in self.sets.items():
            if isinstance(x, torch.Tensor) and x.shape == s.shape and torch.equal(x, s):
                return label
        return "something else"

    def __call__(self, a, b) -> float:
        pair = frozenset((self.which(a), self.which(b))) if self.which(a) != self.which(b) else (self.which(a),)
        self.pairs.append(pair)
        if self.zero_floor and pair == frozenset(("real", "reference")):
            return 0.0
        return frechet_distance(a, b)


def check_fd_ratio(fn) -> None:
    """fn(samples, real, reference, fd) -> FD(samples, reference) / FD(real, reference), a Python float; a floor
    of 0 or less is a ValueError (real and reference must be two different halves of the held-out images)."""
    name = "fd_ratio"
    written_here(fn, name)
    g = torch.Generator().manual_seed(3)
    for shift, case in ((0.6, "samples shifted by 0.6 from the real features, 300 x 8 each"),
                        (0.0, "samples from the real distribution, 300 x 8 each")):
        real = torch.randn(300, 8, generator=g)
        reference = torch.randn(300, 8, generator=g)
        samples = torch.randn(300, 8, generator=g) * 1.3 + shift
        sets = {"samples": samples, "real": real, "reference": reference}
        fd = RecordingFD(sets)
        got = run(fn, name, case, samples.clone(), real.clone(), reference.clone(), fd)
        floor, fd_s = frechet_distance(real, reference), frechet_distance(samples, reference)
        want = fd_s / floor
        if isinstance(got, torch.Tensor) and got.numel() == 1:
            got = got.item()
        if not isinstance(got, float):
            raise ExerciseError(f"{name} ({case}): return one Python float, the ratio; got {type(got).__name__}.")
        pairs = set(fd.pairs)
        selves = [next(iter(p)) for p in pairs if len(p) == 1]
        if selves:
            raise ExerciseError(f"{name} ({case}): you compared a feature set with itself ({selves[0]}); that FD is "
                                "0. The floor is FD(real, reference): two different halves of the real images.")
        mistakes = {
            "the ratio is upside down: FD(samples, reference) / FD(real, reference), so 1 means as close as real "
            "images and more is worse.": floor / fd_s,
            "the samples were compared with the real half; measure them against the reference, the same set the "
            "floor is measured against: FD(samples, reference) / FD(real, reference).":
                frechet_distance(samples, real) / floor,
            "that is a difference; the course reports the ratio FD(samples, reference) / FD(real, reference).":
                fd_s - floor,
            "that is the samples' FD alone; divide it by the floor FD(real, reference).": fd_s,
        }
        for message, wrong in mistakes.items():
            if math.isclose(got, wrong, rel_tol=1e-6) and not math.isclose(wrong, want, rel_tol=1e-6):
                raise ExerciseError(f"{name} ({case}): got {got:.4g}, expected {want:.4g}: {message}")
        if frozenset(("real", "reference")) not in pairs:
            raise ExerciseError(f"{name} ({case}): fd was never called on (real, reference): the floor is FD(real, "
                                "reference).")
        if not math.isclose(got, want, rel_tol=1e-5):
            raise ExerciseError(f"{name} ({case}): got {got:.6g}, expected FD(samples, reference) / FD(real, "
                                f"reference) = {fd_s:.4g} / {floor:.4g} = {want:.6g}.")
    real, reference, samples = (torch.randn(50, 4, generator=g) for _ in range(3))
    expect_value_error(fn, name, "a floor of 0", samples, real, reference,
                       RecordingFD({"samples": samples, "real": real, "reference": reference}, zero_floor=True),
                       why="says the floor FD(real, reference) is 0, so real and reference must be different images")
    passed(name, "FD(samples, reference) / FD(real, reference), a floor of 0 refused")
