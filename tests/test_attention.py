"""ALiBi flash attention (bloom_kernels/triton/attention.py, decode.py) against the float64 reference,
through tests/kernel_harness.py.

On a CPU the kernels run in Triton's interpreter (fp32 and fp16; its tl.dot cannot do bf16), with
small odd sizes; the `gpu` tests check bf16/fp16 at BLOOM shapes with the flash-attention rule, the
decode path against a 4096+ cache, torch.compile and CUDA-graph capture.
"""

import math

import pytest
import torch
from helpers import HAS_CUDA, KERNEL_DEVICE, left_padding_mask
from kernel_harness import (alibi_attention64, check_compiled, check_cuda_graph, check_kernel, check_opcheck,
                            check_public_name_survives_kernel_import, only_the_kernel_runs, qkv)

import bloom_kernels as bk
from bloom_kernels import _dispatch, reference
from bloom_kernels.triton import attention, decode

# the interpreter's own numpy deprecation noise, thousands of times per test
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0:DeprecationWarning")

# (dtype, atol, rtol) against the float64 reference on the same (rounded) inputs; outputs are O(1).
# fp32: the same maths in fp32; the summation order, exp2-vs-exp and the online rescaling: ~1e-6
#       seen (a few ulp), 1e-5 leaves room for sums over ~130 keys.
# fp16: the kernel rounds the probabilities to fp16 for the P·V dot (as flash attention does, 2^-11
#       relative each) and rounds the output to fp16 (ulp 2^-10 near 1): <= 9e-4 seen.
#       Gradients go through two more fp16-rounded products (P for dV, dS for dQ/dK): <= 2.1e-3 seen.
FWD_TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3)}
GRAD_TOL = {torch.float32: (2e-5, 2e-5), torch.float16: (4e-3, 4e-3)}


def _mask(key_len, pads):
    """Left padding: pads[b] leading zeros in row b, as in batched generation."""
    return left_padding_mask(key_len, pads=pads, device=KERNEL_DEVICE)


def _inputs(batch, heads, q_len, k_len, head_dim, dtype, seed=0):
    q, k, v = qkv(batch, heads, q_len, k_len, head_dim, dtype, seed, device=KERNEL_DEVICE)
    return q, k, v, bk.alibi_slopes(heads, device=KERNEL_DEVICE)


def _compare(q, k, v, slopes, mask=None, scale=None, grad=True):
    """Kernel (forced triton, poisoned buffers) vs the float64 reference on the same inputs: the output
    and, with `grad`, the q/k/v gradients. Returns (kernel output, reference output)."""
    got, want = check_kernel(bk.alibi_attention, alibi_attention64,
                             {"q": q, "k": k, "v": v, "slopes": slopes, "mask": mask, "scale": scale},
                             grads=("q", "k", "v") if grad else (), tol=FWD_TOL, grad_tol=GRAD_TOL,
                             dispatched="alibi_attention")
    return got["out"], want["out"]


# ------------------------------------------------------------------------------------------------
# CPU (interpreter) and GPU: against the reference
# ------------------------------------------------------------------------------------------------
FP32, FP16 = torch.float32, torch.float16


# Lengths past test_properties' (Sk <= 64) in both dtypes; the shorter ones in one each (the
# properties draw both dtypes there).
@pytest.mark.parametrize(
    "batch, heads, q_len, k_len, head_dim, dtype",
    [
        (1, 2, 17, 17, 64, FP32),     # prefill, sizes that divide no block
        (1, 3, 130, 130, 80, FP32),   # several query/key blocks, causal stages, non-pow2 D and H
        (1, 3, 130, 130, 80, FP16),
        (1, 2, 33, 130, 96, FP32),    # chunked prefill: Sq < Sk, diagonal offset by 97
        (1, 2, 33, 130, 96, FP16),
        (2, 2, 1, 130, 128, FP32),    # decode, split-KV + combine
        (2, 2, 1, 130, 128, FP16),
        (1, 2, 5, 47, 64, FP16),      # a few decode tokens against a short cache
        (1, 1, 24, 24, 8, FP16),      # tiny head dim (padded to a 16-wide tile)
    ],
)
def test_matches_reference(batch, heads, q_len, k_len, head_dim, dtype):
    _compare(*_inputs(batch, heads, q_len, k_len, head_dim, dtype))


