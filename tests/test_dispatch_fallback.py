"""BLOOM_KERNELS_BACKEND=auto falls back to the reference when a kernel cannot compile or launch
(bloom_kernels/_dispatch.py); `triton` raises; any other error propagates.

The failures are simulated: the kernel module's entry function is replaced by a fake that raises the
error a GPU would give. The tensors live on KERNEL_DEVICE: the GPU, or the CPU, where `auto` would not
try the kernels, so `_dispatch._kernel_eligible` is patched to let it try them through Triton's
interpreter (tests/conftest.py).
"""

import ast
import os
import subprocess
import sys
import warnings

import pytest
import torch

pytest.importorskip("triton")

from triton.compiler.errors import CompilationError  # noqa: E402
from triton.runtime.errors import InterpreterError, OutOfResources, PTXASError  # noqa: E402

from helpers import HAS_CUDA, KERNEL_DEVICE  # noqa: E402

import bloom_kernels as bk  # noqa: E402
from bloom_kernels import _dispatch, reference  # noqa: E402
from bloom_kernels._dispatch import KernelFallbackWarning  # noqa: E402

NO_IMAGE = "CUDA error: no kernel image is available for execution on the device"


def compilation_error():
    node = ast.parse("acc = tl.dot(a, b)").body[0]  # has a lineno: the message starts "at 1:0:"
    cause = "ValueError('type bf16 not supported in this architecture')"
    return CompilationError("acc = tl.dot(a, b)", node, cause)


# each error a kernel can give on an untested GPU, and a fragment the warning must quote
KERNEL_FAILURES = {
    "compilation": (compilation_error, "CompilationError: ValueError('type bf16 not supported"),
    "out_of_resources": (lambda: OutOfResources(232448, 101376, "shared memory"),
                         "OutOfResources: out of resource: shared memory, Required: 232448"),
    "ptxas": (lambda: PTXASError("ptxas fatal: Value 'sm_61' is not defined"),
              "PTXASError: ptxas fatal: Value 'sm_61' is not defined"),
    "no_kernel_image": (lambda: RuntimeError(NO_IMAGE), "RuntimeError: " + NO_IMAGE),
    "launch_resources": (lambda: RuntimeError("Triton Error [CUDA]: too many resources requested for launch"),
                         "too many resources requested for launch"),
}


@pytest.fixture(autouse=True)
def clean_registry():
    _dispatch.reset_kernel_failures()
    yield
    _dispatch.reset_kernel_failures()


@pytest.fixture
def auto_tries_kernels(monkeypatch):
    """auto, with the kernel path eligible for CPU tensors too (the interpreter runs the real kernels)."""
    monkeypatch.setenv("BLOOM_KERNELS_BACKEND", "auto")
    monkeypatch.setattr(_dispatch, "_kernel_eligible", lambda mode, tensors: mode != "reference")


class FakeKernel:
    """Stands in for a kernel module's entry: raises `make_error()` when `fails(*args)`, else runs the
    real kernel. Counts its calls."""

    def __init__(self, real, make_error, fails=lambda *args: True):
        self.real, self.make_error, self.fails, self.calls = real, make_error, fails, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fails(*args):
            raise self.make_error()
        return self.real(*args, **kwargs)


def fake_kernel(monkeypatch, op, make_error, fails=lambda *args: True) -> FakeKernel:
    module = _dispatch._kernel_module(op)
    fake = FakeKernel(getattr(module, op), make_error, fails)
    monkeypatch.setattr(module, op, fake)
    return fake


def fallback_warnings(record):
    return [w for w in record if issubclass(w.category, KernelFallbackWarning)]


def call_recording(fn, *args):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        out = fn(*args)
    return out, fallback_warnings(record)


def counts(op):
    return {path: _dispatch.dispatch_counts[(op, path)] for path in ("triton", "reference", "fallback")}


def _f(*shape, seed=0, dtype=torch.float32):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(KERNEL_DEVICE, dtype)


