"""Evaluation (stage 7): reconstruction PSNR, and distances between two sets of image features.

The Fréchet distance (FD) and the kernel distance (KID) compare a set of generated images with a set of real
ones through the features a classifier computes for them. Here the features come from classifiers the course
trains itself (the Shapes judge of `minildm.judge`), so the numbers are comparable with each other across this
course's runs, never with the "FID" and "KID" of papers, which use the features of a pretrained Inception
network: these are not Inception FIDs and are never called that.

Features are (N, D) tensors, one row per image. All sums run in float64 on the CPU (the feature sets are small,
and float32 loses the few digits FD is made of: it is a difference of traces of similar size).
"""

from __future__ import annotations

import torch


def psnr(x: torch.Tensor, y: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per image, in dB: 10 log10(range^2 / MSE).

    Images in [-1, 1] have range 2 (the same value as PSNR of the images mapped to [0, 1] with range 1).
    x, y: (B, C, H, W) -> (B,)
    """
    if x.shape != y.shape:
        raise ValueError(f"psnr needs images of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    mse = (x.float() - y.float()).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(data_range**2 / mse.clamp_min(1e-12))


# ---------------------------------------------------------------- checking inputs


def _features(x, name: str) -> torch.Tensor:
    """`x` as a float64 CPU tensor of shape (N, D) with N >= 2 finite rows, or a ValueError saying what is wrong."""
    x = torch.as_tensor(x).detach()
    if x.ndim != 2:
        raise ValueError(f"{name} must be a 2-D tensor (N images, D features), got shape {tuple(x.shape)}; "
                         "flatten each image's features into one row, e.g. features.flatten(1)")
    if x.shape[0] < 2:
        raise ValueError(f"{name} has {x.shape[0]} sample(s); a mean and a covariance need at least 2 "
                         "(use a few hundred or more for a stable estimate)")
    x = x.to("cpu", torch.float64)
    bad = ~torch.isfinite(x).all(1)
    if bad.any():
        rows = torch.nonzero(bad).flatten().tolist()
        raise ValueError(f"{name} contains NaN or inf in {len(rows)} row(s), first ones {rows[:5]}; drop or "
                         "fix those samples (a diverged model or an unnormalised image gives such features)")
    return x


def _same_width(a: torch.Tensor, b: torch.Tensor, what: str) -> None:
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"{what} have different feature widths, {a.shape[-1]} and {b.shape[-1]}; compute both "
                         "with the same feature network (and the same layer)")


def _gaussian(mu, cov, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(mu (D,), cov (D, D)) as float64 CPU tensors, checked."""
    mu, cov = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (mu, cov))
    if mu.ndim != 1 or cov.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"{name}: expected a mean of shape (D,) and a covariance of shape (D, D), got "
                         f"{tuple(mu.shape)} and {tuple(cov.shape)}")
    if not (torch.isfinite(mu).all() and torch.isfinite(cov).all()):
        raise ValueError(f"{name}: the mean or covariance contains NaN or inf; check the features they came from")
    return mu, cov


# ---------------------------------------------------------------- Fréchet distance


def _psd_sqrt(a: torch.Tensor) -> torch.Tensor:
    """Square root of a symmetric positive semi-definite matrix: V diag(sqrt(w)) V^T from a = V diag(w) V^T.
    Rounding can leave eigenvalues like -1e-17 where 0 is meant: they are clamped to 0."""
    w, v = torch.linalg.eigh((a + a.T) / 2)  # symmetrise: eigh reads only one triangle
    return (v * w.clamp_min(0).sqrt()) @ v.T


