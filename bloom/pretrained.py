"""Base class of every BLOOM model: config, weight init, device/dtype, loading and saving."""

from __future__ import annotations

import torch
from torch import nn

from .config import BloomConfig
from .hub import HubOptions


class BloomPreTrainedModel(nn.Module):
    config_class = BloomConfig
    base_model_prefix = "transformer"

    def __init__(self, config: BloomConfig):
        super().__init__()
        if not isinstance(config, BloomConfig):
            raise TypeError(f"config must be a BloomConfig, got {type(config).__name__}")
        self.config = config

    def init_weights(self) -> None:
        """transformers' init: Linear/Embedding ~ N(0, initializer_range), zero biases, LN = identity."""
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                if module.weight.device.type != "meta":
                    nn.init.normal_(module.weight, mean=0.0, std=std)
                if getattr(module, "bias", None) is not None and module.bias.device.type != "meta":
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm) and module.weight.device.type != "meta":
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @classmethod
    def from_pretrained(cls, name_or_path, *, config: BloomConfig | None = None, torch_dtype=None,
                        dtype=None, device=None, revision: str | None = None, cache_dir=None,
                        local_files_only: bool = False, token=None, quantization: str | None = None,
                        **config_overrides):
        """Load a checkpoint from a local directory or a hub id (see bloom/loading.py).

        torch_dtype (or dtype): None = float32, "auto" = the checkpoint's dtype, or a dtype / its name.
        quantization="int8": int8 weight-only, quantised tensor by tensor while loading.
        Remaining keyword arguments override config fields.
        """
        from .loading import load_pretrained

        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        return load_pretrained(cls, name_or_path, config=config, torch_dtype=torch_dtype, dtype=dtype,
                               device=device, hub=hub, quantization=quantization, **config_overrides)

    def save_pretrained(self, save_directory, max_shard_size: int | str = "5GB") -> None:
        """config.json + safetensors (sharded with an index past max_shard_size), as transformers."""
        from .loading import save_pretrained

        save_pretrained(self, save_directory, max_shard_size)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {id(p): p for p in self.parameters()}.values())
