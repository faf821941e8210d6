"""One harness for the kernel tests (imported as `kernel_harness`; pytest puts tests/ on sys.path).

Every op's test file checks its Triton kernel the same way, so the machinery is written once here:

    check_kernel(op, ref64, inputs, tol=..., grads=..., ...)
        runs `op` forward and backward on the kernel path (BLOOM_KERNELS_BACKEND=triton, every buffer the
        launchers allocate poisoned with NaN, see `kernel_path`) and `ref64` on float64 copies of the same
        inputs, then compares every output and every input gradient within the file's per-dtype
        tolerance table (a tensor's own dtype picks its row; a NaN left by an unwritten element fails).
    check_opcheck(op, args, grad=...)       torch.library.opcheck of one custom-op call.
    check_compiled(fn, inputs, grads=...)   torch.compile(fullgraph=True): outputs and gradients equal
                                            eager's (bit for bit unless a tolerance is given).
    check_cuda_graph(op, ref64, inputs, refills, ...)   (GPU) capture forward + backward in a CUDA
                                            graph, replay it on new values, compare with the reference.

`inputs` is an ordered {name: value} of the op's positional arguments (tensors, None, floats); the
gradients come back as "d<name>" next to the outputs (named by `outputs`). Upstream gradients are
drawn at random in each output's dtype (one fixed seed) unless given, and the float64 reference gets
the same values.

The float64 references (`attention64`, `bias_gelu64`, `layer_norm64`, `int8_linear64`) are written
from the maths, independently of bloom_kernels/reference.py: test_reference_*.py check reference.py
against them, and the kernels are checked against them here.
"""

from __future__ import annotations

import contextlib
import math
import os
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping

import torch
from torch import Tensor

from bloom_kernels import _dispatch

Tolerances = Mapping[torch.dtype, tuple[float, float]]  # dtype -> (atol, rtol)


# ==================================================================================================
# float64 references
# ==================================================================================================
def attention64(q, k, v, slopes, mask=None, scale=None):
    """Dense float64 ALiBi attention. Returns (out (B,H,Sq,D), probs (B,H,Sq,Sk), has_key (B,1,Sq)).

    bias[b,h,i,j] = slopes[h] * pos[b,j], pos = cumsum(mask) - 1 (arange without mask); query i sits at
    absolute position Sk - Sq + i and sees keys j <= Sk - Sq + i that are not padding; padded keys'
    K and V do not enter (their gradients are 0). Differentiable.
    """
    q, k, v = q.double(), k.double(), v.double()
    batch, heads, q_len, head_dim = q.shape
    key_len = k.shape[2]
    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    if mask is None:
        real = torch.ones(batch, key_len, dtype=torch.bool, device=q.device)
        pos = torch.arange(key_len, dtype=torch.float64, device=q.device).expand(batch, key_len)
    else:
        real = mask != 0
        pos = (real.to(torch.float64).cumsum(-1) - 1.0)
    # attention is over the real keys only: what a padded position holds (even NaN) is not part of it
    hidden = ~real.view(batch, 1, key_len, 1)
    k, v = k.masked_fill(hidden, 0.0), v.masked_fill(hidden, 0.0)
    bias = slopes.double().view(1, heads, 1, 1) * pos.view(batch, 1, 1, key_len)
    scores = torch.einsum("bhid,bhjd->bhij", q, k) * scale + bias  # (B, H, Sq, Sk)
    causal = torch.ones(q_len, key_len, dtype=torch.bool, device=q.device).tril(diagonal=key_len - q_len)
    visible = causal.view(1, 1, q_len, key_len) & real.view(batch, 1, 1, key_len)
    has_key = visible.any(-1)  # (B, 1, Sq)
    scores = scores.masked_fill(~visible, -math.inf)
    row_max = torch.where(has_key, scores.amax(-1), torch.zeros((), dtype=scores.dtype, device=q.device))[..., None]
    weights = torch.exp(scores - row_max)  # exp(-inf) = 0 at hidden keys
    denom = weights.sum(-1, keepdim=True)
    probs = torch.where(denom > 0, weights / torch.where(denom > 0, denom, 1.0), 0.0)
    return probs @ v, probs, has_key


def alibi_attention64(q, k, v, slopes, mask=None, scale=None) -> Tensor:
    """The output of `attention64` alone: the float64 counterpart of bloom_kernels.alibi_attention."""
    return attention64(q, k, v, slopes, mask, scale)[0]


