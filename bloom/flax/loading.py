"""Flax checkpoints: read the PyTorch model's checkpoints (safetensors, sharded or not; pytorch_model.bin
through torch.load(weights_only=True)) and transformers 4.x's `flax_model.msgpack` (flax's msgpack
restore: data only, no pickle); write safetensors the PyTorch model and transformers load.

Files and tensor names go through bloom/loading.py (the same search order, prefix mapping and
CheckpointError messages as the PyTorch side); the expected tree comes from `jax.eval_shape` of the
module's init, so nothing is initialised at random. Tensors are converted one at a time.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax.serialization import msgpack_restore
from flax.traverse_util import flatten_dict, unflatten_dict

from ..config import BloomConfig
from ..hub import HubOptions
from ..loading import (WEIGHT_FORMATS, CheckpointError, find_weight_files, iter_checkpoint, map_name, parse_size,
                       write_safetensors)
from .convert import array_to_tensor, tensor_to_array, torch_name, torch_shape

FLAX_WEIGHTS = "flax_model.msgpack"
FLAX_INDEX = "flax_model.msgpack.index.json"
CHECKPOINT_FORMATS = (WEIGHT_FORMATS[0], (FLAX_WEIGHTS, FLAX_INDEX, "msgpack"), *WEIGHT_FORMATS[1:])
BASE_KEY = "transformer"  # the base model's subtree in a causal LM (transformers' base_model_prefix)


def find_checkpoint(name_or_path, hub: HubOptions) -> tuple[list[Path], str]:
    """The weight files and their format: safetensors first (the PyTorch model's checkpoints), then
    transformers' Flax msgpack, then pytorch_model.bin."""
    return find_weight_files(name_or_path, hub, formats=CHECKPOINT_FORMATS)


def expected_params(module, input_ids_shape=(1, 1)) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    """The module's parameters, flattened, as shapes and dtypes (nothing computed or allocated)."""
    ids = jnp.zeros(input_ids_shape, jnp.int32)
    shapes = jax.eval_shape(lambda: module.init(jax.random.PRNGKey(0), ids)["params"])
    return flatten_dict(shapes)


def load_params(module, config: BloomConfig, files: list[Path], fmt: str, name_or_path, param_dtype,
                state_dict: dict | None = None) -> dict:
    """The parameter tree of `module` (FlaxBloomModule or the causal LM's) from checkpoint files, or
    from `state_dict` (PyTorch names -> tensors, e.g. a bloom.BloomForCausalLM's) when given."""
    expected = expected_params(module)

    def place(array):  # one tensor at a time onto the device, cast once: the host copy is freed at once
        return jnp.asarray(array, dtype=param_dtype)

    if fmt == "msgpack":
        found = _read_msgpack(files, expected, place)
    else:
        tensors = (((Path("state_dict"), name, t) for name, t in state_dict.items()) if state_dict is not None
                   else iter_checkpoint(files, fmt))
        found = _read_torch_format(tensors, expected, config, place)
    missing = sorted("/".join(p) for p in expected if p not in found)
    if missing:
        raise CheckpointError(f"checkpoint {name_or_path} does not match {type(module).__name__} with this "
                              f"config:\n  missing keys: {', '.join(missing)}")
    return unflatten_dict(found)


def _read_torch_format(tensors, expected, config, place) -> dict[tuple[str, ...], jax.Array]:
    by_name = {torch_name(path)[0]: path for path in expected}
    names = set(by_name)
    found: dict[tuple[str, ...], jax.Array] = {}
    unexpected = []
    for file, name, tensor in tensors:
        key = map_name(name, names)  # adds / strips "transformer.", drops other heads' tensors
        if key is None:
            continue
        if key not in by_name:
            unexpected.append(name)
            continue
        path = by_name[key]
        want = torch_shape(path, expected[path].shape)
        if tuple(tensor.shape) != want:
            raise CheckpointError(
                f"{file.name}: tensor {name} has shape {tuple(tensor.shape)} but the config "
                f"({config.hidden_size=}, {config.n_head=}, {config.vocab_size=}) expects {want} — does the "
                "config match the weights?")
        if not tensor.is_floating_point():
            raise CheckpointError(f"{file.name}: tensor {name} has dtype {tensor.dtype}, expected a float dtype "
                                  "(an int8-quantised checkpoint loads in the PyTorch model only)")
        found[path] = place(tensor_to_array(tensor, transpose=torch_name(path)[1]))
    if unexpected:
        raise CheckpointError(f"checkpoint does not match the model with this config:\n  unexpected keys: "
                              f"{', '.join(sorted(unexpected))}")
    return found


def _read_msgpack(files, expected, place) -> dict[tuple[str, ...], jax.Array]:
    flat: dict[tuple[str, ...], np.ndarray] = {}
    for file in files:  # a sharded checkpoint: each shard holds part of the same nested tree
        try:
            state = msgpack_restore(Path(file).read_bytes())
        except Exception as err:  # msgpack's own errors: truncated or not a msgpack file
            raise CheckpointError(f"{Path(file).name} is not a readable Flax msgpack checkpoint: {err}") from None
        if not isinstance(state, dict):
            raise CheckpointError(f"{Path(file).name} holds a {type(state).__name__}, not a parameter tree")
        flat.update(flatten_dict(state))
    causal = any(p[0] == BASE_KEY for p in expected)
    stored_causal = any(p[0] == BASE_KEY for p in flat)
    found, unexpected = {}, []
    for path, array in flat.items():
        if stored_causal and not causal:  # a causal LM's file into the base model: its subtree only
            if path[0] != BASE_KEY:
                continue  # lm_head
            path = path[1:]
        elif causal and not stored_causal:  # a base model's file into a causal LM
            path = (BASE_KEY, *path)
        if path not in expected:
            unexpected.append("/".join(path))
            continue
        if tuple(np.shape(array)) != tuple(expected[path].shape):
            raise CheckpointError(f"{Path(files[0]).name}: parameter {'/'.join(path)} has shape "
                                  f"{tuple(np.shape(array))}, the config expects {tuple(expected[path].shape)}")
        found[path] = place(array)
    if unexpected:
        raise CheckpointError(f"checkpoint does not match the model with this config:\n  unexpected keys: "
                              f"{', '.join(sorted(unexpected))}")
    return found


def save_params(params: dict, config: BloomConfig, directory, architecture: str,
                max_shard_size: int | str = "5GB") -> None:
    """config.json + model.safetensors (or shards and an index) under PyTorch BLOOM's names."""
    directory = Path(directory)
    limit = parse_size(max_shard_size)
    state = {}
    for path, array in flatten_dict(params).items():
        name, transpose = torch_name(path)
        state[name] = array_to_tensor(array, transpose)
    write_safetensors(state, directory, limit)

    saved = BloomConfig.from_dict(config.to_dict())
    saved.architectures = [architecture]
    dtypes = {str(t.dtype).removeprefix("torch.") for t in state.values()}
    saved.dtype = dtypes.pop() if len(dtypes) == 1 else None
    saved.save_pretrained(directory)
