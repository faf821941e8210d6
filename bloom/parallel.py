"""Megatron-style tensor parallelism of BLOOM on torch.distributed (NCCL on GPUs, gloo on CPUs).

Launched with `torchrun --nproc-per-node N` (or `--nnodes`): every rank runs the same program, the
model is loaded with `from_pretrained(path, tensor_parallel=True)` inside the initialised process
group, and each rank holds about 1/N of the weights:

    query_key_value, dense_h_to_4h   split by output rows: rank r holds heads [r*H/N, (r+1)*H/N) —
                                     BLOOM's fused QKV rows are per head (q, k, v of a head adjacent),
                                     so a rank's heads are one contiguous block of rows — and the same
                                     block of 4E/N rows of h->4h (bias and int8 scales sliced alike)
    dense, dense_4h_to_h             split by input columns: each rank's partial product, ONE all-reduce,
                                     the bias added once (by rank 0, before the all-reduce)
    word_embeddings                  split over the vocabulary: masked lookup of the rank's rows + one
                                     all-reduce
    lm_head                          split over the vocabulary; the logits all-gathered so that every
                                     rank holds (and samples from) the same full logits
    LayerNorms, task heads           replicated; ALiBi slopes are the slice of the GLOBAL head indices

Rows of the vocabulary: ceil(V/N) per rank, the last rank fewer (V need not be divisible by N); the
gather pads the last rank's logits and cuts the padding off. The collectives are
torch.distributed's functional collectives (`_c10d_functional.all_reduce` / `all_gather_into_tensor`
+ `wait_tensor`): torch.compile traces them (decode="compile") and on CUDA they are captured in the
decode step's CUDA graph. The single-process model is untouched: tensor parallelism swaps the classes
of the split modules for the subclasses below (their forward adds the collective) and sets `tp` on
the model; nothing else runs per layer.

Loading reads only the rank's slices (`safe_open(...).get_slice(name)[rows or cols]`); int8: the
row-parallel weights are quantised with the FULL row's absmax (one all-reduce MAX per tensor while
loading), so int8 on N ranks holds exactly the slices of int8 on one.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

import bloom_kernels as bk

__all__ = ["TPContext", "Shard", "init_distributed", "shutdown", "tensor_parallel", "check_devices", "check_heads"]

_ops = None


def _functional():
    global _ops
    if _ops is None:
        _ops = torch.ops._c10d_functional
    return _ops


# --------------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------------
NO_GROUP = ("tensor_parallel=True needs an initialised torch.distributed process group: launch with "
            "`torchrun --nproc-per-node N your_script.py` (or --nnodes for several machines) and call "
            "torch.distributed.init_process_group() (or bloom.parallel.init_distributed()) before from_pretrained")


def check_heads(n_head: int, world: int) -> None:
    """Whole heads per rank: n_head must be divisible by the world size."""
    if n_head % world:
        divisors = [d for d in range(1, n_head + 1) if n_head % d == 0]
        raise ValueError(f"tensor parallelism splits whole attention heads: n_head={n_head} is not divisible by "
                         f"the world size {world}; run on a number of processes that divides {n_head} "
                         f"({', '.join(map(str, divisors))})")


def check_devices(devices: list[tuple[str, str]], backend: str) -> None:
    """`devices`: (host, device) of every rank, by rank. One device type on every rank, a GPU per rank
    (no two ranks of a host on one GPU), and a backend that reduces tensors of that type."""
    types = {torch.device(d).type for _, d in devices}
    if len(types) > 1:
        listing = ", ".join(f"rank {r}: {d}" for r, (_, d) in enumerate(devices))
        raise ValueError(f"tensor parallelism needs every rank on the same kind of device; got {listing} "
                         "(pass device=... consistently, e.g. device='cuda' for each rank's own GPU)")
    seen: dict[tuple[str, str], int] = {}
    for rank, (host, device) in enumerate(devices):
        if torch.device(device).type == "cuda":
            if (host, device) in seen:
                raise ValueError(f"ranks {seen[(host, device)]} and {rank} both use {device} on {host}: tensor "
                                 "parallelism needs one GPU per rank (device='cuda' picks cuda:LOCAL_RANK)")
            seen[(host, device)] = rank
    kind = types.pop()
    if kind == "cuda" and "nccl" not in backend and "gloo" not in backend:
        raise ValueError(f"the process group's backend {backend!r} cannot reduce CUDA tensors: "
                         "init_process_group('nccl')")
    if kind == "cpu" and "gloo" not in backend:
        raise ValueError(f"the model is on the CPU but the process group's backend is {backend!r}, which "
                         "reduces CUDA tensors only: init_process_group('gloo') for CPU ranks, or load on "
                         "device='cuda' (each rank's cuda:LOCAL_RANK)")


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def resolve_device(device, backend: str) -> torch.device:
    """A rank's device: None -> cuda:LOCAL_RANK with NCCL, else the CPU; 'cuda' -> cuda:LOCAL_RANK."""
    if device is None:
        return torch.device("cuda", _local_rank()) if "nccl" in backend else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", _local_rank())
    return device


