"""The encoding object BloomTokenizerFast returns, and the id <-> tensor conversions around it.

`BatchEncoding` is the dict-with-attributes result of a call; `_text_batch` reads a call's text (one
string or a batch), `_batch_encoding` builds the result from the `tokenizers` encodings (python lists,
flat for one string, or "pt" / "np" int64 tensors); `_to_py` turns ids given as tensors or arrays back
into python ints and lists for decoding.
"""

from __future__ import annotations

from typing import Any

_TENSOR_TYPES = (None, "pt", "np")


class BatchEncoding(dict):
    """The output of `BloomTokenizerFast.__call__`: a dict (`input_ids`, `attention_mask`, ...) whose
    keys are also attributes, so `model(**batch)`, `batch["input_ids"]` and `batch.input_ids` all work.
    `encodings` holds the `tokenizers.Encoding` of each sequence (tokens, offsets, word ids)."""

    def __init__(self, data: dict[str, Any] | None = None, encodings: list | None = None):
        super().__init__(data or {})
        self.encodings = encodings

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r} (keys: {list(self)})") from None

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of sequence `batch_index`."""
        if not self.encodings:
            raise ValueError("this BatchEncoding holds no tokenizers encodings")
        return self.encodings[batch_index].tokens

    def to(self, device, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every torch tensor value to `device` (in place); returns self."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


def _text_batch(text: Any, text_pair: Any = None) -> tuple[list, bool]:
    """A call's text -> (list of strings or (first, second) pairs, whether it was a batch). Pairs come
    as `text_pair` beside `text` (a str with a str, a list with a list of the same length), or as a
    list of 2-element lists / tuples of str in `text`, as transformers reads them."""
    def is_pair(item):
        return isinstance(item, (list, tuple)) and len(item) == 2 and all(isinstance(t, str) for t in item)

    if text_pair is not None:
        if isinstance(text, str) and isinstance(text_pair, str):
            return [(text, text_pair)], False
        if (isinstance(text, (list, tuple)) and isinstance(text_pair, (list, tuple))
                and all(isinstance(t, str) for t in (*text, *text_pair))):
            if len(text) != len(text_pair):
                raise ValueError(f"text and text_pair must have the same length; got {len(text)} and "
                                 f"{len(text_pair)}")
            return list(zip(text, text_pair)), True
        raise TypeError(f"text_pair must match text: a str with a str, a list of str with a list of str; got "
                        f"{type(text).__name__} and {type(text_pair).__name__}")
    if isinstance(text, str):
        return [text], False
    if isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        return list(text), True
    if isinstance(text, (list, tuple)) and text and all(is_pair(t) for t in text):
        return [tuple(t) for t in text], True
    raise TypeError(
        f"text must be a str, a list of str or a list of (str, str) pairs, got {type(text).__name__}"
        + (f" containing {type(next(t for t in text if not isinstance(t, str))).__name__}"
           if isinstance(text, (list, tuple)) and text else "")
    )


def _check_tensor_type(return_tensors: Any) -> None:
    if return_tensors not in _TENSOR_TYPES:
        raise ValueError(f"return_tensors must be one of None, 'pt', 'np', got {return_tensors!r}")


def _batch_encoding(
    encodings: list,
    *,
    is_batched: bool,
    return_tensors: str | None,
    return_attention_mask: bool,
    return_offsets_mapping: bool,
    return_token_type_ids: bool = False,
    return_special_tokens_mask: bool = False,
) -> BatchEncoding:
    """The BatchEncoding of `tokenizers` encodings: lists (flat for a single string) or (B, T) tensors."""
    data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
    if return_token_type_ids:
        data["token_type_ids"] = [e.type_ids for e in encodings]
    if return_special_tokens_mask:
        data["special_tokens_mask"] = [e.special_tokens_mask for e in encodings]
    if return_attention_mask:
        data["attention_mask"] = [e.attention_mask for e in encodings]
    if return_offsets_mapping:
        data["offset_mapping"] = [e.offsets for e in encodings]

    if return_tensors is not None:
        lengths = {len(ids) for ids in data["input_ids"]}
        if len(lengths) > 1:
            raise ValueError(
                f"return_tensors={return_tensors!r} needs sequences of one length, but this batch has lengths "
                f"{sorted(lengths)}: pass padding=True (and truncation=True with max_length to cap the length)"
            )
        data = {key: _as_tensor(value, return_tensors) for key, value in data.items()}
    elif not is_batched:
        data = {key: value[0] for key, value in data.items()}
    return BatchEncoding(data, encodings)


def _as_tensor(value: list, kind: str):
    if kind == "pt":
        import torch

        return torch.tensor(value, dtype=torch.long) if value else torch.empty((0, 0), dtype=torch.long)
    import numpy as np

    return np.array(value, dtype=np.int64) if value else np.empty((0, 0), dtype=np.int64)


def _to_py(ids: Any):
    """Token ids given as int, list, tuple, numpy array or torch tensor -> python ints / lists."""
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array, numpy scalar
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_py(x) for x in ids]
    return ids
