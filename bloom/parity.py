"""Run the same inputs through the fused path and the fp32 reference path (and transformers' BLOOM when
it is installed) and print, per layer, how far they part: hidden-state errors, the logits' relative
error, top-1 agreement and greedy tokens in agreement. Exit status 1 past the dtype's thresholds.

The fused path is the model as it runs for a user: the default dispatch (Triton kernels on CUDA, the
measured CPU routes on the CPU), or whatever BLOOM_KERNELS_BACKEND forces (`triton` with
TRITON_INTERPRET=1 runs the kernels on the CPU through Triton's interpreter), in --dtype, int8 with
--int8. The reference path is the same weights as an fp32 copy run with BLOOM_KERNELS_BACKEND=reference
(the eager definitions in bloom_kernels/reference.py). The transformers row runs
transformers.BloomForCausalLM on that fp32 state dict. Without MODEL the weights are random, seeded, in
the shape of --shape (default bloom-560m), so the check runs offline on any machine.

Hidden states are those of `output_hidden_states=True`, as in transformers: the embeddings (after their
LayerNorm), the output of every block but the last, and the last block's output after ln_f. Errors are
taken over the real (unpadded) positions only: max |fused - baseline| and ||fused - baseline|| /
||baseline||. Greedy agreement: both paths generate --new-tokens tokens (eos held off with
min_new_tokens, the same on every path); per row, the number of new tokens equal before the first that
differs (min and mean are reported).

Thresholds (exit status 1 when any is passed, against either baseline):
    dtype       hidden-state rel   logits rel   top-1 agreement
    fp32        1e-4               1e-4         >= 99%
    fp16        5e-3               5e-3         >= 95%
    bf16        3e-2               3e-2         >= 90%
    int8        1e-1               1e-1         >= 80%   (looser of these and the activation dtype's)
Why: fp32 paths differ only in summation order (~1e-7 relative per op: 5e-8 measured on the tiny
shape); 1e-4 leaves room for depth and the sizes of large models, and still catches a wrong mask, scale or
missing bias. A half-precision activation is rounded to 2^-11 (fp16) or 2^-8 (bf16) at every op, and the
rounding errors of the blocks add up: on random bloom-560m weights (CPU, batch 2 x 16) the hidden states
grow from 3e-4 / 2.3e-3 after the embeddings to 1.7e-3 (fp16) / 1.3e-2 (bf16) after 24 blocks, the logits
the same. The thresholds are ~3x that, for the 30-70 blocks of the larger models; a broken op is off by
far more. Weight-only int8 with one scale per output channel puts ~0.5-1% on every product (more where
an outlier sets a row's scale): 1.8e-2 after 24 blocks, 2e-2 on the logits, measured as above; 1e-1
allows real weights' outliers. Top-1 agreement counts argmax flips at near-ties (all 28 positions
agreed in every measurement above): the floors allow rounding's flips, not a broken layer's (which takes
the agreement towards chance). Greedy agreement is reported, not checked: one near-tie flips a token and
every later token follows a different prefix, so it measures the luck of the first tie more than the
kernels.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import sys
import warnings
from dataclasses import dataclass, field

import torch
from torch import Tensor

from bloom_kernels._dispatch import requested_backend, use_backend

from .cli import DTYPE_NAMES, add_device_argument, resolve_device

DEFAULT_BATCH, DEFAULT_SEQ_LEN, DEFAULT_NEW_TOKENS = 2, 32, 8


# --------------------------------------------------------------------------------------------------
# Thresholds
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Thresholds:
    hidden_rel: float  # the largest relative error any layer's hidden states may have
    logits_rel: float  # the largest relative error of the logits
    top1_min: float    # the smallest fraction of real positions whose argmax must agree

    def looser(self, other: "Thresholds") -> "Thresholds":
        return Thresholds(max(self.hidden_rel, other.hidden_rel), max(self.logits_rel, other.logits_rel),
                          min(self.top1_min, other.top1_min))


# why these numbers: see the module docstring
THRESHOLDS = {
    "float32": Thresholds(1e-4, 1e-4, 0.99),
    "float16": Thresholds(5e-3, 5e-3, 0.95),
    "bfloat16": Thresholds(3e-2, 3e-2, 0.90),
    "int8": Thresholds(1e-1, 1e-1, 0.80),
}


def thresholds_for(dtype: torch.dtype, int8: bool) -> Thresholds:
    name = str(dtype).removeprefix("torch.")
    if name not in THRESHOLDS:
        raise ValueError(f"parity has thresholds for float32, float16 and bfloat16 models; got {name}")
    base = THRESHOLDS[name]
    return base.looser(THRESHOLDS["int8"]) if int8 else base


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
@dataclass
class LayerRow:
    name: str         # "embeddings", "layer 3", "layer 23 + ln_f"
    layer: int | None  # the block whose output this is (None: the embeddings)
    max_abs: float
    rel: float


@dataclass
class Comparison:
    """The fused path against one baseline (the fp32 reference, or transformers)."""
    baseline: str
    layers: list[LayerRow]
    logits_max_abs: float
    logits_rel: float
    top1: float            # fraction of real positions whose argmax agrees
    positions: int         # real (unpadded) positions compared
    greedy_min: int        # new tokens equal before the first difference, worst row
    greedy_mean: float
    new_tokens: int


@dataclass
class Failure:
    baseline: str
    metric: str           # "hidden_rel", "logits_rel", "top1"
    layer: int | None     # the block of the first failing hidden state (None: not a layer metric)
    where: str            # the row's name, "logits", "top-1"
    value: float
    limit: float

    def __str__(self) -> str:
        if self.metric == "hidden_rel":
            text = f"{self.where}: hidden-state relative error {self.value:.3g} > {self.limit:.3g}"
        elif self.metric == "logits_rel":
            text = f"logits: relative error {self.value:.3g} > {self.limit:.3g}"
        else:
            text = f"top-1 agreement {self.value:.2%} < {self.limit:.0%}"
        return f"{text} (vs {self.baseline})"


@dataclass
class ParityReport:
    model: str
    dtype: str
    int8: bool
    device: str
    batch: int
    seq_len: int
    fused: str        # what the fused path ran
    reference: str
    thresholds: Thresholds
    comparisons: list[Comparison]
    failures: list[Failure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not self.failures

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["passed"] = self.passed
        out["failures"] = [dict(f, message=str(obj)) for f, obj in zip(out["failures"], self.failures)]
        out["table"] = self.table()
        return out

    def table(self) -> str:
        return format_table(self)


# --------------------------------------------------------------------------------------------------
# The paths
# --------------------------------------------------------------------------------------------------
def is_quantized(model) -> bool:
    from .quantization import QUANTIZATION_KEY

    return bool(getattr(model.config, QUANTIZATION_KEY, None))


def cast_copy(model, dtype: torch.dtype):
    """A new BloomForCausalLM with model's weights in `dtype` (shared, not copied, where they already are
    that dtype). Built on the meta device and assigned, not deep-copied: a deep copy would also copy
    the model's cached decoders (KV caches, captured CUDA graphs)."""
    from .model import BloomForCausalLM

    with torch.device("meta"):
        twin = BloomForCausalLM(copy.deepcopy(model.config))
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
    twin.load_state_dict(state, assign=True)
    twin.tie_weights()
    return twin.eval()


