"""bloom_kernels: Triton kernels for BLOOM, each with an eager PyTorch reference.

Public ops (dispatched per call by BLOOM_KERNELS_BACKEND, see `_dispatch.py`):
alibi_slopes, alibi_key_positions, alibi_attention, alibi_attention_probs, bias_gelu, layer_norm, linear,
quantize_int8, int8_linear. `prepare_to_compile()` before torch.compile of a model that calls them (see
cpu.py). `unchecked` holds the same ops without argument checks (and attention on
inputs prepared once per forward) for a model that validates at its own boundary.
"""

from .ops import (
    alibi_attention,
    alibi_key_positions,
    alibi_attention_probs,
    alibi_slopes,
    bias_gelu,
    int8_linear,
    layer_norm,
    linear,
    quantize_int8,
)

from . import _dispatch, unchecked
from .cpu import prepare_to_compile

if _dispatch.kernels_usable_here():  # never on a CPU-only machine without TRITON_INTERPRET
    _dispatch.preload_kernels()

__all__ = [
    "alibi_attention",
    "alibi_attention_probs",
    "alibi_key_positions",
    "alibi_slopes",
    "bias_gelu",
    "int8_linear",
    "layer_norm",
    "linear",
    "prepare_to_compile",
    "quantize_int8",
    "unchecked",
]
