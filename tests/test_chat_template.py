"""apply_chat_template and the files that carry a chat template and additional special tokens, compared
with transformers' fast tokenizer on the same directory (texts and ids), in both directions of saving."""

from __future__ import annotations

import pytest

from bloom.tokenizer import BloomTokenizerFast
from helpers import BLOOM_CONFIG, train_bloom_like_tokenizer, write_tokenizer_dir

transformers = pytest.importorskip("transformers")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m['role'] == 'system' and not loop.first %}{{ raise_exception('system must come first') }}{% endif %}"
    "<|{{ m['role'] }}|>\n  {{ m['content'] | trim }}{% if not loop.last or not continue_final %}{{ eos_token }}{% endif %}\n"
    "{% endfor %}"
    "{% if tools %}tools: {{ tools | tojson }}\n{% endif %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hello there, café & <b>! "},
        {"role": "assistant", "content": "Hi"}]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    directory = write_tokenizer_dir(tmp_path_factory.mktemp("chat_tok"), train_bloom_like_tokenizer(), BLOOM_CONFIG)
    ref = transformers.AutoTokenizer.from_pretrained(str(directory))
    ref.chat_template = TEMPLATE
    ref.add_special_tokens({"additional_special_tokens": ["<|user|>", "<|assistant|>"]})
    ref.save_pretrained(directory)  # transformers 5 writes chat_template.jinja and extra_special_tokens
    return directory


@pytest.fixture
def pair(tok_dir):
    return BloomTokenizerFast.from_pretrained(tok_dir), transformers.AutoTokenizer.from_pretrained(str(tok_dir))


def _plain(value):
    if hasattr(value, "keys"):
        return {k: _plain(v) for k, v in dict(value).items()}
    return value.tolist() if hasattr(value, "tolist") else value


@pytest.mark.parametrize("kwargs", [
    dict(tokenize=False),
    dict(tokenize=False, add_generation_prompt=True),
    dict(tokenize=False, tools=[{"type": "function", "function": {"name": "f", "description": "é <x>"}}]),
    dict(tokenize=False, continue_final_message=True, continue_final=True),
    dict(),
    dict(add_generation_prompt=True, return_dict=False),
    dict(return_tensors="pt"),
], ids=str)
def test_single_conversation_equals_transformers(pair, kwargs):
    ours, theirs = pair
    assert _plain(ours.apply_chat_template(CHAT, **kwargs)) == _plain(theirs.apply_chat_template(CHAT, **kwargs))


def test_batch_with_padding_equals_transformers(pair):
    ours, theirs = pair
    batch = [CHAT, CHAT[:2]]
    for kwargs in (dict(tokenize=False), dict(padding=True, return_tensors="pt"), dict(return_dict=False)):
        assert _plain(ours.apply_chat_template(batch, **kwargs)) == _plain(theirs.apply_chat_template(batch, **kwargs))


def test_the_template_sees_the_special_tokens_and_keywords(pair):
    ours, _ = pair
    text = ours.apply_chat_template(CHAT[1:2], tokenize=False, chat_template="{{ bos_token }}|{{ flavour }}")
    assert text == f"{ours.bos_token}|"  # an undefined variable renders empty, as in transformers
    assert ours.apply_chat_template(CHAT[1:2], tokenize=False, chat_template="{{ flavour }}", flavour="mint") == "mint"
    ids = ours.apply_chat_template(CHAT[1:2], return_dict=False, chat_template="<|user|>")
    assert ids == [ours.convert_tokens_to_ids("<|user|>")]  # an additional special token stays one id


def test_files_round_trip_both_ways(pair, tmp_path):
    ours, _ = pair
    assert ours.chat_template == TEMPLATE and ours.additional_special_tokens == ["<|user|>", "<|assistant|>"]
    ours.save_pretrained(tmp_path / "ours")
    assert (tmp_path / "ours" / "chat_template.jinja").read_text() == TEMPLATE
    back = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "ours"))
    assert back.chat_template == TEMPLATE
    assert list(back.extra_special_tokens) == ["<|user|>", "<|assistant|>"]
    again = BloomTokenizerFast.from_pretrained(tmp_path / "ours")
    assert again.chat_template == TEMPLATE and again.additional_special_tokens == ours.additional_special_tokens


def test_transformers_4_style_config_keys(tmp_path):
    """tokenizer_config.json with "chat_template" (a string, or 4.x's named list) and
    "additional_special_tokens"."""
    import json

    directory = write_tokenizer_dir(tmp_path / "t4", train_bloom_like_tokenizer(), BLOOM_CONFIG)
    config = json.loads((directory / "tokenizer_config.json").read_text())
    config["chat_template"] = [{"name": "default", "template": "D{{ messages | length }}"},
                               {"name": "tool_use", "template": "T"}]
    config["additional_special_tokens"] = ["<extra>"]
    (directory / "tokenizer_config.json").write_text(json.dumps(config))
    tok = BloomTokenizerFast.from_pretrained(directory)
    assert tok.apply_chat_template(CHAT, tokenize=False) == "D3"
    assert tok.additional_special_tokens == ["<extra>"] and tok.tokenize("a<extra>b")[1] == "<extra>"


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(chat_template=None), ValueError, "no chat template"),
    (dict(add_generation_prompt=True, continue_final_message=True), ValueError, "not compatible"),
    (dict(return_assistant_tokens_mask=True), ValueError, "not implemented"),
    (dict(tools=[print]), ValueError, "tools must be a list of JSON-schema dicts"),
], ids=str)
def test_refusals(pair, kwargs, error, match):
    ours, _ = pair
    if "chat_template" in kwargs:
        ours.chat_template = None
    with pytest.raises(error, match=match):
        ours.apply_chat_template(CHAT, **kwargs)


def test_template_errors_and_the_sandbox(pair):
    import jinja2

    ours, _ = pair
    with pytest.raises(jinja2.exceptions.TemplateError, match="system must come first"):
        ours.apply_chat_template([CHAT[1], CHAT[0]], tokenize=False)
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(CHAT, tokenize=False, chat_template="{{ messages.__class__.__mro__ }}"
                                 "{{ ''.__class__.__subclasses__() }}")
    with pytest.raises(ValueError, match="must be a list of messages"):
        ours.apply_chat_template("hello", tokenize=False)