def gelu64(h: Tensor) -> Tensor:
    """BLOOM's tanh GeLU (its constants) on a float64 tensor."""
    return h * 0.5 * (1.0 + torch.tanh(0.79788456 * h * (1.0 + 0.044715 * h * h)))


def bias_gelu64(x: Tensor, bias: Tensor) -> Tensor:
    return gelu64(x.double() + bias.double())


def layer_norm64(x, weight, bias, eps=1e-5, residual=None):
    """LayerNorm (biased variance) of x (+ residual) in float64; with a residual: (y, x + residual)."""
    h = x.double() if residual is None else x.double() + residual.double()
    mean = h.mean(-1, keepdim=True)
    var = ((h - mean) ** 2).mean(-1, keepdim=True)
    y = (h - mean) / torch.sqrt(var + eps) * weight.double() + bias.double()
    return y if residual is None else (y, h)


def dequantize64(weight_int8: Tensor, scale: Tensor) -> Tensor:
    return weight_int8.double() * scale.double()[:, None]


def int8_linear64(x, weight_int8, scale, bias=None) -> Tensor:
    """x · (weight_int8 * scale)ᵀ + bias in float64."""
    y = x.double() @ dequantize64(weight_int8, scale).T
    return y if bias is None else y + bias.double()


def qkv(batch, heads, q_len, key_len, head_dim, dtype, seed=0, device="cpu"):
    """Standard-normal q (B, H, Sq, D), k and v (B, H, Sk, D), drawn in that order from one seed."""
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(batch, heads, n, head_dim, generator=gen).to(device, dtype)
                 for n in (q_len, key_len, key_len))


# ==================================================================================================
# the reference tests (test_reference_*.py): reference.py and the public ops against float64
# ==================================================================================================
# Every reference op upcasts to fp32, computes, and rounds ONCE to the output dtype. Against the exact
# (float64) result on the same inputs its error is therefore at most
#     half an ulp of the output dtype (relative: 2^-(p+1), p = mantissa bits)  +  the fp32 computation's
#     own error (absolute, set per op in each file from the op's accumulation length, with a margin)
# so each check is  |ref - exact| <= atol + HALF_ULP[dtype] * |exact|  with atol the op's fp32 error.
# A wrong constant, a wrong position, a missing mask or a variance off by N/(N-1) is orders of magnitude
# above these bounds in fp32 (and above half an ulp in fp16).
REFERENCE_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
REFERENCE_DTYPE_IDS = ["fp32", "fp16", "bf16"]
# Relative rounding error of one round-to-nearest into the dtype: 2^-(mantissa bits + 1).
HALF_ULP = {torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}
# Each reference test runs both reference.<op> and the public bloom_kernels.<op> (backend=reference).
IMPLS = ["reference", "public"]


def impl_of(name: str, op: str):
    import bloom_kernels
    from bloom_kernels import reference

    return getattr(reference if name == "reference" else bloom_kernels, op)


