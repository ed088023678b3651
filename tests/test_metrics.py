"""Metrics: PSNR, the Fréchet distance against closed forms and torchmetrics, KID unbiased and against a
hand computation, and clear errors for bad feature sets."""

import math

import pytest
import torch

from minildm import metrics
from minildm.metrics import feature_statistics, frechet_distance, gaussian_frechet_distance, kid

D64 = torch.float64


def gaussian_samples(mu, cov, n, generator):
    """n rows drawn from N(mu, cov): mu + z L^T with cov = L L^T."""
    z = torch.randn(n, len(mu), generator=generator, dtype=D64)
    return mu + z @ torch.linalg.cholesky(cov).T


def random_orthogonal(d, generator):
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=D64))
    return q


# A non-commuting 2x2 pair. For 2x2 PSD matrices, tr(M^{1/2}) = sqrt(tr M + 2 sqrt(det M)) (the square of
# sqrt(l1) + sqrt(l2)), and M = S1^{1/2} S2 S1^{1/2} has tr M = tr(S1 S2), det M = det S1 det S2. Here
# tr(S1 S2) = 2 + 18 = 20, det S1 det S2 = 3 * 9 = 27, ||mu1 - mu2||^2 = 5, tr S1 + tr S2 = 4 + 10.
S1 = torch.tensor([[2.0, 1.0], [1.0, 2.0]], dtype=D64)
S2 = torch.tensor([[1.0, 0.0], [0.0, 9.0]], dtype=D64)
MU1, MU2 = torch.zeros(2, dtype=D64), torch.tensor([1.0, -2.0], dtype=D64)
FD_2X2 = 5 + 4 + 10 - 2 * math.sqrt(20 + 2 * math.sqrt(27))


def test_psnr_closed_form():
    x = torch.zeros(2, 3, 4, 4)
    y = x + torch.tensor([0.1, 0.2]).view(2, 1, 1, 1)  # MSE 0.01 and 0.04 on a range of 2
    assert torch.allclose(metrics.psnr(x, y), 10 * torch.log10(4 / torch.tensor([0.01, 0.04])))


def test_fd_one_dimensional():
    """In 1-D: FD = (m1 - m2)^2 + (s1 - s2)^2 with s the standard deviations."""
    fd = gaussian_frechet_distance(torch.tensor([1.0]), torch.tensor([[4.0]]), torch.tensor([-2.0]),
                                   torch.tensor([[0.25]]))
    assert fd == pytest.approx(9 + (2 - 0.5) ** 2, rel=1e-12)


def test_fd_commuting_covariances_closed_form():
    """S1 = Q diag(s1) Q^T, S2 = Q diag(s2) Q^T commute: FD = ||mu1 - mu2||^2 + sum (sqrt(s1) - sqrt(s2))^2."""
    g = torch.Generator().manual_seed(0)
    s1, s2 = torch.rand(6, generator=g, dtype=D64) * 3, torch.rand(6, generator=g, dtype=D64) * 3
    mu1, mu2 = torch.randn(6, generator=g, dtype=D64), torch.randn(6, generator=g, dtype=D64)
    want = (mu1 - mu2).pow(2).sum() + (s1.sqrt() - s2.sqrt()).pow(2).sum()
    assert gaussian_frechet_distance(mu1, torch.diag(s1), mu2, torch.diag(s2)) == pytest.approx(want.item(), rel=1e-10)
    q = random_orthogonal(6, g)
    rotated = gaussian_frechet_distance(mu1, q @ torch.diag(s1) @ q.T, mu2, q @ torch.diag(s2) @ q.T)
    assert rotated == pytest.approx(want.item(), rel=1e-9)


def test_fd_non_commuting_pair_by_hand():
    assert not torch.allclose(S1 @ S2, S2 @ S1)
    assert gaussian_frechet_distance(MU1, S1, MU2, S2) == pytest.approx(FD_2X2, rel=1e-12)
    assert gaussian_frechet_distance(MU2, S2, MU1, S1) == pytest.approx(FD_2X2, rel=1e-12)