def transformers_twin(reference):
    """transformers.BloomForCausalLM on the reference's fp32 weights (the same tensors, bloom.interop), or
    None if transformers is not importable."""
    try:
        return reference.to_transformers().eval()
    except ImportError:
        return None


def describe_fused(device: torch.device) -> str:
    from bloom_kernels.triton._launch import triton_interpreting

    backend = requested_backend()
    if backend == "reference":
        return "reference ops (BLOOM_KERNELS_BACKEND=reference)"
    if backend == "triton":
        return "Triton kernels" + (" (interpreter)" if device.type == "cpu" and triton_interpreting() else "")
    return "Triton kernels (auto dispatch)" if device.type == "cuda" else "CPU routes (auto dispatch)"


@dataclass
class PathOutput:
    hidden: tuple[Tensor, ...]  # fp32, per hidden state (B, S, E)
    logits: Tensor              # fp32 (B, S, V)
    new_tokens: Tensor          # (B, n)


@torch.inference_mode()
def run_ours(model, input_ids: Tensor, attention_mask: Tensor, new_tokens: int, **generate_kwargs) -> PathOutput:
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    tokens = model.generate(input_ids, attention_mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                            do_sample=False, **generate_kwargs)
    return PathOutput(tuple(h.float() for h in out.hidden_states), out.logits.float(),
                      tokens[:, input_ids.shape[1]:])


@torch.inference_mode()
def run_transformers(model, input_ids: Tensor, attention_mask: Tensor, new_tokens: int) -> PathOutput:
    out = model(input_ids, attention_mask=attention_mask, output_hidden_states=True, use_cache=False)
    with warnings.catch_warnings():  # generation-config chatter, not about parity
        warnings.simplefilter("ignore")
        tokens = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens,
                                min_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=model.config.pad_token_id)
    return PathOutput(tuple(h.float() for h in out.hidden_states), out.logits.float(),
                      tokens[:, input_ids.shape[1]:])