def assert_close64(actual: Tensor, expected: Tensor, dtype: torch.dtype, atol: float, what: str = "") -> None:
    """|actual - expected| <= atol + HALF_ULP[dtype] * |expected|, elementwise, in float64."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().double()
    expected = expected.detach().double()
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    err = (actual - expected).abs()
    bound = atol + HALF_ULP[dtype] * expected.abs()
    bad = err > bound
    if bad.any():
        idx = tuple(i.item() for i in bad.nonzero()[0])
        raise AssertionError(
            f"{what}: {int(bad.sum())} / {err.numel()} elements off; first at {idx}: got "
            f"{actual[idx].item()!r}, expected {expected[idx].item()!r} (bound {bound[idx].item():.3g}); "
            f"max err {err.max().item():.3g}"
        )


# ==================================================================================================
# running an op: the kernel path, forward + backward on fresh leaves
# ==================================================================================================
@contextlib.contextmanager
def kernel_path(backend: str = "triton", poison: bool = True):
    """BLOOM_KERNELS_BACKEND=backend and, with `poison`, every buffer the launchers allocate filled with
    NaN (integers: -1), so an element a kernel fails to write fails the comparison."""
    from bloom_kernels.triton._launch import poisoned_outputs  # imports neither triton nor the kernels

    previous = os.environ.get(_dispatch.BACKEND_ENV)
    os.environ[_dispatch.BACKEND_ENV] = backend
    try:
        with poisoned_outputs(poison):
            yield
    finally:
        if previous is None:
            del os.environ[_dispatch.BACKEND_ENV]
        else:
            os.environ[_dispatch.BACKEND_ENV] = previous


@dataclass
class Run:
    """What one forward + backward gave: the outputs by name, the input gradients by "d<name>"."""
    outputs: dict[str, Tensor]
    grads: dict[str, Tensor | None] = field(default_factory=dict)
    upstream: dict[str, Tensor] = field(default_factory=dict)

    def items(self):
        yield from self.outputs.items()
        yield from self.grads.items()

    def __getitem__(self, name: str):
        return self.grads[name] if name in self.grads else self.outputs[name]


def random_upstream(outputs: Mapping[str, Tensor], names: Iterable[str] | None = None, seed: int = 1):
    """A standard-normal upstream gradient for each named output (default: all), in its dtype."""
    gen = torch.Generator().manual_seed(seed)
    return {name: torch.randn(outputs[name].shape, generator=gen).to(outputs[name].device, outputs[name].dtype)
            for name in (outputs if names is None else names)}


def forward_backward(fn: Callable, inputs: Mapping, *, grads: Iterable[str] = (), outputs: tuple[str, ...] = ("out",),
                     upstream: Mapping[str, Tensor] | Iterable[str] | None = None, to: torch.dtype | None = None,
                     seed: int = 1) -> Run:
    """fn(*inputs.values()) on fresh leaves detached from the inputs, with their strides (floating
    tensors cast to `to` if given), the names in `grads` requiring grad. With `grads`, backpropagates
    `upstream` (a {output: gradient} mapping; or the output names to draw random ones for; default:
    every output) and returns the input gradients (None where the inputs got none)."""
    grads = tuple(grads)
    args = {}
    for name, value in inputs.items():
        if isinstance(value, Tensor):
            value = value.detach()  # no copy: a strided view stays one (clone() would compact some)
            if to is not None and value.is_floating_point():
                value = value.to(to)
            if name in grads:
                value.requires_grad_()
        args[name] = value
    out = fn(*args.values())
    outs = out if isinstance(out, tuple) else (out,)
    assert len(outs) == len(outputs), f"{len(outs)} outputs, named {outputs}"
    run = Run(dict(zip(outputs, outs)))
    if not grads:
        return run
    if upstream is None or not isinstance(upstream, Mapping):
        upstream = random_upstream(run.outputs, upstream, seed)
    run.upstream = dict(upstream)
    used = [run.outputs[name] for name in upstream]
    got = torch.autograd.grad(used, [args[name] for name in grads],
                              [g.to(o.dtype) for g, o in zip(upstream.values(), used)], allow_unused=True)
    run.grads = {f"d{name}": g for name, g in zip(grads, got)}
    return run


def assert_matches(got: Run, want: Run, tol: Tolerances, grad_tol: Tolerances | None = None, *,
                   atol_of_max: bool = False, exact: bool = False) -> None:
    """Every output and gradient of `got` within the tolerance of `want`'s: |a - b| <= atol + rtol |b|
    with (atol, rtol) = tol[a.dtype] (grad_tol for the gradients, if given). `atol_of_max`: atol is a
    fraction of max(max|b|, 1). `exact`: bit for bit (and the same dtypes). A gradient `want` does not
    have (an input its used outputs do not depend on) must be absent or zero in `got`."""
    assert got.outputs.keys() == want.outputs.keys() and got.grads.keys() == want.grads.keys()
    for name, b in want.items():
        a = got[name]
        if b is None:
            assert a is None or not a.any(), f"{name}: non-zero where the reference has no gradient"
            continue
        assert a is not None, f"{name}: no gradient"
        assert a.shape == b.shape, f"{name}: shape {tuple(a.shape)} != {tuple(b.shape)}"
        if exact:
            assert a.dtype == b.dtype, f"{name}: {a.dtype} != {b.dtype}"
            torch.testing.assert_close(a, b, atol=0, rtol=0, equal_nan=False, msg=lambda m, name=name: f"{name}: {m}")
            continue
        table = grad_tol if grad_tol is not None and name in got.grads else tol
        atol, rtol = table[a.dtype]
        if atol_of_max:
            atol *= max(b.detach().abs().max().item(), 1.0) if b.numel() else 1.0
        torch.testing.assert_close(a.detach().double(), b.detach().double().to(a.device), atol=atol, rtol=rtol,
                                   msg=lambda m, name=name: f"{name} ({a.dtype}): {m}")


def _expected_dtypes(run: Run, inputs: Mapping, out_dtype: torch.dtype | None) -> None:
    """Outputs in the op's dtype (default: its first floating tensor input's), gradients in their input's."""
    if out_dtype is None:
        out_dtype = next(t.dtype for t in inputs.values() if isinstance(t, Tensor) and t.is_floating_point())
    for name, t in run.outputs.items():
        assert t.dtype == out_dtype, f"{name}: {t.dtype}, expected {out_dtype}"
    for name, g in run.grads.items():
        if g is not None:
            assert g.dtype == inputs[name[1:]].dtype, f"{name}: {g.dtype}, expected {inputs[name[1:]].dtype}"