def test_fd_of_samples_approaches_the_closed_form():
    """50,000 samples from each Gaussian of the 2x2 pair: the estimate's standard deviation is about 0.06
    (measured over seeds), so 0.25 (3 % of FD) is about 4 of them."""
    g = torch.Generator().manual_seed(0)
    a, b = gaussian_samples(MU1, S1, 50_000, g), gaussian_samples(MU2, S2, 50_000, g)
    assert frechet_distance(a, b) == pytest.approx(FD_2X2, abs=0.25)


def test_fd_of_a_set_with_itself_is_zero_and_fd_is_symmetric():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(200, 16, generator=g), torch.randn(300, 16, generator=g) * 1.5 + 0.2
    assert frechet_distance(x, x) == pytest.approx(0, abs=1e-6)
    assert frechet_distance(x[:10], x[:10].clone()) == pytest.approx(0, abs=1e-6)  # 10 rows, rank-9 covariance
    assert frechet_distance(x, y) == pytest.approx(frechet_distance(y, x), rel=1e-9)
    assert frechet_distance(x, y) > 1


def test_feature_statistics_unbiased_covariance():
    mu, cov = feature_statistics(torch.tensor([[0.0, 1.0], [2.0, 1.0]]))
    assert torch.equal(mu, torch.tensor([1.0, 1.0], dtype=D64))
    assert torch.equal(cov, torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=D64))  # divides by N - 1 = 1
    x = torch.randn(50, 5, generator=torch.Generator().manual_seed(2))
    assert torch.allclose(feature_statistics(x)[1], torch.cov(x.T).double(), atol=1e-6)


@pytest.mark.filterwarnings("ignore:Metric `Kernel Inception Distance` will save all extracted features")
def test_frechet_distance_agrees_with_torchmetrics():
    # From the submodules: torchmetrics.image exports these names only when torch-fidelity (the Inception
    # network, which we never use) is installed; with a feature module of our own they work without it.
    fid_module = pytest.importorskip("torchmetrics.image.fid")
    kid_module = pytest.importorskip("torchmetrics.image.kid")

    class Features(torch.nn.Module):
        """The "images" fed to torchmetrics are the features themselves. Versions that do not read
        num_features probe the width with one dummy image: answer it with 12 zeros."""

        num_features = 12

        def forward(self, x):
            return x if x.ndim == 2 else x.new_zeros(x.shape[0], self.num_features)

    g = torch.Generator().manual_seed(3)
    a = torch.randn(400, 12, generator=g, dtype=D64)
    b = torch.randn(300, 12, generator=g, dtype=D64) @ torch.randn(12, 12, generator=g, dtype=D64) * 0.5 + 0.3
    fid = fid_module.FrechetInceptionDistance(feature=Features())
    fid.update(a, real=True)
    fid.update(b, real=False)
    assert frechet_distance(a, b) == pytest.approx(fid.compute().item(), rel=1e-3)
    # KID with one subset of every row: torchmetrics' random permutation does not change the value.
    kernel = kid_module.KernelInceptionDistance(feature=Features(), subsets=1, subset_size=300)
    kernel.update(a[:300], real=True)
    kernel.update(b, real=False)
    assert kid(a[:300], b, subsets=1, subset_size=300)[0] == pytest.approx(kernel.compute()[0].item(), rel=1e-6)


def test_kid_by_hand():
    """1-D sets {0, 1} and {2, 3}, k(x, y) = (xy + 1)^3, subsets of the whole sets:
    within {0, 1}: k(0, 1) = 1; within {2, 3}: k(2, 3) = 343; across: 1 + 1 + 27 + 64 = 93, mean 23.25.
    MMD^2 = 1 + 343 - 2 * 23.25 = 297.5, the same in every subset (std 0)."""
    mean, std = kid(torch.tensor([[0.0], [1.0]]), torch.tensor([[2.0], [3.0]]), subsets=3, subset_size=2)
    assert mean == pytest.approx(297.5, rel=1e-12) and std == pytest.approx(0, abs=1e-9)


