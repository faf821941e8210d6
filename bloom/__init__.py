"""bloom: a slim BLOOM model, a drop-in for transformers', running on bloom_kernels."""

from .cache import BloomCache, CacheOverflowError
from .config import BloomConfig
from .model import BloomForCausalLM, BloomModel
from .pretrained import BloomPreTrainedModel

__all__ = [
    "BloomCache",
    "BloomConfig",
    "BloomForCausalLM",
    "BloomModel",
    "BloomPreTrainedModel",
    "CacheOverflowError",
]
