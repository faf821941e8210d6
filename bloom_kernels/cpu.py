"""CPU speed routes: faster ways to compute an op on the CPU than its eager reference, with the same
products summed in another order (fp32 rounding differences only). `_dispatch.select_linear` picks
them; `reference.py` stays the plain definition each route is tested against.

linear: a skinny x (decode: <= SKINNY_MAX_ROWS rows) against a large weight runs as a batched matmul
over 4 (or 2) row blocks of the weight: MKL spreads that over its threads and streams the weight at
memory speed, where its skinny GEMM does not. Measured once, on 2 cores: BLOOM's lm_head (250880 x
1024) went from 65 to 43 ms at one row and from 262 to 114 ms at eight; how it fares on other
machines and shapes is not known (to be chosen per shape by measurement).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

# inputs of at most this many rows against a weight of at least this many elements take the row-block
# batched-matmul route
SKINNY_MAX_ROWS = 16
SKINNY_MIN_WEIGHT = 1 << 20


def linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """F.linear(x, weight, bias) in x.dtype, through the row-block route when x is skinny (above)."""
    out_features, in_features = weight.shape
    rows = x.numel() // in_features if in_features else 0
    skinny = (x.device.type == "cpu" and 0 < rows <= SKINNY_MAX_ROWS
              and weight.numel() >= SKINNY_MIN_WEIGHT and weight.is_contiguous())
    chunks = next((c for c in (4, 2) if out_features % c == 0), None)
    if not skinny or chunks is None:
        return F.linear(x, weight, bias)
    blocks = weight.view(chunks, out_features // chunks, in_features)
    xt = x.reshape(rows, in_features).t().expand(chunks, in_features, rows)
    if bias is None:
        y = torch.bmm(blocks, xt)
    else:
        y = torch.baddbmm(bias.view(chunks, -1, 1), blocks, xt)
    return y.reshape(out_features, rows).t().contiguous().view(*x.shape[:-1], out_features)


def int8_linear(x: Tensor, weight_int8: Tensor, scale: Tensor, bias: Tensor | None = None) -> Tensor:
    """reference.int8_linear (placeholder until the measured CPU routes land)."""
    from . import reference

    return reference.int8_linear(x, weight_int8, scale, bias)
