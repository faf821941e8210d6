"""BloomTokenizerFast: BLOOM's byte-level BPE tokenizer on the `tokenizers` library.

A drop-in for the parts of transformers' `BloomTokenizerFast` (removed in transformers 5) that a BLOOM
user touches, with the same results as transformers' `PreTrainedTokenizerFast` on the same files:

    tok = BloomTokenizerFast.from_pretrained("bigscience/bloom-560m")   # or a local directory
    batch = tok(["Hello world", "Bonjour"], padding=True, return_tensors="pt")  # left padding
    batch.input_ids, batch.attention_mask            # (B, T) int64 tensors
    tok.batch_decode(batch.input_ids, skip_special_tokens=True)

Files: tokenizer.json (the `tokenizers` serialization: vocabulary, merges, pre-tokenizer, decoder,
post-processor; required), tokenizer_config.json and special_tokens_map.json (optional). The pipeline
is whatever tokenizer.json says; BLOOM's is: no normalizer, pre-tokenizer Split(" ?[^(\\s|[.,!?…。，、।۔،])]+",
isolated) then ByteLevel(add_prefix_space=False, use_regex=False), BPE model, ByteLevel decoder and a
ByteLevel post-processor -- so `add_special_tokens=True` adds no token (no BOS/EOS), exactly as upstream.

Defaults are BLOOM's: special tokens <unk>=0 <s>=1 </s>=2 <pad>=3, padding on the left (BLOOM's
tokenizer_config.json says so), truncation on the right, no clean-up of tokenization spaces.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Tokenizer

from .hub import resolve_file

TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"

# transformers' "no length limit" value of model_max_length (int(1e30)); limits above LARGE_INTEGER
# mean "unset", so truncation=True / padding="max_length" without max_length do nothing.
VERY_LARGE_INTEGER = int(1e30)
LARGE_INTEGER = int(1e20)

SPECIAL_TOKENS_ATTRIBUTES = ("bos_token", "eos_token", "unk_token", "pad_token")
_SIDES = ("left", "right")
_PADDING_VALUES = (False, True, "longest", "max_length", "do_not_pad")
_TRUNCATION_VALUES = (False, None, True, "longest_first", "only_first", "do_not_truncate")
_TENSOR_TYPES = (None, "pt", "np")


class BatchEncoding(dict):
    """The output of `BloomTokenizerFast.__call__`: a dict (`input_ids`, `attention_mask`, ...) whose
    keys are also attributes, so `model(**batch)`, `batch["input_ids"]` and `batch.input_ids` all work.
    `encodings` holds the `tokenizers.Encoding` of each sequence (tokens, offsets, word ids)."""

    def __init__(self, data: dict[str, Any] | None = None, encodings: list | None = None):
        super().__init__(data or {})
        self.encodings = encodings

    def __getattr__(self, name: str):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(f"BatchEncoding has no key or attribute {name!r} (keys: {list(self)})") from None

    def tokens(self, batch_index: int = 0) -> list[str]:
        """The token strings of sequence `batch_index`."""
        if not self.encodings:
            raise ValueError("this BatchEncoding holds no tokenizers encodings")
        return self.encodings[batch_index].tokens

    def to(self, device, *, non_blocking: bool = False) -> BatchEncoding:
        """Move every torch tensor value to `device` (in place); returns self."""
        import torch

        for key, value in self.items():
            if isinstance(value, torch.Tensor):
                self[key] = value.to(device, non_blocking=non_blocking)
        return self


def _token_str(value: Any, name: str) -> str | None:
    """A special token given as str, tokenizers.AddedToken or a serialized AddedToken dict -> its text."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, AddedToken):
        return value.content
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise TypeError(f"{name} must be a str, a tokenizers.AddedToken or None, got {value!r}")


def _check_side(value: Any, name: str) -> str:
    if value not in _SIDES:
        raise ValueError(f"{name} must be 'left' or 'right', got {value!r}")
    return value


def _set_byte_level_prefix_space(component, value: bool):
    """A copy of a pre-tokenizer / decoder with every ByteLevel part's add_prefix_space set to `value`.

    Returns (new component, number of ByteLevel parts found). Works on the JSON state, so nested
    Sequences are handled whatever their depth.
    """
    state = json.loads(component.__getstate__())
    found = 0

    def walk(node):
        nonlocal found
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                node["add_prefix_space"] = value
                found += 1
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(state)
    # Rebuild the way pickle does: __newobj__(cls, *args), then __setstate__(JSON state).
    factory, args = component.__reduce_ex__(2)[:2]
    rebuilt = factory(*args)
    rebuilt.__setstate__(json.dumps(state).encode())
    return rebuilt, found