# --------------------------------------------------------------------------------------------------
# The metrics
# --------------------------------------------------------------------------------------------------
def errors(fused: Tensor, baseline: Tensor, real: Tensor) -> tuple[float, float]:
    """(max abs, relative) error over the real positions; norms in float64 (no overflow on large states).
    Padded positions are left out: what a model computes there is not defined."""
    a, b = fused[real].double(), baseline[real].double()
    diff = a - b
    if diff.numel() == 0:
        return 0.0, 0.0
    max_abs = float(diff.abs().max())
    rel = float(diff.norm() / b.norm().clamp_min(torch.finfo(torch.float64).tiny))
    return max_abs, rel


def layer_names(count: int) -> list[tuple[str, int | None]]:
    """Names of output_hidden_states' entries: the embeddings, then each block's output; the last
    block's comes after ln_f."""
    names: list[tuple[str, int | None]] = [("embeddings", None)]
    names += [(f"layer {i}", i) for i in range(count - 2)]
    names.append((f"layer {count - 2} + ln_f", count - 2))
    return names


def greedy_agreement(fused: Tensor, baseline: Tensor) -> list[int]:
    """Per row, the number of leading new tokens that are equal."""
    n = min(fused.shape[1], baseline.shape[1])
    differs = (fused[:, :n].cpu() != baseline[:, :n].cpu())
    return [int(row.nonzero()[0]) if bool(row.any()) else n for row in differs]


def compare_outputs(baseline: str, fused: PathOutput, other: PathOutput, real: Tensor) -> Comparison:
    rows = [LayerRow(name, layer, *errors(a, b.to(a.device), real))
            for (name, layer), a, b in zip(layer_names(len(fused.hidden)), fused.hidden, other.hidden)]
    logits_max, logits_rel = errors(fused.logits, other.logits.to(fused.logits.device), real)
    same = fused.logits.argmax(-1)[real] == other.logits.to(fused.logits.device).argmax(-1)[real]
    agree = greedy_agreement(fused.new_tokens, other.new_tokens)
    return Comparison(baseline, rows, logits_max, logits_rel, float(same.float().mean()) if same.numel() else 1.0,
                      int(same.numel()), min(agree), sum(agree) / len(agree), int(fused.new_tokens.shape[1]))


def find_failures(comparison: Comparison, limits: Thresholds) -> list[Failure]:
    """What passes its threshold, the first failing layer first (where a broken layer shows itself:
    the layers after it inherit its error)."""
    found = [Failure(comparison.baseline, "hidden_rel", row.layer, row.name, row.rel, limits.hidden_rel)
             for row in comparison.layers if not row.rel <= limits.hidden_rel]  # not <=: NaN fails
    if not comparison.logits_rel <= limits.logits_rel:
        found.append(Failure(comparison.baseline, "logits_rel", None, "logits", comparison.logits_rel,
                             limits.logits_rel))
    if not comparison.top1 >= limits.top1_min:
        found.append(Failure(comparison.baseline, "top1", None, "top-1", comparison.top1, limits.top1_min))
    return found


