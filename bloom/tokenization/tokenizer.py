"""BloomTokenizerFast: BLOOM's byte-level BPE tokenizer on the `tokenizers` library.

A drop-in for the parts of transformers' `BloomTokenizerFast` (removed in transformers 5) that a BLOOM
user touches, with the same results as transformers' `PreTrainedTokenizerFast` on the same files:

    tok = BloomTokenizerFast.from_pretrained("bigscience/bloom-560m")   # or a local directory
    batch = tok(["Hello world", "Bonjour"], padding=True, return_tensors="pt")  # left padding
    batch.input_ids, batch.attention_mask            # (B, T) int64 tensors
    tok.batch_decode(batch.input_ids, skip_special_tokens=True)

Defaults are BLOOM's: special tokens <unk>=0 <s>=1 </s>=2 <pad>=3, padding on the left (BLOOM's
tokenizer_config.json says so), truncation on the right, no clean-up of tokenization spaces.

This module holds the class itself; the pieces it uses live beside it: `encoding` (the BatchEncoding
it returns), `rules` (padding/truncation arguments), `state` (the `tokenizers` backend and its JSON
state), `files` (from_pretrained / save_pretrained files).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from tokenizers import AddedToken, Tokenizer

from ..hub import HubOptions
from .encoding import BatchEncoding, _as_tensor, _batch_encoding, _check_tensor_type, _text_batch, _to_py
from .chat import render, split_conversations, template_from_config
from .files import TOKENIZER_FILE, _from_pretrained_kwargs, _save_pretrained
from .rules import VERY_LARGE_INTEGER, _check_side, _padding_and_truncation, _strategies
from .state import (
    SPECIAL_TOKENS_ATTRIBUTES,
    _byte_level_prefix_space,
    _detach_padding_and_truncation,
    _load_backend,
    _set_add_prefix_space,
    _token_str,
)


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


PADDED_KEYS = ("input_ids", "attention_mask", "token_type_ids", "special_tokens_mask")


def _padded(row: list, length: int, fill: int, side: str) -> list:
    pad = [fill] * max(0, length - len(row))
    return pad + row if side == "left" else row + pad


def _special_token(name: str) -> property:
    """The `name` attribute (e.g. pad_token): its text, or None; setting it registers the token."""
    return property(
        lambda self: self._special[name],
        lambda self, value: self._set_special(name, value),
        doc=f"The {name.split('_')[0]} special token (str or None). Settable, e.g. pad_token = eos_token.",
    )


def _special_token_id(name: str) -> property:
    return property(lambda self: self._special_id(name), lambda self, value: self._set_special_id(name, value),
                    doc=f"The id of {name} (None when it is not set); settable to an id of the vocabulary.")


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
        backend = _load_backend(tokenizer_file, tokenizer_object, vocab_file, merges_file)
        padding_side, truncation_side = _detach_padding_and_truncation(backend, padding_side, truncation_side)

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
        self.chat_template = template_from_config(kwargs.pop("chat_template", None))
        additional = kwargs.pop("additional_special_tokens", None)
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
        if additional:
            self.add_special_tokens({"additional_special_tokens": list(additional)})

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
        subfolder: str | None = None,
        **kwargs: Any,
    ) -> BloomTokenizerFast:
        """Load from a local directory or a hub id (e.g. "bigscience/bloom-560m").

        Reads tokenizer.json (required), tokenizer_config.json and special_tokens_map.json (optional).
        Precedence: tokenizer_config.json < special_tokens_map.json < keyword arguments.
        """
        hub = HubOptions(revision=revision, cache_dir=cache_dir, local_files_only=local_files_only, token=token,
                         subfolder=subfolder)
        return cls(**_from_pretrained_kwargs(name_or_path, kwargs, hub))

    def save_pretrained(self, save_directory: str | os.PathLike) -> tuple[str, ...]:
        """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `save_directory`.

        The result loads with this class's from_pretrained and with transformers' AutoTokenizer.
        Returns the paths written.
        """
        config = {
            "tokenizer_class": "BloomTokenizerFast",
            **self.special_tokens_map,
            "add_prefix_space": self.add_prefix_space,
            "clean_up_tokenization_spaces": self.clean_up_tokenization_spaces,
            "model_max_length": self.model_max_length,
            "padding_side": self.padding_side,
            "truncation_side": self.truncation_side,
        }
        if self.additional_special_tokens:
            config["extra_special_tokens"] = self.additional_special_tokens  # transformers 5's key
        return _save_pretrained(save_directory, self._tokenizer, self._lock, config, self.special_tokens_map,
                                self.chat_template)

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

    def _set_special_id(self, name: str, value: Any) -> None:
        token = None if value is None else self._tokenizer.id_to_token(value) if isinstance(value, int) else None
        if value is not None and token is None:
            raise ValueError(f"{name}_id must be None or an id of the vocabulary [0, {len(self)}); got {value!r}")
        self._set_special(name, token)

    # --- adding tokens (then model.resize_token_embeddings(len(tokenizer))) -------------------------
    def add_tokens(self, new_tokens: str | AddedToken | list, special_tokens: bool = False) -> int:
        """Add tokens to the vocabulary (matched whole, never split); returns how many were new."""
        tokens = [new_tokens] if isinstance(new_tokens, (str, AddedToken)) else list(new_tokens)
        for token in tokens:
            if not isinstance(token, (str, AddedToken)) or not str(token):
                raise TypeError(f"add_tokens takes non-empty str or AddedToken values; got {token!r}")
        with self._lock:
            before = len(self)
            if special_tokens:
                self._tokenizer.add_special_tokens(
                    [t if isinstance(t, AddedToken) else AddedToken(t, special=True, normalized=False) for t in tokens])
            else:
                self._tokenizer.add_tokens(tokens)
            return len(self) - before

    def add_special_tokens(self, special_tokens_dict: dict[str, Any],
                           replace_additional_special_tokens: bool = True) -> int:
        """Set bos/eos/unk/pad tokens and/or `additional_special_tokens` (a list), adding those not in the
        vocabulary; returns how many were new (as transformers)."""
        allowed = (*SPECIAL_TOKENS_ATTRIBUTES, "additional_special_tokens")
        unknown = sorted(set(special_tokens_dict) - set(allowed))
        if unknown:
            raise ValueError(f"add_special_tokens: unknown keys {unknown}; expected some of {list(allowed)}")
        before = len(self)
        # the named tokens first, then the additional ones: the ids transformers gives them
        for name, value in sorted(special_tokens_dict.items(), key=lambda kv: kv[0] == "additional_special_tokens"):
            if name == "additional_special_tokens":
                extra = [_token_str(t, name) for t in value]
                self.add_tokens(extra, special_tokens=True)
                kept = [] if replace_additional_special_tokens else self.additional_special_tokens
                self._additional = list(dict.fromkeys(kept + extra))
            else:
                self._set_special(name, value)
        return len(self) - before

    @property
    def additional_special_tokens(self) -> list[str]:
        return list(getattr(self, "_additional", []))

    @additional_special_tokens.setter
    def additional_special_tokens(self, tokens: list) -> None:
        self.add_special_tokens({"additional_special_tokens": list(tokens)})

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
        return list(dict.fromkeys([*self.special_tokens_map.values(), *self.additional_special_tokens]))

    @property
    def all_special_ids(self) -> list[int]:
        return self.convert_tokens_to_ids(self.all_special_tokens)

    @property
    def add_prefix_space(self) -> bool:
        """Whether the ByteLevel pre-tokenizer prepends a space to the input (False for BLOOM)."""
        return bool(_byte_level_prefix_space(self._tokenizer.pre_tokenizer))

    @add_prefix_space.setter
    def add_prefix_space(self, value: bool) -> None:
        _set_add_prefix_space(self._tokenizer, value)

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
            self._check_ids([ids], "ids")
            return self._tokenizer.id_to_token(ids)
        self._check_ids([int(i) for i in ids], "ids")
        skip = set(self.all_special_ids) if skip_special_tokens else set()
        return [self._tokenizer.id_to_token(int(i)) for i in ids if int(i) not in skip]

    def _check_ids(self, ids: list[int], name: str) -> None:
        """Every id names a token: one outside the vocabulary is an error, not silently dropped (decode)
        or None (convert_ids_to_tokens)."""
        size = len(self)
        bad = next((i for i in ids if not 0 <= i < size or self._tokenizer.id_to_token(i) is None), None)
        if bad is not None:
            raise ValueError(f"{name} holds token id {bad}, outside the vocabulary [0, {size})")

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
        text: str | list[str] | tuple[str, ...] | list[tuple[str, str]] | None = None,
        text_pair: str | list[str] | None = None,
        *,
        text_target: str | list[str] | None = None,
        text_pair_target: str | list[str] | None = None,
        add_special_tokens: bool = True,
        padding: bool | str = False,
        truncation: bool | str | None = None,
        max_length: int | None = None,
        pad_to_multiple_of: int | None = None,
        padding_side: str | None = None,
        return_tensors: str | None = None,
        return_attention_mask: bool = True,
        return_token_type_ids: bool | None = None,
        return_special_tokens_mask: bool = False,
        return_offsets_mapping: bool = False,
        return_overflowing_tokens: bool = False,
        stride: int = 0,
    ) -> BatchEncoding:
        """Encode a string, a batch (list) of strings, or pairs of them.

        Args:
            text_pair: the second sequence of each pair (a str beside a str, a list beside a list); pairs
                may also be given as a list of (first, second) in `text`.
            text_target / text_pair_target: targets, encoded the same way; their input_ids become the
                `labels` of the result (the whole result when `text` is None), as in transformers.
            padding: False / "do_not_pad"; True / "longest" (to the longest of the batch); "max_length"
                (to `max_length`, or model_max_length).
            truncation: True / "longest_first" (pairs: the longer one first) / "only_first" / "only_second"
                cut each sequence to `max_length` (or model_max_length) on `truncation_side`; False / None:
                no truncation -- except that, as in transformers, `max_length` given with padding=False
                and truncation=None truncates.
            padding_side: "left" or "right" for this call (default: `self.padding_side`).
            return_tensors: None (python lists) / "pt" (torch int64) / "np" (numpy int64).
            return_token_type_ids: BLOOM's model takes none, so only when asked (0 first, 1 second).
            return_overflowing_tokens: with truncation, what is cut becomes further rows (windows sharing
                `stride` tokens with the previous one) and `overflow_to_sample_mapping` says whose.
        Returns:
            BatchEncoding with `input_ids`, `attention_mask` (unless return_attention_mask=False), and
            `token_type_ids`, `special_tokens_mask`, `offset_mapping`, `labels` if asked. A single string
            (or pair) gives flat lists, or a (1, T) tensor.
        """
        if text is None and text_target is None:
            raise ValueError("give text (the inputs) or text_target (the labels), or both")
        options = dict(add_special_tokens=add_special_tokens, padding=padding, truncation=truncation,
                       max_length=max_length, pad_to_multiple_of=pad_to_multiple_of, padding_side=padding_side,
                       return_tensors=return_tensors, return_attention_mask=return_attention_mask,
                       return_token_type_ids=bool(return_token_type_ids),
                       return_special_tokens_mask=return_special_tokens_mask,
                       return_offsets_mapping=return_offsets_mapping,
                       return_overflowing_tokens=return_overflowing_tokens, stride=stride)
        inputs = None if text is None else self._encode(text, text_pair, **options)
        if text_target is None:
            return inputs
        targets = self._encode(text_target, text_pair_target, **options)
        if inputs is None:
            return targets
        inputs["labels"] = targets["input_ids"]
        return inputs

    def _encode(self, text, text_pair, *, add_special_tokens, padding, truncation, max_length,
                pad_to_multiple_of, padding_side, return_tensors, return_overflowing_tokens, stride,
                **returns) -> BatchEncoding:
        batch, is_batched = _text_batch(text, text_pair)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 0:
            raise ValueError(f"stride must be an int >= 0; got {stride!r}")
        _check_tensor_type(return_tensors)
        pad_strategy, truncate, max_length = _strategies(
            padding,
            truncation,
            max_length,
            pad_to_multiple_of,
            model_max_length=self.model_max_length,
            pad_token=self.pad_token,
            pad_token_id=self.pad_token_id,
        )
        side = _check_side(self.padding_side if padding_side is None else padding_side, "padding_side")
        truncation_side = _check_side(self.truncation_side, "truncation_side")

        with self._lock, _padding_and_truncation(
            self._tokenizer,
            pad_strategy,
            truncate,
            max_length,
            padding_side=side,
            truncation_side=truncation_side,
            pad_id=self.pad_token_id,
            pad_token=self.pad_token,
            pad_to_multiple_of=pad_to_multiple_of,
            stride=stride,
        ):
            _check_encodable(batch)
            encodings = self._tokenizer.encode_batch(batch, add_special_tokens=add_special_tokens)

        if not return_overflowing_tokens:
            return _batch_encoding(encodings, is_batched=is_batched, return_tensors=return_tensors, **returns)
        # as transformers: every window a row of its own, in order (a batch even for one string), and
        # which input each row came from
        windows = [(i, e) for i, encoding in enumerate(encodings) for e in [encoding, *encoding.overflowing]]
        result = _batch_encoding([e for _, e in windows], is_batched=True, return_tensors=return_tensors, **returns)
        mapping = [i for i, _ in windows]
        result["overflow_to_sample_mapping"] = _as_tensor(mapping, return_tensors) if return_tensors else mapping
        return result

    def pad(self, encoded_inputs, padding: bool | str = True, max_length: int | None = None,
            pad_to_multiple_of: int | None = None, padding_side: str | None = None,
            return_attention_mask: bool | None = None, return_tensors: str | None = None) -> BatchEncoding:
        """Pad already-encoded sequences (a BatchEncoding / dict of lists, or a list of dicts, e.g. a
        dataset's rows) as transformers does: input_ids with pad_token_id, attention_mask (made if
        absent, unless return_attention_mask=False; one given is kept) and token_type_ids with 0, special_tokens_mask with
        1; other keys are kept as they are."""
        if isinstance(encoded_inputs, (list, tuple)) and encoded_inputs and isinstance(encoded_inputs[0], dict):
            encoded_inputs = {key: [row[key] for row in encoded_inputs] for key in encoded_inputs[0]}
        if not isinstance(encoded_inputs, dict) or "input_ids" not in encoded_inputs:
            raise ValueError("pad takes a BatchEncoding / dict with input_ids, or a list of such dicts; got "
                             f"{type(encoded_inputs).__name__}")
        _check_tensor_type(return_tensors)
        data = {key: _to_py(value) for key, value in encoded_inputs.items()}
        single = bool(data["input_ids"]) and not isinstance(data["input_ids"][0], list)
        if single:
            data = {key: [value] for key, value in data.items()}
        if return_attention_mask is not False and "attention_mask" not in data:
            data["attention_mask"] = [[1] * len(ids) for ids in data["input_ids"]]
        pad_strategy, _, max_length = _strategies(padding, False, max_length, pad_to_multiple_of,
                                                  model_max_length=self.model_max_length, pad_token=self.pad_token,
                                                  pad_token_id=self.pad_token_id)
        side = _check_side(self.padding_side if padding_side is None else padding_side, "padding_side")
        if pad_strategy is not None:
            target = max_length if pad_strategy == "max_length" else max(map(len, data["input_ids"]), default=0)
            if pad_to_multiple_of:
                target = -(-target // pad_to_multiple_of) * pad_to_multiple_of
            fills = {"input_ids": self.pad_token_id, "attention_mask": 0, "token_type_ids": 0,
                     "special_tokens_mask": 1}
            for key, fill in fills.items():
                if key in data:
                    data[key] = [_padded(row, target, fill, side) for row in data[key]]
        if return_tensors is not None:
            data = {key: _as_tensor(value, return_tensors) if key in PADDED_KEYS else value
                    for key, value in data.items()}
        elif single:
            data = {key: value[0] for key, value in data.items()}
        return BatchEncoding(data)

    def apply_chat_template(
        self,
        conversation,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        chat_template: str | None = None,
        add_generation_prompt: bool = False,
        continue_final_message: bool = False,
        tokenize: bool = True,
        padding: bool | str = False,
        truncation: bool = False,
        max_length: int | None = None,
        return_tensors: str | None = None,
        return_dict: bool = True,
        return_assistant_tokens_mask: bool = False,
        tokenizer_kwargs: dict[str, Any] | None = None,
        **kwargs: Any,
    ):
        """A conversation (a list of {"role", "content"} dicts, or a batch of them) rendered by the chat
        template (`chat_template`, else the tokenizer's) as transformers 5 renders it: the text
        (`tokenize=False`), else its encoding without added special tokens: a BatchEncoding
        (`return_dict=True`, transformers 5's default) or the input_ids. `kwargs` become template
        variables beside the special tokens (bos_token, ...), `messages`, `tools`, `documents` and
        `add_generation_prompt`."""
        template = chat_template if chat_template is not None else self.chat_template
        if template is None:
            raise ValueError("this tokenizer has no chat template (tokenizer.chat_template is None, no "
                             "chat_template.jinja or tokenizer_config.json 'chat_template'); pass chat_template=")
        if return_assistant_tokens_mask:
            raise ValueError("return_assistant_tokens_mask ({% generation %} blocks) is not implemented")
        conversations, batched = split_conversations(conversation)
        variables = {**self.special_tokens_map, **kwargs}
        texts = [render(template, messages, add_generation_prompt=add_generation_prompt,
                        continue_final_message=continue_final_message, tools=tools, documents=documents,
                        **variables) for messages in conversations]
        if not tokenize:
            return texts if batched else texts[0]
        out = self(texts if batched else texts[0], add_special_tokens=False, padding=padding, truncation=truncation,
                   max_length=max_length, return_tensors=return_tensors, **(tokenizer_kwargs or {}))
        return out if return_dict else out["input_ids"]

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
        self._check_ids(token_ids, "token_ids")
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


def _check_encodable(batch: list) -> None:
    """Every text is valid Unicode: a lone surrogate (from a bad decode('utf-8', 'surrogatepass'), say)
    cannot be encoded to UTF-8, and `tokenizers` would reject it with a message about types."""
    for i, item in enumerate(batch):
        for text in (item if isinstance(item, (tuple, list)) else (item,)):
            if isinstance(text, str):
                try:
                    text.encode("utf-8")
                except UnicodeEncodeError as err:
                    where = "" if len(batch) == 1 else f"text {i}: "
                    raise ValueError(f"{where}character {text[err.start]!r} at index {err.start} is a lone "
                                     f"surrogate, not valid Unicode text; it cannot be tokenized") from None
