"""Checkers for exercise 09 (guidance): classifier-free guidance (Ho & Salimans 2022), out = out_u + w (out_c - out_u),
and condition dropout, the training side that teaches one network both predictions. References:
minildm.samplers.model_output and minildm.text.drop_captions."""

from __future__ import annotations

import torch
from torch import nn

from minildm import samplers as ref
from minildm import text as ref_text
from minildm.checks import (
    ExerciseError,
    expect_tensor,
    expect_value_error,
    known_mistake,
    passed,
    run,
    written_here,
)


class _ProbeModel(nn.Module):
    """A deterministic 'denoiser' whose output depends non-linearly on x_t, t and the context (B, D), and that
    remembers every context it was given."""

    def __init__(self, channels: int = 3, context_dim: int = 4, T: int = 100):
        super().__init__()
        with torch.random.fork_rng(devices=[]):  # the same weights every time; the caller's RNG is untouched
            torch.manual_seed(9)
            self.conv = nn.Conv2d(channels, channels, 3, padding=1)
            self.proj = nn.Linear(context_dim, 2 * channels)
        self.T = T
        self.contexts: list[torch.Tensor] = []

    def forward(self, x_t, t, context):
        self.contexts.append(context.detach().clone())
        scale, shift = self.proj(context)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
        h = self.conv(x_t) * (1 + torch.as_tensor(t, dtype=x_t.dtype).view(-1, 1, 1, 1) / self.T)
        return torch.tanh(h * (1 + scale)) + shift


def _not_the_answer(mistakes: dict[str, torch.Tensor], want: torch.Tensor) -> dict[str, torch.Tensor]:
    """Drop the typical mistakes that give the right answer in this case (e.g. any of them at w = 1)."""
    return {m: w for m, w in mistakes.items() if not torch.allclose(w.double(), want.double(), rtol=1e-5, atol=1e-6)}


def check_model_output(fn) -> None:
    """fn(model, x, t, context, guidance_scale, uncond_context) -> the guided prediction out_u + w (out_c - out_u)."""
    name = "model_output"
    written_here(fn, name)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 5, 5, generator=g)
    t = torch.tensor([0, 40, 99])
    context, uncond = torch.randn(3, 4, generator=g), torch.zeros(3, 4)
    with torch.no_grad():
        probe = _ProbeModel()
        out_c, out_u = probe(x, t, context), probe(x, t, uncond)
    for w in (3.0, 7.5, 1.0, 1.5):
        case = f"guidance_scale={w}, a batch of 3"
        model = _ProbeModel()
        with torch.no_grad():
            got = run(fn, name, case, model, x, t, context, w, uncond)
        want = ref.model_output(_ProbeModel(), x, t, context, w, uncond)
        if isinstance(got, torch.Tensor) and got.shape[0] == 2 * x.shape[0]:
            raise ExerciseError(f"{name} ({case}): returned {got.shape[0]} rows for {x.shape[0]} images: after running "
                                "the conditional and unconditional passes as one batch of 2B, split the output back "
                                "into its two halves (e.g. .chunk(2)) and combine them.")
        if isinstance(got, (tuple, list)):
            raise ExerciseError(f"{name} ({case}): return one tensor, the guided prediction, not a "
                                f"{type(got).__name__}.")
        seen = torch.cat(model.contexts) if model.contexts else torch.zeros(0, 4)
        if w != 1 and not any(torch.equal(row, uncond[0]) for row in seen):
            raise ExerciseError(f"{name} ({case}): the model never saw uncond_context; guidance needs its prediction "
                                "for the empty condition too: out_u = model(x, t, uncond_context).")
        if not any(torch.equal(row, context[0]) for row in seen):
            raise ExerciseError(f"{name} ({case}): the model never saw the context; out_c = model(x, t, context).")
        known_mistake(got, _not_the_answer({
            "the two predictions are swapped: start from the unconditional one and move towards the conditional "
            "one, out_u + w (out_c - out_u) (the same as (1 - w) out_u + w out_c, not (1 - w) out_c + w out_u). If "
            "you ran both as one batch, check that .chunk gives them back in the order torch.cat put them in.":
                out_c + w * (out_u - out_c),
            "that is Ho & Salimans' own convention, (1 + w) out_c - w out_u, in which w = 0 is the plain conditional "
            "model; the course's w is theirs + 1 (w = 1 = no guidance): out_u + w (out_c - out_u).":
                out_c + w * (out_c - out_u),
            "you returned the conditional prediction alone; guidance extrapolates: out_u + w (out_c - out_u).": out_c,
            "you returned the unconditional prediction alone; guidance is out_u + w (out_c - out_u).": out_u,
            "that is w (out_c - out_u) alone: add it to the unconditional prediction.": w * (out_c - out_u),
            "that scales the conditional prediction; guidance scales the difference: out_u + w (out_c - out_u).":
                w * out_c,
            "that is the average of the two predictions; guidance is out_u + w (out_c - out_u).": (out_c + out_u) / 2,
        }, want), name, case)
        expect_tensor(got, want, name, case, atol=1e-5)
    passed(name, "out_u + w (out_c - out_u) with both passes of the model; w = 1 is the conditional model")