# --------------------------------------------------------------------------------------------------
# The API
# --------------------------------------------------------------------------------------------------
def compare(model, input_ids: Tensor, attention_mask: Tensor | None = None, *, new_tokens: int = DEFAULT_NEW_TOKENS,
            reference=None, with_transformers: bool = True, thresholds: Thresholds | None = None,
            label: str | None = None, notes: list[str] | None = None) -> ParityReport:
    """The parity report of `model` (a bloom BloomForCausalLM, as the user runs it) on `input_ids`
    (B, S) with `attention_mask` (0 on left padding; default all ones).

    `reference`: the fp32 model to compare with, run with BLOOM_KERNELS_BACKEND=reference (default: an
    fp32 copy of `model`'s weights; required for an int8 model, whose float weights are gone).
    `with_transformers`: also compare with transformers' BLOOM on the reference's weights (skipped with
    a note when transformers is not importable). `thresholds`: default by the model's dtype and int8.
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids must be a non-empty (batch, seq) tensor; got "
                         f"{tuple(input_ids.shape) if isinstance(input_ids, Tensor) else type(input_ids).__name__}")
    if not isinstance(new_tokens, int) or new_tokens < 1:
        raise ValueError(f"new_tokens must be an int >= 1; got {new_tokens!r}")
    device = model.device
    input_ids = input_ids.to(device)
    attention_mask = (torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device))
    if tuple(attention_mask.shape) != tuple(input_ids.shape):
        raise ValueError(f"attention_mask must have the shape of input_ids {tuple(input_ids.shape)}; "
                         f"got {tuple(attention_mask.shape)}")
    int8 = is_quantized(model)
    if reference is None:
        if int8:
            raise ValueError("an int8 model has no float weights to build the reference from: pass "
                             "reference= (the fp32 model it was quantised from)")
        reference = cast_copy(model, torch.float32)
    notes = list(notes or [])
    limits = thresholds or thresholds_for(model.dtype, int8)
    real = attention_mask.bool()

    fused_text = describe_fused(device) + f", {str(model.dtype).removeprefix('torch.')}" + (", int8" if int8 else "")
    fused = run_ours(model, input_ids, attention_mask, new_tokens)
    with use_backend("reference"):
        # eager decode: a reference step has nothing to gain from a captured graph
        ref = run_ours(reference, input_ids, attention_mask, new_tokens, decode="eager")
    comparisons = [compare_outputs("reference", fused, ref, real)]

    if with_transformers:
        theirs = transformers_twin(reference)
        if theirs is None:
            notes.append("transformers is not importable: no transformers comparison")
        else:
            comparisons.append(compare_outputs("transformers", fused, run_transformers(
                theirs, input_ids, attention_mask, new_tokens), real))

    report = ParityReport(
        model=label or getattr(model.config, "name_or_path", "") or "model",
        dtype=str(model.dtype).removeprefix("torch."), int8=int8, device=str(device),
        batch=int(input_ids.shape[0]), seq_len=int(input_ids.shape[1]), fused=fused_text,
        reference="reference ops (BLOOM_KERNELS_BACKEND=reference), float32", thresholds=limits,
        comparisons=comparisons, notes=notes)
    for comparison in comparisons:
        report.failures += find_failures(comparison, limits)
    return report


# --------------------------------------------------------------------------------------------------
# The table
# --------------------------------------------------------------------------------------------------
def format_table(report: ParityReport) -> str:
    t = report.thresholds
    lines = [f"bloom parity: {report.model} | {report.dtype}{' int8' if report.int8 else ''} | "
             f"device {report.device} | batch {report.batch} x seq {report.seq_len}",
             f"  fused:     {report.fused}",
             f"  reference: {report.reference}"]
    for c in report.comparisons:
        lines += ["", f"fused vs {c.baseline}",
                  f"  {'hidden state':<22}{'max abs err':>12}{'rel err':>12}{'limit':>10}"]
        lines += [f"  {row.name:<22}{row.max_abs:>12.3e}{row.rel:>12.3e}{t.hidden_rel:>10.0e}"
                  + ("  FAIL" if not row.rel <= t.hidden_rel else "") for row in c.layers]
        lines.append(f"  {'logits':<22}{c.logits_max_abs:>12.3e}{c.logits_rel:>12.3e}{t.logits_rel:>10.0e}"
                     + ("  FAIL" if not c.logits_rel <= t.logits_rel else ""))
        lines.append(f"  {'top-1 agreement':<22}{c.top1:>12.2%}{f'of {c.positions}':>12}{f'>={t.top1_min:.0%}':>10}"
                     + ("  FAIL" if not c.top1 >= t.top1_min else ""))
        lines.append(f"  {'greedy tokens agreeing':<22}{f'min {c.greedy_min}':>12}{f'mean {c.greedy_mean:.1f}':>12}"
                     f"{f'of {c.new_tokens}':>10}  (reported, not checked)")
    lines += [""] + [f"note: {note}" for note in report.notes]
    if report.passed:
        lines.append("PASSED: every metric within the thresholds")
    else:
        lines.append(f"FAILED: {report.failures[0]}")
        lines += [f"        {failure}" for failure in report.failures[1:]]
    return "\n".join(line for i, line in enumerate(lines) if line or (i and lines[i - 1]))


# --------------------------------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------------------------------
def threshold_help() -> str:
    parts = [f"{name} rel {t.hidden_rel:.0e}, top-1 >= {t.top1_min:.0%}"
             for name, t in zip(("fp32", "fp16", "bf16", "int8"), THRESHOLDS.values())]
    return ("thresholds (exit status 1 past any, against the reference or transformers): "
            + "; ".join(parts).replace("e-0", "e-")
            + " (rel: hidden states of every layer and logits alike; int8 takes the looser of its own and its "
            "dtype's; greedy agreement is reported, not checked). Why: see bloom/parity.py.")


def add_arguments(parser) -> None:
    from .shapes import SHAPES

    parser.epilog = threshold_help()
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="a local directory or hub id (default: random weights of --shape)")
    parser.add_argument("--shape", choices=list(SHAPES), default=None,
                        help="random weights of this shape when no MODEL is given (default: bloom-560m)")
    parser.add_argument("--dtype", choices=sorted(DTYPE_NAMES), default=None,
                        help="the fused path's dtype (default: bf16 on a GPU, fp32 on the CPU); the "
                             "reference is always fp32")
    parser.add_argument("--int8", action="store_true", help="quantise the fused path's weights to int8")
    add_device_argument(parser)
    parser.add_argument("--prompt", default=None, metavar="TEXT",
                        help="tokenised with MODEL's tokenizer (needs MODEL; default: random token ids)")
    parser.add_argument("--batch", type=int, default=None, metavar="B",
                        help=f"rows of random ids, left-padded to different lengths (default {DEFAULT_BATCH})")
    parser.add_argument("--seq-len", type=int, default=None, metavar="N",
                        help=f"length of the random ids (default {DEFAULT_SEQ_LEN})")
    parser.add_argument("--new-tokens", type=int, default=DEFAULT_NEW_TOKENS, metavar="N",
                        help=f"greedy tokens each path generates (default {DEFAULT_NEW_TOKENS})")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights and ids (default 0)")
    parser.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    parser.add_argument("--json", default=None, metavar="FILE", help="also write the report as JSON")


def check_args(args) -> None:
    """Bad values as one line naming the argument, what it takes and what it got."""
    for name in ("batch", "seq_len", "new_tokens"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1; got {value}")
    if args.prompt is not None and args.model is None:
        raise ValueError("--prompt needs MODEL (its tokenizer); random weights take random ids "
                         "(--batch/--seq-len)")
    if args.prompt is not None and (args.batch is not None or args.seq_len is not None):
        raise ValueError("--prompt and --batch/--seq-len are exclusive: the prompt is one row of its own length")
    if args.model is not None and args.shape is not None:
        raise ValueError(f"--shape {args.shape} is for random weights; MODEL {args.model!r} has its own shape")


def load_reference(args, device: torch.device):
    """(fp32 model, label): MODEL loaded, or random weights of --shape."""
    if args.model is not None:
        from .model import BloomForCausalLM

        return BloomForCausalLM.from_pretrained(args.model, torch_dtype="float32", device=device).eval(), args.model
    from .shapes import random_model

    shape = args.shape or "bloom-560m"
    return random_model(shape, device=device, seed=args.seed), f"shape {shape} (random weights, seed {args.seed})"


def random_inputs(vocab: int, batch: int, seq_len: int, pad_id: int, seed: int, device) -> tuple[Tensor, Tensor]:
    """Random ids, row i left-padded by i * seq_len // (2 * batch) (rows of different lengths, as a
    batched prompt has; every row keeps at least half its length)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    for i in range(batch):
        pad = i * seq_len // (2 * batch)
        ids[i, :pad], mask[i, :pad] = pad_id, 0
    return ids.to(device), mask.to(device)