# ------------------------------------------------------------------------------------------------
# auto: warn once, reference for that case from then on
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", ["compilation", "out_of_resources", "ptxas", "launch_resources"])
def test_auto_falls_back_once_per_case(auto_tries_kernels, monkeypatch, failure):
    make_error, quoted = KERNEL_FAILURES[failure]
    fake = fake_kernel(monkeypatch, "bias_gelu", make_error, fails=lambda x, bias: x.shape == (4, 33))
    x, bias = _f(4, 33, seed=1), _f(33, seed=2)
    before = counts("bias_gelu")

    out, warned = call_recording(bk.bias_gelu, x, bias)
    torch.testing.assert_close(out, reference.bias_gelu(x, bias), atol=0, rtol=0)
    assert fake.calls == 1
    assert len(warned) == 1, [str(w.message) for w in warned]
    message = str(warned[0].message)
    for fragment in ("bias_gelu", "x (4, 33) float32", "bias (33,) float32", quoted,
                     "BLOOM_KERNELS_BACKEND=triton", "this case"):
        assert fragment in message, (fragment, message)
    assert warned[0].filename == __file__  # points at the caller, not at the dispatcher
    after = counts("bias_gelu")
    assert after == {**before, "triton": before["triton"] + 1, "fallback": before["fallback"] + 1}

    # the same case again: straight to the reference, no retry, no warning
    x2 = _f(4, 33, seed=3)
    out, warned = call_recording(bk.bias_gelu, x2, bias)
    torch.testing.assert_close(out, reference.bias_gelu(x2, bias), atol=0, rtol=0)
    assert warned == [] and fake.calls == 1
    assert counts("bias_gelu")["fallback"] == before["fallback"] + 2
    assert counts("bias_gelu")["triton"] == before["triton"] + 1

    # another shape tries the kernel again (and here it runs)
    x3 = _f(5, 33, seed=4)
    out, warned = call_recording(bk.bias_gelu, x3, bias)
    assert warned == [] and fake.calls == 2
    assert counts("bias_gelu")["triton"] == before["triton"] + 2
    torch.testing.assert_close(out, reference.bias_gelu(x3, bias), atol=1e-5, rtol=1e-5)
    assert list(_dispatch.kernel_failures()) == [
        ("bias_gelu", x.device, (torch.float32, torch.float32), ((4, 33), (33,)))]


def test_no_kernel_image_falls_back_for_every_shape_but_not_every_dtype(auto_tries_kernels, monkeypatch):
    """The GPU cannot run the kernel's code at all: recorded for all shapes of (op, device, dtypes)."""
    fake = fake_kernel(monkeypatch, "bias_gelu", KERNEL_FAILURES["no_kernel_image"][0])
    _, warned = call_recording(bk.bias_gelu, _f(4, 33), _f(33))
    assert len(warned) == 1 and NO_IMAGE in str(warned[0].message)
    assert "every bias_gelu call with these dtypes" in str(warned[0].message)

    x, bias = _f(7, 20, seed=5), _f(20, seed=6)  # a decode loop's next shape: no retry, no warning
    out, warned = call_recording(bk.bias_gelu, x, bias)
    assert warned == [] and fake.calls == 1
    torch.testing.assert_close(out, reference.bias_gelu(x, bias), atol=0, rtol=0)

    x16, bias16 = x.half(), bias.half()  # other dtypes compile other code: tried again
    out, warned = call_recording(bk.bias_gelu, x16, bias16)
    assert len(warned) == 1 and fake.calls == 2
    torch.testing.assert_close(out, reference.bias_gelu(x16, bias16), atol=0, rtol=0)


def test_reset_kernel_failures_retries_and_warns_again(auto_tries_kernels, monkeypatch):
    fake = fake_kernel(monkeypatch, "bias_gelu", KERNEL_FAILURES["out_of_resources"][0])
    x, bias = _f(3, 8), _f(8)
    assert len(call_recording(bk.bias_gelu, x, bias)[1]) == 1
    assert len(_dispatch.kernel_failures()) == 1
    assert call_recording(bk.bias_gelu, x, bias)[1] == [] and fake.calls == 1

    _dispatch.reset_kernel_failures()
    assert _dispatch.kernel_failures() == {}
    assert len(call_recording(bk.bias_gelu, x, bias)[1]) == 1
    assert fake.calls == 2