def _captions(n: int, seed: int) -> list[str]:
    words = ("red", "blue", "green", "circle", "square", "ring", "left", "right", "top")
    g = torch.Generator().manual_seed(seed)
    return [f"a {words[i]} {words[j]} {k}" for i, j, k in torch.randint(0, len(words), (n, 3), generator=g).tolist()]


def _call_drop(fn, name, case, captions, p, seed):
    """The student's function on a copy of `captions`, with a generator of `seed`; the global RNG is left alone."""
    copy = list(captions)
    with torch.random.fork_rng(devices=[]):
        got = run(fn, name, case, copy, p, torch.Generator().manual_seed(seed))
    if copy != captions:
        raise ExerciseError(f"{name} ({case}): your function changed the list it was given; return a new list and "
                            "leave the captions of the batch as they were.")
    if not isinstance(got, list) or len(got) != len(captions) or not all(isinstance(c, str) for c in got):
        what = f"a {type(got).__name__}" + (f" of length {len(got)}" if hasattr(got, "__len__") else "")
        raise ExerciseError(f"{name} ({case}): expected a list of {len(captions)} str, one per caption; got {what}.")
    for new, old in zip(got, captions):
        if new not in ("", old):
            raise ExerciseError(f"{name} ({case}): a caption became {new!r}; each one must stay as it is or become the "
                                "empty caption \"\" (exactly: no spaces, no special token).")
    return got


def check_drop_captions(fn) -> None:
    """fn(captions, p, generator) -> captions with each one replaced by "" with probability p, drawn per caption as
    u = torch.rand(len(captions), generator=generator), dropped where u < p (minildm.text.drop_captions)."""
    name = "drop_captions"
    written_here(fn, name)
    many = _captions(2000, 1)
    for p in (0.1, 0.3):
        case = f"p={p}, {len(many)} captions"
        got = _call_drop(fn, name, case, many, p, 0)
        share = sum(c == "" for c in got) / len(got)
        if abs(share - (1 - p)) < 0.05:
            raise ExerciseError(f"{name} ({case}): {share:.0%} of the captions were dropped, about 1 - p: the "
                                "probability is inverted. Drop a caption when u < p (keep it when u >= p).")
        if share in (0.0, 1.0):
            raise ExerciseError(f"{name} ({case}): {'every' if share else 'no'} caption was dropped. Condition dropout "
                                "decides for each caption on its own, with probability p.")
        if abs(share - p) > 0.05:
            raise ExerciseError(f"{name} ({case}): {share:.1%} of the captions were dropped; about {p:.0%} should be.")
    batch = _captions(64, 2)
    all_or_none = [_call_drop(fn, name, f"p=0.5, a batch of 64, generator seed {s}", batch, 0.5, s) for s in range(6)]
    if all(len(set(d)) == 1 or d == batch or all(c == "" for c in d) for d in all_or_none):
        raise ExerciseError(f"{name} (p=0.5, a batch of 64): each call dropped the whole batch or none of it. Draw one "
                            "number per caption, u = torch.rand(len(captions), generator=generator), not one per batch.")
    for p in (0.0, 1.0):
        case = f"p={p}"
        got = _call_drop(fn, name, case, batch, p, 3)
        want = batch if p == 0 else [""] * len(batch)
        if got != want:
            raise ExerciseError(f"{name} ({case}): {'no' if p == 0 else 'every'} caption must be dropped at p = {p}, "
                                f"but {sum(a != b for a, b in zip(got, want))} of {len(batch)} differ.")
    first, again, other = (_call_drop(fn, name, "p=0.5, generators of seeds 4, 4 and 5", batch, 0.5, s)
                           for s in (4, 4, 5))
    if first != again:
        raise ExerciseError(f"{name}: two generators of the same seed dropped different captions. Draw the random "
                            "numbers from the generator you are given: torch.rand(n, generator=generator).")
    if first == other:
        raise ExerciseError(f"{name}: generators of different seeds dropped the same captions: your draw ignores "
                            "the generator. Draw u = torch.rand(len(captions), generator=generator).")
    for seed, p in ((4, 0.5), (11, 0.25), (12, 0.75)):
        case = f"p={p}, a batch of 64, generator seed {seed}"
        got = _call_drop(fn, name, case, batch, p, seed)
        want = ref_text.drop_captions(batch, p, torch.Generator().manual_seed(seed))
        if got != want:
            u = torch.rand(len(batch), generator=torch.Generator().manual_seed(seed))
            if got == ["" if v <= p else c for v, c in zip(u.tolist(), batch)]:
                continue  # u <= p instead of u < p: the same except at u = p exactly
            raise ExerciseError(f"{name} ({case}): {sum(a != b for a, b in zip(got, want))} of {len(batch)} captions "
                                "differ from the prescribed draw: u = torch.rand(len(captions), generator=generator) "
                                "once, then caption i becomes \"\" where u[i] < p.")
    for p in (-0.1, 1.5):
        expect_value_error(fn, name, f"p={p}", list(batch), p, torch.Generator().manual_seed(0),
                           why="says p must lie in [0, 1]")
    passed(name, "each caption dropped on its own with probability p, from the generator; p outside [0, 1] refused")
