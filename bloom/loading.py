"""Checkpoints: find, validate and load BLOOM weights; save them in transformers' format.

Loading builds the model on the `meta` device (no random init), then reads the checkpoint one tensor
at a time, converting each straight to the requested dtype/device (and, with quantization="int8",
quantising each Linear weight as it arrives) — peak CPU memory is about one shard. safetensors is read
first; `pytorch_model.bin` only through `torch.load(weights_only=True)`. Every problem is reported
before a model is returned: nothing half-loaded escapes. The one exception to "no random init": a task
head absent from a base-model checkpoint is initialised as transformers does, with a warning.
"""

from __future__ import annotations

import json
import re
import warnings
import zipfile
from pathlib import Path
from typing import Iterable, Iterator

import torch
from torch import Tensor, nn

from .config import BloomConfig, parse_dtype
from .hub import HubOptions, resolve_file

SAFE_WEIGHTS = "model.safetensors"
SAFE_INDEX = "model.safetensors.index.json"
TORCH_WEIGHTS = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
BASE_PREFIX = "transformer."
# Heads of the task models: absent from base checkpoints, ignored when loading a base model.
HEAD_PREFIXES = ("lm_head.", "score.", "classifier.", "qa_outputs.")

class CheckpointError(ValueError):
    """The checkpoint is corrupt, incomplete, or does not match the model's config."""


# --------------------------------------------------------------------------------------------------
# Finding the files
# --------------------------------------------------------------------------------------------------
# (single file, index of shards, format) in the order a checkpoint folder or hub repo is searched
WEIGHT_FORMATS = ((SAFE_WEIGHTS, SAFE_INDEX, "safetensors"), (TORCH_WEIGHTS, TORCH_INDEX, "torch"))


def find_weight_files(name_or_path, hub: HubOptions, formats=WEIGHT_FORMATS) -> tuple[list[Path], str]:
    """The checkpoint's weight files and their format: the first of `formats` present, its single file
    before its index (bloom.flax passes its own list, with transformers' Flax msgpack)."""
    for single_name, index_name, fmt in formats:
        single = resolve_file(name_or_path, single_name, hub, required=False)
        if single is not None:
            return [single], fmt
        index = resolve_file(name_or_path, index_name, hub, required=False)
        if index is not None:
            return [resolve_file(name_or_path, shard, hub) for shard in read_index(index)], fmt
    names = [name for single_name, index_name, _ in formats for name in (single_name, index_name)]
    raise FileNotFoundError(f"no weights found in {name_or_path}: looked for {', '.join(names[:-1])} and {names[-1]}")


def read_index(path: Path) -> list[str]:
    """Shard file names of a sharded checkpoint's index, in order."""
    try:
        weight_map = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as err:
        raise CheckpointError(f"{path.name} is not a valid checkpoint index ({err})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
        raise CheckpointError(f"{path.name} is not a valid checkpoint index (weight_map must map tensor names "
                              f"to file names; got {type(weight_map).__name__})")
    shards = sorted(set(weight_map.values()))
    for shard in shards:
        if Path(shard).name != shard:  # an index must not point outside its directory
            raise CheckpointError(f"{path.name} names an invalid shard file {shard!r}")
    return shards


# --------------------------------------------------------------------------------------------------
# Reading tensors
# --------------------------------------------------------------------------------------------------
def iter_checkpoint(files: list[Path], fmt: str, lazy: bool = False) -> Iterator[tuple[Path, str, Tensor]]:
    """(file, name, tensor) for every tensor, one file open at a time. `lazy` (safetensors): a
    bloom.parallel.LazyTensor instead, read (whole or a slice) only when asked, before the next one."""
    for path in files:
        if fmt == "safetensors":
            from safetensors import SafetensorError, safe_open

            try:
                with safe_open(str(path), framework="pt", device="cpu") as reader:
                    for name in reader.keys():
                        if lazy:
                            from .parallel import LazyTensor

                            yield path, name, LazyTensor(reader, name)
                        else:
                            yield path, name, reader.get_tensor(name)
            except SafetensorError as err:
                raise CheckpointError(f"{path.name} is truncated or corrupt: {err}") from None
        else:
            try:
                # mmap only for torch's zip format; the legacy (pre-1.6) format is read whole
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
            except Exception as err:  # any unpickling failure: corrupt, truncated, or unsafe content
                raise CheckpointError(f"{path.name} cannot be read safely: {err}") from None
            if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, Tensor)
                                                      for k, v in state.items()):
                raise CheckpointError(f"{path.name} is not a state dict (a mapping of names to tensors); "
                                      f"it holds a {type(state).__name__}")
            for name, tensor in state.items():
                yield path, name, tensor
            del state