def _byte_level_prefix_space(component) -> bool | None:
    """add_prefix_space of the first ByteLevel part of a pre-tokenizer (None if it has none)."""
    if component is None:
        return None
    stack = [json.loads(component.__getstate__())]
    while stack:
        node = stack.pop(0)
        if isinstance(node, dict):
            if node.get("type") == "ByteLevel":
                return bool(node.get("add_prefix_space", False))
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


def _clean_up_tokenization(text: str) -> str:
    """transformers' clean_up_tokenization: drop the space before punctuation and English contractions."""
    return (
        text.replace(" .", ".")
        .replace(" ?", "?")
        .replace(" !", "!")
        .replace(" ,", ",")
        .replace(" ' ", "'")
        .replace(" n't", "n't")
        .replace(" 'm", "'m")
        .replace(" 's", "'s")
        .replace(" 've", "'ve")
        .replace(" 're", "'re")
    )


def _to_py(ids: Any):
    """Token ids given as int, list, tuple, numpy array or torch tensor -> python ints / lists."""
    if hasattr(ids, "tolist"):  # torch.Tensor, numpy array, numpy scalar
        return ids.tolist()
    if isinstance(ids, (list, tuple)):
        return [_to_py(x) for x in ids]
    return ids


def _special_token(name: str) -> property:
    """The `name` attribute (e.g. pad_token): its text, or None; setting it registers the token."""
    return property(
        lambda self: self._special[name],
        lambda self, value: self._set_special(name, value),
        doc=f"The {name.split('_')[0]} special token (str or None). Settable, e.g. pad_token = eos_token.",
    )


def _special_token_id(name: str) -> property:
    return property(lambda self: self._special_id(name), doc=f"The id of {name} (None when it is not set).")


