"""CPU speed routes: other ways to compute `linear` and `int8_linear` on the CPU than their eager
references, with the same products summed in another order (fp32 rounding differences only).
Which one runs for a shape is measured on the machine (cpu_routes.py); `reference.py` stays the plain
definition each route is tested against.

Decode multiplies a few rows by a large weight, and is bound by reading the weight. On the machine
these were written on (2 cores, AMD EPYC, MKL), MKL's skinny GEMM reads it at a fraction of memory
speed, and which route is fastest changed from shape to shape:
  F.linear    MKL's GEMM: the reference, best for many rows (prefill) and some small weights;
  rowblock    a batched matmul over 4 (or 2) row blocks of the weight: MKL spreads it over its threads
              (BLOOM's lm_head at one row: 30 ms vs 62 ms for F.linear);
  gemv        the product as elementwise-multiply-and-sum, compiled by inductor for this exact shape:
              one vectorised pass over the weight (4096x1024 at one row: 0.23 ms vs 1.2 ms);
  onednn      oneDNN's inner-product (the matmul inductor itself emits for CPU linears) on the weight as
              it is, no packed copy: 2-3x faster than MKL's GEMM at 8 rows (4096x1024: 0.84 vs 1.8 ms;
              the lm_head 250880x1024: 80 vs 194 ms);
for int8 weights:
  dequant     the reference: the weight dequantized to fp32, then F.linear (reads 5 bytes per weight);
  blocked     the same a block of output rows at a time (~1 MiB of fp32 each, in cache): no whole fp32
              copy of the weight per call, whose allocation and page faults cost more than the product
              (4096x1024 at 32 rows: 10.5 ms dequant, 2.2 ms blocked, 2.0 ms F.linear on fp32 weights);
  gemv        the int8 weight read once, converted and scaled in registers (1 byte per weight).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import Tensor

from . import reference


# --------------------------------------------------------------------------------------------------
# linear
# --------------------------------------------------------------------------------------------------
def linear_rowblock(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) as a batched matmul over row blocks of the weight (needs a contiguous
    weight whose rows split in 4 or 2; else F.linear)."""
    out_features, in_features = weight.shape
    chunks = next((c for c in (4, 2) if out_features % c == 0), None)
    if chunks is None or not weight.is_contiguous() or in_features == 0:
        return F.linear(x, weight, bias)
    rows = x.numel() // in_features
    blocks = weight.view(chunks, out_features // chunks, in_features)
    xt = x.reshape(rows, in_features).t().expand(chunks, in_features, rows)
    if bias is None:
        y = torch.bmm(blocks, xt)
    else:
        y = torch.baddbmm(bias.view(chunks, -1, 1), blocks, xt)
    return y.reshape(out_features, rows).t().contiguous().view(*x.shape[:-1], out_features)


def linear_onednn(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) through oneDNN's inner product (fp32 weights only; else F.linear)."""
    if not _ONEDNN_LINEAR or weight.dtype != torch.float32 or x.dtype != torch.float32:
        return F.linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _gemv(x: Tensor, weight: Tensor, scale: Tensor | None, bias: Tensor | None) -> Tensor:
    # (rows, 1, K) * (1, N, K) summed over K, in fp32: inductor turns this into one loop over the weight
    # (float, or int8 converted in registers) with the rows in registers; it is never materialised. An
    # int8 weight's scale is per output row, so it multiplies the sum, not every product.
    x2 = _materialized(x.reshape(-1, weight.shape[1]).float())
    y = (x2.unsqueeze(1) * weight.float().unsqueeze(0)).sum(-1)
    if scale is not None:
        y = y * scale.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], weight.shape[0])


def _materialized(x: Tensor) -> Tensor:
    """x, made a buffer of its own when inductor compiles the graph around it.

    The multiply-and-sum reads x once per output row. Left to itself inductor inlines a cheap pointwise
    producer (the LayerNorm before QKV and h->4h) into that loop, recomputing it N times: a vector
    division per weight element, 3-4x the step's time (small shape, int8: 1.8 ms a step, 0.9 ms with x
    stored first). Its realization heuristic (config.realize_opcount_threshold) cannot be lowered for
    the whole graph instead: at 8 rows that realized other broadcasts and ran 4x slower.
    inductor_force_stride_order asks for x laid out in memory, which realizes it; eagerly it returns x."""
    if _force_stride_order is None or not torch.compiler.is_compiling():
        return x
    return _force_stride_order(x, x.stride())


_force_stride_order = None  # inductor's prim, once prepare_to_compile has imported it


