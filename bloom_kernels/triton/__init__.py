"""The Triton kernels, one module per kernel family, and the pieces they share.

    _launch.py       launch helpers: interpreter flag, output allocation, length buckets, dot precision,
                     head-dim tiles, SM count and shared memory (of this GPU or a planned one)
    _tuning.py       autotuning that persists on disk, keyed by GPU
    _alibi.py        @triton.jit building blocks of ALiBi attention: tile loads, key positions, the
                     bias, one online-softmax step (forward, backward and decode use the same ones)
    attention.py     the public entry of ALiBi attention: custom ops, autograd, dispatch to the kernels
    attention_fwd.py / attention_bwd.py / decode.py   the prefill forward, the backward, split-KV decode
    layer_norm.py, bias_gelu.py, int8_linear.py       one op each, kernel and launcher together

These modules import only each other's shared pieces and `bloom_kernels.reference`, never the
dispatcher or the public ops: `bloom_kernels._dispatch` imports them lazily, by module name, when a call
first takes a kernel. Importing this package imports nothing (triton included).
"""