def checkpoint_dtype(config: BloomConfig, tensors: Iterable[Tensor]) -> torch.dtype:
    """The dtype the checkpoint was saved in: config.dtype (a torch.dtype: BloomConfig parses it), else
    the dtype of the first float tensor of `tensors` (read lazily), else float32."""
    if isinstance(config.dtype, torch.dtype):
        return config.dtype
    return next((t.dtype for t in tensors if t.is_floating_point()), torch.float32)


# --------------------------------------------------------------------------------------------------
# Names
# --------------------------------------------------------------------------------------------------
def map_name(name: str, model_keys: set[str]) -> str | None:
    """The model's name for a checkpoint tensor (None: a task head this model does not have)."""
    if name in model_keys:
        return name
    if BASE_PREFIX + name in model_keys:  # base-model checkpoint (bigscience) into a task model
        return BASE_PREFIX + name
    if name.startswith(BASE_PREFIX) and name[len(BASE_PREFIX):] in model_keys:  # task ckpt -> base
        return name[len(BASE_PREFIX):]
    if name.startswith(HEAD_PREFIXES):
        return None
    return name  # unknown: reported as unexpected


def tied_keys(model: nn.Module) -> set[str]:
    """Names whose parameter is shared with another name (lm_head -> word_embeddings)."""
    seen: dict[int, str] = {}
    tied = set()
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) in seen:
            tied.add(name)
        seen.setdefault(id(tensor), name)
    return tied


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def resolve_config(name_or_path, config: BloomConfig | None, state_dict, hub: HubOptions,
                   overrides: dict) -> BloomConfig:
    """The config a from_pretrained loads with: `config` (with the `overrides` of its fields), else the
    checkpoint's config.json; name_or_path=None (weights given as state_dict=) needs config=."""
    if name_or_path is None and (config is None or state_dict is None):
        raise ValueError("from_pretrained(None, ...) needs both config= and state_dict=")
    if config is None:
        return BloomConfig._from_hub(name_or_path, hub, **overrides)
    return BloomConfig.from_dict(config.to_dict(), **overrides) if overrides else config


