"""The `tokenizers` backend and its JSON state, as BloomTokenizerFast builds and changes it.

Building the backend (from a tokenizer.json or a `tokenizers.Tokenizer`, always an independent copy),
what tokenizer.json's stored padding/truncation mean (only the default sides), the ByteLevel
add_prefix_space flag read and rewritten through the components' JSON state, and special tokens given
as str, `tokenizers.AddedToken` or a serialized AddedToken dict.

The pipeline is whatever tokenizer.json says; BLOOM's is: no normalizer, pre-tokenizer
Split(" ?[^(\\s|[.,!?…。，、।۔،])]+", isolated) then ByteLevel(add_prefix_space=False, use_regex=False),
BPE model, ByteLevel decoder and a ByteLevel post-processor -- so `add_special_tokens=True` adds no
token (no BOS/EOS), exactly as upstream.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")


def _load_backend(
    tokenizer_file: str | os.PathLike | None,
    tokenizer_object: Tokenizer | None,
    vocab_file: str | None,
    merges_file: str | None,
) -> Tokenizer:
    """BloomTokenizerFast's own `tokenizers.Tokenizer`: a copy of `tokenizer_object`, or `tokenizer_file` read."""
    if tokenizer_object is not None:
        if not isinstance(tokenizer_object, Tokenizer):
            raise TypeError(
                f"tokenizer_object must be a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}"
            )
        # Round-trip through JSON: an independent copy (special tokens and add_prefix_space change it).
        return Tokenizer.from_str(tokenizer_object.to_str())
    if tokenizer_file is not None:
        if not Path(tokenizer_file).is_file():
            raise FileNotFoundError(f"tokenizer_file {str(tokenizer_file)!r} does not exist or is not a file")
        try:
            return Tokenizer.from_file(str(tokenizer_file))
        except Exception as err:  # tokenizers raises a bare Exception for bad JSON, bad UTF-8, bad models
            raise ValueError(f"{Path(tokenizer_file).name} is not a valid `tokenizers` file ({tokenizer_file}): "
                             f"{err}") from None
    if vocab_file is not None or merges_file is not None:
        raise ValueError(
            "BloomTokenizerFast is built from a tokenizer.json (tokenizer_file=...) or a tokenizers.Tokenizer "
            "(tokenizer_object=...); vocab_file/merges_file alone are not supported (nor were they in transformers)"
        )
    raise ValueError("BloomTokenizerFast needs tokenizer_file=... (a tokenizer.json) or tokenizer_object=...")


def _detach_padding_and_truncation(
    backend: Tokenizer, padding_side: str | None, truncation_side: str | None
) -> tuple[str, str]:
    """Clear the backend's stored padding/truncation; returns the sides, defaulted from what it stored.

    Padding/truncation stored in tokenizer.json only give the default sides (as in transformers);
    the backend is then left without either: every call sets exactly what it asks for, and
    save_pretrained writes a clean file.
    """
    if padding_side is None:
        padding_side = (backend.padding or {}).get("direction", "left")  # BLOOM pads on the left
    if truncation_side is None:
        truncation_side = (backend.truncation or {}).get("direction", "right")
    backend.no_padding()
    backend.no_truncation()
    return padding_side, truncation_side


def _token_str(value: Any, name: str) -> str | None:
    """A special token given as str, tokenizers.AddedToken or a serialized AddedToken dict -> its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, AddedToken):
        return value.content
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TypeError(f"{name} must be a str, a tokenizers.AddedToken or None, got {value!r}")


def _set_byte_level_prefix_space(component, value: bool):
    """A copy of a pre-tokenizer / decoder with every ByteLevel part's add_prefix_space set to `value`.

    Returns (new component, number of ByteLevel parts found). Works on the JSON state, so nested
    Sequences are handled whatever their depth.
    """
    state = json.loads(component.__getstate__())
    found = 0

    def walk(node):
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                node["add_prefix_space"] = value
                found += 1
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(state)
    # Rebuild the way pickle does: __newobj__(cls, *args), then __setstate__(JSON state).
    factory, args = component.__reduce_ex__(2)[:2]
    rebuilt = factory(*args)
    rebuilt.__setstate__(json.dumps(state).encode())
    return rebuilt, found


def _byte_level_prefix_space(component) -> bool | None:
    """add_prefix_space of the first ByteLevel part of a pre-tokenizer (None if it has none)."""
    if component is None:
        return None
    stack = [json.loads(component.__getstate__())]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return bool(node.get("add_prefix_space", False))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _set_add_prefix_space(backend: Tokenizer, value: bool) -> None:
    """Set add_prefix_space on every ByteLevel part of the backend's pre-tokenizer (and decoder)."""
    if not isinstance(value, bool):
        raise TypeError(f"add_prefix_space must be True or False, got {value!r}")
    pre_tokenizer = backend.pre_tokenizer
    found = 0
    if pre_tokenizer is not None:
        rebuilt, found = _set_byte_level_prefix_space(pre_tokenizer, value)
    if not found:
        if not value:
            return  # nothing prepends a space: already "False"
        raise ValueError(
            "add_prefix_space=True needs a ByteLevel pre-tokenizer, and this tokenizer.json's pre-tokenizer has "
            f"none ({pre_tokenizer.__getstate__().decode() if pre_tokenizer is not None else None})"
        )
    backend.pre_tokenizer = rebuilt
    # The ByteLevel decoder ignores the flag, but keep it consistent as transformers did.
    if backend.decoder is not None:
        decoder, found_in_decoder = _set_byte_level_prefix_space(backend.decoder, value)
        if found_in_decoder:
            backend.decoder = decoder
