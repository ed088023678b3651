"""Checkers for exercise 07 (evaluation): the mean and unbiased covariance of a feature set, the Fréchet distance
between two Gaussians, and caption accuracy from the Shapes judge's reading (per object, then the whole report).
References: minildm.metrics.feature_statistics, minildm.metrics.gaussian_frechet_distance,
minildm.judge.caption_accuracy."""

from __future__ import annotations

import math

import torch

from minildm import judge, metrics
from minildm.checks import (
    ExerciseError,
    expect_tensor,
    expect_value_error,
    known_mistake,
    passed,
    run,
    written_here,
)
from minildm.data.shapes import MAX_OBJECTS, POSITIONS, ShapesConfig, attributes, sample_scenes

D64 = torch.float64
CELLS = len(POSITIONS)
SQRT_NAN = ("torch.sqrt of a negative number gives NaN: either of a matrix entry (torch.sqrt works entry by "
            "entry, it is not a matrix square root) or of an eigenvalue that rounding left slightly below 0 "
            "(clamp eigenvalues to 0 first).")
ABSENT_HINT = ("Rows of -1 (absent objects) have position -1, which is no cell: index with the position clamped "
               "to a valid cell (.clamp(min=0)) and mask those rows out with attributes[..., 0] >= 0.")
CLAMP_HINT = ("A covariance with zero eigenvalues (fewer samples than features) gets some that rounding makes "
              "slightly negative: clamp eigenvalues to 0 before their square roots (NaNs from torch.sqrt make a "
              "later eigh fail).")


def _number(got, name: str, case: str) -> float:
    """A Python number or a one-element tensor, as a float; anything else is an error."""
    if isinstance(got, torch.Tensor) and got.numel() == 1:
        return float(got)
    if isinstance(got, (int, float)) and not isinstance(got, bool):
        return float(got)
    raise ExerciseError(f"{name} ({case}): expected one number, got {type(got).__name__}"
                        + (f" of shape {tuple(got.shape)}" if isinstance(got, torch.Tensor) else "") + ".")


def _expect_number(got: float, want: float, mistakes: dict[str, float], name: str, case: str,
                   nan_hint: str = "", rtol: float = 1e-6, atol: float = 1e-8) -> None:
    """got must be want; when it is not, name the typical mistake that gives got, if one does."""
    if math.isnan(got):
        raise ExerciseError(f"{name} ({case}): got NaN. {nan_hint}".strip())
    if abs(got - want) <= atol + rtol * abs(want):
        return
    for message, wrong in mistakes.items():
        if abs(got - wrong) <= atol + rtol * abs(wrong):
            raise ExerciseError(f"{name} ({case}): {message}")
    raise ExerciseError(f"{name} ({case}): got {got:.8g}, expected {want:.8g}.")


# ---------------------------------------------------------------- feature statistics


