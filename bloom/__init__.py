"""bloom: a slim BLOOM model, a drop-in for transformers, running on bloom_kernels."""