class BloomTokenizerFast:
    """BLOOM's fast tokenizer (byte-level BPE on `tokenizers`), API of transformers' BloomTokenizerFast.

    Args:
        vocab_file, merges_file: accepted for signature compatibility only; BLOOM ships tokenizer.json,
            and (as in transformers) a BloomTokenizerFast cannot be built from vocab/merges alone.
        tokenizer_file: path of a tokenizer.json.
        tokenizer_object: a `tokenizers.Tokenizer` to use instead (copied, never modified).
        unk_token, bos_token, eos_token, pad_token: the special tokens (None for none). A token absent
            from the vocabulary is added as a special token, as transformers does.
        add_prefix_space: True makes every ByteLevel part of the pre-tokenizer prepend a space, so a
            leading word encodes like any other (the model was not trained that way). None keeps what
            tokenizer.json says (False for BLOOM).
        clean_up_tokenization_spaces: default of `decode`'s argument of the same name.
        padding_side, truncation_side: "left" or "right"; None: tokenizer.json's padding/truncation
            direction if it stores one, else "left" (as BLOOM) and "right".
        model_max_length: the length `truncation=True` / `padding="max_length"` use when `max_length`
            is not given (default: no limit).
        **kwargs: other tokenizer_config.json keys (kept in `init_kwargs`, otherwise unused).
    """

    vocab_files_names = {"tokenizer_file": TOKENIZER_FILE}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str | None = None,
        merges_file: str | None = None,
        tokenizer_file: str | os.PathLike | None = None,
        unk_token: str | None = "<unk>",
        bos_token: str | None = "<s>",
        eos_token: str | None = "</s>",
        pad_token: str | None = "<pad>",
        add_prefix_space: bool | None = None,
        clean_up_tokenization_spaces: bool = False,
        *,
        tokenizer_object: Tokenizer | None = None,
        padding_side: str | None = None,
        truncation_side: str | None = None,
        model_max_length: int | None = None,
        name_or_path: str | os.PathLike = "",
        **kwargs: Any,
    ):
        if tokenizer_object is not None:
            if not isinstance(tokenizer_object, Tokenizer):
                raise TypeError(
                    f"tokenizer_object must be a tokenizers.Tokenizer, got {type(tokenizer_object).__name__}"
                )
            # Round-trip through JSON: an independent copy (special tokens and add_prefix_space change it).
            backend = Tokenizer.from_str(tokenizer_object.to_str())
        elif tokenizer_file is not None:
            if not Path(tokenizer_file).is_file():
                raise FileNotFoundError(f"tokenizer_file {str(tokenizer_file)!r} does not exist or is not a file")
            backend = Tokenizer.from_file(str(tokenizer_file))
        elif vocab_file is not None or merges_file is not None:
            raise ValueError(
                "BloomTokenizerFast is built from a tokenizer.json (tokenizer_file=...) or a tokenizers.Tokenizer "
                "(tokenizer_object=...); vocab_file/merges_file alone are not supported (nor were they in transformers)"
            )
        else:
            raise ValueError("BloomTokenizerFast needs tokenizer_file=... (a tokenizer.json) or tokenizer_object=...")

        # Padding/truncation stored in tokenizer.json only give the default sides (as in transformers);
        # the backend is then left without either: every call sets exactly what it asks for, and
        # save_pretrained writes a clean file.
        if padding_side is None:
            padding_side = (backend.padding or {}).get("direction", "left")  # BLOOM pads on the left
        if truncation_side is None:
            truncation_side = (backend.truncation or {}).get("direction", "right")
        backend.no_padding()
        backend.no_truncation()

        self._tokenizer = backend
        self._lock = threading.Lock()  # calls configure then use the shared backend's padding/truncation
        self.name_or_path = str(name_or_path)
        self.padding_side = _check_side(padding_side, "padding_side")
        self.truncation_side = _check_side(truncation_side, "truncation_side")
        self.clean_up_tokenization_spaces = bool(clean_up_tokenization_spaces)
        if model_max_length is None:
            model_max_length = VERY_LARGE_INTEGER
        if not isinstance(model_max_length, int) or isinstance(model_max_length, bool) or model_max_length < 1:
            raise ValueError(f"model_max_length must be a positive int, got {model_max_length!r}")
        self.model_max_length = model_max_length
        self.init_kwargs = dict(kwargs)

        self._special: dict[str, str | None] = {}
        for name, value in (
            ("unk_token", unk_token),
            ("bos_token", bos_token),
            ("eos_token", eos_token),
            ("pad_token", pad_token),
        ):
            setattr(self, name, value)  # the property setter registers it with the backend

        if add_prefix_space is not None:
            self.add_prefix_space = add_prefix_space

    # ------------------------------------------------------------------ loading and saving

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool = False,
        token: str | bool | None = None,
        **kwargs: Any,
    ) -> BloomTokenizerFast:
        """Load from a local directory or a hub id (e.g. "bigscience/bloom-560m").

        Reads tokenizer.json (required), tokenizer_config.json and special_tokens_map.json (optional).
        Precedence: tokenizer_config.json < special_tokens_map.json < keyword arguments.
        """
        where = dict(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token)
        try:
            tokenizer_path = resolve_file(name_or_path, TOKENIZER_FILE, **where)
        except FileNotFoundError as err:
            raise FileNotFoundError(
                f"{err} (BloomTokenizerFast reads the `tokenizers` serialization {TOKENIZER_FILE})"
            ) from None

        init: dict[str, Any] = {}
        config_path = resolve_file(name_or_path, TOKENIZER_CONFIG_FILE, required=False, **where)
        if config_path is not None:
            init.update(_read_json(config_path))
        map_path = resolve_file(name_or_path, SPECIAL_TOKENS_MAP_FILE, required=False, **where)
        if map_path is not None:
            for key, value in _read_json(map_path).items():
                if key in SPECIAL_TOKENS_ATTRIBUTES:
                    init[key] = value

        # Keys of tokenizer_config.json that only mean something to transformers' loader.
        for key in ("tokenizer_class", "tokenizer_file", "name_or_path", "special_tokens_map_file", "auto_map"):
            init.pop(key, None)
        if not init.get("add_prefix_space"):
            # Only True re-configures the pre-tokenizer (as in transformers); otherwise tokenizer.json governs.
            init.pop("add_prefix_space", None)
        if init.get("model_max_length") is not None and not isinstance(init["model_max_length"], int):
            init["model_max_length"] = int(init["model_max_length"])  # some configs store it as a float
        init.update(kwargs)
        init["tokenizer_file"] = str(tokenizer_path)
        init.setdefault("name_or_path", str(name_or_path))
        return cls(**init)

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `save_directory`.

        The result loads with this class's from_pretrained and with transformers' AutoTokenizer.
        Returns the paths written.
        """
        directory = Path(save_directory)
        if directory.is_file():
            raise ValueError(f"save_directory must be a directory, {str(directory)!r} is a file")
        directory.mkdir(parents=True, exist_ok=True)

        tokenizer_path = directory / TOKENIZER_FILE
        with self._lock:
            self._tokenizer.save(str(tokenizer_path))

        config = {
            "tokenizer_class": "BloomTokenizerFast",
            **self.special_tokens_map,
            "add_prefix_space": self.add_prefix_space,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
        }
        config_path = directory / TOKENIZER_CONFIG_FILE
        map_path = directory / SPECIAL_TOKENS_MAP_FILE
        _write_json(config_path, config)
        _write_json(map_path, self.special_tokens_map)
        return (str(config_path), str(map_path), str(tokenizer_path))

    def __getstate__(self):
        state = self.__dict__.copy()
        del state["_lock"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name_or_path={self.name_or_path!r}, vocab_size={self.vocab_size}, "
            f"padding_side={self.padding_side!r}, truncation_side={self.truncation_side!r}, "
            f"add_prefix_space={self.add_prefix_space}, special_tokens={self.special_tokens_map})"
        )

    # ------------------------------------------------------------------ vocabulary and special tokens

    @property
    def backend_tokenizer(self) -> Tokenizer:
        """The underlying `tokenizers.Tokenizer`."""
        return self._tokenizer

    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary (without added tokens)."""
        return self._tokenizer.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Size of the full vocabulary, added tokens included."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self._tokenizer.get_vocab(with_added_tokens=True)

    def _set_special(self, name: str, value: Any) -> None:
        token = _token_str(value, name)
        if token is not None:
            # A no-op for a token already registered as special; otherwise it becomes one (keeping its
            # vocabulary id if it has one), so decode(skip_special_tokens=True) drops it.
            self._tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False)])
        self._special[name] = token

    def _special_id(self, name: str) -> int | None:
        token = self._special.get(name)
        return None if token is None else self._tokenizer.token_to_id(token)

    unk_token = _special_token("unk_token")
    bos_token = _special_token("bos_token")
    eos_token = _special_token("eos_token")
    pad_token = _special_token("pad_token")
    unk_token_id = _special_token_id("unk_token")
    bos_token_id = _special_token_id("bos_token")
    eos_token_id = _special_token_id("eos_token")
    pad_token_id = _special_token_id("pad_token")

    @property
    def special_tokens_map(self) -> dict[str, str]:
        """{"bos_token": "<s>", ...} for the special tokens that are set."""
        return {name: self._special[name] for name in SPECIAL_TOKENS_ATTRIBUTES if self._special[name] is not None}

    @property
    def all_special_tokens(self) -> list[str]:
        return list(dict.fromkeys(self.special_tokens_map.values()))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def add_prefix_space(self) -> bool:
        """Whether the ByteLevel pre-tokenizer prepends a space to the input (False for BLOOM)."""
        return bool(_byte_level_prefix_space(self._tokenizer.pre_tokenizer))

    @add_prefix_space.setter
    def add_prefix_space(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise TypeError(f"add_prefix_space must be True or False, got {value!r}")
        pre_tokenizer = self._tokenizer.pre_tokenizer
        found = 0
        if pre_tokenizer is not None:
            rebuilt, found = _set_byte_level_prefix_space(pre_tokenizer, value)
        if not found:
            if not value:
                return  # nothing prepends a space: already "False"
            raise ValueError(
                "add_prefix_space=True needs a ByteLevel pre-tokenizer, and this tokenizer.json's pre-tokenizer has "
                f"none ({pre_tokenizer.__getstate__().decode() if pre_tokenizer is not None else None})"
            )
        self._tokenizer.pre_tokenizer = rebuilt
        # The ByteLevel decoder ignores the flag, but keep it consistent as transformers did.
        if self._tokenizer.decoder is not None:
            decoder, found_in_decoder = _set_byte_level_prefix_space(self._tokenizer.decoder, value)
            if found_in_decoder:
                self._tokenizer.decoder = decoder

    def convert_tokens_to_ids(self, tokens: str | list[str]) -> int | None | list[int | None]:
        """Token string(s) -> id(s); unknown tokens map to unk_token_id."""
        if isinstance(tokens, str):
            index = self._tokenizer.token_to_id(tokens)
            return self.unk_token_id if index is None else index
        return [self.convert_tokens_to_ids(t) for t in tokens]

    def convert_ids_to_tokens(self, ids: Any, skip_special_tokens: bool = False) -> str | None | list[str]:
        """Id(s) -> token string(s) (byte-level symbols, e.g. "Ġworld")."""
        ids = _to_py(ids)
        if isinstance(ids, int):
            return self._tokenizer.id_to_token(ids)
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        decoder = self._tokenizer.decoder
        return decoder.decode(tokens) if decoder is not None else " ".join(tokens)

    def tokenize(self, text: str, add_special_tokens: bool = False) -> list[str]:
        """The token strings of `text`."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).tokens

    # ------------------------------------------------------------------ encoding

    def __call__(
        self,
        text: str | list[str] | tuple[str, ...],
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_offsets_mapping: bool = False,
    ) -> BatchEncoding:
        """Encode a string or a batch (list) of strings.

        Args:
            padding: False / "do_not_pad"; True / "longest" (to the longest of the batch); "max_length"
                (to `max_length`, or model_max_length).
            truncation: True / "longest_first" / "only_first" cut each sequence to `max_length` (or
                model_max_length) on `truncation_side`; False / None: no truncation -- except that, as in
                transformers, `max_length` given with padding=False and truncation=None truncates.
            padding_side: "left" or "right" for this call (default: `self.padding_side`).
            return_tensors: None (python lists) / "pt" (torch int64) / "np" (numpy int64).
        Returns:
            BatchEncoding with `input_ids`, `attention_mask` (unless return_attention_mask=False) and
            `offset_mapping` if asked. A single string gives flat lists, or a (1, T) tensor.
        """
        if isinstance(text, str):
            batch, is_batched = [text], False
        elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
            batch, is_batched = list(text), True
        else:
            raise TypeError(
                f"text must be a str or a list of str, got {type(text).__name__}"
                + (f" containing {type(next(t for t in text if not isinstance(t, str))).__name__}"
                   if isinstance(text, (list, tuple)) else "")
            )
        if return_tensors not in _TENSOR_TYPES:
            raise ValueError(f"return_tensors must be one of None, 'pt', 'np', got {return_tensors!r}")
        pad_strategy, truncate, max_length = self._strategies(padding, truncation, max_length, pad_to_multiple_of)
        side = _check_side(self.padding_side if padding_side is None else padding_side, "padding_side")
        truncation_side = _check_side(self.truncation_side, "truncation_side")

        with self._lock:
            try:
                if truncate:
                    self._tokenizer.enable_truncation(
                        max_length, stride=0, strategy="longest_first", direction=truncation_side
                    )
                if pad_strategy is not None:
                    self._tokenizer.enable_padding(
                        direction=side,
                        pad_id=self.pad_token_id,
                        pad_token=self.pad_token,
                        length=max_length if pad_strategy == "max_length" else None,
                        pad_to_multiple_of=pad_to_multiple_of,
                    )
                encodings = self._tokenizer.encode_batch(batch, add_special_tokens=add_special_tokens)
            finally:
                self._tokenizer.no_padding()
                self._tokenizer.no_truncation()

        data: dict[str, Any] = {"input_ids": [e.ids for e in encodings]}
        if return_attention_mask:
            data["attention_mask"] = [e.attention_mask for e in encodings]
        if return_offsets_mapping:
            data["offset_mapping"] = [e.offsets for e in encodings]

        if return_tensors is not None:
            lengths = {len(ids) for ids in data["input_ids"]}
            if len(lengths) > 1:
                raise ValueError(
                    f"return_tensors={return_tensors!r} needs sequences of one length, but this batch has lengths "
                    f"{sorted(lengths)}: pass padding=True (and truncation=True with max_length to cap the length)"
                )
            data = {key: _as_tensor(value, return_tensors) for key, value in data.items()}
        elif not is_batched:
            data = {key: value[0] for key, value in data.items()}
        return BatchEncoding(data, encodings)

    def _strategies(self, padding, truncation, max_length, pad_to_multiple_of):
        """Validate the padding/truncation arguments the way transformers reads them.

        Returns (None | "longest" | "max_length", truncate: bool, max_length).
        """
        if not any(padding is v or (isinstance(v, str) and padding == v) for v in _PADDING_VALUES):
            raise ValueError(
                f"padding must be one of False, True, 'longest', 'max_length', 'do_not_pad', got {padding!r}"
            )
        if not any(truncation is v or (isinstance(v, str) and truncation == v) for v in _TRUNCATION_VALUES):
            raise ValueError(
                "truncation must be one of True, 'longest_first', 'only_first', False, None, 'do_not_truncate', "
                f"got {truncation!r}"
            )
        for name, value in (("max_length", max_length), ("pad_to_multiple_of", pad_to_multiple_of)):
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ValueError(f"{name} must be a positive int or None, got {value!r}")

        # transformers: max_length alone (no padding, truncation unset) means "truncate to max_length".
        if max_length is not None and padding is False and truncation is None:
            truncation = True
        if padding in (False, "do_not_pad"):
            pad_strategy = None
        else:
            pad_strategy = "max_length" if padding == "max_length" else "longest"
        truncate = truncation not in (False, None, "do_not_truncate")

        if max_length is None:
            limit = self.model_max_length if self.model_max_length <= LARGE_INTEGER else None
            if pad_strategy == "max_length" and limit is None:
                pad_strategy = None  # as transformers: nothing to pad to
            if truncate and limit is None:
                truncate = False
            max_length = limit

        if pad_strategy is not None and (self.pad_token is None or self.pad_token_id is None):
            raise ValueError(
                f"padding={padding!r} needs a padding token, but this tokenizer has pad_token={self.pad_token!r}"
                f"{' (not in the vocabulary)' if self.pad_token is not None else ''}: set one, e.g. "
                "tokenizer.pad_token = tokenizer.eos_token"
            )
        if truncate and pad_strategy is not None and pad_to_multiple_of and max_length % pad_to_multiple_of:
            raise ValueError(
                f"truncation and padding are both on, but max_length={max_length} is not a multiple of "
                f"pad_to_multiple_of={pad_to_multiple_of}"
            )
        return pad_strategy, truncate, max_length

    def encode(
        self,
        text: str,
        *,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
    ):
        """The `input_ids` of `self(text, ...)`: a list of ids for a string (or a (1, T) tensor)."""
        return self(
            text,
            add_special_tokens=add_special_tokens,
            padding=padding,
            truncation=truncation,
            max_length=max_length,
            padding_side=padding_side,
            return_tensors=return_tensors,
            return_attention_mask=False,
        )["input_ids"]

    # ------------------------------------------------------------------ decoding

    def decode(
        self,
        token_ids: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> str | list[str]:
        """Ids (int, list, numpy array or tensor) -> text. A batch (2-D) gives a list of texts.

        skip_special_tokens drops the special tokens (<pad>, <s>, ...). clean_up_tokenization_spaces
        (default: the attribute, False for BLOOM) removes the space before . , ! ? and English
        contractions, as transformers 4 did (it corrupts byte-level BPE text, hence off by default).
        """
        token_ids = _to_py(token_ids)
        if isinstance(token_ids, list) and token_ids and isinstance(token_ids[0], list):
            return self.batch_decode(token_ids, skip_special_tokens, clean_up_tokenization_spaces)
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        if not isinstance(token_ids, list) or not all(isinstance(i, int) for i in token_ids):
            raise TypeError(f"token_ids must be an int or a sequence of ints, got {token_ids!r:.80}")
        text = self._tokenizer.decode(token_ids, skip_special_tokens=skip_special_tokens)
        if clean_up_tokenization_spaces is None:
            clean_up_tokenization_spaces = self.clean_up_tokenization_spaces
        return _clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Any,
        skip_special_tokens: bool = False,
        clean_up_tokenization_spaces: bool | None = None,
    ) -> list[str]:
        """decode() of each sequence of a batch (list of lists, 2-D array or tensor)."""
        sequences = _to_py(sequences)
        if not isinstance(sequences, list) or not all(isinstance(s, list) for s in sequences):
            raise TypeError("sequences must be a batch of id sequences (a list of lists, or a 2-D array/tensor)")
        return [self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences]


def _as_tensor(value: list, kind: str):
    if kind == "pt":
        import torch

        return torch.tensor(value, dtype=torch.long) if value else torch.empty((0, 0), dtype=torch.long)
    import numpy as np

    return np.array(value, dtype=np.int64) if value else np.empty((0, 0), dtype=np.int64)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _write_json(path: Path, data: dict[str, Any]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(json.dumps(data, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
