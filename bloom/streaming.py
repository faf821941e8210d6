"""TextStreamer: prints generated text as it is produced (transformers' streamer protocol)."""

from __future__ import annotations

import sys
from typing import TextIO

from torch import Tensor


class TextStreamer:
    """Pass as `generate(..., streamer=TextStreamer(tokenizer))` (batch 1).

    Byte-level BPE tokens can end inside a multi-byte character: text is held back until it decodes
    without a replacement character, so what is printed never contains a broken character.
    """

    def __init__(self, tokenizer, skip_prompt: bool = False, file: TextIO | None = None, **decode_kwargs):
        self.tokenizer = tokenizer
        self.skip_prompt = skip_prompt
        self.file = file if file is not None else sys.stdout
        self.decode_kwargs = {"skip_special_tokens": True, **decode_kwargs}
        self.ids: list[int] = []
        self.printed = 0  # characters of the decoded text already written
        self.next_is_prompt = True

    def put(self, value: Tensor) -> None:
        ids = value.reshape(-1).tolist()
        if self.next_is_prompt:
            self.next_is_prompt = False
            if self.skip_prompt:
                return
        self.ids.extend(ids)
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        if text.endswith("\ufffd"):
            return  # an incomplete character: wait for the next token
        self._write(text[self.printed:])
        self.printed = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.ids, **self.decode_kwargs)
        self._write(text[self.printed:] + "\n")
        self.ids, self.printed, self.next_is_prompt = [], 0, True

    def _write(self, text: str) -> None:
        if text:
            self.file.write(text)
            self.file.flush()