def prepare_to_compile() -> None:
    """Import inductor's prim that _materialized traces (call before torch.compile; importing it costs
    ~1 s, so `import bloom_kernels` does not). Without it, or in a torch build that lacks it (a private
    API), traced gemvs leave x as inductor decides: the same result, slower."""
    global _force_stride_order
    if _force_stride_order is None:
        try:
            import torch._inductor.inductor_prims  # noqa: F401  (registers the prim)
            _force_stride_order = torch.ops.prims.inductor_force_stride_order.default
        except (ImportError, AttributeError):  # pragma: no cover - depends on the torch build
            pass


# --------------------------------------------------------------------------------------------------
# compiled, once per exact shape
# --------------------------------------------------------------------------------------------------
_compiled: dict[tuple, object] = {}


def _compiled_for(fn, tensors: tuple[Tensor | None, ...]):
    """fn compiled by inductor for exactly these shapes, strides and dtypes (None: an absent argument)."""
    key = (fn.__name__,) + tuple(None if t is None else (tuple(t.shape), t.stride(), t.dtype) for t in tensors)
    compiled = _compiled.get(key)
    if compiled is None:
        compiled = _compiled[key] = _inductor_compiled(fn, tensors) or _dynamo_compiled(fn, len(_compiled))
    return compiled


def _inductor_compiled(fn, tensors: tuple[Tensor | None, ...]):
    """fn's FX graph (make_fx) compiled by torch._inductor.compile: no dynamo frame and no guards to
    evaluate per call (the key of _compiled is the guard), 31 -> 18 µs a call for 1536x512 int8 at one
    row, of which a small-shape decode step makes 25. None where that private entry point fails."""
    present = [i for i, t in enumerate(tensors) if t is not None]

    def over_present(*args):  # fn with its absent arguments fixed to None
        full: list[Tensor | None] = [None] * len(tensors)
        for i, arg in zip(present, args):
            full[i] = arg
        return fn(*full)

    example = [tensors[i] for i in present]
    try:
        from torch.fx.experimental.proxy_tensor import make_fx
        import torch._inductor

        run = torch._inductor.compile(make_fx(over_present)(*example), example)
    except Exception:  # noqa: BLE001 - another torch's private API: the torch.compile path instead
        return None
    return lambda *args: run(*[args[i] for i in present])


def _dynamo_compiled(fn, serial: int):
    """fn through torch.compile, with a copy of its code object of its own: dynamo caches (and caps, at
    8) compilations per code object, and a model has more than 8 projection shapes."""
    code = fn.__code__.replace(co_name=f"{fn.__name__}_{serial}")
    copy = types.FunctionType(code, fn.__globals__, code.co_name)
    return torch.compile(copy, dynamic=False, fullgraph=True)


def _run_gemv(*args: Tensor | None) -> Tensor:
    """_gemv compiled for these shapes; inside a graph being compiled, traced as plain ops instead (the
    outer compilation fuses it in)."""
    return _gemv(*args) if torch.compiler.is_compiling() else _compiled_for(_gemv, args)(*args)


def linear_gemv(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) through the compiled multiply-and-sum (fp32 accumulation)."""
    return _run_gemv(x, weight, None, bias)


DEQUANT_BLOCK_BYTES = 1 << 20  # fp32 bytes of weight a block of `blocked` dequantizes at a time


def int8_linear_blocked(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """reference.int8_linear one block of output rows at a time (the fp32 weight never exists whole)."""
    n, k = weight_int8.shape
    rows = max(1, DEQUANT_BLOCK_BYTES // (4 * max(k, 1)))
    if n <= rows:
        return reference.int8_linear(x, weight_int8, scale, bias)
    xf = x.float()
    parts = [F.linear(xf, reference.dequantize_int8(weight_int8[lo:lo + rows], scale[lo:lo + rows]),
                      None if bias is None else bias[lo:lo + rows].float())
             for lo in range(0, n, rows)]
    return torch.cat(parts, dim=-1).to(x.dtype)


def int8_linear_gemv(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """reference.int8_linear through the compiled multiply-and-sum on the int8 weight."""
    return _run_gemv(x, weight_int8, scale, bias)


# oneDNN is in every x86 build of torch; the op is private, so its absence is a missing route, not an error
_ONEDNN_LINEAR = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")

# route name -> implementation, per op (cpu_routes.py measures and picks among them)
LINEAR_ROUTES = {"F.linear": reference.linear, "rowblock": linear_rowblock, "gemv": linear_gemv,
                 "onednn": linear_onednn}
INT8_LINEAR_ROUTES = {"dequant": reference.int8_linear, "blocked": int8_linear_blocked, "gemv": int8_linear_gemv}