@pytest.mark.parametrize("q_len, k_len, dtype", [(70, 70, FP16), (3, 70, FP32), (1, 130, FP32), (1, 130, FP16)])
def test_left_padded_batch(q_len, k_len, dtype):
    """Different padding per row; with Sq == Sk the queries at padded positions see no key -> 0."""
    pads = [0, 5, 40]
    q, k, v, slopes = _inputs(3, 2, q_len, k_len, 64, dtype)
    mask = _mask(k_len, pads)
    out, expected = _compare(q, k, v, slopes, mask)
    if q_len == k_len:
        assert torch.count_nonzero(out[2, :, : pads[2]]) == 0
        assert torch.count_nonzero(expected[2, :, : pads[2]]) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_sizes_that_divide_the_blocks(force_triton, dtype):
    """Sq, Sk multiples of every block (the boundary masks compiled away), with and without padding;
    and Sq = 16, the longest query run the decode kernel takes."""
    q, k, v, slopes = _inputs(2, 2, 64, 96, 64, dtype)
    _compare(q, k, v, slopes)
    _compare(q, k, v, slopes, _mask(96, [0, 50]))
    _compare(*_inputs(1, 2, attention.DECODE_MAX_QUERIES, 40, 64, dtype))


def test_mask_dtypes_agree(force_triton, poisoned):
    """int, bool and float 0/1 masks are the same mask."""
    q, k, v, slopes = _inputs(2, 2, 20, 20, 64, torch.float32)
    mask = _mask(20, [0, 7])
    outs = [bk.alibi_attention(q, k, v, slopes, mask.to(dt)) for dt in (torch.int64, torch.bool, torch.float32)]
    torch.testing.assert_close(outs[0], outs[1], atol=0, rtol=0)
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)


def test_non_power_of_two_heads_and_scale(force_triton):
    """12 heads take the interleaved ALiBi slopes; an explicit scale replaces 1/sqrt(D)."""
    q, k, v, slopes = _inputs(1, 12, 18, 18, 64, torch.float32)
    _compare(q, k, v, slopes, scale=0.3, grad=False)
    q, k, v, slopes = _inputs(1, 12, 2, 40, 64, torch.float32)
    _compare(q, k, v, slopes, scale=0.3, grad=False)


@pytest.mark.parametrize("q_len", [19, 1])
def test_strided_views_of_fused_qkv(q_len):
    """q/k/v as BLOOM's views of the fused (B, S, H, 3, D) projection; grads land in the fused tensor."""
    batch, seq, heads, head_dim = 2, 19, 3, 64
    gen = torch.Generator().manual_seed(3)
    fused = torch.randn(batch, seq, heads * 3 * head_dim, generator=gen).to(KERNEL_DEVICE)
    slopes = bk.alibi_slopes(heads, device=KERNEL_DEVICE)
    mask = _mask(seq, [0, 4])

    def split(t):
        t = t.view(batch, seq, heads, 3, head_dim)
        q, k, v = (t[..., i, :].transpose(1, 2) for i in range(3))  # (B, H, S, D), strided
        return q[:, :, seq - q_len:], k, v

    q = split(fused)[0]
    assert not q.is_contiguous() and q.stride(2) == heads * 3 * head_dim
    check_kernel(lambda t: bk.alibi_attention(*split(t), slopes, mask),
                 lambda t: alibi_attention64(*split(t), slopes, mask), {"fused": fused}, grads=("fused",),
                 tol=FWD_TOL, grad_tol=GRAD_TOL, dispatched="alibi_attention")


@pytest.mark.parametrize("q_len", [1, 4, 20])
def test_slice_of_kv_cache_buffer(force_triton, q_len):
    """k/v = cache[:, :, :L] of a pre-allocated (B, H, max_len, D) buffer whose tail is garbage."""
    batch, heads, max_len, length, head_dim = 2, 2, 160, 90, 96
    gen = torch.Generator().manual_seed(4)
    cache_k = torch.randn(batch, heads, max_len, head_dim, generator=gen).to(KERNEL_DEVICE)
    cache_v = torch.randn(batch, heads, max_len, head_dim, generator=gen).to(KERNEL_DEVICE)
    cache_k[:, :, length:] = float("nan")  # must never be read
    cache_v[:, :, length:] = float("nan")
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(KERNEL_DEVICE)
    k, v = cache_k[:, :, :length], cache_v[:, :, :length]
    mask = _mask(length, [0, 6])
    _compare(q, k, v, bk.alibi_slopes(heads, device=KERNEL_DEVICE), mask, grad=False)


