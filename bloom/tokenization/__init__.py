"""BLOOM's tokenizer: `BloomTokenizerFast` (on the `tokenizers` library) and the `BatchEncoding` it returns.

Modules: `tokenizer` (the BloomTokenizerFast class), `encoding` (BatchEncoding and the id <-> tensor
conversions), `rules` (padding and truncation arguments), `state` (the `tokenizers` backend and its
JSON state), `files` (what from_pretrained reads and save_pretrained writes).
"""

from .encoding import BatchEncoding
from .tokenizer import BloomTokenizerFast

__all__ = ["BatchEncoding", "BloomTokenizerFast"]
