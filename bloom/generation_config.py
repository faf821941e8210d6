"""GenerationConfig: the generation defaults a checkpoint carries (generation_config.json), as in
transformers. It holds only the values that were set; `generate` takes them as defaults, and any
keyword given to `generate` wins.

The keys `generate` implements are GENERATE_KEYS. transformers' other keys are accepted where they
hold the value that means "off" (num_beams=1, no_repeat_ngram_size=0, ...), so a transformers
generation_config.json loads; a value that asks for something not implemented (num_beams=4) is an
error naming it when generate runs.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

from .config import read_json_object
from .hub import HubOptions, resolve_file

GENERATION_CONFIG_NAME = "generation_config.json"

GENERATE_KEYS = ("max_new_tokens", "min_new_tokens", "max_length", "min_length", "do_sample", "temperature",
                 "top_k", "top_p", "repetition_penalty", "eos_token_id", "pad_token_id", "num_return_sequences",
                 "use_cache", "num_beams", "length_penalty", "early_stopping", "no_repeat_ngram_size", "bad_words_ids",
                 "forced_eos_token_id", "output_scores", "output_logits", "return_dict_in_generate")
# transformers' keys whose value here means "not used"; another value is refused by generate
OFF_VALUES: dict[str, tuple] = {
    "num_beam_groups": (1,), "forced_bos_token_id": (None,), "penalty_alpha": (None,),
    "diversity_penalty": (0.0,),
    "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,),
    "encoder_no_repeat_ngram_size": (0,), "prompt_lookup_num_tokens": (None,), "assistant_model": (None,),
    "output_attentions": (False, None), "output_hidden_states": (False, None), "min_p": (None,),
    "stop_strings": (None,), "max_time": (None,), "suppress_tokens": (None,), "begin_suppress_tokens": (None,),
    "sequence_bias": (None,), "renormalize_logits": (False,), "remove_invalid_values": (False,),
    "guidance_scale": (None, 1.0), "watermarking_config": (None,), "token_healing": (False,),
    "dola_layers": (None,), "constraints": (None,), "force_words_ids": (None,), "top_h": (None,),
    "exponential_decay_length_penalty": (None,), "encoder_repetition_penalty": (1.0,),
    "cache_implementation": (None,), "cache_config": (None,), "max_cache_len": (None,), "low_memory": (None, False),
    "compile_config": (None,), "disable_compile": (False,),
}
# bookkeeping keys transformers writes; carried, never acted on
INFO_KEYS = ("bos_token_id", "decoder_start_token_id", "transformers_version", "_from_model_config")


class GenerationConfig:
    def __init__(self, **kwargs: Any) -> None:
        self._values: dict[str, Any] = {}
        self.update(**kwargs)

    def update(self, **kwargs: Any) -> None:
        self._values.update(copy.deepcopy(kwargs))

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return self._values.get(name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name.startswith("_"):
            super().__setattr__(name, value)
        else:
            self._values[name] = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, GenerationConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        return f"GenerationConfig {json.dumps(self.to_dict(), sort_keys=True)}"

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self._values)

    @classmethod
    def from_model_config(cls, config) -> "GenerationConfig":
        """The token ids a model's config gives (what transformers copies into a new generation config)."""
        return cls(**{k: getattr(config, k) for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if getattr(config, k, None) is not None})

    @classmethod
    def from_any(cls, config) -> "GenerationConfig":
        """Ours, a transformers GenerationConfig (its set values: to_diff_dict) or a dict."""
        if isinstance(config, GenerationConfig):
            return config
        if isinstance(config, dict):
            return cls(**config)
        if hasattr(config, "to_diff_dict"):
            return cls(**config.to_diff_dict())
        raise TypeError(f"generation_config must be a GenerationConfig or a dict; got {type(config).__name__}")

    def generate_kwargs(self) -> dict[str, Any]:
        """The values generate takes as defaults; ValueError naming any option it does not implement."""
        unsupported = [f"{k}={v!r}" for k, v in self._values.items()
                       if k in OFF_VALUES and v not in OFF_VALUES[k]]
        unknown = [k for k in self._values if k not in GENERATE_KEYS and k not in OFF_VALUES
                   and k not in INFO_KEYS]
        if unsupported or unknown:
            raise ValueError("generation_config asks for what bloom's generate does not implement: "
                             + ", ".join(unsupported + [f"{k} (unknown)" for k in unknown]))
        return {k: v for k, v in self._values.items() if k in GENERATE_KEYS and v is not None}

    # --- files ------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike) -> None:
        directory = Path(save_directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / GENERATION_CONFIG_NAME).write_text(
            json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n", encoding="utf-8")

    @classmethod
    def from_pretrained(cls, name_or_path, hub: HubOptions = HubOptions(), *,
                        required: bool = True) -> "GenerationConfig | None":
        path = resolve_file(name_or_path, GENERATION_CONFIG_NAME, hub, required=required)
        return None if path is None else cls(**read_json_object(path))