def test_decode_paths_split_and_single(force_triton):
    """The decode kernel with several splits + combine, and with one split writing the output itself."""
    assert decode.num_splits(2 * 2, 130, KERNEL_DEVICE)[0] > 1
    q, k, v, slopes = _inputs(2, 2, 3, 130, 64, torch.float32)
    _compare(q, k, v, slopes, _mask(130, [0, 100]), grad=False)
    assert decode.num_splits(1 * 2, 20, KERNEL_DEVICE)[0] == 1
    q, k, v, slopes = _inputs(1, 2, 2, 20, 80, torch.float32)
    _compare(q, k, v, slopes, grad=False)


@pytest.mark.parametrize("magnitude", [1e10, 1e19, 1e25, 1e30])
@pytest.mark.parametrize("q_len, k_len", [(40, 70), (3, 130), (1, 20)],
                         ids=["prefill", "decode-split", "decode-single"])
def test_scores_past_fp32_range(force_triton, poisoned, magnitude, q_len, k_len):
    """q·k past fp32's range (issue 14: |q|, |k| ~ 1e19 and up overflow the scores, and inf - inf is
    NaN) with a finite softmax: the kernels shift q by a power of two and give float64's answer, fp32
    prefill and decode (split + combine, and single). The probabilities are ~one-hot here."""
    q, k, v, slopes = _inputs(2, 2, q_len, k_len, 64, torch.float32)
    q, k = q * magnitude, k * magnitude
    if k_len == 130:
        assert decode.num_splits(2 * 2, k_len, KERNEL_DEVICE)[0] > 1
    check_kernel(bk.alibi_attention, alibi_attention64,
                 {"q": q, "k": k, "v": v, "slopes": slopes, "mask": _mask(k_len, [0, 5]), "scale": None},
                 tol=FWD_TOL, dispatched="alibi_attention")


def test_zero_length_queries(force_triton, poisoned):
    q, k, v, slopes = _inputs(1, 2, 0, 5, 64, torch.float32)
    k.requires_grad_()
    out = bk.alibi_attention(q, k, v, slopes)
    assert out.shape == (1, 2, 0, 64)
    out.sum().backward()
    assert torch.count_nonzero(k.grad) == 0


# ------------------------------------------------------------------------------------------------
# dispatch, errors, custom op
# ------------------------------------------------------------------------------------------------
def test_triton_path_ran(force_triton, poisoned, monkeypatch):
    """Forced triton: the dispatcher picks the kernel, the kernel launches, the reference never runs."""
    q, k, v, slopes = _inputs(1, 2, 9, 9, 64, torch.float32)
    expected = reference.alibi_attention(q, k, v, slopes)
    q.requires_grad_()
    with only_the_kernel_runs(monkeypatch, attention, "alibi_attention"):
        out = bk.alibi_attention(q, k, v, slopes)
        out.sum().backward()
    torch.testing.assert_close(out, expected, atol=2e-5, rtol=2e-5)


def test_public_name_survives_the_kernel_import():
    check_public_name_survives_kernel_import("alibi_attention")


def test_unsupported_head_dim(force_triton):
    q, k, v, slopes = _inputs(1, 1, 3, 3, 160, torch.float32)
    reason = attention.alibi_attention_unsupported(q, k, v, slopes)
    assert reason is not None and "160" in reason
    with pytest.raises(ValueError, match="head dim D=160"):
        bk.alibi_attention(q, k, v, slopes)
    for head_dim in (64, 80, 96, 128):
        assert attention.alibi_attention_unsupported(*_inputs(1, 1, 3, 3, head_dim, torch.float32)) is None


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU-interpreter limitation")
def test_bf16_refused_by_interpreter(force_triton):
    q, k, v, slopes = _inputs(1, 1, 3, 3, 64, torch.bfloat16)
    with pytest.raises(ValueError, match="bfloat16"):
        bk.alibi_attention(q, k, v, slopes)


def test_auto_backend_falls_back_for_unsupported_head_dim(monkeypatch):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    q, k, v, slopes = _inputs(1, 2, 3, 3, 160, torch.float32)
    before = _dispatch.dispatch_counts[("alibi_attention", "reference")]
    bk.alibi_attention(q, k, v, slopes)
    assert _dispatch.dispatch_counts[("alibi_attention", "reference")] == before + 1


