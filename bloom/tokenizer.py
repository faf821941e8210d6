"""Compatibility module, kept for `from bloom.tokenizer import ...`: the tokenizer lives in `bloom.tokenization`.

Re-exports BloomTokenizerFast, BatchEncoding and the public constants this module used to define.
"""

from .tokenization.encoding import BatchEncoding
from .tokenization.files import SPECIAL_TOKENS_MAP_FILE, TOKENIZER_CONFIG_FILE, TOKENIZER_FILE
from .tokenization.rules import LARGE_INTEGER, VERY_LARGE_INTEGER
from .tokenization.state import SPECIAL_TOKENS_ATTRIBUTES
from .tokenization.tokenizer import BloomTokenizerFast

__all__ = [
    "BatchEncoding",
    "BloomTokenizerFast",
    "LARGE_INTEGER",
    "SPECIAL_TOKENS_ATTRIBUTES",
    "SPECIAL_TOKENS_MAP_FILE",
    "TOKENIZER_CONFIG_FILE",
    "TOKENIZER_FILE",
    "VERY_LARGE_INTEGER",
]
