"""The files of a tokenizer directory: what from_pretrained reads and save_pretrained writes.

Files: tokenizer.json (the `tokenizers` serialization: vocabulary, merges, pre-tokenizer, decoder,
post-processor; required), tokenizer_config.json, special_tokens_map.json and chat_template.jinja
(optional), found in a
local directory or on the hub through `bloom.hub.resolve_file`.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from ..hub import HubOptions, resolve_file
from .chat import CHAT_TEMPLATE_FILE
from .rules import VERY_LARGE_INTEGER
from .state import SPECIAL_TOKENS_ATTRIBUTES

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"


def _from_pretrained_kwargs(
    name_or_path: str | os.PathLike, kwargs: dict[str, Any], hub: HubOptions
) -> dict[str, Any]:
    """The BloomTokenizerFast(...) arguments of a local directory or hub id, `kwargs` taking precedence.

    Precedence: tokenizer_config.json < special_tokens_map.json < `kwargs`.
    """
    try:
        tokenizer_path = resolve_file(name_or_path, TOKENIZER_FILE, hub)
    except FileNotFoundError as err:
        raise FileNotFoundError(
            f"{err} (BloomTokenizerFast reads the `tokenizers` serialization {TOKENIZER_FILE})"
        ) from None

    init: dict[str, Any] = {}
    config_path = resolve_file(name_or_path, TOKENIZER_CONFIG_FILE, hub, required=False)
    if config_path is not None:
        init.update(_read_json(config_path))
    map_path = resolve_file(name_or_path, SPECIAL_TOKENS_MAP_FILE, hub, required=False)
    if map_path is not None:
        for key, value in _read_json(map_path).items():
            if key in SPECIAL_TOKENS_ATTRIBUTES:
                init[key] = value

    # transformers 5 keeps the chat template in its own file (4.x: the "chat_template" key)
    template_path = resolve_file(name_or_path, CHAT_TEMPLATE_FILE, hub, required=False)
    if template_path is not None:
        init["chat_template"] = template_path.read_text(encoding="utf-8")
    # transformers 5 names the additional special tokens "extra_special_tokens" (4.x: "additional_...")
    extra = init.pop("extra_special_tokens", None)
    if isinstance(extra, list) and "additional_special_tokens" not in init:
        init["additional_special_tokens"] = extra

    # Keys of tokenizer_config.json that only mean something to transformers' loader.
    for key in ("tokenizer_class", "tokenizer_file", "name_or_path", "special_tokens_map_file", "auto_map",
                "backend", "is_local", "local_files_only"):
        init.pop(key, None)
    if not init.get("add_prefix_space"):
        # Only True re-configures the pre-tokenizer (as in transformers); otherwise tokenizer.json governs.
        init.pop("add_prefix_space", None)
    limit = init.get("model_max_length")
    if limit is not None and not isinstance(limit, int):
        # some configs store it as a float (1e30: "no limit"); anything else is named
        if isinstance(limit, bool) or not isinstance(limit, float) or not limit >= 1 or limit != limit:
            raise ValueError(f"{TOKENIZER_CONFIG_FILE}: model_max_length must be a positive number; got {limit!r}")
        init["model_max_length"] = int(limit) if limit != float("inf") else VERY_LARGE_INTEGER
    init.update(kwargs)
    init["tokenizer_file"] = str(tokenizer_path)
    init.setdefault("name_or_path", str(name_or_path))
    return init


def _save_pretrained(
    save_directory: str | os.PathLike,
    backend: Tokenizer,
    lock: threading.Lock,
    config: dict[str, Any],
    special_tokens_map: dict[str, str],
    chat_template: str | None = None,
) -> tuple[str, ...]:
    """Write tokenizer.json (`backend`, saved under `lock`), tokenizer_config.json (`config`),
    special_tokens_map.json and (when there is one) chat_template.jinja into `save_directory`; returns
    the paths written."""
    directory = Path(save_directory)
    if directory.is_file():
        raise ValueError(f"save_directory must be a directory, {str(directory)!r} is a file")
    directory.mkdir(parents=True, exist_ok=True)

    tokenizer_path = directory / TOKENIZER_FILE
    with lock:
        backend.save(str(tokenizer_path))

    config_path = directory / TOKENIZER_CONFIG_FILE
    map_path = directory / SPECIAL_TOKENS_MAP_FILE
    _write_json(config_path, config)
    _write_json(map_path, special_tokens_map)
    written = (str(config_path), str(map_path), str(tokenizer_path))
    if chat_template is not None:
        template_path = directory / CHAT_TEMPLATE_FILE
        template_path.write_text(chat_template, encoding="utf-8")
        written += (str(template_path),)
    return written


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not UTF-8 text: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