def gaussian_frechet_distance(mu1, cov1, mu2, cov2) -> float:
    """Fréchet (2-Wasserstein) distance, squared, between N(mu1, S1) and N(mu2, S2):

        FD = ||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr( (S1^{1/2} S2 S1^{1/2})^{1/2} )

    (Dowson & Landau 1982; used on image features by Heusel et al. 2017). When S1 and S2 commute, the last
    term is tr((S1 S2)^{1/2}), and for diagonal covariances FD = ||mu1 - mu2||^2 + sum_i (sqrt(s1_i) - sqrt(s2_i))^2.

    S1^{1/2} S2 S1^{1/2} is symmetric positive semi-definite, so both square roots come from symmetric
    eigendecompositions (torch.linalg.eigh), in float64, with tiny negative eigenvalues clamped to 0. The
    result is >= 0 in exact arithmetic; a rounding error below 0 is returned as 0.
    mu: (D,), cov: (D, D) tensors (or arrays) -> a Python float.
    """
    mu1, cov1 = _gaussian(mu1, cov1, "the first Gaussian")
    mu2, cov2 = _gaussian(mu2, cov2, "the second Gaussian")
    _same_width(mu1, mu2, "the two Gaussians")
    root1 = _psd_sqrt(cov1)
    middle = root1 @ cov2 @ root1
    eigenvalues = torch.linalg.eigvalsh((middle + middle.T) / 2)
    trace_of_root = eigenvalues.clamp_min(0).sqrt().sum()  # tr(M^{1/2}) = sum of sqrt(eigenvalues of M)
    fd = (mu1 - mu2).pow(2).sum() + cov1.trace() + cov2.trace() - 2 * trace_of_root
    return max(fd.item(), 0.0)


def feature_statistics(features) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and unbiased covariance of (N, D) features: mu = (1/N) sum_n x_n,
    S = (1/(N - 1)) sum_n (x_n - mu)(x_n - mu)^T. Returns float64 tensors (D,) and (D, D)."""
    x = _features(features, "features")
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def frechet_distance(features_a, features_b) -> float:
    """FD between Gaussians fitted to two feature sets (N_a, D) and (N_b, D): gaussian_frechet_distance of
    their feature_statistics. It is biased upwards at small N (it falls towards its limit as N grows), so
    compare FDs computed from the same number of samples."""
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    _same_width(a, b, "features_a and features_b")
    return gaussian_frechet_distance(*feature_statistics(a), *feature_statistics(b))


# ---------------------------------------------------------------- kernel distance (KID)


def polynomial_kernel(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """k(x, y) = (x . y / D + 1)^3 for all pairs of rows: (M, D), (N, D) -> (M, N)."""
    return (x @ y.T / x.shape[1] + 1) ** 3


def mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Unbiased estimate of the squared maximum mean discrepancy with the polynomial kernel (Gretton et al. 2012):

        MMD^2 = 1/(m(m-1)) sum_{i != j} k(x_i, x_j) + 1/(n(n-1)) sum_{i != j} k(y_i, y_j)
                - 2/(mn) sum_{i, j} k(x_i, y_j)

    Leaving out the i = j terms makes its expectation exactly 0 when x and y come from the same distribution
    (single estimates can then be negative)."""
    m, n = x.shape[0], y.shape[0]
    kxx, kyy = polynomial_kernel(x, x), polynomial_kernel(y, y)
    within_x = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
    within_y = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    return within_x + within_y - 2 * polynomial_kernel(x, y).mean()


def kid(features_a, features_b, subsets: int = 100, subset_size: int = 1000,
        generator: torch.Generator | None = None) -> tuple[float, float]:
    """Kernel distance of Bińkowski et al. (2018) between two feature sets (N_a, D) and (N_b, D).

    For each of `subsets` rounds, draw `subset_size` rows of each set without replacement and compute
    mmd2_unbiased with the cubic polynomial kernel k(x, y) = (x . y / D + 1)^3; return the mean over rounds
    and its spread (population std over rounds, as in Bińkowski et al.'s code). Unlike FD it is unbiased:
    about 0 for two samples of one distribution, whatever their size.
    The subsets come from `generator` (a CPU torch.Generator), or from a fresh one seeded with 0 when it is
    None: the result is reproducible and the global random state is left alone.
    """
    a, b = _features(features_a, "features_a"), _features(features_b, "features_b")
    _same_width(a, b, "features_a and features_b")
    if not (isinstance(subsets, int) and subsets >= 1):
        raise ValueError(f"subsets must be an int >= 1, got {subsets!r}")
    smallest = min(a.shape[0], b.shape[0])
    if not (isinstance(subset_size, int) and 2 <= subset_size <= smallest):
        raise ValueError(f"subset_size must be an int from 2 to the size of the smaller feature set ({smallest}), "
                         f"got {subset_size!r}; pass subset_size={smallest} or compute more features")
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    scores = torch.empty(subsets, dtype=torch.float64)
    for i in range(subsets):
        pick_a = torch.randperm(a.shape[0], generator=generator)[:subset_size]
        pick_b = torch.randperm(b.shape[0], generator=generator)[:subset_size]
        scores[i] = mmd2_unbiased(a[pick_a], b[pick_b])
    return scores.mean().item(), scores.std(correction=0).item()
