"""The public wrappers (`bloom_kernels.<op>`) of every op: argument checks naming the argument, the
BLOOM_KERNELS_BACKEND switch, and the dispatch counter (backend=reference: the eager reference runs)."""

from __future__ import annotations

import pytest
import torch
from kernel_harness import qkv

import bloom_kernels
from bloom_kernels import _dispatch, reference

pytestmark = pytest.mark.usefixtures("force_reference")  # public calls run the eager reference


# ==================================================================================================
# public wrappers: argument checks, backend switch, dispatch counter
# ==================================================================================================
def _attn_args(**over):
    q, k, v = qkv(2, 3, 4, 6, 5, torch.float32, seed=18)
    args = dict(q=q, k=k, v=v, slopes=torch.rand(3), attention_mask=torch.ones(2, 6, dtype=torch.int64),
                scale=None)
    args.update(over)
    return args


def _f(*shape, dtype=torch.float32):
    return torch.randn(shape).to(dtype)


W_INT8 = torch.randint(-127, 128, (4, 7), dtype=torch.int8)

# (call, exception, message pattern naming the argument)
BAD_CALLS = {
    # wrong dtype -> TypeError naming the argument
    "attn_q_int": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=torch.ones(2, 3, 4, 5, dtype=torch.int64))),
                   TypeError, r"\bq\b"),
    "attn_k_int": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=torch.ones(2, 3, 6, 5, dtype=torch.int32))),
                   TypeError, r"\bk\b"),
    "attn_dtype_mix": (lambda: bloom_kernels.alibi_attention(**_attn_args(v=_f(2, 3, 6, 5, dtype=torch.float16))),
                       TypeError, r"\bv torch.float16"),
    "attn_scale_str": (lambda: bloom_kernels.alibi_attention(**_attn_args(scale="0.5")), TypeError, r"scale"),
    "attn_q_not_tensor": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=[[1.0]])), TypeError, r"\bq\b"),
    "probs_q_int": (lambda: bloom_kernels.alibi_attention_probs(**_attn_args(q=torch.ones(2, 3, 4, 5, dtype=torch.int64))),
                    TypeError, r"\bq\b"),
    "gelu_x_int": (lambda: bloom_kernels.bias_gelu(torch.ones(3, 5, dtype=torch.int64), _f(5)), TypeError, r"\bx\b"),
    "gelu_bias_int": (lambda: bloom_kernels.bias_gelu(_f(3, 5), torch.ones(5, dtype=torch.int64)),
                      TypeError, r"\bbias\b"),
    "ln_weight_int": (lambda: bloom_kernels.layer_norm(_f(3, 5), torch.ones(5, dtype=torch.int64), _f(5)),
                      TypeError, r"\bweight\b"),
    "ln_residual_int": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, torch.ones(3, 5, dtype=torch.int64)),
                        TypeError, r"\bresidual\b"),
    "quant_weight_int": (lambda: bloom_kernels.quantize_int8(torch.ones(3, 5, dtype=torch.int64)),
                         TypeError, r"\bweight\b"),
    "int8_x_int": (lambda: bloom_kernels.int8_linear(torch.ones(2, 7, dtype=torch.int64), W_INT8, torch.rand(4)),
                   TypeError, r"\bx\b"),
    "int8_weight_float": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8.float(), torch.rand(4)),
                          TypeError, r"\bweight_int8\b.*int8"),
    "int8_weight_uint8": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8.to(torch.uint8), torch.rand(4)),
                          TypeError, r"\bweight_int8\b"),
    "int8_scale_int": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.ones(4, dtype=torch.int64)),
                       TypeError, r"\bscale\b"),
    # wrong shapes -> ValueError naming the argument
    "attn_q_3d": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=_f(3, 4, 5))), ValueError, r"\bq\b"),
    "attn_slopes_len": (lambda: bloom_kernels.alibi_attention(**_attn_args(slopes=torch.rand(4))),
                        ValueError, r"\bslopes\b"),
    "attn_mask_shape": (lambda: bloom_kernels.alibi_attention(**_attn_args(attention_mask=torch.ones(2, 5))),
                        ValueError, r"\battention_mask\b"),
    "attn_mask_3d": (lambda: bloom_kernels.alibi_attention(**_attn_args(attention_mask=torch.ones(2, 1, 6))),
                     ValueError, r"\battention_mask\b"),
    "attn_sq_gt_sk": (lambda: bloom_kernels.alibi_attention(**_attn_args(q=_f(2, 3, 7, 5))), ValueError, r"Sq must be <= Sk"),
    "attn_kv_len": (lambda: bloom_kernels.alibi_attention(**_attn_args(v=_f(2, 3, 5, 5))), ValueError, r"\bv\b"),
    "attn_k_heads": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=_f(2, 2, 6, 5))), ValueError, r"\bk\b"),
    "attn_k_dim": (lambda: bloom_kernels.alibi_attention(**_attn_args(k=_f(2, 3, 6, 4))), ValueError, r"\bk\b"),
    "probs_slopes_len": (lambda: bloom_kernels.alibi_attention_probs(**_attn_args(slopes=torch.rand(2))),
                         ValueError, r"\bslopes\b"),
    "gelu_bias_len": (lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(6)), ValueError, r"\bbias\b"),
    "gelu_bias_2d": (lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(3, 5)), ValueError, r"\bbias\b"),
    "ln_weight_len": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(4), _f(5)), ValueError, r"\bweight\b"),
    "ln_bias_len": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(6)), ValueError, r"\bbias\b"),
    "ln_residual_shape": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, _f(2, 5)),
                          ValueError, r"\bresidual\b"),
    "quant_weight_3d": (lambda: bloom_kernels.quantize_int8(_f(2, 3, 5)), ValueError, r"\bweight\b"),
    "int8_x_last_dim": (lambda: bloom_kernels.int8_linear(_f(2, 6), W_INT8, torch.rand(4)), ValueError, r"\bx\b"),
    "int8_weight_1d": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8[0], torch.rand(4)),
                       ValueError, r"\bweight_int8\b"),
    "int8_scale_len": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(5)), ValueError, r"\bscale\b"),
    "int8_bias_len": (lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4), _f(3)),
                      ValueError, r"\bbias\b"),
    # tensors on different devices (meta vs cpu: the check runs before any computation)
    "attn_device": (lambda: bloom_kernels.alibi_attention(**_attn_args(slopes=torch.rand(3, device="meta"))),
                    ValueError, r"slopes on meta"),
    "attn_mask_device": (lambda: bloom_kernels.alibi_attention(
        **_attn_args(attention_mask=torch.ones(2, 6, device="meta"))), ValueError, r"attention_mask on meta"),
    "gelu_device": (lambda: bloom_kernels.bias_gelu(_f(3, 5), torch.rand(5, device="meta")), ValueError, r"bias on meta"),
    "ln_device": (lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, torch.rand(3, 5, device="meta")),
                  ValueError, r"residual on meta"),
    "int8_device": (lambda: bloom_kernels.int8_linear(torch.rand(2, 7, device="meta"), W_INT8, torch.rand(4)),
                    ValueError, r"x on meta"),
}


