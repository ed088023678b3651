"""Exercise checkers: one module per stage, called from the graded cells of the exercises.

Every checker calls the student's function on a few inputs, compares with the package's reference
implementation, and either prints one pass line or raises `ExerciseError` (an AssertionError, so
nbgrader counts the cell as failed) that says exactly what is wrong: which input, which property
(type, shape, dtype, value) and by how much. Every checker first calls `written_here`: the answer must be the
student's own function, not the package's reference answer.
"""

from __future__ import annotations

import builtins
import dis
import functools
import math
import types

import torch
import torch.nn.functional as F


class ExerciseError(AssertionError):
    """The student's answer is wrong; the message says how."""


def _from_package(obj) -> bool:
    """Whether `obj` is the minildm package, one of its modules, or a function, class or object defined in it."""
    module = obj.__name__ if isinstance(obj, types.ModuleType) else getattr(obj, "__module__", None)
    return isinstance(module, str) and module.split(".")[0] == "minildm"


def _package_use(fn, seen: set) -> str | None:
    """The first name by which `fn` (or a notebook function it calls) reaches the minildm package, or None.

    Looks at the global names its code loads and the modules it imports (in nested functions, lambdas and
    comprehensions too: their code objects sit in co_consts), and at its default arguments and closure."""
    if id(fn) in seen:
        return None
    seen.add(id(fn))
    reached = list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    reached += [cell.cell_contents for cell in fn.__closure__ or () if cell.cell_contents is not None]
    codes = [fn.__code__]
    while codes:
        code = codes.pop()
        codes += [c for c in code.co_consts if isinstance(c, types.CodeType)]
        for ins in dis.get_instructions(code):
            if ins.opname == "IMPORT_NAME" and ins.argval.split(".")[0] == "minildm":
                return f"`import {ins.argval}`"
            if ins.opname in ("LOAD_GLOBAL", "LOAD_NAME") and ins.argval in fn.__globals__:
                obj = fn.__globals__[ins.argval]
                if _from_package(obj):
                    return f"`{ins.argval}`"
                reached.append(obj)
    for obj in reached:
        if _from_package(obj):
            return f"`{_label(obj)}`"
        if isinstance(obj, types.FunctionType) and obj.__module__ == "__main__":  # another notebook function
            found = _package_use(obj, seen)
            if found:
                return f"{found} (through your {obj.__name__})"
    return None


def _label(obj) -> str:
    """module.name of a function or class, the name of a module, else the type of the object."""
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    if isinstance(obj, (types.FunctionType, type)):
        return f"{obj.__module__}.{obj.__qualname__}"
    kind = type(obj)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# What the checkers (and the hidden tests' asserts) compute with: an answer cell must not have replaced any of it.
TRUSTED = {"torch": torch, "torch.Tensor": torch.Tensor, "torch._C.TensorBase": torch._C.TensorBase,
           "torch.nn.functional": F, "torch.linalg": torch.linalg, "math": math, "builtins": builtins}


def _notebook_made(obj) -> bool:
    """Whether `obj` is a function (or a partial of one, or an instance of a class) defined in a notebook's __main__."""
    if isinstance(obj, functools.partial):
        obj = obj.func
    if isinstance(obj, (types.FunctionType, types.MethodType)):
        return getattr(obj, "__globals__", {}).get("__name__") == "__main__" or _notebook_made(
            getattr(obj, "__func__", None))
    return getattr(type(obj), "__module__", None) == "__main__"


def torch_untouched() -> None:
    """Raise ExerciseError when a function of torch, torch.Tensor, torch.nn.functional, torch.linalg, math or the
    builtins was replaced by notebook code (`torch.allclose = lambda *a, **k: True`): the checkers would believe it."""
    for owner_name, owner in TRUSTED.items():
        for attr, obj in list(vars(owner).items()):
            if _notebook_made(obj):
                raise ExerciseError(f"{owner_name}.{attr} was replaced by code in this notebook, so no check can "
                                    "trust it: remove that assignment and restart the kernel.")


def written_here(fn, name: str) -> None:
    """Raise ExerciseError unless `fn` is the student's own code: a plain function defined (`def` or lambda) in
    the notebook, whose code does not reach the minildm package.

    The package ships every reference answer (the checkers compare with them), so without this guard
    `from minildm.regularizers import kl_divergence`, or a `def` that only calls it, would score full marks.
    Refused: a function from another module, a builtin, a functools.partial or other callable object, and a
    function whose code (nested functions included, and the notebook functions it calls) loads a global bound
    to anything from minildm (a module such as `checks`, a function, a class or one of its objects), imports
    minildm or holds such a thing as a default argument or in its closure.

    What it cannot stop: a student who copies the reference's source text into the notebook, or who reaches the
    package in a roundabout way (`sys.modules`, `__import__`, `getattr` on a torch object, ...), or who patches
    the package itself from an answer cell. It stops the obvious import; reading the submissions is still the
    instructor's job. (Checkers replaced from an answer cell, `checks.check_x = lambda fn: None`, are handled
    elsewhere: the hidden part of every graded cell calls the checker again through a freshly reloaded module.)
    It also refuses to check anything once notebook code has replaced a torch, math or builtin function the checks
    use (`torch_untouched`).
    """
    torch_untouched()
    if not isinstance(fn, types.FunctionType) or fn.__module__ != "__main__":
        what = _label(fn) if isinstance(fn, types.FunctionType) else f"a {_label(fn)} object"
        raise ExerciseError(f"{name}: expected your own function, written with `def {name}(...)` in this notebook; "
                            f"got {what}. Importing the answer from the minildm package does not count.")
    used = _package_use(fn, set())
    if used:
        raise ExerciseError(f"{name}: your function uses {used} from the minildm package, which holds the "
                            "reference answers; write the computation yourself (torch, math and einops are fine).")


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


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.shape == b.shape and torch.allclose(a.detach().double(), b.detach().double(), rtol=1e-5, atol=1e-6)


def known_mistake(got, mistakes: dict[str, torch.Tensor], name: str, case: str,
                  expected: torch.Tensor | None = None) -> None:
    """Raise with a specific explanation when `got` equals the result of a typical wrong answer.

    With `expected` (the right answer), mistakes that give the right answer in this case (a missing offset when the
    offset is 0, a wrong frequency at t = 0) are skipped, so a correct answer can never be called a mistake."""
    if not isinstance(got, torch.Tensor):
        return
    for message, wrong in mistakes.items():
        if _same(got, wrong) and not (expected is not None and _same(wrong, expected)):
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


def expect_loss_gradients(got: torch.Tensor, want: torch.Tensor, model, reference_model, name: str,
                          case: str) -> None:
    """The student's loss `got` must carry a gradient, and backpropagating it must give `model` the gradients that
    the reference loss `want` gives `reference_model` (a copy with the same weights)."""
    if not got.requires_grad:
        raise ExerciseError(f"{name} ({case}): the loss has no gradient; do not detach the model output.")
    got.backward()
    want.backward()
    for (label, p), p_ref in zip(model.named_parameters(), reference_model.parameters()):
        expect_tensor(p.grad, p_ref.grad, name, f"{case}: gradient w.r.t. the model's {label}", atol=1e-4)


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