# ------------------------------------------------------------------------------------------------
# triton raises; errors that are not compile/launch failures propagate
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("failure", list(KERNEL_FAILURES))
def test_triton_backend_raises_the_original_error(force_triton, monkeypatch, failure):
    make_error, _ = KERNEL_FAILURES[failure]
    fake_kernel(monkeypatch, "bias_gelu", make_error)
    before = counts("bias_gelu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(type(make_error())) as info:
            bk.bias_gelu(_f(4, 33), _f(33))
    assert type(info.value) is type(make_error())
    assert str(info.value) == str(make_error())  # unchanged; only a note is added
    assert any("bias_gelu" in n and "x (4, 33) float32" in n for n in getattr(info.value, "__notes__", []))
    assert fallback_warnings(record) == []
    assert _dispatch.kernel_failures() == {}
    assert counts("bias_gelu")["fallback"] == before["fallback"]


NOT_KERNEL_FAILURES = {
    "value_error": lambda: ValueError("x must be contiguous"),
    "type_error": lambda: TypeError("unsupported operand"),
    "device_assert": lambda: RuntimeError("CUDA error: device-side assert triggered\nCUDA kernel errors ..."),
    "illegal_access": lambda: RuntimeError("CUDA error: an illegal memory access was encountered"),
    "out_of_memory": lambda: torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"),
    "other_runtime_error": lambda: RuntimeError("expected scalar type Float but found Half"),
    "interpreter_error": lambda: InterpreterError("IndexError('index out of range')"),
    "assertion": lambda: AssertionError("a bug"),
}


@pytest.mark.parametrize("error", list(NOT_KERNEL_FAILURES))
def test_other_errors_propagate_in_auto(auto_tries_kernels, monkeypatch, error):
    make_error = NOT_KERNEL_FAILURES[error]
    fake = fake_kernel(monkeypatch, "bias_gelu", make_error)
    before = counts("bias_gelu")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        with pytest.raises(type(make_error())) as info:
            bk.bias_gelu(_f(4, 33), _f(33))
        assert str(info.value) == str(make_error())
        with pytest.raises(type(make_error())):  # nothing recorded: the kernel is tried again
            bk.bias_gelu(_f(4, 33), _f(33))
    assert fake.calls == 2
    assert fallback_warnings(record) == []
    assert _dispatch.kernel_failures() == {}
    assert counts("bias_gelu")["fallback"] == before["fallback"]


def test_argument_errors_still_raise_before_dispatch(auto_tries_kernels, monkeypatch):
    fake = fake_kernel(monkeypatch, "bias_gelu", KERNEL_FAILURES["out_of_resources"][0])
    with pytest.raises(ValueError, match="bias"):
        bk.bias_gelu(_f(4, 33), _f(32))
    assert fake.calls == 0 and _dispatch.kernel_failures() == {}


# ------------------------------------------------------------------------------------------------
# autograd, every op family, torch.compile, CPU-only auto
# ------------------------------------------------------------------------------------------------
def _grads(fn, inputs):
    inputs = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*inputs)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(9)
    torch.autograd.backward(outs, [torch.randn(o.shape, generator=gen).to(o.device) for o in outs])
    return [o.detach() for o in outs], [t.grad for t in inputs]


def test_fallback_is_differentiable_layer_norm(auto_tries_kernels, monkeypatch):
    fake_kernel(monkeypatch, "layer_norm", compilation_error)
    x, residual, weight, bias = _f(3, 5, 40, seed=1), _f(3, 5, 40, seed=2), 1 + _f(40, seed=3), _f(40, seed=4)
    with pytest.warns(KernelFallbackWarning, match="layer_norm"):
        got = _grads(lambda x, w, b, r: bk.layer_norm(x, w, b, 1e-5, r), [x, weight, bias, residual])
    expected = _grads(lambda x, w, b, r: reference.layer_norm(x, w, b, 1e-5, r), [x, weight, bias, residual])
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    assert all(g is not None for g in got[1])


def test_fallback_is_differentiable_bias_gelu(auto_tries_kernels, monkeypatch):
    fake_kernel(monkeypatch, "bias_gelu", KERNEL_FAILURES["out_of_resources"][0])
    x, bias = 3 * _f(6, 17, seed=1), _f(17, seed=2)
    with pytest.warns(KernelFallbackWarning):
        got = _grads(bk.bias_gelu, [x, bias])
    expected = _grads(reference.bias_gelu, [x, bias])
    for a, b in zip(got[0] + got[1], expected[0] + expected[1]):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def _attention_case(shape_seed):
    q_len = 5 + shape_seed
    q, k, v = _f(1, 2, q_len, 64, seed=1), _f(1, 2, q_len, 64, seed=2), _f(1, 2, q_len, 64, seed=3)
    mask = torch.ones(1, q_len, dtype=torch.long, device=KERNEL_DEVICE)
    mask[:, 0] = 0
    return (q, k, v, reference.alibi_slopes(2, KERNEL_DEVICE), mask), f"q (1, 2, {q_len}, 64) float32"


def _int8_case(shape_seed):
    weight_int8, scale = reference.quantize_int8(_f(12, 16, seed=5))
    return (_f(3 + shape_seed, 16, seed=6), weight_int8, scale, _f(12, seed=7)), \
        f"x ({3 + shape_seed}, 16) float32, weight_int8 (12, 16) int8, scale (12,) float32, " \
        "bias (12,) float32"