@pytest.mark.parametrize("case", list(BAD_CALLS))
def test_public_ops_reject_bad_arguments(case):
    call, exc, pattern = BAD_CALLS[case]
    with pytest.raises(exc, match=pattern):
        call()


def test_public_ops_accept_the_good_version_of_the_bad_calls():
    """The bad calls above differ from these in one argument only: the good ones must run."""
    bloom_kernels.alibi_attention(**_attn_args())
    bloom_kernels.alibi_attention_probs(**_attn_args())
    bloom_kernels.bias_gelu(_f(3, 5), _f(5))
    bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5), 1e-5, _f(3, 5))
    bloom_kernels.quantize_int8(_f(3, 5))
    bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4), _f(4))


@pytest.mark.parametrize("bogus", ["bogus", "cuda", "tritonn"])
def test_bogus_backend_is_an_error_naming_the_variable(monkeypatch, bogus):
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", bogus)
    calls = [
        lambda: bloom_kernels.alibi_attention(**_attn_args()),
        lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(5)),
        lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5)),
        lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4)),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=rf"BLOOM_KERNELS_BACKEND.*{bogus}"):
            call()


DISPATCHED = {
    "alibi_attention": lambda: bloom_kernels.alibi_attention(**_attn_args()),
    "bias_gelu": lambda: bloom_kernels.bias_gelu(_f(3, 5), _f(5)),
    "layer_norm": lambda: bloom_kernels.layer_norm(_f(3, 5), _f(5), _f(5)),
    "int8_linear": lambda: bloom_kernels.int8_linear(_f(2, 7), W_INT8, torch.rand(4)),
}


@pytest.mark.parametrize("op", list(DISPATCHED))
def test_reference_backend_is_counted_and_bit_identical(op, monkeypatch):
    before = dict(_dispatch.dispatch_counts)
    args_holder = {}

    real = getattr(reference, op)

    def spy(*args, **kwargs):
        args_holder["args"], args_holder["kwargs"] = args, kwargs
        return real(*args, **kwargs)

    monkeypatch.setattr(reference, op, spy)
    out = DISPATCHED[op]()
    assert _dispatch.dispatch_counts[(op, "reference")] == before.get((op, "reference"), 0) + 1
    assert _dispatch.dispatch_counts[(op, "triton")] == before.get((op, "triton"), 0)
    assert "args" in args_holder, f"{op} did not run reference.{op}"
    torch.testing.assert_close(out, real(*args_holder["args"], **args_holder["kwargs"]), atol=0, rtol=0)
