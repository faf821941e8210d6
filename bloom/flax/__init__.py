"""bloom.flax: BLOOM in JAX / Flax (optional extra `bloom-kernels[flax]`), from the same checkpoints.

Importing `bloom` never imports this package (nor jax); `import bloom.flax` does.
"""

from .modeling import (FlaxBloomAttention, FlaxBloomBlock, FlaxBloomForCausalLMModule, FlaxBloomMLP,
                       FlaxBloomModule)
from .outputs import FlaxBaseModelOutputWithPast, FlaxCausalLMOutputWithPast, FlaxGenerateOutput
from .pretrained import FlaxBloomForCausalLM, FlaxBloomModel, FlaxBloomPreTrainedModel

__all__ = [
    "FlaxBaseModelOutputWithPast",
    "FlaxBloomAttention",
    "FlaxBloomBlock",
    "FlaxBloomForCausalLM",
    "FlaxBloomForCausalLMModule",
    "FlaxBloomMLP",
    "FlaxBloomModel",
    "FlaxBloomModule",
    "FlaxBloomPreTrainedModel",
    "FlaxCausalLMOutputWithPast",
    "FlaxGenerateOutput",
]