@pytest.mark.parametrize(
    "change, error, match",
    [
        (lambda q, k, v: (q, k[:, :, :, :32], v), ValueError, "k must have shape"),
        (lambda q, k, v: (q, k, v.half()), TypeError, "share one dtype"),
        (lambda q, k, v: (q, k[:, :, :2], v[:, :, :2]), ValueError, "Sq must be <= Sk"),
        (lambda q, k, v: (q.to(torch.int32), k, v), TypeError, "q must have dtype"),
        (lambda q, k, v: (q, k.to("meta"), v), ValueError, "same device"),
    ],
)
def test_clear_errors(force_triton, change, error, match):
    q, k, v, slopes = _inputs(1, 2, 3, 5, 64, torch.float32)
    with pytest.raises(error, match=match):
        bk.alibi_attention(*change(q, k, v), slopes)


def test_custom_op_opcheck():
    """Fake (meta) implementation, schema and autograd registration of both custom ops are consistent
    with the kernels."""
    q, k, v, slopes = _inputs(1, 1, 3, 5, 16, torch.float32)
    positions = reference.alibi_key_positions(_mask(5, [2]))
    args = (q, k, v, slopes, positions, 0.125)
    check_opcheck(torch.ops.bloom_kernels.alibi_attention_fwd.default, args, grad=(0, 1, 2))
    out, lse = torch.ops.bloom_kernels.alibi_attention_fwd(*args)
    check_opcheck(torch.ops.bloom_kernels.alibi_attention_bwd.default,
                  (torch.randn_like(out), q, k, v, out, lse, slopes, positions, 0.125))


def test_traces_under_torch_compile_fullgraph():
    """No graph break through the op, forward and backward (aot_eager: no C++ compiler needed)."""
    q, k, v, slopes = _inputs(1, 2, 20, 20, 64, torch.float32)
    mask = _mask(20, [2])
    check_compiled(lambda q, k, v: bk.alibi_attention(q, k, v, slopes, mask) * 2.0, {"q": q, "k": k, "v": v},
                   grads=("q", "k", "v"))


# ------------------------------------------------------------------------------------------------
# GPU: BLOOM shapes, bf16/fp16, the flash-attention error rule
# ------------------------------------------------------------------------------------------------
def _eager_low_precision(q, k, v, slopes, mask, scale=None):
    """What PyTorch computes the eager way in q.dtype: matmuls, bias and softmax in that dtype."""
    dtype, (batch, _, q_len, head_dim), k_len = q.dtype, q.shape, k.shape[2]
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale
    pos = reference.alibi_positions(mask, batch, k_len, q.device)
    bias = (slopes.float().view(1, -1, 1, 1) * pos[:, None, None, :]).to(dtype)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale + bias
    allowed = torch.ones(q_len, k_len, dtype=torch.bool, device=q.device).tril(k_len - q_len)[None, None]
    if mask is not None:
        allowed = allowed & mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    return torch.matmul(probs, v)


def _flash_rule(q, k, v, slopes, mask=None, grad=True):
    """Kernel error vs the fp32 reference <= 2x PyTorch's own low-precision error, out and grads."""
    leaves = {name: [t.detach().clone().requires_grad_(grad) for t in (q, k, v)] for name in ("kernel", "eager")}
    leaves["fp32"] = [t.detach().float().requires_grad_(grad) for t in (q, k, v)]
    outs = {
        "kernel": bk.alibi_attention(*leaves["kernel"], slopes, mask),
        "eager": _eager_low_precision(*leaves["eager"], slopes, mask),
        "fp32": reference.alibi_attention(*leaves["fp32"], slopes, mask),
    }
    assert outs["kernel"].dtype == q.dtype and torch.isfinite(outs["kernel"]).all()

    def check(what, ours, eager, truth):
        err = (ours.float() - truth).abs().max().item()
        base = (eager.float() - truth).abs().max().item()
        # the floor only matters if PyTorch's error were exactly 0
        assert err <= 2 * base + 1e-6, f"{what}: kernel error {err:.3e} > 2 x PyTorch's {base:.3e}"

    check("out", outs["kernel"], outs["eager"], outs["fp32"])
    if grad:
        upstream = torch.randn_like(outs["fp32"])
        for out in outs.values():
            out.backward(upstream.to(out.dtype))
        for i, name in enumerate("qkv"):
            check(f"d{name}", leaves["kernel"][i].grad, leaves["eager"][i].grad, leaves["fp32"][i].grad)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch, heads, seq, head_dim, pads",
    [
        (2, 16, 1024, 64, None),         # bloom-560m
        (1, 32, 2048, 128, None),        # bloom-7b1
        (2, 32, 777, 80, [0, 133]),      # bloom-3b, odd length, left padding
        (2, 16, 1000, 96, [51, 0]),      # bloom-1b1
        (1, 112, 300, 128, None),        # BLOOM-176B's head count
    ],
)
def test_gpu_prefill_flash_rule(force_triton, batch, heads, seq, head_dim, pads, dtype):
    q, k, v, slopes = _inputs(batch, heads, seq, seq, head_dim, dtype)
    mask = None if pads is None else _mask(seq, pads)
    _flash_rule(q, k, v, slopes, mask)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("batch, q_len, length", [(1, 1, 4096), (4, 1, 4103), (2, 5, 4200), (2, 300, 4500)])
