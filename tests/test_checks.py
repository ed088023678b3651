"""Each checker accepts the reference answer and rejects unfilled and typical wrong answers
with a message that says what is wrong."""

import pytest
import torch
from einops import rearrange

from minildm import autoencoder as ref
from minildm.checks import ExerciseError
from minildm.checks import stage02 as s02


def unfilled(*args):
    raise NotImplementedError()


STAGE02 = [
    # (checker, reference, [(wrong answer, expected message fragment), ...])
    (s02.check_reparameterize, ref.reparameterize, [
        (lambda m, lv, n: m + torch.exp(lv) * n, "values are off"),  # used the variance, not sigma
        (lambda m, lv, n: (m + torch.exp(0.5 * lv) * n).detach(), "no gradient"),
    ]),
    (s02.check_kl_divergence, ref.kl_divergence, [
        (lambda m, lv: 0.5 * (m**2 + lv.exp() - 1 - lv).sum(), "expected shape"),  # summed over the batch too
        (lambda m, lv: (m**2 + lv.exp() - 1 - lv).sum((1, 2, 3)), "values are off"),  # forgot the 1/2
    ]),
    (s02.check_nearest_code, ref.nearest_code, [
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> b (h w) c"), e[None]).argmax(-1)
         .reshape(z.shape[0], *z.shape[2:]), "entries differ"),  # farthest, not nearest
        (lambda z, e: torch.cdist(rearrange(z, "b c h w -> (b h w) c"), e).argmin(-1), "expected shape"),
    ]),
    (s02.check_straight_through, ref.straight_through, [
        (lambda z, zq: zq, "no gradient path"),
        (lambda z, zq: z, "values are off"),
        (lambda z, zq: z + (zq - z), "backward"),  # no detach: gradient w.r.t. z vanishes
    ]),
]


@pytest.mark.parametrize("checker, reference, wrong", STAGE02, ids=lambda x: getattr(x, "__name__", ""))
def test_checker_accepts_reference_and_rejects_wrong_answers(checker, reference, wrong, capsys):
    checker(reference)
    assert capsys.readouterr().out.startswith("PASS")
    with pytest.raises(ExerciseError, match="not implemented yet"):
        checker(unfilled)
    for answer, message in wrong:
        with pytest.raises(ExerciseError, match=message):
            checker(answer)
