"""Exercise checkers: one module per stage, called from the graded cells of the exercises.

Every checker calls the student's function on a few inputs, compares with the package's reference
implementation, and either prints one pass line or raises `ExerciseError` (an AssertionError, so
nbgrader counts the cell as failed) that says exactly what is wrong: which input, which property
(type, shape, dtype, value) and by how much.
"""

from __future__ import annotations

import torch


class ExerciseError(AssertionError):
    """The student's answer is wrong; the message says how."""


def call(fn, name: str, *args, **kwargs):
    """Call the student's function, turning 'not done yet' into a clear message."""
    try:
        return fn(*args, **kwargs)
    except NotImplementedError:
        raise ExerciseError(f"{name}: not implemented yet — replace `raise NotImplementedError()` "
                            "with your code.") from None


def run(fn, name: str, case: str, *args, hint: str = ""):
    """Call the student's function; an exception from inside it becomes a message naming the case."""
    try:
        return call(fn, name, *args)
    except ExerciseError:
        raise
    except Exception as e:  # any error in the student's code is reported, with its traceback
        raise ExerciseError(f"{name} ({case}): your function raised {type(e).__name__}: {e}. {hint}".strip()) from e


def known_mistake(got, mistakes: dict[str, torch.Tensor], name: str, case: str) -> None:
    """Raise with a specific explanation when `got` equals the result of a typical wrong answer."""
    if not isinstance(got, torch.Tensor):
        return
    for message, wrong in mistakes.items():
        if got.shape == wrong.shape and torch.allclose(got.detach().double(), wrong.double(), rtol=1e-5, atol=1e-6):
            raise ExerciseError(f"{name} ({case}): {message}")


def expect_tensor(got, expected: torch.Tensor, name: str, case: str, atol: float = 1e-5, rtol: float = 1e-4):
    """Raise ExerciseError unless `got` is a tensor of the expected shape, dtype and values."""
    if not isinstance(got, torch.Tensor):
        raise ExerciseError(f"{name} ({case}): expected a torch.Tensor, got {type(got).__name__}.")
    if got.shape != expected.shape:
        raise ExerciseError(f"{name} ({case}): expected shape {tuple(expected.shape)}, got {tuple(got.shape)}.")
    if got.dtype != expected.dtype:
        raise ExerciseError(f"{name} ({case}): expected dtype {expected.dtype}, got {got.dtype}.")
    if expected.dtype.is_floating_point:
        if not torch.isfinite(got).all():
            raise ExerciseError(f"{name} ({case}): the result contains NaN or inf.")
        err = (got.detach().double() - expected.double()).abs()
        tol = atol + rtol * expected.double().abs()
        if (err > tol).any():
            i = int(torch.argmax(err - tol))
            raise ExerciseError(
                f"{name} ({case}): values are off — largest error {err.max().item():.3g} "
                f"(element {i}: got {got.flatten()[i].item():.6g}, expected {expected.flatten()[i].item():.6g})."
            )
    elif not torch.equal(got, expected):
        wrong = int((got != expected).sum())
        raise ExerciseError(f"{name} ({case}): {wrong} of {expected.numel()} entries differ from the expected values.")


def expect_value_error(fn, name: str, case: str, *args, why: str) -> None:
    """The student's function must refuse this input with a ValueError (the course's rule: clear errors, raised
    early); `why` completes "raise a ValueError that ..."."""
    try:
        result = call(fn, name, *args)
    except ValueError:
        return
    except ExerciseError:
        raise
    except Exception as e:
        raise ExerciseError(f"{name} ({case}): raised {type(e).__name__}; raise a ValueError that {why}.") from e
    raise ExerciseError(f"{name} ({case}): returned {type(result).__name__} for input it must refuse; raise a "
                        f"ValueError that {why}.")


def passed(name: str, detail: str) -> None:
    print(f"PASS {name}: {detail}")