def shutdown() -> None:
    """Free what is unreachable (models left in reference cycles: torch's lazy imports leave some) and
    destroy the default process group. A model still alive when the interpreter's last collection
    frees it, after the group is gone, can abort the process (gloo: "terminate called without an
    active exception")."""
    import gc

    gc.collect()
    if dist.is_initialized():
        dist.destroy_process_group()


def init_distributed(device=None) -> torch.device:
    """Initialise the default process group from torchrun's environment if none is (NCCL when this rank
    has a GPU, gloo otherwise) and return this rank's device."""
    if not dist.is_initialized():
        wants_cuda = torch.cuda.is_available() and (device is None or torch.device(device).type == "cuda")
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("--tensor-parallel runs under torchrun (RANK/WORLD_SIZE are not set): "
                               "torchrun --nproc-per-node N -m bloom.cli generate ... --tensor-parallel")
        dist.init_process_group("nccl" if wants_cuda else "gloo")
    resolved = resolve_device(device, dist.get_backend())
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
    return resolved


# --------------------------------------------------------------------------------------------------
# The context: group, rank, world, the local slices
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Shard:
    """One tensor's slice on this rank: [lo, hi) along `dim` of the full `shape`."""

    dim: int
    lo: int
    hi: int
    full: tuple[int, ...]

    @property
    def index(self) -> tuple[slice, ...]:
        return (slice(None),) * self.dim + (slice(self.lo, self.hi),)