def check_feature_statistics(fn) -> None:
    """fn(features (N, D)) -> (mu (D,), cov (D, D)) with the unbiased covariance (divided by N - 1)."""
    name = "feature_statistics"
    written_here(fn, name)
    g = torch.Generator().manual_seed(0)
    cases = {"hand-made [[0, 1], [2, 1], [4, 4]]": torch.tensor([[0.0, 1.0], [2.0, 1.0], [4.0, 4.0]]),
             "7 random samples of 3 features": torch.randn(7, 3, generator=g) * 2 + 1,
             "50 correlated samples of 4 features (float64)": torch.randn(50, 4, generator=g, dtype=D64)
             @ torch.randn(4, 4, generator=g, dtype=D64) + 3}
    for case, x in cases.items():
        got = run(fn, name, case, x)
        if not (isinstance(got, tuple) and len(got) == 2):
            raise ExerciseError(f"{name} ({case}): return a tuple (mu, cov), got {type(got).__name__}"
                                + (f" of length {len(got)}" if isinstance(got, (tuple, list)) else "") + ".")
        mu, cov = metrics.feature_statistics(x)
        n, d = x.shape
        if isinstance(got[1], torch.Tensor) and got[1].shape == (n, n) and n != d:
            raise ExerciseError(f"{name} ({case}): cov has shape ({n}, {n}), one entry per pair of samples; it needs "
                                f"one per pair of features, ({d}, {d}): compute centred.T @ centred (or torch.cov "
                                "of features.T: torch.cov takes one variable per row).")
        x64 = x.double()
        got = tuple(t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in got)
        known_mistake(got[1], {
            "this is the biased covariance, divided by N; the unbiased estimate divides by N - 1 (one degree of "
            "freedom went into the mean).": (x64 - mu).T @ (x64 - mu) / n,
            "the mean was not subtracted: cov = (x - mu)^T (x - mu) / (N - 1).": x64.T @ x64 / (n - 1),
            "only the variances: the covariance matrix also holds the covariances between features off its "
            "diagonal, (x - mu)^T (x - mu) / (N - 1).": torch.diag(x64.var(0)),
            "the mean was subtracted along the wrong axis (per sample, over the features); subtract the mean over "
            "the samples, features.mean(0).": (x64 - x64.mean(1, keepdim=True)).T
                @ (x64 - x64.mean(1, keepdim=True)) / (n - 1),
        }, name, case, cov.double())
        expect_tensor(got[0], mu, name, case + ": mu", atol=1e-5)
        expect_tensor(got[1], cov, name, case + ": cov", atol=1e-5)
    expect_value_error(fn, name, "a single sample", torch.ones(1, 3),
                       why="says a covariance needs at least 2 samples")
    passed(name, "mean and unbiased covariance (divided by N - 1); fewer than 2 samples raise ValueError")