def load_pretrained(cls, name_or_path, *, config: BloomConfig | None = None, torch_dtype=None,
                    dtype=None, device=None, hub: HubOptions = HubOptions(), quantization: str | None = None,
                    ignore_mismatched_sizes: bool = False, state_dict: dict | None = None,
                    tensor_parallel: bool = False, **config_overrides) -> tuple[nn.Module, dict]:
    """Build `cls` on the meta device and fill it from a checkpoint (see module docstring); `hub` says
    how to fetch files when `name_or_path` is a hub id. Returns the model and transformers' loading
    info: {"missing_keys" (initialised afresh), "unexpected_keys", "mismatched_keys" ((name, shape in
    the checkpoint, shape in the model), with ignore_mismatched_sizes), "error_msgs"}. `state_dict`:
    the tensors to load instead of the checkpoint's files (name_or_path may then be None).

    quantization="int8" quantises every Linear (lm_head included) tensor by tensor while loading; a
    checkpoint saved from a quantised model is recognised from its config and loads as int8 anyway.
    tensor_parallel=True (inside a torch.distributed process group): this rank's slices only, read as
    slices (bloom/parallel.py).
    """
    from .quantization import QUANTIZATION_KEY, quantizing_converter, swap_to_empty_int8

    if quantization not in (None, "int8"):
        raise ValueError(f"quantization must be None or 'int8'; got {quantization!r}")
    config = resolve_config(name_or_path, config, state_dict, hub, config_overrides)
    if state_dict is not None:
        files, fmt = [], "state_dict"
        tensors = [(Path("state_dict"), name, tensor) for name, tensor in state_dict.items()]
    else:
        files, fmt = find_weight_files(name_or_path, hub)
        tensors = None
    target = parse_dtype(dtype if dtype is not None else torch_dtype)
    if target == "auto":
        target = checkpoint_dtype(config, state_dict.values() if state_dict is not None
                                  else (t for _, _, t in iter_checkpoint(files[:1], fmt)))
    target = target or torch.float32
    if not isinstance(tensor_parallel, bool):
        raise ValueError(f"tensor_parallel must be True or False; got {tensor_parallel!r}")
    tp = None
    if tensor_parallel:
        from .parallel import TPContext

        tp = TPContext.create(config, device)  # the clear errors: no group, heads, devices
        device = tp.device
    device = torch.device(device) if device is not None else torch.device("cpu")

    with torch.device("meta"):
        model = cls(config)
    convert = None
    saved_quantization = getattr(config, QUANTIZATION_KEY, None)
    if saved_quantization:  # an int8 checkpoint: int8 tensors arrive as they are
        swap_to_empty_int8(model, saved_quantization.get("include_lm_head", True))
    elif quantization == "int8":
        names = swap_to_empty_int8(model, include_lm_head=True)
        tied_head = "lm_head" in names and getattr(config, "tie_word_embeddings", True)
        convert = quantizing_converter(names, tied_head, None if tp is None else tp.quantizer())
    model.to(target)  # on meta: only sets the dtypes each tensor will be cast to
    if tp is not None:
        from .parallel import tensor_parallel as split

        split(model, tp)  # on meta: the local shapes, and tp.plan (what to read of each tensor)
    expected = dict(model.state_dict())
    expected_names = set(expected)
    tied = tied_keys(model) if getattr(config, "tie_word_embeddings", True) else set()
    loaded: set[str] = set()
    unexpected: list[str] = []
    mismatched: list[tuple[str, tuple, tuple]] = []

    progress = _ShardProgress(files, name_or_path)
    for path, name, tensor in (tensors if tensors is not None else iter_checkpoint(files, fmt, lazy=tp is not None)):
        progress.update_file(path)
        key = map_name(name, expected_names)
        if key is None:
            continue
        if key not in expected:
            unexpected.append(name)
            continue
        want = tuple(expected[key].shape) if tp is None else tp.full_shape(key, expected[key].shape)
        if tuple(tensor.shape) != want:
            if ignore_mismatched_sizes:
                mismatched.append((key, tuple(tensor.shape), want))
                continue
            raise CheckpointError(
                f"{path.name}: tensor {name} has shape {tuple(tensor.shape)} but the config "
                f"({config.hidden_size=}, {config.n_head=}, {config.vocab_size=}) expects "
                f"{want} — does the config match the weights? "
                "(ignore_mismatched_sizes=True initialises such tensors afresh)"
            )
        if tp is not None:
            tensor = tp.take(key, tensor)  # this rank's slice (read as a slice from safetensors)
        if tensor.is_floating_point() and expected[key].is_floating_point():
            placed = {key: tensor.to(device=device, dtype=expected[key].dtype)}
        elif tensor.dtype == expected[key].dtype or convert is not None:
            placed = {key: tensor.to(device=device)}
        else:
            raise CheckpointError(f"{path.name}: tensor {name} has dtype {tensor.dtype}, expected "
                                  f"{expected[key].dtype}")
        if convert is not None:
            placed = convert(model, key, placed[key])
        model.load_state_dict(placed, strict=False, assign=True)
        loaded.update(placed)
    progress.close()

    mismatched_names = {key for key, _, _ in mismatched}
    missing = sorted(expected_names - loaded - tied - mismatched_names)
    head_only = [k for k in missing if k.startswith(HEAD_PREFIXES) and k != "lm_head.weight"]
    real_missing = [k for k in missing if k not in head_only]
    if unexpected or real_missing:
        raise CheckpointError(
            f"checkpoint {name_or_path} does not match {cls.__name__} with this config:"
            + (f"\n  missing keys: {', '.join(real_missing)}" if real_missing else "")
            + (f"\n  unexpected keys: {', '.join(sorted(unexpected))}" if unexpected else "")
        )
    if head_only:  # a task head fine-tuned from a base checkpoint starts from random weights
        warnings.warn(f"newly initialised (not in the checkpoint): {', '.join(head_only)}", stacklevel=3)
    if mismatched:
        warnings.warn("newly initialised (shape in the checkpoint differs, ignore_mismatched_sizes=True): "
                      + ", ".join(f"{k} {ckpt} -> {want}" for k, ckpt, want in mismatched), stacklevel=3)
    _materialise_head(model, head_only + sorted(mismatched_names), device, target)
    if tp is not None:  # replicated tensors initialised afresh: rank 0's on every rank
        for key in head_only + sorted(mismatched_names):
            if key not in tp.plan:
                tp.broadcast_(model.get_parameter(key))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    model.config.dtype = target
    if name_or_path is not None and hasattr(model, "generation_config"):
        from .generation_config import GenerationConfig

        saved = GenerationConfig.from_pretrained(name_or_path, hub, required=False)
        if saved is not None:
            model.generation_config = saved
    # as transformers 5 reports them: sets, shapes as torch.Size
    info = {"missing_keys": set(head_only), "unexpected_keys": set(),
            "mismatched_keys": {(k, torch.Size(ckpt), torch.Size(want)) for k, ckpt, want in mismatched},
            "error_msgs": []}
    return model.eval(), info