def test_gpu_decode_and_chunked_prefill_against_long_cache(force_triton, batch, q_len, length, dtype):
    heads, head_dim, max_len = 32, 128, 4608
    gen = torch.Generator(device="cuda").manual_seed(5)
    cache_k = torch.randn(batch, heads, max_len, head_dim, generator=gen, device="cuda", dtype=dtype)
    cache_v = torch.randn(batch, heads, max_len, head_dim, generator=gen, device="cuda", dtype=dtype)
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen, device="cuda", dtype=dtype)
    slopes = bk.alibi_slopes(heads, device="cuda")
    mask = _mask(length, [0, 37, 5, 900][:batch])
    _flash_rule(q, cache_k[:, :, :length], cache_v[:, :, :length], slopes, mask, grad=q_len > 1)


@pytest.mark.gpu
@pytest.mark.parametrize("magnitude", [1e19, 1e30])
def test_gpu_bf16_decode_scores_past_fp32_range(force_triton, magnitude):
    """bf16 decode shifts q too (the prefill kernel does so in fp32 only: see attention_fwd.forward)."""
    q, k, v, slopes = _inputs(2, 16, 1, 3000, 128, torch.bfloat16)
    q, k = q * magnitude, k * magnitude
    check_kernel(bk.alibi_attention, alibi_attention64,
                 {"q": q, "k": k, "v": v, "slopes": slopes, "mask": _mask(3000, [0, 700]), "scale": None},
                 tol={torch.bfloat16: (1e-2, 1e-2)}, dispatched="alibi_attention")  # one bf16 rounding of v


@pytest.mark.gpu
def test_gpu_torch_compile_fullgraph():
    q, k, v, slopes = _inputs(2, 16, 300, 300, 64, torch.bfloat16)
    mask = _mask(300, [0, 17])
    check_compiled(lambda q, k, v: bk.alibi_attention(q, k, v, slopes, mask) * 2.0, {"q": q, "k": k, "v": v},
                   grads=("q", "k", "v"))


@pytest.mark.gpu
def test_gpu_cuda_graph_decode_step():
    """Capture one decode step (static cache and mask buffers), replay it on new values."""
    batch, heads, max_len, head_dim = 2, 32, 4096, 128
    q, cache_k, cache_v, slopes = _inputs(batch, heads, 1, max_len, head_dim, torch.bfloat16)
    mask = torch.ones(batch, max_len, dtype=torch.int64, device="cuda")
    mask[1, :100] = 0
    mask[:, 3000:] = 0  # not yet written cache slots
    initial, refills = mask, []
    for seed in (11, 12):
        _, new_k, new_v, _ = _inputs(batch, heads, 1, max_len, head_dim, torch.bfloat16, seed=seed)
        mask = mask.clone()
        mask[:, 3000 + seed] = 1
        refills.append({"q": torch.randn_like(q), "k": new_k, "v": new_v, "mask": mask})
    check_cuda_graph(bk.alibi_attention, alibi_attention64,
                     {"q": q, "k": cache_k, "v": cache_v, "slopes": slopes, "mask": initial},
                     refills, tol={torch.bfloat16: (2e-2, 2e-2)})