def prompt_inputs(args, device) -> tuple[Tensor, Tensor]:
    from .tokenization import BloomTokenizerFast

    encoded = BloomTokenizerFast.from_pretrained(args.model)(args.prompt, return_tensors="pt")
    if encoded["input_ids"].shape[1] == 0:
        raise ValueError("--prompt is empty after tokenisation")
    return encoded["input_ids"].to(device), encoded["attention_mask"].to(device)


def run(args) -> int:
    check_args(args)
    device = resolve_device(args.device)
    dtype = getattr(torch, DTYPE_NAMES[args.dtype] if args.dtype else
                    ("bfloat16" if device.type == "cuda" else "float32"))
    reference, label = load_reference(args, device)
    fused = cast_copy(reference, dtype)
    if args.int8:
        from .quantization import quantize_int8

        fused = quantize_int8(fused)
    if args.prompt is not None:
        ids, mask = prompt_inputs(args, device)
    else:
        ids, mask = random_inputs(reference.config.vocab_size, args.batch or DEFAULT_BATCH,
                                  args.seq_len or DEFAULT_SEQ_LEN, reference.config.pad_token_id or 0, args.seed, device)
    report = compare(fused, ids, mask, new_tokens=args.new_tokens, reference=reference,
                     with_transformers=not args.no_transformers, label=label)
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report.to_dict(), f, indent=2)
            f.write("\n")
    sys.stdout.flush()
    return 0 if report.passed else 1