def check_kernel(op: Callable, ref64: Callable, inputs: Mapping, *, tol: Tolerances,
                 grad_tol: Tolerances | None = None, grads: Iterable[str] = (), outputs: tuple[str, ...] = ("out",),
                 upstream: Mapping[str, Tensor] | Iterable[str] | None = None, dispatched: str | None = None,
                 out_dtype: torch.dtype | None = None, atol_of_max: bool = False, seed: int = 1) -> tuple[Run, Run]:
    """`op` on the kernel path (forced triton, NaN-poisoned buffers) against `ref64` in float64 on the
    same inputs: every output and every gradient in `grads`, each in the dtype it must have, within
    the tolerance of its dtype (see assert_matches). `dispatched`: the op's name, to check that the
    dispatcher picked its Triton kernel once. Returns (kernel run, reference run)."""
    before = _dispatch.dispatch_counts[(dispatched, "triton")]
    with kernel_path():
        got = forward_backward(op, inputs, grads=grads, outputs=outputs, upstream=upstream, seed=seed)
    if dispatched is not None:
        assert _dispatch.dispatch_counts[(dispatched, "triton")] == before + 1, f"{dispatched}: the kernel did not run"
    _expected_dtypes(got, inputs, out_dtype)
    want = forward_backward(ref64, inputs, grads=grads, outputs=outputs, upstream=got.upstream or None,
                            to=torch.float64)
    assert_matches(got, want, tol, grad_tol, atol_of_max=atol_of_max)
    return got, want


# ==================================================================================================
# custom op registration, torch.compile, CUDA graphs
# ==================================================================================================
def check_opcheck(op, args: tuple, grad: Iterable[int] = ()) -> None:
    """torch.library.opcheck (schema, fake/meta implementation, autograd registration, AOT dispatch)
    of one call of a custom op, on the kernel with NaN-poisoned buffers; the tensors at the positions
    in `grad` are fresh leaves that require grad, the others fresh copies."""
    from bloom_kernels.triton._launch import poisoned_outputs

    grad = set(grad)
    args = tuple(a.detach().clone().requires_grad_(i in grad) if isinstance(a, Tensor) else a
                 for i, a in enumerate(args))
    with poisoned_outputs():
        torch.library.opcheck(op, args)


def check_compiled(fn: Callable, inputs: Mapping, *, grads: Iterable[str] = (), outputs: tuple[str, ...] = ("out",),
                   backend: str | None = None, tol: Tolerances | None = None, grad_tol: Tolerances | None = None,
                   atol_of_max: bool = False) -> Run:
    """fn under torch.compile(fullgraph=True) (no graph break) gives eager's outputs and gradients, on the
    kernel path: bit for bit (the same kernels run underneath) unless `tol` is given (then as in
    assert_matches). backend: default "aot_eager" without a GPU (no C++ compiler needed), inductor with one."""
    if backend is None:
        backend = "inductor" if torch.cuda.is_available() else "aot_eager"
    _dispatch.preload_kernels()  # dynamo cannot trace the dispatcher's first import of a kernel module
    torch._dynamo.reset()
    with kernel_path():
        eager = forward_backward(fn, inputs, grads=grads, outputs=outputs)
        compiled = forward_backward(torch.compile(fn, fullgraph=True, backend=backend), inputs, grads=grads,
                                    outputs=outputs, upstream=eager.upstream or None)
    assert_matches(compiled, eager, tol or {}, grad_tol, atol_of_max=atol_of_max, exact=tol is None)
    return compiled