def test_kid_is_unbiased_on_equal_distributions_and_positive_on_shifted_ones():
    """400 pairs of independent 50-row samples of N(0, I): the mean MMD^2 is within 3 standard errors of 0.
    (Keeping the i = j kernel terms would put it about 0.4 above 0, some 50 standard errors.)"""
    g = torch.Generator().manual_seed(0)
    same = torch.tensor([kid(torch.randn(50, 4, generator=g), torch.randn(50, 4, generator=g),
                             subsets=1, subset_size=50)[0] for _ in range(400)])
    standard_error = same.std() / math.sqrt(len(same))
    assert same.mean().abs() < 3 * standard_error
    assert (same < 0).any()  # single unbiased estimates can be negative
    shifted = kid(torch.randn(500, 4, generator=g), torch.randn(500, 4, generator=g) + 0.5,
                  subsets=20, subset_size=100)
    assert shifted[0] > 20 * standard_error and shifted[0] > 5 * shifted[1] / math.sqrt(20)


def test_kid_is_reproducible_and_leaves_the_global_random_state_alone():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(100, 8, generator=g), torch.randn(120, 8, generator=g) + 0.3
    torch.manual_seed(0)
    untouched = torch.rand(3)
    torch.manual_seed(0)
    first = kid(a, b, subsets=5, subset_size=50)
    assert torch.equal(torch.rand(3), untouched)
    assert kid(a, b, subsets=5, subset_size=50) == first  # generator None: a fresh one seeded with 0
    seeded = [kid(a, b, subsets=5, subset_size=50, generator=torch.Generator().manual_seed(7)) for _ in range(2)]
    assert seeded[0] == seeded[1] and seeded[0] != first


@pytest.mark.parametrize("call, message", [
    (lambda: frechet_distance(torch.randn(1, 4), torch.randn(5, 4)), "at least 2"),
    (lambda: frechet_distance(torch.randn(5, 4), torch.randn(5, 3)), "different feature widths, 4 and 3"),
    (lambda: frechet_distance(torch.randn(5, 4, 2), torch.randn(5, 4)), "2-D tensor.*flatten"),
    (lambda: frechet_distance(torch.randn(5, 4), torch.tensor([[0.0] * 4, [math.nan] * 4])), "NaN or inf.*\\[1\\]"),
    (lambda: feature_statistics(torch.randn(1, 3)), "at least 2"),
    (lambda: kid(torch.randn(5, 4), torch.randn(5, 3), subset_size=5), "different feature widths"),
    (lambda: kid(torch.randn(5, 4), torch.randn(8, 4)), "subset_size.*\\(5\\).*subset_size=5"),
    (lambda: kid(torch.randn(5, 4), torch.randn(8, 4), subset_size=1), "subset_size"),
    (lambda: kid(torch.randn(5, 4), torch.randn(8, 4), subsets=0, subset_size=5), "subsets must be"),
    (lambda: kid(torch.full((5, 4), math.inf), torch.randn(8, 4), subset_size=5), "features_a contains NaN or inf"),
    (lambda: gaussian_frechet_distance(torch.zeros(2), torch.eye(3), torch.zeros(2), torch.eye(2)), "shape \\(D, D\\)"),
    (lambda: gaussian_frechet_distance(torch.zeros(2), torch.eye(2), torch.zeros(3), torch.eye(3)), "feature widths"),
    (lambda: gaussian_frechet_distance(torch.tensor([math.nan, 0]), torch.eye(2), torch.zeros(2), torch.eye(2)),
     "NaN or inf"),
])
def test_bad_input_raises_a_clear_value_error(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_kid_subsets_of_a_small_evaluation_differ_so_their_spread_is_not_zero():
    # With subsets of all n samples every round is the same set and the +- came out as 0.0000 for n <= 256.
    from minildm.pipeline import kid_subset_size

    assert [kid_subset_size(n) for n in (1000, 512, 200, 5, 3)] == [256, 256, 100, 2, 2]
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(200, 8, generator=g), torch.randn(200, 8, generator=g) + 0.5
    mean, spread = kid(a, b, subsets=50, subset_size=kid_subset_size(200))
    assert mean > 0 and spread > 0
