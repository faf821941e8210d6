"""Flax parameter tree <-> PyTorch BLOOM tensor names, and tensor <-> array conversion.

A Flax path ("transformer", "h", "0", "self_attention", "query_key_value", "kernel") is the PyTorch name
"transformer.h.0.self_attention.query_key_value.weight" with the leaf renamed (kernel/embedding/scale ->
weight) and, for a Dense kernel, the array transposed: Flax kernels are (in, out), PyTorch Linear
weights (out, in). Both directions are exact (no arithmetic), so a round trip gives identical tensors.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import torch

LEAF_TO_TORCH = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}


def torch_name(path: tuple[str, ...]) -> tuple[str, bool]:
    """(PyTorch name, whether the array is transposed) of a Flax parameter path."""
    *modules, leaf = path
    if leaf not in LEAF_TO_TORCH:
        raise ValueError(f"unknown BLOOM parameter {'/'.join(path)} (leaf {leaf!r})")
    return ".".join([*modules, LEAF_TO_TORCH[leaf]]), leaf == "kernel"


def torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape the PyTorch checkpoint holds for a Flax parameter of `shape`."""
    return tuple(reversed(shape)) if torch_name(path)[1] else tuple(shape)


def tensor_to_array(tensor: torch.Tensor, transpose: bool) -> np.ndarray:
    """A CPU numpy array of `tensor`, same dtype (bf16 as ml_dtypes.bfloat16), transposed if asked."""
    tensor = tensor.detach().cpu()
    if tensor.dtype == torch.bfloat16:  # numpy has no bf16: reinterpret the bits as ml_dtypes' bfloat16
        array = tensor.contiguous().view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    else:
        array = tensor.numpy()
    return np.ascontiguousarray(array.T) if transpose else array


def array_to_tensor(array, transpose: bool) -> torch.Tensor:
    """A contiguous CPU torch tensor of a jax / numpy array (bf16 kept bit for bit)."""
    array = np.asarray(array)
    if transpose:
        array = array.T
    array = np.ascontiguousarray(array)
    if not array.flags.writeable:  # a view of a jax buffer: torch wants memory it may write
        array = array.copy()
    if array.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)
