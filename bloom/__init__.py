"""bloom: a slim BLOOM model, a drop-in for transformers', running on bloom_kernels."""

from .cache import BloomCache, CacheOverflowError
from .config import BloomConfig
from .generation_config import GenerationConfig
from .heads import BloomForQuestionAnswering, BloomForSequenceClassification, BloomForTokenClassification
from .interop import from_transformers
from .loading import CheckpointError
from .model import BloomForCausalLM, BloomModel
from .pretrained import BloomPreTrainedModel
from .quantization import Int8Linear, quantize_int8
from .streaming import TextStreamer
from .tokenization import BatchEncoding, BloomTokenizerFast

__all__ = [
    "GenerationConfig",
    "BatchEncoding",
    "BloomCache",
    "BloomConfig",
    "BloomForCausalLM",
    "BloomForQuestionAnswering",
    "BloomForSequenceClassification",
    "BloomForTokenClassification",
    "BloomModel",
    "BloomPreTrainedModel",
    "BloomTokenizerFast",
    "CacheOverflowError",
    "CheckpointError",
    "Int8Linear",
    "TextStreamer",
    "from_transformers",
    "quantize_int8",
]
