"""BloomConfig: transformers' BloomConfig fields, defaults and JSON format, without transformers."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import torch

from .hub import HubOptions, resolve_file

CONFIG_NAME = "config.json"

# Every field of transformers' BloomConfig, with its default (same order as transformers).
BLOOM_DEFAULTS: dict[str, Any] = {
    "vocab_size": 250880,
    "hidden_size": 64,
    "n_layer": 2,
    "n_head": 8,
    "layer_norm_epsilon": 1e-5,
    "initializer_range": 0.02,
    "use_cache": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": None,
    "apply_residual_connection_post_layernorm": False,
    "hidden_dropout": 0.0,
    "attention_dropout": 0.0,
    "pretraining_tp": 1,
    "slow_but_exact": False,
    "tie_word_embeddings": True,
}

# The generic fields every transformers config carries (PretrainedConfig), with their defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "architectures": None,
    "problem_type": None,
    "dtype": None,
}

# Other spellings found in transformers and in the bigscience config.json files.
# dtype names accepted wherever a dtype is given (config, from_pretrained, the CLI)
DTYPES = {
    "float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
}


def parse_dtype(value: Any, name: str = "torch_dtype") -> torch.dtype | str | None:
    """A torch.dtype from a dtype or its name (None and 'auto' kept); ValueError naming `name`."""
    if value is None or value == "auto" or isinstance(value, torch.dtype):
        return value
    if isinstance(value, str) and value.removeprefix("torch.") in DTYPES:
        return DTYPES[value.removeprefix("torch.")]
    raise ValueError(f"{name} must be None, 'auto', a torch.dtype or one of {sorted(DTYPES)}; got {value!r}")


def read_json_object(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON object in `path`; ValueError naming the file if it is not valid JSON or not an object."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _int_keys(id2label) -> dict[int, Any]:
    """id2label with int keys (JSON stores them as strings); ValueError naming it otherwise."""
    if not isinstance(id2label, dict):
        raise ValueError(f"BloomConfig.id2label must be a dict of label index -> name, got {type(id2label).__name__}")
    out = {}
    for key, name in id2label.items():
        try:
            index = int(key) if not isinstance(key, (bool, float)) else None
        except (TypeError, ValueError):
            index = None
        if index is None or index < 0:
            raise ValueError(f"BloomConfig.id2label keys must be label indices (ints >= 0); got key {key!r}")
        out[index] = name
    return out


ALIASES = {"num_hidden_layers": "n_layer", "num_attention_heads": "n_head", "n_embed": "hidden_size"}


class BloomConfig:
    """Configuration of a BLOOM model; accepts every key of a transformers `config.to_dict()`.

    Unknown keys are kept as attributes (and written back by `to_dict`). `num_labels` follows
    `id2label`. Invalid values raise ValueError naming the field.
    """

    model_type = "bloom"

    def __init__(self, **kwargs: Any) -> None:
        kwargs = dict(kwargs)
        for alias, field in ALIASES.items():
            if alias in kwargs:
                value = kwargs.pop(alias)
                if field in kwargs and kwargs[field] != value:
                    raise ValueError(f"{alias}={value!r} conflicts with {field}={kwargs[field]!r}")
                kwargs[field] = value
        if "torch_dtype" in kwargs:  # transformers 4.x spelling
            torch_dtype = kwargs.pop("torch_dtype")
            if kwargs.get("dtype") is None:
                kwargs["dtype"] = torch_dtype
            elif parse_dtype(torch_dtype, "torch_dtype") != parse_dtype(kwargs["dtype"], "dtype"):
                raise ValueError(f"torch_dtype={torch_dtype!r} conflicts with dtype={kwargs['dtype']!r}")
        kwargs.pop("model_type", None)

        for name, default in {**BLOOM_DEFAULTS, **COMMON_DEFAULTS}.items():
            setattr(self, name, copy.deepcopy(kwargs.pop(name, default)))

        id2label = kwargs.pop("id2label", None)
        label2id = kwargs.pop("label2id", None)
        num_labels = kwargs.pop("num_labels", None)
        if num_labels is not None and (isinstance(num_labels, bool) or not isinstance(num_labels, int)
                                       or num_labels < 0):
            raise ValueError(f"BloomConfig.num_labels must be an int >= 0, got {num_labels!r}")
        if id2label is None:
            id2label = {i: f"LABEL_{i}" for i in range(2 if num_labels is None else num_labels)}
        self.id2label = _int_keys(id2label)  # JSON turns int keys into strings
        self.label2id = dict(label2id) if label2id is not None else {v: k for k, v in self.id2label.items()}

        for name, value in kwargs.items():  # keys we don't know: kept, as transformers does
            attr = getattr(type(self), name, None)
            if isinstance(attr, property) and attr.fset is None:
                continue  # a derived value (head_dim): recomputed, not stored
            setattr(self, name, value)
        self.validate()

    # --- aliases ----------------------------------------------------------------------------------
    @property
    def num_hidden_layers(self) -> int:
        return self.n_layer

    @num_hidden_layers.setter
    def num_hidden_layers(self, value: int) -> None:
        self.n_layer = value

    @property
    def num_attention_heads(self) -> int:
        return self.n_head

    @num_attention_heads.setter
    def num_attention_heads(self, value: int) -> None:
        self.n_head = value

    @property
    def n_embed(self) -> int:
        return self.hidden_size

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.n_head

    @property
    def dtype(self) -> torch.dtype | str | None:
        """The weights' dtype as a torch.dtype (None: not said; 'auto' kept as given); saved by name."""
        return self._dtype

    @dtype.setter
    def dtype(self, value: Any) -> None:
        self._dtype = parse_dtype(value, "BloomConfig.dtype")

    @property
    def torch_dtype(self) -> torch.dtype | str | None:  # transformers 4.x name
        return self._dtype

    @torch_dtype.setter
    def torch_dtype(self, value: Any) -> None:
        self.dtype = value

    @property
    def num_labels(self) -> int:
        return len(self.id2label)

    @num_labels.setter
    def num_labels(self, value: int) -> None:
        if value != len(self.id2label):
            self.id2label = {i: f"LABEL_{i}" for i in range(value)}
            self.label2id = {v: k for k, v in self.id2label.items()}

    # --- validation ---------------------------------------------------------------------------------
    def validate(self) -> None:
        def positive_int(name: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"BloomConfig.{name} must be a positive int, got {value!r}")

        for name in ("vocab_size", "hidden_size", "n_layer", "n_head", "pretraining_tp"):
            positive_int(name)
        if self.hidden_size % self.n_head != 0:
            raise ValueError(
                f"BloomConfig.hidden_size ({self.hidden_size}) must be divisible by n_head ({self.n_head})"
            )
        for name, default in {**BLOOM_DEFAULTS, **COMMON_DEFAULTS}.items():
            # a flag given as a string ("False" is truthy) would silently switch a path on
            if isinstance(default, bool) and not isinstance(getattr(self, name), bool):
                raise ValueError(f"BloomConfig.{name} must be True or False, got {getattr(self, name)!r}")
        value = self.initializer_range
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value < float("inf"):
            raise ValueError(f"BloomConfig.initializer_range must be a finite number >= 0, got {value!r}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not 0.0 <= value < 1.0:
                raise ValueError(f"BloomConfig.{name} must be a probability in [0, 1), got {value!r}")
        if not isinstance(self.layer_norm_epsilon, (int, float)) or not self.layer_norm_epsilon > 0:
            raise ValueError(f"BloomConfig.layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon!r}")
        for name in ("bos_token_id", "pad_token_id"):
            value = getattr(self, name)
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(f"BloomConfig.{name} must be None or in [0, {self.vocab_size}), got {value!r}")
        eos = self.eos_token_id
        for value in eos if isinstance(eos, (list, tuple)) else [eos]:
            if value is not None and not (isinstance(value, int) and 0 <= value < self.vocab_size):
                raise ValueError(
                    f"BloomConfig.eos_token_id must be None, an id or a list of ids in [0, {self.vocab_size}),"
                    f" got {eos!r}"
                )

    # --- (de)serialisation ------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = {k: copy.deepcopy(v) for k, v in vars(self).items() if not k.startswith("_")}
        dtype = self.dtype
        out["dtype"] = str(dtype).removeprefix("torch.") if isinstance(dtype, torch.dtype) else dtype
        out["model_type"] = self.model_type
        return out

    def to_diff_dict(self) -> dict[str, Any]:
        """Only the values that differ from the defaults (plus model_type)."""
        defaults = BloomConfig().to_dict()
        return {k: v for k, v in self.to_dict().items() if k == "model_type" or defaults.get(k, object()) != v}

    @classmethod
    def from_dict(cls, config_dict: dict[str, Any], **overrides: Any) -> "BloomConfig":
        return cls(**{**config_dict, **overrides})

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    def to_json_file(self, path: str | os.PathLike) -> None:
        Path(path).write_text(self.to_json_string(), encoding="utf-8")

    @classmethod
    def from_json_file(cls, path: str | os.PathLike, **overrides: Any) -> "BloomConfig":
        data = read_json_object(path)
        model_type = data.get("model_type", "bloom")
        if model_type != "bloom":
            raise ValueError(f"{path} describes a {model_type!r} model, not 'bloom'")
        return cls.from_dict(data, **overrides)

    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.to_json_file(directory / CONFIG_NAME)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        subfolder: str | None = None,
        **overrides: Any,
    ) -> "BloomConfig":
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                         subfolder=subfolder)
        return cls._from_hub(name_or_path, hub, **overrides)

    @classmethod
    def _from_hub(cls, name_or_path: str | os.PathLike, hub: HubOptions, **overrides: Any) -> "BloomConfig":
        """from_pretrained with the hub arguments as one HubOptions (see bloom.hub)."""
        return cls.from_json_file(resolve_file(name_or_path, CONFIG_NAME, hub), **overrides)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, BloomConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"BloomConfig {self.to_json_string()}"
