"""Argument validation shared by every path of every op (kernel or reference).

Errors name the argument, what was expected, and what was given, in the caller's terms.
"""

from __future__ import annotations

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _fmt_dtypes(dtypes) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(name: str, value, *, ndim: int | None = None, min_ndim: int | None = None,
                 dtypes=FLOAT_DTYPES) -> Tensor:
    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if dtypes is not None and value.dtype not in dtypes:
        raise TypeError(f"{name} must have dtype {_fmt_dtypes(dtypes)}; got {value.dtype}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be {ndim}-D; got shape {tuple(value.shape)}")
    if min_ndim is not None and value.dim() < min_ndim:
        raise ValueError(f"{name} must have at least {min_ndim} dims; got shape {tuple(value.shape)}")
    return value


def check_shape(name: str, value: Tensor, expected: tuple, what: str = "") -> None:
    """`expected` may hold None for 'any size' in a dimension."""
    ok = value.dim() == len(expected) and all(e is None or e == s for e, s in zip(expected, value.shape))
    if not ok:
        shown = tuple("*" if e is None else e for e in expected)
        extra = f" ({what})" if what else ""
        raise ValueError(f"{name} must have shape {shown}{extra}; got {tuple(value.shape)}")


def _check_same(what: str, attribute: str, error: type[Exception], tensors: dict) -> None:
    present = {n: t for n, t in tensors.items() if t is not None}
    if len({getattr(t, attribute) for t in present.values()}) > 1:
        listing = ", ".join(f"{n} {'on ' if attribute == 'device' else ''}{getattr(t, attribute)}"
                            for n, t in present.items())
        raise error(f"{what}; got {listing}")


def check_same_device(**tensors: Tensor | None) -> None:
    _check_same("all tensors must be on the same device", "device", ValueError, tensors)


def check_same_dtype(**tensors: Tensor | None) -> None:
    _check_same("tensors must share one dtype", "dtype", TypeError, tensors)