@dataclass(eq=False)
class TPContext:
    """Where this rank sits: process group, rank, world size, its heads and vocabulary rows, and the
    shard of every split tensor (state-dict name -> Shard). `group` None: the default (world) group —
    not held, so that destroy_process_group() frees it even while a model lives."""

    group: object
    rank: int
    world: int
    n_head: int
    vocab_size: int
    device: torch.device
    plan: dict[str, Shard] = field(default_factory=dict)

    def __post_init__(self):
        # what the functional collectives (and dynamo) take
        self.group_name = (self.group or dist.group.WORLD).group_name
        self.backend = dist.get_backend(self.group)
        self.local_heads = self.n_head // self.world
        self.head_lo = self.rank * self.local_heads
        self.head_hi = self.head_lo + self.local_heads
        self.vocab_per_rank = -(-self.vocab_size // self.world)
        self.vocab_lo = min(self.vocab_size, self.rank * self.vocab_per_rank)
        self.vocab_hi = min(self.vocab_size, self.vocab_lo + self.vocab_per_rank)
        self.comm_device = self.device if "nccl" in self.backend else torch.device("cpu")

    @classmethod
    def create(cls, config, device=None, group=None) -> "TPContext":
        """The context for `config` in `group` (default: the world), with the clear errors: no process
        group, heads not divisible, mismatched devices."""
        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(NO_GROUP)
        group = None if group is None or group is dist.group.WORLD else group
        world, rank = dist.get_world_size(group), dist.get_rank(group)
        check_heads(config.n_head, world)
        if config.vocab_size < world:
            raise ValueError(f"vocab_size={config.vocab_size} is smaller than the world size {world}")
        backend = dist.get_backend(group)
        device = resolve_device(device, backend)
        if device.type == "cuda" and device.index < torch.cuda.device_count():
            torch.cuda.set_device(device)  # NCCL's object collectives (below) use the current device
        devices: list = [None] * world
        dist.all_gather_object(devices, (socket.gethostname(), str(device)), group=group)
        check_devices(devices, backend)
        return cls(group, rank, world, config.n_head, config.vocab_size, device)

    # --- collectives in the forward (functional: traceable, capturable) -----------------------
    def all_reduce(self, x: Tensor) -> Tensor:
        ops = _functional()
        return ops.wait_tensor(ops.all_reduce(x, "sum", self.group_name))

    def all_gather(self, x: Tensor, dim: int) -> Tensor:
        """Concatenate every rank's `x` (same shape on each) along `dim`."""
        ops = _functional()
        moved = x.movedim(dim, 0).contiguous()
        out = ops.wait_tensor(ops.all_gather_into_tensor(moved, self.world, self.group_name))
        return out.movedim(0, dim)

    def gather_vocab(self, logits: Tensor) -> Tensor:
        """(..., local vocab) -> (..., V): every rank's columns in rank order."""
        lead, local = logits.shape[:-1], logits.shape[-1]
        flat = logits.reshape(-1, local)
        if local != self.vocab_per_rank:  # the last rank's shorter slice
            flat = F.pad(flat, (0, self.vocab_per_rank - local))
        ops = _functional()
        out = ops.wait_tensor(ops.all_gather_into_tensor(flat.contiguous(), self.world, self.group_name))
        out = out.view(self.world, -1, self.vocab_per_rank).transpose(0, 1).reshape(flat.shape[0], -1)
        if out.shape[-1] != self.vocab_size:
            out = out[:, : self.vocab_size]
        return out.reshape(*lead, self.vocab_size)

    def checked_cache(self, cache):
        """What forward's validation sees of a rank's cache (this rank's heads): a stand-in of the
        shapes the whole model's cache would have (meta tensors, nothing allocated)."""
        from .cache import BloomCache

        if not isinstance(cache, BloomCache):
            return cache
        batch, heads, capacity, head_dim = cache.keys[0].shape
        view = BloomCache.__new__(BloomCache)
        view.keys = view.values = [torch.empty((batch, heads * self.world, capacity, head_dim),
                                               device="meta")] * len(cache.keys)
        view.length, view.growable, view.padding_zeroed = cache.length, cache.growable, cache.padding_zeroed
        return view

    # --- eager collectives (loading, saving, generate's seed) -----------------------------------
    def max_over_ranks(self, x: Tensor) -> Tensor:
        y = x.to(self.comm_device).clone()
        dist.all_reduce(y, op=dist.ReduceOp.MAX, group=self.group)
        return y.to(x.device)

    def broadcast_(self, x: Tensor) -> None:
        """x (in place) = rank 0's x."""
        y = x.detach().to(self.comm_device).contiguous()
        dist.broadcast(y, src=0 if self.group is None else dist.get_global_rank(self.group, 0), group=self.group)
        with torch.no_grad():
            x.copy_(y)

    def shared_seed(self, generator: torch.Generator | None) -> torch.Generator:
        """A CPU generator seeded alike on every rank: rank 0's draw from `generator` (or torch's RNG)."""
        seed = torch.randint(0, 2**62, (1,), generator=generator,
                             device=generator.device if generator is not None else "cpu")
        seed = seed.cpu()
        self.broadcast_(seed)
        return torch.Generator().manual_seed(int(seed))

    def gather_full(self, key: str, tensor: Tensor) -> Tensor | None:
        """The whole tensor of a split `key` on rank 0 (None elsewhere); every rank must call it."""
        shard = self.plan[key]
        width = max(-(-shard.full[shard.dim] // self.world), 1) if shard.dim == 0 else tensor.shape[shard.dim]
        local = tensor.detach().to(self.comm_device)
        pad = width - local.shape[shard.dim]
        if pad:
            pad_shape = list(local.shape)
            pad_shape[shard.dim] = pad
            local = torch.cat([local, local.new_zeros(pad_shape)], shard.dim)
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        if self.rank != 0:
            return None
        return torch.cat(parts, shard.dim).narrow(shard.dim, 0, shard.full[shard.dim]).cpu()

    def barrier(self) -> None:
        if "nccl" in self.backend:
            dist.barrier(group=self.group, device_ids=[self.device.index])
        else:
            dist.barrier(group=self.group)

    # --- loading -------------------------------------------------------------------------------
    def take(self, key: str, tensor) -> Tensor:
        """This rank's part of a checkpoint tensor (a Tensor, or a lazy safetensors slice)."""
        shard = self.plan.get(key)
        if isinstance(tensor, LazyTensor):
            return tensor.read(None if shard is None else shard.index)
        if shard is None:
            return tensor
        return tensor[shard.index].clone()  # not a view pinning the whole (e.g. mmap'd) tensor

    def full_shape(self, key: str, local_shape) -> tuple[int, ...]:
        shard = self.plan.get(key)
        return tuple(local_shape) if shard is None else shard.full

    def quantizer(self):
        """bloom.quantization's quantize(key, weight) for this rank: row-parallel (input-split) weights
        take the full row's absmax, so their int8 values and scales are those of the unsplit model."""
        def quantize(key: str, weight: Tensor) -> tuple[Tensor, Tensor]:
            shard = self.plan.get(key)
            if shard is None or shard.dim != 1:
                return bk.quantize_int8(weight)
            return self._quantize_row_split(weight)
        return quantize

    def _quantize_row_split(self, weight: Tensor) -> tuple[Tensor, Tensor]:
        absmax = self.max_over_ranks(weight.detach().abs().amax(dim=1).float())
        # The full row's absmax as one extra column: the kernel's own quantiser then computes exactly the
        # scale (and rounding) of the unsplit row; the extra column is dropped.
        extra = absmax.to(weight.dtype)[:, None]
        if not torch.equal(extra.float()[:, 0], absmax):  # absmax not representable: keep it in fp32
            weight, extra = weight.float(), absmax[:, None]
        q, scale = bk.quantize_int8(torch.cat([weight, extra], dim=1))
        return q[:, :-1].contiguous(), scale

    def int8_from_linear(self, key: str, linear: nn.Module) -> nn.Module:
        """quantize_int8's swap of one split Linear (a float TP model quantised after loading)."""
        from .quantization import Int8Linear

        module = Int8Linear(linear.in_features, linear.out_features, linear.bias is not None,
                            device=linear.weight.device, dtype=linear.weight.dtype)
        module.weight, module.scale = self.quantizer()(key + ".weight", linear.weight.detach())
        if linear.bias is not None:
            module.bias = linear.bias.detach().clone()
        shard = self.plan.get(key + ".weight")
        if shard is not None and shard.dim == 0:  # output rows split: their scales alike
            self.plan[key + ".scale"] = Shard(0, shard.lo, shard.hi, shard.full[:1])
        _reclass(module, type(linear), self)
        return module


class LazyTensor:
    """A tensor of an open safetensors file, read only when (and as far as) asked."""

    def __init__(self, reader, name: str):
        self.reader, self.name = reader, name
        self._slice = reader.get_slice(name)
        self.shape = tuple(self._slice.get_shape())

    def read(self, index: tuple[slice, ...] | None) -> Tensor:
        if index is None:
            return self.reader.get_tensor(self.name)
        return self._slice[index]


# --------------------------------------------------------------------------------------------------
# The split modules: the single-process classes + one collective in forward
# --------------------------------------------------------------------------------------------------
class _RowParallel:
    """Split by input: partial product (the bias on rank 0 only), then one all-reduce."""

    tp: TPContext

    def forward(self, x: Tensor, with_bias: bool = True) -> Tensor:
        return self.tp.all_reduce(super().forward(x, with_bias=with_bias and self.tp.rank == 0))


class _VocabParallelHead:
    """Split over the vocabulary: local logits, then all-gathered to (..., V)."""

    tp: TPContext

    def forward(self, x: Tensor, *args, **kwargs) -> Tensor:
        return self.tp.gather_vocab(super().forward(x, *args, **kwargs))


class VocabParallelEmbedding(nn.Embedding):
    """nn.Embedding holding rows [vocab_lo, vocab_hi): masked lookup, one all-reduce."""

    tp: TPContext

    def forward(self, ids: Tensor) -> Tensor:
        tp = self.tp
        local = ids - tp.vocab_lo
        outside = (local < 0) | (local >= tp.vocab_hi - tp.vocab_lo)
        rows = F.embedding(local.masked_fill(outside, 0), self.weight)
        return tp.all_reduce(rows.masked_fill(outside[..., None], 0))


_CLASSES: dict[tuple[type, type], type] = {}


def _parallel_class(mixin: type, base: type) -> type:
    if issubclass(base, mixin):
        return base
    key = (mixin, base)
    if key not in _CLASSES:
        name = {_RowParallel: "RowParallel", _VocabParallelHead: "VocabParallel"}[mixin] + base.__name__
        _CLASSES[key] = type(name, (mixin, base), {"__module__": __name__})
    return _CLASSES[key]


def _reclass(module: nn.Module, like: type, tp: TPContext) -> None:
    """Give a freshly made module (an int8 swap) the parallel class `like` had."""
    for mixin in (_RowParallel, _VocabParallelHead):
        if issubclass(like, mixin):
            module.__class__ = _parallel_class(mixin, type(module))
            module.tp = tp


# --------------------------------------------------------------------------------------------------
# Splitting a model
# --------------------------------------------------------------------------------------------------
def _narrow(module: nn.Module, name: str, shard: Shard) -> None:
    old = getattr(module, name)
    new = old.detach()[shard.index]
    if new.device.type != "meta":
        new = new.clone()
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
    else:
        module._buffers[name] = new


def _split(module: nn.Module, prefix: str, ctx: TPContext, dim: int, lo: int, hi: int) -> None:
    """Split a Linear / Int8Linear / Embedding module's tensors: dim 0 (output rows: weight, bias,
    scale) or dim 1 (input columns: weight only; bias and scale are per output, replicated)."""
    names = ("weight", "bias", "scale") if dim == 0 else ("weight",)
    for name in names:
        tensor = getattr(module, name, None)
        if tensor is None:
            continue
        shard = Shard(dim, lo, hi, tuple(tensor.shape))
        ctx.plan[prefix + name] = shard
        _narrow(module, name, shard)
    if hasattr(module, "out_features") and dim == 0:
        module.out_features = hi - lo
    if hasattr(module, "in_features") and dim == 1:
        module.in_features = hi - lo
    if isinstance(module, nn.Embedding):
        module.num_embeddings = hi - lo


def tensor_parallel(model: nn.Module, ctx: TPContext | None = None) -> nn.Module:
    """Split `model` (real tensors, or on the meta device before loading) in place for this rank;
    returns it with `model.tp` set. from_pretrained(tensor_parallel=True) calls it on the meta model."""
    from .model import BloomAttention, BloomMLP, BloomModel

    if getattr(model, "tp", None) is not None:
        raise ValueError("this model is already split for tensor parallelism")
    ctx = ctx or TPContext.create(model.config, None)
    E = model.config.hidden_size
    D = E // model.config.n_head
    ctx.plan.clear()
    embedding_weight = model.get_input_embeddings().weight
    for path, module in model.named_modules():
        prefix = path + "." if path else ""
        if isinstance(module, BloomAttention):
            module.num_heads = ctx.local_heads
            module.hidden_size = ctx.local_heads * D
            module.exact_tp = 1  # the real split replaces slow_but_exact's emulated one
            _split(module.query_key_value, prefix + "query_key_value.", ctx, 0, 3 * D * ctx.head_lo,
                   3 * D * ctx.head_hi)
            _split(module.dense, prefix + "dense.", ctx, 1, D * ctx.head_lo, D * ctx.head_hi)
            module.dense.__class__ = _parallel_class(_RowParallel, type(module.dense))
            module.dense.tp = ctx
        elif isinstance(module, BloomMLP):
            module.exact_tp = 1
            inner = module.dense_h_to_4h.weight.shape[0] // ctx.world
            lo, hi = ctx.rank * inner, (ctx.rank + 1) * inner
            _split(module.dense_h_to_4h, prefix + "dense_h_to_4h.", ctx, 0, lo, hi)
            _split(module.dense_4h_to_h, prefix + "dense_4h_to_h.", ctx, 1, lo, hi)
            module.dense_4h_to_h.__class__ = _parallel_class(_RowParallel, type(module.dense_4h_to_h))
            module.dense_4h_to_h.tp = ctx
        elif isinstance(module, BloomModel):
            emb = module.word_embeddings
            _split(emb, prefix + "word_embeddings.", ctx, 0, ctx.vocab_lo, ctx.vocab_hi)
            emb.__class__ = VocabParallelEmbedding
            emb.tp = ctx
            module.tp = ctx
            module._slopes.clear()
    lm_head = model._modules.get("lm_head")
    if lm_head is not None:
        if lm_head.weight is embedding_weight:  # tied: takes the embedding's split rows in tie_weights
            lm_head.out_features = ctx.vocab_hi - ctx.vocab_lo
            ctx.plan["lm_head.weight"] = ctx.plan["transformer.word_embeddings.weight"]
        else:
            _split(lm_head, "lm_head.", ctx, 0, ctx.vocab_lo, ctx.vocab_hi)
        lm_head.__class__ = _parallel_class(_VocabParallelHead, type(lm_head))
        lm_head.tp = ctx
    model.tp = ctx
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


def local_bytes(model: nn.Module) -> int:
    """Bytes of this rank's parameters and buffers (a tied tensor once)."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            total += t.numel() * t.element_size()
    return total