# ---------------------------------------------------------------- Fréchet distance of two Gaussians


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def _fd_cases() -> dict[str, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(5, 5, generator=g, dtype=D64), torch.randn(5, 5, generator=g, dtype=D64)
    low_rank = torch.randn(3, 5, generator=g, dtype=D64)  # 3 samples in 5-D: covariance of rank 2
    low_rank = (low_rank - low_rank.mean(0)).T @ (low_rank - low_rank.mean(0)) / 2

    def t(*values):
        return torch.tensor(values, dtype=D64)

    return {
        "1-D: N(1, 4) and N(-2, 0.25)": (t(1.0), t([4.0]), t(-2.0), t([0.25])),
        "diagonal covariances": (t(0.0, 1.0, 2.0), torch.diag(t(1.0, 4.0, 9.0)), t(1.0, 1.0, 0.0),
                                 torch.diag(t(4.0, 1.0, 0.25))),
        "non-commuting 2x2: S1 = [[2, 1], [1, 2]], S2 = diag(1, 9)": (t(0.0, 0.0), t([2.0, 1.0], [1.0, 2.0]),
                                                                       t(1.0, -2.0), torch.diag(t(1.0, 9.0))),
        "random 5-D covariances A A^T and B B^T": (torch.randn(5, generator=g, dtype=D64), a @ a.T,
                                                   torch.randn(5, generator=g, dtype=D64), b @ b.T / 4),
        "a rank-2 covariance (3 samples in 5-D) against itself": (t(0.0, 1, 2, 3, 4), low_rank, t(0.0, 1, 2, 3, 4),
                                                                 low_rank.clone()),
    }


def _fd_mistakes(mu1, cov1, mu2, cov2) -> dict[str, float]:
    """message -> the value a typical wrong formula gives on this case."""
    d2, traces = (mu1 - mu2).pow(2).sum().item(), (cov1.trace() + cov2.trace()).item()
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    cross = torch.linalg.eigvalsh(middle).clamp_min(0).sqrt().sum().item()
    mistakes = {
        "the cross term -2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}) is missing.": d2 + traces,
        "the cross term needs its factor 2: -2 tr((S1^{1/2} S2 S1^{1/2})^{1/2}).": d2 + traces - cross,
        "tr(S1^{1/2} S2 S1^{1/2}) = tr(S1 S2) misses the outer square root: the cross term is the trace of the "
        "square root of that matrix, the sum of the square roots of its eigenvalues.":
            d2 + traces - 2 * (cov1 @ cov2).trace().item(),
        "the middle matrix is S1^{1/2} S2 S1^{1/2}, with the square root of S1 on both sides, not S1 itself.":
            d2 + traces - 2 * torch.linalg.eigvalsh(cov1 @ cov2 @ cov1).clamp_min(0).sqrt().sum().item(),
        "the trace of M^{1/2} is the sum of the square roots of M's eigenvalues, not of its diagonal entries "
        "(torch.sqrt(M).trace() takes the latter: torch.sqrt works entry by entry).":
            d2 + traces - 2 * middle.diagonal().clamp_min(0).sqrt().sum().item(),
        "||mu1 - mu2|| must be squared: the mean term is ||mu1 - mu2||^2 = sum of squared differences.":
            math.sqrt(d2) + traces - 2 * cross,
        "the mean term is missing: add ||mu1 - mu2||^2.": traces - 2 * cross,
    }
    entrywise = cov1.sqrt() @ cov2 @ cov1.sqrt()  # NaN where a covariance is negative (the answer is NaN too then)
    if torch.isfinite(entrywise).all():  # (eigvals of a NaN matrix can crash the process in MKL)
        mistakes["torch.sqrt(cov1) takes the square root of each entry; it is not the matrix square root. Take "
                 "S1^{1/2} = V diag(sqrt(w)) V^T from torch.linalg.eigh(cov1)."] = (
            d2 + traces - 2 * torch.linalg.eigvals(entrywise).sqrt().real.sum().item())
        mistakes["torch.sqrt works entry by entry: neither torch.sqrt(cov1) nor torch.sqrt(M) is a matrix square "
                 "root. Use eigh: S1^{1/2} = V diag(sqrt(w)) V^T, tr(M^{1/2}) = sum of sqrt(eigenvalues of M)."] = (
            d2 + traces - 2 * entrywise.diagonal().sqrt().sum().item())
    return mistakes


def check_gaussian_frechet_distance(fn) -> None:
    """fn(mu1, cov1, mu2, cov2) -> ||mu1 - mu2||^2 + tr S1 + tr S2 - 2 tr((S1^{1/2} S2 S1^{1/2})^{1/2})."""
    name = "gaussian_frechet_distance"
    written_here(fn, name)
    for case, args in _fd_cases().items():
        hint = CLAMP_HINT if "itself" in case else ""
        got = _number(run(fn, name, case, *(a.clone() for a in args), hint=hint), name, case)
        want = metrics.gaussian_frechet_distance(*args)
        if "itself" in case:
            if abs(got) > 1e-6:
                raise ExerciseError(f"{name} ({case}): the distance of a Gaussian to itself must be 0, got "
                                    f"{got:.3g}. {CLAMP_HINT}")
            continue
        _expect_number(got, want, _fd_mistakes(*args), name, case, nan_hint=SQRT_NAN)
    mu1, cov1, mu2, cov2 = _fd_cases()["random 5-D covariances A A^T and B B^T"]
    expect_value_error(fn, name, "a 5-D and a 4-D Gaussian", mu1, cov1, mu2[:4], cov2[:4, :4],
                       why="says the two Gaussians have different dimensions (5 and 4)")
    passed(name, "matches the closed forms (1-D, diagonal, a non-commuting 2x2), random 5-D pairs and FD(P, P) = 0")


# ---------------------------------------------------------------- caption accuracy


def _perfect_reading(attrs: torch.Tensor) -> torch.Tensor:
    """What a judge that never errs reads: each captioned object's (shape, colour, size) in its cell."""
    read = torch.full((len(attrs), CELLS, 3), -1, dtype=torch.long)
    for b, k in (attrs[..., 0] >= 0).nonzero().tolist():
        read[b, attrs[b, k, 3]] = attrs[b, k, :3]
    return read


def _random_case(seed: int, batch: int = 48) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes attributes and a reading with errors of every kind: wrong attributes, emptied cells, extra objects."""
    attrs = attributes(sample_scenes(range(batch), ShapesConfig(seed=seed)))
    read = _perfect_reading(attrs)
    g = torch.Generator().manual_seed(seed)
    occupied = read[..., 0] >= 0
    for i, n in enumerate((6, 6, 2)):  # replace ~15 % of each attribute by a random (maybe equal) value
        change = (torch.rand(read.shape[:2], generator=g) < 0.15) & occupied
        read[..., i] = torch.where(change, torch.randint(0, n, read.shape[:2], generator=g), read[..., i])
    emptied = (torch.rand(read.shape[:2], generator=g) < 0.1) & occupied
    extra = (torch.rand(read.shape[:2], generator=g) < 0.05) & ~occupied
    read[emptied] = -1
    read[extra] = torch.tensor([0, 4, 1])  # a large blue circle where nothing was captioned
    return read, attrs


def _hand_case() -> tuple[torch.Tensor, torch.Tensor, str]:
    """Four images: all right; a wrong colour; an empty cell; all right plus an extra object."""
    absent = [-1, -1, -1, -1]
    attrs = torch.tensor([
        [[0, 0, 1, 0], [1, 4, 0, 4], absent],  # large red circle top left, small blue square center
        [[2, 3, 1, 2], absent, absent],        # large green triangle top right
        [[5, 1, 0, 7], absent, absent],        # small orange ring bottom
        [[3, 5, 1, 3], [4, 2, 0, 5], absent],  # large purple diamond left, small yellow hexagon right
    ])
    read = _perfect_reading(attrs)
    read[1, 2, 1] = 0  # the triangle is read red
    read[2, 7] = -1  # the ring is missing
    read[3, 8] = torch.tensor([0, 0, 0])  # a small red circle bottom right that nobody asked for
    return read, attrs, "4 hand-made images: all right; a wrong colour; an empty cell; an extra object"


def _reference_object_correct(read: torch.Tensor, attrs: torch.Tensor) -> torch.Tensor:
    """(B, 3) bool from the reference: caption_accuracy of each captioned object alone gives "object" 1 or 0."""
    right = torch.zeros(attrs.shape[:2], dtype=torch.bool)
    for b, k in (attrs[..., 0] >= 0).nonzero().tolist():
        alone = torch.full_like(attrs[b:b + 1], -1)
        alone[0, 0] = attrs[b, k]
        right[b, k] = judge.caption_accuracy(read[b:b + 1], alone)["object"] == 1.0
    return right


def _object_mistakes(read: torch.Tensor, attrs: torch.Tensor) -> dict[str, torch.Tensor]:
    present = attrs[..., 0] >= 0
    batch = torch.arange(len(attrs))[:, None]
    at_position = read[batch, attrs[..., 3]]  # position -1 of an absent row wraps to the last cell
    at_slot = read[:, :MAX_OBJECTS]  # cell k for object k
    return {
        "rows of -1 are absent objects and must be False; indexing with their position -1 reads the last cell "
        "(bottom right) instead: mask them with attributes[..., 0] >= 0.": (at_position == attrs[..., :3]).all(-1),
        "object k was looked up in cell k; its cell is its position, attributes[..., 3].":
            (at_slot == attrs[..., :3]).all(-1) & present,
        "the size was not compared: an object is right when its shape, colour and size all match.":
            (at_position[..., :2] == attrs[..., :2]).all(-1) & present,
    }


def check_object_correct(fn) -> None:
    """fn(read (B, 9, 3), attributes (B, 3, 4)) -> (B, 3) bool: captioned object right (False for -1 rows)."""
    name = "object_correct"
    written_here(fn, name)
    read, attrs, hand = _hand_case()
    cases = {hand: (read, attrs)}
    for seed in (0, 1):
        cases[f"48 Shapes images (seed {seed}) read with random errors"] = _random_case(seed)
    for case, (read, attrs) in cases.items():
        got = run(fn, name, case, read.clone(), attrs.clone(), hint=ABSENT_HINT)
        want = _reference_object_correct(read, attrs)
        if isinstance(got, torch.Tensor) and got.shape == want.shape and got.dtype != torch.bool:
            raise ExerciseError(f"{name} ({case}): expected a bool tensor, got {got.dtype}; comparisons like "
                                "(a == b) give bool tensors, keep them (no .float() or .long()).")
        if not (isinstance(got, torch.Tensor) and torch.equal(got, want)):
            known_mistake(got, _object_mistakes(read, attrs), name, case)
        expect_tensor(got, want, name, case)
    passed(name, "each captioned object right when its cell holds its shape, colour and size; -1 rows False")


def _accuracy_mistakes(read: torch.Tensor, attrs: torch.Tensor) -> dict[str, dict[str, float]]:
    """Per key of the report: message -> the value a typical mistake gives."""
    present = attrs[..., 0] >= 0
    n, batch = int(present.sum()), len(attrs)
    seen = read[torch.arange(batch)[:, None], attrs[..., 3].clamp(min=0)]  # (B, 3, 3)
    right = _reference_object_correct(read, attrs)
    occupied = read[..., 0] >= 0
    extra = occupied & ~(_perfect_reading(attrs)[..., 0] >= 0)
    filled = (seen[..., 0] >= 0) & present
    mistakes = {
        "object": {f"divide by the number of captioned objects ({n}), not by every row of attributes "
                   f"({right.numel()}): rows of -1 are not objects.": right.sum().item() / right.numel()},
        "caption": {"an image with an object in a cell its caption does not mention is wrong: require no extra "
                    "objects as well.": (right | ~present).all(1).float().mean().item(),
                    "rows of -1 are not captioned objects: they cannot make a caption wrong (use object_correct | "
                    "~present before .all).": (right.all(1) & ~extra.any(1)).float().mean().item()},
        "extra_per_image": {"count only the occupied cells that no caption object sits in; this counted every "
                            "occupied cell.": occupied.sum().item() / batch},
    }
    for i, key in enumerate(("shape", "colour", "size")):
        mistakes[key] = {f"an empty cell counts as a wrong {key}: divide by all {n} captioned objects, not only "
                         "those whose cell holds something.":
                         ((seen[..., i] == attrs[..., i]) & filled).sum().item() / max(filled.sum().item(), 1)}
    return mistakes


def check_caption_accuracy(fn) -> None:
    """fn(read, attributes) -> the dict of minildm.judge.caption_accuracy."""
    name = "caption_accuracy"
    written_here(fn, name)
    read, attrs, hand = _hand_case()
    cases = {hand: (read, attrs)}
    for seed in (2, 3):
        cases[f"48 Shapes images (seed {seed}) read with random errors"] = _random_case(seed)
    perfect_attrs = attributes(sample_scenes(range(16), ShapesConfig(seed=4)))
    cases["16 Shapes images read perfectly (every score 1)"] = (_perfect_reading(perfect_attrs), perfect_attrs)
    for case, (read, attrs) in cases.items():
        got = run(fn, name, case, read.clone(), attrs.clone(), hint=ABSENT_HINT)
        want = judge.caption_accuracy(read, attrs)
        if not isinstance(got, dict):
            raise ExerciseError(f"{name} ({case}): return a dict with the keys {sorted(want)}, got "
                                f"{type(got).__name__}.")
        missing = sorted(set(want) - set(got))
        if missing:
            raise ExerciseError(f"{name} ({case}): the keys {missing} are missing from the dict.")
        mistakes = _accuracy_mistakes(read, attrs)
        for key, value in want.items():
            if key in ("objects", "images"):
                if not (isinstance(got[key], int) and got[key] == value):
                    raise ExerciseError(f"{name} ({case}): {key!r} must be the int {value}, got {got[key]!r}.")
                continue
            _expect_number(_number(got[key], name, f"{case}, {key!r}"), value, mistakes.get(key, {}), name,
                           f"{case}, {key!r}", nan_hint="A fraction of 0/0? Divide by the number of captioned "
                           "objects (or of images).")
    passed(name, "place, shape, colour, size, object over captioned objects; caption and extras per image")