def _materialise_head(model: nn.Module, names: list[str], device, dtype) -> None:
    std = model.config.initializer_range
    for name in names:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, attr)
        new = torch.empty(old.shape, device=device, dtype=dtype)
        new.normal_(0.0, std) if attr == "weight" else new.zero_()
        setattr(module, attr, nn.Parameter(new, requires_grad=old.requires_grad))


class _ShardProgress:
    """A tqdm bar over shards, only for multi-shard checkpoints."""

    def __init__(self, files: list[Path], name) -> None:
        self.bar = None
        self.current = None
        if len(files) > 1:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=len(files), desc=f"Loading {Path(str(name)).name}", unit="shard")

    def update_file(self, path: Path) -> None:
        if path != self.current:
            if self.bar is not None and self.current is not None:
                self.bar.update(1)
            self.current = path

    def close(self) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.close()


# --------------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------------
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMG]i?B|B)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}


def parse_size(value: int | str) -> int:
    """max_shard_size in bytes (> 0): an int, or a size like '5GB' / '200MB' / '1GiB'."""
    if isinstance(value, str) and (match := _SIZE.match(value)):
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "B").lower()])
    elif isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        raise ValueError(f"max_shard_size must be bytes or a size like '5GB' or '200MB'; got {value!r}")
    if size <= 0:
        raise ValueError(f"max_shard_size must be more than 0 bytes; got {value!r}")
    return size


def write_safetensors(state: dict[str, Tensor], directory: Path, limit: int) -> None:
    """state as model.safetensors, or as shards of at most `limit` bytes (a tensor larger than that gets a
    shard of its own) + model.safetensors.index.json, transformers' layout; other shards removed."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    shards: list[dict[str, Tensor]] = [{}]
    size = 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > limit:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes

    for stale in list(directory.glob("model*.safetensors")) + list(directory.glob(SAFE_INDEX)):
        stale.unlink()  # a previous save with another sharding must not linger
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(directory / SAFE_WEIGHTS), metadata=metadata)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(directory / file), metadata=metadata)
        weight_map.update({name: file for name in shard})
    total = sum(t.numel() * t.element_size() for t in state.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / SAFE_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def save_pretrained(model: nn.Module, save_directory, max_shard_size: int | str = "5GB") -> None:
    """config.json + model.safetensors (or shards + model.safetensors.index.json past the limit). A
    tensor-parallel model (every rank calls this) writes the whole checkpoint once, from rank 0."""
    directory = Path(save_directory)
    limit = parse_size(max_shard_size)
    tied = tied_keys(model) if getattr(model.config, "tie_word_embeddings", True) else set()
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k not in tied}
    tp = getattr(model, "tp", None)
    if tp is not None:  # tensor parallel: the whole tensors gathered on rank 0, which alone writes
        state = {k: tp.gather_full(k, v) if k in tp.plan else v.cpu() for k, v in state.items()}
        if tp.rank != 0:
            tp.barrier()
            return
        try:
            _write_checkpoint(model, state, directory, limit)
        finally:
            tp.barrier()
        return
    _write_checkpoint(model, state, directory, limit)


def _write_checkpoint(model: nn.Module, state: dict[str, Tensor], directory: Path, limit: int) -> None:
    write_safetensors(state, directory, limit)
    config = BloomConfig.from_dict(model.config.to_dict())
    config.architectures = [type(model).__name__]
    float_dtypes = [p.dtype for p in model.parameters() if p.is_floating_point()]
    config.dtype = str(float_dtypes[0]).removeprefix("torch.") if float_dtypes else None
    config.save_pretrained(directory)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(directory)