def check_cuda_graph(op: Callable, ref64: Callable, inputs: Mapping, refills: Iterable[Mapping], *, tol: Tolerances,
                     grad_tol: Tolerances | None = None, grads: Iterable[str] = (), outputs: tuple[str, ...] = ("out",),
                     atol_of_max: bool = False, warmup: int = 3) -> None:
    """(GPU) `op` forward (and backward for `grads`) captured in one CUDA graph on static inputs, after
    `warmup` calls on a side stream (autotuning and compilation stay outside the capture); then for each
    refill ({name: new value} for some inputs) the values are copied into the static tensors, the graph
    replays, and its outputs and gradients are compared with `ref64` on the new inputs."""
    grads = tuple(grads)
    statics = {name: (t.detach().clone().requires_grad_(name in grads) if isinstance(t, Tensor) else t)
               for name, t in inputs.items()}
    upstream = {}

    def step():
        outs = op(*statics.values())
        outs = dict(zip(outputs, outs if isinstance(outs, tuple) else (outs,)))
        if not grads:
            return Run(outs)
        if not upstream:
            upstream.update(random_upstream(outs))
        got = torch.autograd.grad(list(outs.values()), [statics[n] for n in grads], list(upstream.values()))
        return Run(outs, {f"d{n}": g for n, g in zip(grads, got)}, upstream)

    with kernel_path():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(warmup):
                step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            captured = step()
    for refill in refills:
        with torch.no_grad():
            for name, value in refill.items():
                statics[name].copy_(value)
        graph.replay()
        torch.cuda.synchronize()
        want = forward_backward(ref64, statics, grads=grads, outputs=outputs, upstream=upstream or None,
                                to=torch.float64)
        assert_matches(captured, want, tol, grad_tol, atol_of_max=atol_of_max)


# ==================================================================================================
# proofs that the kernel path is the one that ran
# ==================================================================================================
class SkippedLaunch:
    """Stands in for a @triton.jit kernel: `kernel[grid](...)` launches nothing (see the poison tests)."""

    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


@contextlib.contextmanager
def only_the_kernel_runs(monkeypatch, module, op: str, also=()):
    """Inside: reference.<op> (and each (object, name) in `also`) raises if it runs. On exit: the
    dispatcher picked op's Triton kernel once, and the kernel module's _forward then _backward ran."""
    from bloom_kernels import reference

    def boom(*args, **kwargs):
        raise AssertionError("the reference ran")

    for target, name in [(reference, op), *also]:
        monkeypatch.setattr(target, name, boom)
    launches: list[str] = []
    forward, backward = module._forward, module._backward
    monkeypatch.setattr(module, "_forward", lambda *a: launches.append("fwd") or forward(*a))
    monkeypatch.setattr(module, "_backward", lambda *a: launches.append("bwd") or backward(*a))
    before = _dispatch.dispatch_counts[(op, "triton")]
    yield
    assert _dispatch.dispatch_counts[(op, "triton")] == before + 1
    assert launches == ["fwd", "bwd"]


def check_row_limit(module, op: str, args_of: Callable[[int], tuple]) -> None:
    """Rows of module.MAX_N elements are supported; one more is refused with a reason naming both
    numbers, and the op, forced onto the kernel, raises. args_of(n): the op's arguments, rows of n."""
    import pytest

    from bloom_kernels import ops

    n, unsupported = module.MAX_N, getattr(module, f"{op}_unsupported")
    assert unsupported(*args_of(n)) is None
    reason = unsupported(*args_of(n + 1))
    assert str(n) in reason and str(n + 1) in reason
    with kernel_path(), pytest.raises(ValueError, match=f"at most {n} elements"):
        getattr(ops, op)(*args_of(n + 1))


def check_public_name_survives_kernel_import(op: str) -> None:
    """After the dispatcher's import of op's kernel module (bloom_kernels.triton.<module>, most of them
    named as the op), `bloom_kernels.<op>` is still the public op: the model calls it as an attribute on
    every forward. (An import binds a module only as an attribute of its parent package, so this holds
    in a fresh interpreter exactly when it holds here once the module is imported.)"""
    import importlib

    import bloom_kernels

    importlib.import_module(_dispatch.TRITON_OPS[op])
    public = getattr(bloom_kernels, op)
    assert public is getattr(bloom_kernels.ops, op), f"bloom_kernels.{op} is {public!r}, not the public op"
