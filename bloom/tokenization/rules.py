"""Padding and truncation rules: the arguments of a BloomTokenizerFast call, read as transformers reads them.

`_strategies` validates padding / truncation / max_length / pad_to_multiple_of and turns them into what
the `tokenizers` backend is configured with; `_padding_and_truncation` sets that on the backend for one
call and clears it after; `_check_side` validates a "left" / "right" side.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any

from tokenizers import Tokenizer

# transformers' "no length limit" value of model_max_length (int(1e30)); limits above LARGE_INTEGER
# mean "unset", so truncation=True / padding="max_length" without max_length do nothing.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

_SIDES = ("left", "right")
_PADDING_VALUES = (False, True, "longest", "max_length", "do_not_pad")
_TRUNCATION_VALUES = (False, None, True, "longest_first", "only_first", "only_second", "do_not_truncate")


def _check_side(value: Any, name: str) -> str:
    if value not in _SIDES:
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def _strategies(
    padding,
    truncation,
    max_length,
    pad_to_multiple_of,
    *,
    model_max_length: int,
    pad_token: str | None,
    pad_token_id: int | None,
):
    """Validate the padding/truncation arguments the way transformers reads them.

    `model_max_length`, `pad_token` and `pad_token_id` are the tokenizer's.
    Returns (None | "longest" | "max_length", truncation strategy ("longest_first", "only_first",
    "only_second") or None, max_length).
    """
    if not any(padding is v or (isinstance(v, str) and padding == v) for v in _PADDING_VALUES):
        raise ValueError(
            f"padding must be one of False, True, 'longest', 'max_length', 'do_not_pad', got {padding!r}"
        )
    if not any(truncation is v or (isinstance(v, str) and truncation == v) for v in _TRUNCATION_VALUES):
        raise ValueError(
            "truncation must be one of True, 'longest_first', 'only_first', 'only_second', False, None, "
            "'do_not_truncate', "
            f"got {truncation!r}"
        )
    for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")

    # transformers: max_length alone (no padding, truncation unset) means "truncate to max_length".
    if max_length is not None and padding is False and truncation is None:
        truncation = True
    if padding in (False, "do_not_pad"):
        pad_strategy = None
    else:
        pad_strategy = "max_length" if padding == "max_length" else "longest"
    truncate = None if truncation in (False, None, "do_not_truncate") else (
        "longest_first" if truncation is True else truncation)

    if max_length is None:
        limit = model_max_length if model_max_length <= LARGE_INTEGER else None
        if pad_strategy == "max_length" and limit is None:
            pad_strategy = None  # as transformers: nothing to pad to
        if truncate and limit is None:
            truncate = None
        max_length = limit

    if pad_strategy is not None and (pad_token is None or pad_token_id is None):
        raise ValueError(
            f"padding={padding!r} needs a padding token, but this tokenizer has pad_token={pad_token!r}"
            f"{' (not in the vocabulary)' if pad_token is not None else ''}: set one, e.g. "
            "tokenizer.pad_token = tokenizer.eos_token"
        )
    if truncate and pad_strategy is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
        raise ValueError(
            f"truncation and padding are both on, but max_length={max_length} is not a multiple of "
            f"pad_to_multiple_of={pad_to_multiple_of}"
        )
    return pad_strategy, truncate, max_length


@contextmanager
def _padding_and_truncation(
    backend: Tokenizer,
    pad_strategy: str | None,
    truncate: str | None,
    max_length: int | None,
    *,
    padding_side: str,
    truncation_side: str,
    pad_id: int | None,
    pad_token: str | None,
    pad_to_multiple_of: int | None,
    stride: int = 0,
):
    """The backend padding/truncating as `_strategies` decided, for the `with` block only (`stride`:
    tokens shared by consecutive overflowing windows).

    The caller holds the tokenizer's lock: the backend is shared, and left with neither afterwards.
    """
    try:
        if truncate:
            backend.enable_truncation(max_length, stride=stride, strategy=truncate, direction=truncation_side)
        if pad_strategy is not None:
            backend.enable_padding(
                direction=padding_side,
                pad_id=pad_id,
                pad_token=pad_token,
                length=max_length if pad_strategy == "max_length" else None,
                pad_to_multiple_of=pad_to_multiple_of,
            )
        yield backend
    finally:
        backend.no_padding()
        backend.no_truncation()
