"""int8 weight-only quantisation of BLOOM: the Int8Linear module, the model swap, and checkpoints.

Int8Linear's buffers ARE the checkpoint format: `weight` int8 (out, in), `scale` fp32 (out,) with
weight ≈ weight_int8 * scale[:, None] (symmetric absmax per output channel), and `bias` (out,) in the
model's dtype. `scale` stays fp32 whatever `.to(dtype)` asks: rounding it to bf16 would add a
systematic per-channel error as large as the quantisation step itself.

A quantised model's config records it under QUANTIZATION_KEY, so from_pretrained rebuilds the same
modules. With include_lm_head the tied lm_head gets its own int8 copy of the embedding matrix (the
embedding lookup stays in floating point).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

import bloom_kernels as bk

QUANTIZATION_KEY = "bloom_kernels_quantization"
METHOD = "int8_weight_only"


class Int8Linear(nn.Module):
    """y = x · (weight_int8 * scale)ᵀ + bias through bloom_kernels.int8_linear.

    Called like bloom.model.BloomLinear, which it replaces: `forward(x, with_bias=...)`, `partial_product`.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, device=None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32, device=device))
        bias_tensor = torch.zeros(out_features, dtype=dtype or torch.get_default_dtype(), device=device)
        self.register_buffer("bias", bias_tensor if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     device=linear.weight.device, dtype=linear.weight.dtype)
        module.weight, module.scale = bk.quantize_int8(linear.weight.detach())
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        return module

    def forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        return bk.unchecked.int8_linear(x, self.weight, self.scale, self.bias if with_bias else None)

    def partial_product(self, x: Tensor, lo: int, hi: int) -> Tensor:
        """x[..., lo:hi] · W[:, lo:hi]ᵀ, no bias (see bloom.model.tp_sliced_linear); the per-output-channel
        scale applies to every slice of a row alike."""
        return bk.int8_linear(x[..., lo:hi], self.weight[:, lo:hi].contiguous(), self.scale)

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def _apply(self, fn, recurse=True):
        # Keep `scale` fp32 through .to(dtype)/.half(): apply fn to everything else, then only move it.
        scale = self._buffers.pop("scale")
        try:
            super()._apply(fn, recurse)
        finally:
            self._buffers["scale"] = scale
        self._buffers["scale"] = scale.to(self.weight.device)
        return self

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def linear_targets(model: nn.Module, include_lm_head: bool) -> list[str]:
    """Names of the nn.Linear modules to quantise (every one; lm_head only if asked)."""
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and (include_lm_head or name.rpartition(".")[2] != "lm_head")]


def quantization_config(include_lm_head: bool) -> dict:
    return {"method": METHOD, "include_lm_head": bool(include_lm_head)}


def _swap_linears(model: nn.Module, include_lm_head: bool, make_int8) -> list[str]:
    """Replace each target nn.Linear by make_int8(linear), record the quantisation in the config."""
    names = linear_targets(model, include_lm_head)
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, make_int8(getattr(parent, child)))
    setattr(model.config, QUANTIZATION_KEY, quantization_config(include_lm_head))
    return names


def quantize_int8(model: nn.Module, include_lm_head: bool = True) -> nn.Module:
    """Swap every nn.Linear of a loaded model for an Int8Linear, in place; returns the model."""
    if getattr(model.config, QUANTIZATION_KEY, None):
        raise ValueError("this model is already quantised")
    tp = getattr(model, "tp", None)
    if tp is None:
        _swap_linears(model, include_lm_head, Int8Linear.from_linear)
    else:  # tensor parallel: split rows quantised with the whole row's scale, the split classes kept
        names = iter(linear_targets(model, include_lm_head))
        _swap_linears(model, include_lm_head, lambda linear: tp.int8_from_linear(next(names), linear))
    return model


def swap_to_empty_int8(model: nn.Module, include_lm_head: bool) -> list[str]:
    """Replace the Linear modules by empty Int8Linear of the same shape and dtype (for loading)."""
    return _swap_linears(model, include_lm_head, lambda old: Int8Linear(
        old.in_features, old.out_features, old.bias is not None, device=old.weight.device,
        dtype=old.weight.dtype))


def quantizing_converter(quantized_modules: list[str], tied_lm_head: bool, quantize=None):
    """A `convert` hook for the loader: float Linear weights arriving from a float checkpoint are
    quantised on the spot (on the target device), so the float model never exists in full.
    `quantize(key, weight)`: (int8, scale) (default: bk.quantize_int8; a tensor-parallel rank's quantiser
    gives a split row the whole row's scale)."""
    weights = {name + ".weight" for name in quantized_modules}
    if quantize is None:
        def quantize(key, weight):
            return bk.quantize_int8(weight)

    def convert(model: nn.Module, key: str, tensor: Tensor) -> dict[str, Tensor]:
        out = {}
        if key in weights and tensor.is_floating_point():
            module = key[: -len(".weight")]
            out[key], out[module + ".scale"] = quantize(key, tensor)
        else:
            out[key] = tensor
        if tied_lm_head and key.endswith("word_embeddings.weight") and "lm_head.weight" not in out:
            out["lm_head.weight"], out["lm_head.scale"] = quantize("lm_head.weight", tensor)
        return out

    return convert