def _layer_norm_case(shape_seed):
    return (_f(2 + shape_seed, 24, seed=1), 1 + _f(24, seed=2), _f(24, seed=3)), \
        f"x ({2 + shape_seed}, 24) float32, weight (24,) float32, bias (24,) float32"


def _bias_gelu_case(shape_seed):
    return (_f(2 + shape_seed, 24, seed=1), _f(24, seed=2)), \
        f"x ({2 + shape_seed}, 24) float32, bias (24,) float32"


OP_CASES = {
    "alibi_attention": _attention_case,
    "bias_gelu": _bias_gelu_case,
    "int8_linear": _int8_case,
    "layer_norm": _layer_norm_case,
}


@pytest.mark.parametrize("op", list(OP_CASES))
def test_every_op_falls_back_through_the_public_function(auto_tries_kernels, monkeypatch, op):
    args, described = OP_CASES[op](0)
    fake = fake_kernel(monkeypatch, op, KERNEL_FAILURES["out_of_resources"][0],
                       fails=lambda *call: call[0].shape == args[0].shape)  # only the first case fails
    public, ref = getattr(bk, op), getattr(reference, op)
    before = counts(op)
    out, warned = call_recording(public, *args)
    assert len(warned) == 1 and f"{op} failed" in str(warned[0].message)
    assert described in str(warned[0].message), str(warned[0].message)
    torch.testing.assert_close(out, ref(*args), atol=0, rtol=0)
    out, warned = call_recording(public, *args)
    assert warned == [] and fake.calls == 1
    assert counts(op)["fallback"] == before["fallback"] + 2

    other, _ = OP_CASES[op](3)  # another shape: the (real, interpreted) kernel runs
    out, warned = call_recording(public, *other)
    assert warned == [] and fake.calls == 2
    assert counts(op)["triton"] == before["triton"] + 2
    torch.testing.assert_close(out, ref(*other), atol=1e-4, rtol=1e-4)


def test_recorded_case_traces_to_the_reference_under_torch_compile(auto_tries_kernels, monkeypatch):
    fake = fake_kernel(monkeypatch, "bias_gelu", KERNEL_FAILURES["ptxas"][0])
    x, bias = _f(4, 9), _f(9)
    assert len(call_recording(bk.bias_gelu, x, bias)[1]) == 1
    compiled = torch.compile(lambda a, b: bk.bias_gelu(a, b) * 2.0, fullgraph=True, backend="eager")
    out, warned = call_recording(compiled, x, bias)
    torch.testing.assert_close(out, reference.bias_gelu(x, bias) * 2.0, atol=0, rtol=0)
    assert warned == [] and fake.calls == 1


@pytest.mark.skipif(HAS_CUDA, reason="with a GPU, importing bloom_kernels preloads the kernels")
def test_auto_tries_kernels_tensors_never_imports_triton():
    code = (
        "import sys, torch, bloom_kernels as bk\n"
        "from bloom_kernels import reference\n"
        "x, b = torch.randn(3, 8), torch.randn(8)\n"
        "bk.bias_gelu(x, b); bk.layer_norm(x, torch.ones(8), b)\n"
        "bk.int8_linear(x, *reference.quantize_int8(torch.randn(4, 8)))\n"
        "q = torch.randn(1, 2, 3, 64); bk.alibi_attention(q, q, q, bk.alibi_slopes(2))\n"
        "assert 'triton' not in sys.modules, 'auto on CPU tensors imported triton'\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "BLOOM_KERNELS_BACKEND")}
    # no CPU route timing: its gemv route compiles with inductor, and torch's inductor imports triton
    env["BLOOM_KERNELS_CPU_ROUTE"] = "default"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert done.returncode == 0, done.stderr


def test_use_backend_sets_and_restores_the_variable(monkeypatch):
    monkeypatch.setenv(_dispatch.BACKEND_ENV, "triton")
    with _dispatch.use_backend("reference"):
        assert _dispatch.requested_backend() == "reference"
    assert _dispatch.requested_backend() == "triton"
    monkeypatch.delenv(_dispatch.BACKEND_ENV)
    with pytest.raises(ValueError, match="backend must be one of auto, triton, reference; got 'cuda'"):
        with _dispatch.use_backend("cuda"):
            pass
    with _dispatch.use_backend("reference"):
        pass
    assert _dispatch.BACKEND_ENV not in os.environ
